"""Lightning callbacks that keep a run folder readable while the run goes on."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback

from caitlab.runs import Summary


class SummaryCallback(Callback):
    """Keeps ``summary.json`` current at every validation, so sweeps can be read live."""

    def __init__(self, summary: Summary, wall_before: float, t0: float) -> None:
        self.summary, self.wall_before, self.t0 = summary, wall_before, t0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        values: dict[str, Any] = {"epochs": trainer.current_epoch + 1,
                                  "global_step": trainer.global_step,
                                  "wall_s": self.wall_before + time.time() - self.t0}
        top1 = metrics.get("val/top1")
        if top1 is not None:
            top1 = float(top1)
            best = self.summary.get("val/top1_best")
            values["val/top1"] = top1
            values["val/top1_best"] = top1 if best is None else max(best, top1)
        # validation runs before on_train_epoch_end: read the epoch's throughput directly
        if getattr(pl_module, "images_per_s", None) is not None:
            values["images_per_s"] = pl_module.images_per_s
        self.summary.update(**values)
