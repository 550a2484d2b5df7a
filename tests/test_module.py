"""The Lightning module's recipe: param groups, lr scaling, schedule, mixup, EMA, divergence."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from caitlab.config import EmaConfig, OptimConfig, RecipeConfig, SchedConfig, TrainConfig
from caitlab.data import DigitsDataModule
from caitlab.models import create_model
from caitlab.training.module import ClassificationModule, DivergedError, TopKAccuracy


def _module(**cfg) -> ClassificationModule:
    torch.manual_seed(0)
    model = create_model("cait_tiny", embed_dim=32, depth=2)
    return ClassificationModule(model, num_classes=10, cfg=TrainConfig(**cfg), batch_size=64)


def _trainer(**kwargs) -> L.Trainer:
    args = dict(max_epochs=2, limit_train_batches=5, limit_val_batches=2, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**args, **kwargs})


def test_no_weight_decay_on_norms_biases_gammas_pos_embed_and_class_token():
    module = _module()
    module.trainer = _trainer()  # configure_optimizers reads the world size
    optimizer = module.configure_optimizers()["optimizer"]
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in module.model.named_parameters():
        exempt = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert (id(p) in decay) != exempt, name
    assert any("gamma" in n for n, _ in module.model.named_parameters())


def test_learning_rate_scales_with_global_batch_as_in_deit():
    module = _module(optim=OptimConfig(lr=5e-4, scale_lr=True), sched=SchedConfig(name="constant"))
    module.trainer = _trainer(accumulate_grad_batches=2)
    optimizer = module.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 64 * 2 / 512)
    module = _module(optim=OptimConfig(lr=5e-4, scale_lr=False), sched=SchedConfig(name="constant"))
    module.trainer = _trainer()
    assert module.configure_optimizers().param_groups[0]["lr"] == pytest.approx(5e-4)


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    dm = DigitsDataModule(batch_size=64)
    module = _module(optim=OptimConfig(lr=1e-3, scale_lr=False),
                     sched=SchedConfig(warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-5))
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(max_epochs=4, callbacks=[Record()], limit_val_batches=0).fit(module, dm)
    steps = len(lrs)
    assert steps == 20
    assert lrs[0] == pytest.approx(1e-6)
    peak = max(lrs)
    assert lrs.index(peak) in (4, 5) and peak == pytest.approx(1e-3, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:], strict=False))  # decays after warmup
    assert lrs[-1] < 0.05 * peak


def test_mixup_cutmix_trains_with_soft_targets_and_ema_follows():
    dm = DigitsDataModule(batch_size=64, drop_last=True)
    module = _module(recipe=RecipeConfig(mixup=0.8, cutmix=1.0),
                     ema=EmaConfig(enabled=True, decay=0.9))
    assert type(module.train_loss).__name__ == "SoftTargetCrossEntropy"
    before = [p.detach().clone() for p in module.ema.module.parameters()]
    _trainer().fit(module, dm)
    after = list(module.ema.module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    # the EMA is an average, not a copy, of the trained weights
    trained = list(module.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, trained, strict=True))
    assert module._eval_model() is module.ema.module


def test_non_finite_loss_raises_diverged_with_step_and_epoch():
    dm = DigitsDataModule(batch_size=64)
    module = _module()

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= 7:
                batch[0].fill_(float("nan"))

    with pytest.raises(DivergedError) as err:
        _trainer(callbacks=[Poison()]).fit(module, dm)
    assert err.value.step == 7 and err.value.epoch == 1
    assert "loss became nan at step 7 (epoch 1)" in str(err.value)


class _PoisonFrom(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            batch[0].fill_(float("nan"))


def test_deferred_divergence_check_reports_the_same_step_and_saves_no_poisoned_weights(
        tmp_path):
    """On CUDA the check reads a device flag at logging steps and epoch ends instead of
    syncing every step; forced here on the CPU, it names the same step and epoch, and a
    checkpoint due after the poisoned step is refused before it is written."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = DigitsDataModule(batch_size=64)
    module = _module()
    module.defer_divergence_check = True
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1,
                                 save_top_k=-1, monitor=None)
    with pytest.raises(DivergedError) as err:
        _trainer(callbacks=[_PoisonFrom(7), every_step], log_every_n_steps=50,
                 enable_checkpointing=True).fit(module, dm)
    assert err.value.step == 7 and err.value.epoch == 1
    assert "loss became nan at step 7 (epoch 1)" in str(err.value)
    saved = sorted(int(p.stem.split("=")[1]) for p in tmp_path.glob("*.ckpt"))
    assert saved == list(range(1, 8))  # step 8's weights (the poisoned update's) are not there
    for path in tmp_path.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path.name


def test_a_tolerated_non_finite_step_keeps_the_check_synchronous():
    module = _module(recipe=RecipeConfig(max_nonfinite_steps=1))
    module.trainer = _trainer()
    module.setup("fit")
    assert module.defer_divergence_check is False  # skipping needs the answer at once
    module = _module()
    module.trainer = _trainer()
    module.setup("fit")
    assert module.defer_divergence_check is False  # on the CPU a check costs no sync


@pytest.mark.parametrize("classes", [10, 3])
def test_topk_accuracy_is_torchmetrics_micro_accuracy(classes):
    from torchmetrics.classification import MulticlassAccuracy

    gen = torch.Generator().manual_seed(0)
    ours = TopKAccuracy(classes, prefix="train/")
    ks = (1, 5) if classes >= 5 else (1,)
    theirs = {k: MulticlassAccuracy(classes, top_k=k, average="micro") for k in ks}
    for batch in (64, 64, 17):
        logits = torch.randn(batch, classes, generator=gen)
        target = torch.randint(0, classes, (batch,), generator=gen)
        ours.update(logits, target)
        for metric in theirs.values():
            metric.update(logits, target)
    got = ours.compute()
    assert sorted(got) == [f"train/top{k}" for k in ks]
    for k, metric in theirs.items():
        assert got[f"train/top{k}"].item() == pytest.approx(metric.compute().item(), abs=1e-6)
    assert 0.0 < got["train/top1"].item() < 1.0
    ours.reset()
    assert ours.total.item() == 0


def test_bounded_non_finite_steps_are_skipped():
    dm = DigitsDataModule(batch_size=64)
    module = _module(recipe=RecipeConfig(max_nonfinite_steps=2))
    calls = []

    class PoisonTwice(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            calls.append(batch_idx)
            if len(calls) in (2, 3):
                batch[0].fill_(float("nan"))

    _trainer(max_epochs=1, callbacks=[PoisonTwice()]).fit(module, dm)
    assert module.nonfinite_steps == 2
    # a NaN loss would have made NaN gradients and NaN weights: the skipped steps made no update
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_the_loss_mean_is_weighted_by_batch_size():
    from caitlab.training.module import WeightedMean

    mean = WeightedMean()
    mean.update(torch.tensor(1.0), weight=1)
    mean.update(torch.tensor(3.0), weight=3)
    assert mean.compute().item() == pytest.approx(2.5)


def test_steady_training_steps_read_nothing_back_from_the_device(tmp_path):
    """On a GPU a scalar read (``.item()``, ``bool(tensor)``) waits for the device; the
    training step and its batch end make none but on the steps the loggers write and at
    the epoch's last batch (the deferred divergence check)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from caitlab import compat

    class ScalarReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                ScalarReads.count += 1
            return func(*args, **(kwargs or {}))

    module = _module(ema=EmaConfig(enabled=True, decay=0.9))
    module.defer_divergence_check = True  # what a CUDA run decides in setup
    reads: dict[int, int] = {}
    quiet: list[int] = []

    def counted(method, batch_idx_at: int):
        def run(*args, **kwargs):
            step = args[batch_idx_at]  # one epoch: the batch's index is its step
            before = ScalarReads.count
            with ScalarReads():
                out = method(*args, **kwargs)
            reads[step] = reads.get(step, 0) + ScalarReads.count - before
            return out
        return run

    module.training_step = counted(module.training_step, 1)
    module.on_train_batch_end = counted(module.on_train_batch_end, 2)

    class Quiet(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            last = batch_idx + 1 >= trainer.num_training_batches
            if batch_idx > 0 and not last and not compat.logs_this_step(trainer):
                quiet.append(batch_idx)

    trainer = _trainer(max_epochs=1, limit_train_batches=12, limit_val_batches=0,
                       log_every_n_steps=5, callbacks=[Quiet()],
                       logger=L.pytorch.loggers.CSVLogger(tmp_path))
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert len(quiet) >= 6
    assert {step: reads[step] for step in quiet} == dict.fromkeys(quiet, 0)
    assert reads[11] > 0  # the last batch does read: the count sees what it should


def _replay(sched: SchedConfig, peak: float, epochs: int, steps_per_epoch: int = 10) -> list:
    """The lr of every step of a run, as the module's schedule gives it."""
    from caitlab.training.module import cosine_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    total = epochs * steps_per_epoch
    scheduler, _ = cosine_schedule(optimizer, sched, peak, total, steps_per_epoch)
    lrs = []
    for step in range(total):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_the_384_finetune_lr_warms_up_then_stays_flat_as_deits_command():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from caitlab.resolvers import register_resolvers
    from caitlab.train import CONF_DIR

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=cait_finetune_384", "data.root=/x"])
    stage = cfg.stages.finetune
    # trainer=ddp: 8 devices x 64 images = DeiT's 512, so the lr is the stage's own
    assert cfg.trainer.devices * cfg.data.batch_size == 512
    sched = SchedConfig(warmup_epochs=cfg.sched.warmup_epochs, warmup_lr=cfg.sched.warmup_lr,
                        min_lr=stage["sched.min_lr"])
    lrs = _replay(sched, stage["optim.lr"], stage["trainer.max_epochs"])
    assert lrs[0] == pytest.approx(1e-6) and cfg.sched.warmup_epochs == 5
    assert lrs[50:] == pytest.approx([5e-6] * len(lrs[50:]))
    assert max(lrs) <= 5e-6 * (1 + 1e-9)


def test_a_floor_above_the_peak_is_capped_and_said():
    from caitlab.config import lr_floor

    assert lr_floor(SchedConfig(min_lr=1e-5), 5e-6) == (
        5e-6, "sched.min_lr=1e-05 is above the peak lr 5e-06: the cosine ends at the peak "
              "instead (the lr stays flat after the warm-up)")
    assert lr_floor(SchedConfig(min_lr=1e-5), 5e-4) == (1e-5, None)


def test_the_floor_is_not_scaled_with_the_batch_as_in_deit():
    # lr 5e-4 per 512 at a global batch of 128: peak 1.25e-4, floor still DeiT's 1e-5
    lrs = _replay(SchedConfig(warmup_epochs=1, min_lr=1e-5), 1.25e-4, epochs=20)
    assert lrs[-1] == pytest.approx(1e-5, rel=0.01)
