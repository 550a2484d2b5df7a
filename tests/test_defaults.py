"""Defaults that give a real result: the bare command trains, short runs still warm up, and
each dataset gets the recipe that goes with it."""

from __future__ import annotations

import csv
import json

import pytest

from caitlab.config import ConfigError, SchedConfig, check_choice, fit_warmup
from conftest import caitlab_train
from test_config import _compose


def _run(out):
    (run,) = [p.parent for p in (out / "default").glob("*/summary.json")]
    return run, json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_bare_caitlab_train_reaches_90_percent_on_digits(tmp_path):
    caitlab_train(tmp_path, fresh=True)  # the README's first command, as it is (wandb offline)
    _, summary = _run(tmp_path)
    assert summary["status"] == "completed"
    assert summary["epochs"] == 30
    assert summary["test/top1"] >= 0.90, summary["test/top1"]


@pytest.mark.slow
def test_run_shorter_than_its_warmup_says_so_and_reaches_its_lr(tmp_path):
    proc = caitlab_train(tmp_path, "trainer.max_epochs=2", "logger=csv",
                         "trainer.log_every_n_steps=1")
    line = ("sched.warmup_epochs=3 is more than half of trainer.max_epochs=2: "
            "warming up for 1 epochs instead")
    assert (proc.stdout + proc.stderr).count(line) == 1, proc.stdout + proc.stderr
    run, summary = _run(tmp_path)
    assert summary["status"] == "completed"
    with open(run / "metrics.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")]
    steps_per_epoch = len(lrs) // 2
    peak = max(lrs)
    assert peak == pytest.approx(2e-3, rel=0.05)  # the digits recipe's lr, reached ...
    assert abs(lrs.index(peak) - steps_per_epoch) <= 1  # ... after one epoch of warm-up
    assert lrs[-1] < 0.1 * peak


def test_fit_warmup_leaves_runs_long_enough_alone():
    sched = SchedConfig(warmup_epochs=5)
    assert fit_warmup(sched, 300) is None and sched.warmup_epochs == 5
    assert fit_warmup(sched, 10) is None and sched.warmup_epochs == 5
    assert "trainer.max_epochs=3" in fit_warmup(sched, 3) and sched.warmup_epochs == 1.5
    constant = SchedConfig(name="constant", warmup_epochs=5)
    assert fit_warmup(constant, 1) is None


def test_each_dataset_gets_its_recipe():
    digits = _compose()
    assert (digits.optim.lr, digits.optim.scale_lr, digits.sched.warmup_epochs,
            digits.trainer.max_epochs) == (2e-3, False, 3, 30)
    # ImageNet-style data keeps DeiT's lr rule (5e-4 per 512 images, 5 warm-up epochs)
    folder = _compose("data=imagefolder", "data.root=/x", "model=deit_small_patch16_224")
    assert (folder.optim.lr, folder.optim.scale_lr, folder.sched.warmup_epochs) == \
        (5e-4, True, 5)
    deit = _compose("recipe=deit")
    assert (deit.optim.lr, deit.optim.scale_lr, deit.trainer.max_epochs, deit.recipe.mixup,
            deit.recipe.cutmix, deit.recipe.label_smoothing) == (5e-4, True, 300, 0.8, 1.0, 0.1)
    # an experiment's own values win over the recipe
    demo = _compose("experiment=demo")
    assert demo.sched.warmup_epochs == 3 and demo.trainer.max_epochs == 30


def test_mistyped_recipe_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="recipe=digitz is not an option of recipe; "
                                          "did you mean digits"):
        check_choice("recipe", "digitz", ["deit", "digits"], given=True)
    check_choice("recipe", "imagefolder", ["deit", "digits"], given=False)  # data's own: none
    proc = caitlab_train(tmp_path, "recipe=digitz", check=False)
    assert proc.returncode == 2
    assert "recipe=digitz is not an option of recipe; did you mean digits?" in proc.stderr
    assert not list(tmp_path.glob("default/*/summary.json"))


def test_cait_recipe_is_deits_for_400_epochs_evaluated_at_crop_1():
    deit = _compose("recipe=deit", "data=imagefolder", "data.root=/x",
                    "model=deit_small_patch16_224")
    cait = _compose("recipe=cait", "data=imagefolder", "data.root=/x", "model=cait_s24_224")
    for cfg in (deit, cait):
        assert (cfg.optim.lr, cfg.optim.scale_lr, cfg.optim.weight_decay,
                cfg.sched.warmup_epochs, cfg.recipe.mixup, cfg.recipe.cutmix,
                cfg.recipe.label_smoothing, cfg.data.repeated_aug, cfg.data.remode) == \
            (5e-4, True, 0.05, 5, 0.8, 1.0, 0.1, 3, "pixel")
    assert (deit.trainer.max_epochs, deit.data.crop_pct) == (300, 0.875)
    assert (cait.trainer.max_epochs, cait.data.crop_pct) == (400, 1.0)
