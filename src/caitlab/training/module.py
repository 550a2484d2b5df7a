"""The Lightning module: DeiT's recipe around any model of the family.

Pieces come from the libraries that already have them: timm's optimizer factory (no weight
decay on norms, biases, gammas, position embedding, class token), cosine scheduler, Mixup /
CutMix, soft-target loss and EMA; torchmetrics' metric base (ranks synchronised at epoch
end) and mean.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol, TypeGuard, cast

import lightning as L
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from caitlab import compat
from caitlab.config import TrainConfig, lr_floor
from caitlab.console import say
from caitlab.data.sampling import dist_rank_world
from caitlab.training.distillation import DistillationLoss
from caitlab.training.metrics import TopKAccuracy, WeightedMean
from caitlab.training.preemption import rng_state, set_rng_state

log = logging.getLogger("caitlab")


class DivergedError(RuntimeError):
    """The loss became non-finite (more often than ``recipe.max_nonfinite_steps`` allows)."""

    def __init__(self, step: int, epoch: int, value: float) -> None:
        super().__init__(f"loss became {value} at step {step} (epoch {epoch})")
        self.step, self.epoch, self.value = step, epoch, value


class _Distilled(Protocol):
    """A model with a distillation token (caitlab's ``ImageTransformer``), as used here."""

    def set_distilled_training(self, enable: bool = True) -> None: ...

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _has_dist_token(model: nn.Module) -> TypeGuard[_Distilled]:
    return getattr(model, "dist_token", None) is not None


def cosine_schedule(optimizer: torch.optim.Optimizer, sched: Any, peak: float, total: int,
                    steps_per_epoch: float) -> tuple[CosineLRScheduler, str | None]:
    """DeiT's schedule, per step: a linear warm-up from ``sched.warmup_lr`` to the ``peak`` lr,
    then a cosine down to ``sched.min_lr`` (unscaled, capped at the peak: ``lr_floor``).

    Parameters:
        optimizer: its lr is the peak.
        sched: ``caitlab.config.SchedConfig``.
        peak: the lr after warm-up (``optim.lr``, scaled with the batch where asked).
        total: the optimizer steps of the run; ``steps_per_epoch``: per epoch.
    Returns:
        The scheduler (driven by ``step_update``), and the line saying the floor was capped.
    """
    floor, note = lr_floor(sched, peak)
    warmup = min(int(round(sched.warmup_epochs * steps_per_epoch)), total - 1)
    # warmup_prefix: the cosine starts at the peak lr once warmup is over
    return CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=floor, warmup_t=warmup,
                             warmup_lr_init=sched.warmup_lr, warmup_prefix=True,
                             t_in_epochs=False), note


class ClassificationModule(L.LightningModule):
    teacher: nn.Module | None  # kept in __dict__ (__init__): no submodule

    def __init__(self, model: nn.Module, num_classes: int, cfg: TrainConfig | None = None,
                 batch_size: int = 128, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg or TrainConfig()
        self.num_classes = num_classes
        self.batch_size = batch_size
        recipe = self.cfg.recipe
        self.mixup = (
            Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                  switch_prob=recipe.mixup_switch_prob, label_smoothing=recipe.label_smoothing,
                  num_classes=num_classes)
            if recipe.mixes else None
        )
        # mixup's soft targets; hard labels take F.cross_entropy (_base_loss)
        self.train_loss = SoftTargetCrossEntropy() if self.mixup else None
        d = self.cfg.distillation
        self.distill = DistillationLoss(self._base_loss, d.type, d.alpha, d.tau)
        # the teacher is no submodule: checkpoints, the optimizer, EMA and train() leave it be
        self.__dict__["teacher"] = teacher
        if teacher is not None and _has_dist_token(model):
            model.set_distilled_training(True)  # before torch.compile sees the model
        # validate_args=False: the inputs are the model's own logits and the data's labels,
        # and the checks cost as much as the update itself
        self.head_metrics = nn.ModuleDict(
            {f"{stage}_{head}": MulticlassAccuracy(num_classes, top_k=1, average="micro",
                                                   validate_args=False)
             for stage in ("val", "test") for head in ("cls", "dist")}
        ) if _has_dist_token(model) else None
        self.train_metrics = TopKAccuracy(num_classes, prefix="train/")
        self.val_metrics = TopKAccuracy(num_classes, prefix="val/")
        self.test_metrics = TopKAccuracy(num_classes, prefix="test/")
        # Losses are averaged on the device too (weighted by batch size) and synchronised
        # across ranks once, at epoch end, like the accuracies.
        self.train_loss_mean = WeightedMean()
        self.val_loss_mean = WeightedMean()
        self.test_loss_mean = WeightedMean()
        self.ema = ModelEmaV3(model, decay=self.cfg.ema.decay) if self.cfg.ema.enabled else None
        if self.ema is not None:
            # the average is no parameter to train: under DDP a submodule whose parameters
            # want gradients but get none stops the first step ("parameters that were not
            # used in producing the loss")
            self.ema.requires_grad_(False)
        self.nonfinite_steps = 0
        # None: decided in setup (on CUDA when no non-finite step is tolerated)
        self.defer_divergence_check: bool | None = None
        self._nonfinite_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (step, value)
        self._epoch_images = 0
        self._epoch_t0: float | None = None
        self._epoch_t1 = 0.0

    # --- steps -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None and self.cfg.ema.evaluate else self.model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        targets = y
        # timm's Mixup pairs each image with its mirror in the batch: it needs an even batch.
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, targets = self.mixup(x, y)
        outputs = self.model(x)  # (cls, dist) logits in a distilled training with the token
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        loss = (self.distill(outputs, targets, teacher_logits) if self.teacher is not None
                else self._base_loss(outputs, targets))
        logits = (outputs[0] + outputs[1]) / 2 if isinstance(outputs, tuple) else outputs
        if self.defer_divergence_check:
            self._note_nonfinite(loss)
        elif self._nonfinite_on_any_rank(loss):
            self.nonfinite_steps += 1
            if self.nonfinite_steps > self.cfg.recipe.max_nonfinite_steps:
                raise DivergedError(self.global_step, self.current_epoch, loss.item())
            return None  # Lightning skips backward and the optimizer step
        # Metrics accumulate on the device every step; Lightning's self.log costs about a
        # millisecond a call on the CPU, so it runs only on the steps the loggers write
        # (trainer.log_every_n_steps) and once per epoch, never once per step.
        self.train_metrics.update(logits.detach(), y)
        self.train_loss_mean.update(loss.detach(), weight=x.shape[0])
        if self._logs_this_step():
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False,
                     prog_bar=True)
        self._epoch_images += x.shape[0]
        return loss

    def _nonfinite_on_any_rank(self, loss: torch.Tensor) -> bool:
        """Whether the step's loss is non-finite on this rank or any other: every rank skips
        the step, or raises, together (one rank alone would leave the others waiting in the
        gradients' all-reduce)."""
        bad = ~torch.isfinite(loss.detach())
        if dist_rank_world()[1] > 1:
            bad = bad.to(torch.int32)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad)

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Records the first non-finite loss on the device, without the device sync that
        ``if not torch.isfinite(loss)`` costs every step; :meth:`_check_diverged` reads it.

        Only where no non-finite step is tolerated: skipping a step needs its answer at once.
        The poisoned step's update is made, but the run is diverged whatever follows, and no
        checkpoint is written before the check (``on_save_checkpoint``)."""
        loss = loss.detach()
        if self._nonfinite_at is None:
            self._nonfinite_at = (torch.full((), -1, dtype=torch.long, device=loss.device),
                                  torch.zeros((), dtype=torch.float32, device=loss.device))
        step, value = self._nonfinite_at
        first = ~torch.isfinite(loss) & (step < 0)
        self._nonfinite_at = (torch.where(first, self.global_step, step),
                              torch.where(first, loss.float(), value))

    def _check_diverged(self) -> None:
        """Raises :class:`DivergedError` for a non-finite loss :meth:`_note_nonfinite` saw, on
        this rank or any other (the earliest step of any): every rank calls this at the same
        steps, and all raise together."""
        if self._nonfinite_at is None:
            return
        step, value = self._nonfinite_at
        seen = torch.stack([step.double(), value.double()])
        if dist_rank_world()[1] > 1:
            # a tensor's gather is a tensor (Lightning types it as any collection's)
            ranks = cast(torch.Tensor, self.all_gather(seen)).reshape(-1, 2)
            found = ranks[ranks[:, 0] >= 0]
            seen = found[found[:, 0].argmin()] if len(found) else seen
        if seen[0].item() >= 0:  # the one device sync, at logging steps and epoch ends
            raise DivergedError(int(seen[0].item()), self.current_epoch, seen[1].item())

    def _base_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The recipe's loss: soft targets after mixup; hard labels (smoothed) otherwise, and
        where an odd batch was left unmixed (the functional form: the module's call costs
        more, every step)."""
        if targets.ndim == 2:
            assert self.train_loss is not None  # soft targets come from mixup
            return self.train_loss(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.recipe.label_smoothing)

    def on_fit_start(self) -> None:
        if self.teacher is not None:  # the student's device and dtype (bf16-true included)
            dtype = next(self.model.parameters()).dtype
            self.teacher.to(device=self.device, dtype=dtype)

    on_test_start = on_fit_start  # a test-only run (trainer.test) needs it there too

    def _logs_this_step(self) -> bool:
        # Lightning's own rule (log_every_n_steps, counted in optimizer steps), so every
        # value logged here is one the loggers write.
        trainer = compat.attached_trainer(self)
        return trainer is not None and compat.logs_this_step(trainer)

    def _eval_step(self, batch: Any, metrics: TopKAccuracy, loss_mean: WeightedMean,
                   stage: str) -> None:
        x, y = batch
        model = self._eval_model()
        if self.head_metrics is not None:  # DeiT: the heads' mean predicts; each is logged
            # head_metrics exist for a model with a distillation token (__init__)
            cls, dist = cast(_Distilled, model).forward_heads(x)
            logits = (cls + dist) / 2
            self._head_metric(f"{stage}_cls").update(cls, y)
            self._head_metric(f"{stage}_dist").update(dist, y)
        else:
            logits = model(x)
        metrics.update(logits, y)
        loss_mean.update(F.cross_entropy(logits, y), weight=x.shape[0])

    def _log_heads(self, stage: str) -> None:
        if self.head_metrics is None:
            return
        for head in ("cls", "dist"):
            metric = self._head_metric(f"{stage}_{head}")
            self.log(f"{stage}/top1_{head}", metric.compute(), sync_dist=True)
            metric.reset()

    def _head_metric(self, name: str) -> Metric:
        """``head_metrics[name]``: torch's ModuleDict is not generic (it types items Module)."""
        assert self.head_metrics is not None
        return cast(Metric, self.head_metrics[name])

    def _log_epoch(self, metrics: Metric, loss_mean: WeightedMean, loss_name: str,
                   prog_bar: bool = False) -> None:
        """Logs the epoch's values (compute() synchronises ranks) and resets for the next.
        Callers skip epochs without a single update (every step skipped as non-finite)."""
        values = {**metrics.compute(), loss_name: loss_mean.compute()}
        # compute() already synchronised ranks; sync_dist averages equal values (a no-op)
        # and keeps Lightning's epoch-level DDP warning quiet
        self.log_dict(values, prog_bar=prog_bar, sync_dist=True)
        metrics.reset()
        loss_mean.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss_mean, "val")

    def on_validation_epoch_end(self) -> None:
        if self.val_loss_mean.update_count:
            self._log_heads("val")
            self._log_epoch(self.val_metrics, self.val_loss_mean, "val/loss", prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss_mean, "test")

    def on_test_epoch_end(self) -> None:
        if self.test_loss_mean.update_count:
            self._log_heads("test")
            self._log_epoch(self.test_metrics, self.test_loss_mean, "test/loss")

    # --- throughput: training images per second of training-step time ---------------------

    def on_train_epoch_start(self) -> None:
        self._epoch_images, self._epoch_t0 = 0, None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._epoch_t0 is None:
            self._epoch_t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = compat.attached_trainer(self)
        last = trainer is None or batch_idx + 1 >= trainer.num_training_batches
        # every epoch's last batch is checked, so a bad step is in the epoch it reports
        if self.defer_divergence_check and (last or self._logs_this_step()):
            self._check_diverged()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        if last and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the epoch's clock stops when its work has
        self._epoch_t1 = time.perf_counter()

    @property
    def images_per_s(self) -> float | None:
        """Training throughput of the current (or last) epoch, all ranks together."""
        if self._epoch_t0 is None or self._epoch_images == 0:
            return None
        seconds = max(self._epoch_t1 - self._epoch_t0, 1e-9)
        trainer = compat.attached_trainer(self)
        world = trainer.world_size if trainer is not None else 1
        return self._epoch_images * world / seconds

    def on_train_epoch_end(self) -> None:
        if self.train_loss_mean.update_count:
            self._log_epoch(self.train_metrics, self.train_loss_mean, "train/loss_epoch")
        ips = self.images_per_s
        if ips is not None and self._epoch_t0 is not None:  # (no ips without a start time)
            self.log("perf/images_per_s", ips, on_epoch=True)
            self.log("perf/epoch_time_s", self._epoch_t1 - self._epoch_t0, on_epoch=True)

    def setup(self, stage: str) -> None:
        cuda = self.trainer.strategy.root_device.type == "cuda"
        if self.defer_divergence_check is None:
            self.defer_divergence_check = cuda and self.cfg.recipe.max_nonfinite_steps == 0
        if cuda:
            # TF32 tensor cores for the fp32 matmuls that bf16 autocast leaves in fp32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # --- optimisation ----------------------------------------------------------------------

    def global_batch_size(self) -> int:
        trainer = compat.attached_trainer(self)
        if trainer is None:
            return self.batch_size
        return self.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    # Any: Lightning's OptimizerLRScheduler admits torch's schedulers only, and this one is
    # timm's (stepped by lr_scheduler_step)
    def configure_optimizers(self) -> Any:
        optim = self.cfg.optim
        lr = optim.lr * self.global_batch_size() / 512 if optim.scale_lr else optim.lr
        kwargs: dict[str, Any] = ({"betas": optim.betas, "eps": optim.eps}
                                  if optim.name != "sgd" else {})
        if optim.name == "adamw":
            fused = optim.fused
            if fused is None:  # torch would pick foreach; the fused kernel is faster on GPU
                fused = next(self.model.parameters()).is_cuda or None
            if fused is not None:
                kwargs["fused"] = fused
        optimizer = create_optimizer_v2(self.model, opt=optim.name, lr=lr,
                                        weight_decay=optim.weight_decay, **kwargs)
        sched = self.cfg.sched
        if sched.name == "constant":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler, note = cosine_schedule(optimizer, sched, lr, total,
                                          total / max(self.trainer.max_epochs or 1, 1))
        if note and self.global_rank == 0:
            say(log, note)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # timm schedulers are driven by the number of updates done, not by .step()
        scheduler.step_update(num_updates=self.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._logs_this_step():
            self.log("lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip = self.cfg.optim.clip_grad or gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # --- checkpoints carry what Lightning does not know about -------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.defer_divergence_check:
            self._check_diverged()  # never a checkpoint of weights a non-finite step made
        # RNG states too, every rank's (under DDP each draws its own, seed + rank, and rank 0
        # writes the file): a resumed run draws the same dropout/drop-path/mixup as one that
        # never stopped.
        rng = rng_state()
        by_rank: list[Any] = [rng]
        world = dist_rank_world()[1]
        if world > 1:
            by_rank = [None] * world
            torch.distributed.all_gather_object(by_rank, rng)
        checkpoint["caitlab"] = {"nonfinite_steps": self.nonfinite_steps,
                                 "model_config": getattr(self.model, "config", None),
                                 "rng": by_rank[0], "rng_by_rank": by_rank}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("caitlab", {})
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        rank, world = dist_rank_world()
        by_rank = state.get("rng_by_rank") or ([state["rng"]] if "rng" in state else [])
        # on another number of ranks no state is this rank's: it keeps its seed's draws
        if len(by_rank) == world:
            set_rng_state(by_rank[rank])
