"""The Lightning module's recipe: param groups, lr scaling, schedule, mixup, EMA, divergence."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from caitlab.config import EmaConfig, OptimConfig, RecipeConfig, SchedConfig, TrainConfig
from caitlab.data import DigitsDataModule
from caitlab.models import create_model
from caitlab.training.module import ClassificationModule, DivergedError


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
