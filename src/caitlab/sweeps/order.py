"""The grid's order recorded at a sweep's first launch: ``sweep_order.yaml`` in the sweep
folder, key -> values as that launch listed them. ``caitlab-report`` takes its default
baseline (each key's first value) from it, so a re-launch that lists the values in another
order, or only some of them, does not move the baseline: Hydra's ``multirun.yaml`` is
rewritten by every launch. A later launch only appends the keys and values the record lacks.

Hydra calls :class:`RecordOrder` (``hydra.callbacks`` in ``conf/hydra/default.yaml``) as a
multirun starts, before any job.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from caitlab.config import container
from caitlab.record.sweep import ORDER_FILE, order_of


def record(sweep_dir: Path, order: dict[str, list[str]]) -> dict[str, list[str]]:
    """Merges ``order`` into the sweep's record: what it holds keeps its place, new keys and
    values go last. Returns the record as written (unchanged files are not rewritten)."""
    path = Path(sweep_dir) / ORDER_FILE
    saved = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    merged = {str(k): [str(x) for x in v] for k, v in saved.items()}
    for key, values in order.items():
        have = merged.setdefault(key, [])
        have += [v for v in values if v not in have]
    if merged != saved:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{ORDER_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:  # a reader never sees half a record
            yaml.safe_dump(merged, f, sort_keys=False)
        os.replace(tmp, path)
    return merged


class RecordOrder(Callback):
    """Writes (or extends) ``sweep_order.yaml`` as a multirun starts."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        saved = container(config, resolve=False)
        record(Path(str(config.hydra.sweep.dir)), order_of(saved))
