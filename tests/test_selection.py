"""Selection apart from the score: the ``test/top1`` a verdict compares is never measured on
the images that chose its checkpoint.

A simulation of equal variants shows the bias of choosing and scoring on one split and its
absence under the rule the data modules now give (run this file to print the numbers); the
data modules' splits, the checkpoint the test scores, and the report's warning for runs
scored the old way are checked on the code itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from caitlab.analysis.report import collect_runs, main
from caitlab.analysis.report_runs import measured_on_selection, selection_warning
from caitlab.data import Cifar10DataModule, DigitsDataModule, ImageFolderDataModule
from caitlab.training.task import data_selection
from conftest import make_image_folder
from test_data import _fake_cifar10

# scipy's t.ppf(0.975, 4): the report's paired test over 5 seeds calls a difference "better"
# when its 95% interval's low end is above 0, i.e. t above this (2.5% of equal variants)
T_CRIT_4 = 2.7764451051977987
NOMINAL = 0.025


def simulate(scored: str, same_split: bool, experiments: int = 20000, seeds: int = 5,
             epochs: int = 10, noise: tuple[float, float] = (0.25, 0.5), run_sd: float = 0.5,
             rng_seed: int = 0) -> tuple[float, float, float]:
    """Two variants of equal accuracy, compared over ``seeds`` paired seeds in each of
    ``experiments`` sweeps.

    Each run's level is drawn around the same mean (``run_sd``, points); each of its last
    ``epochs`` checkpoints measures that level plus its own noise on a split (``noise``: per
    variant, the second's epochs noisier), independently on an independent split.

    Args:
        scored: ``best`` (the checkpoint best on the validation split) or ``last``.
        same_split: whether the test split is the validation split.

    Returns:
        ``(mean difference, its Monte-Carlo standard error, share of sweeps whose paired
        t-test calls the noisier variant better)``, in points.
    """
    rng = np.random.default_rng(rng_seed)
    shape = (experiments, seeds, epochs)
    scores = []
    for sd in noise:
        level = rng.normal(0.0, run_sd, (experiments, seeds, 1))
        val = level + rng.normal(0.0, sd, shape)
        test = val if same_split else level + rng.normal(0.0, sd, shape)
        pick = val.argmax(-1) if scored == "best" else np.full(shape[:2], epochs - 1)
        scores.append(np.take_along_axis(test, pick[..., None], -1)[..., 0])
    d = scores[1] - scores[0]
    t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(seeds))
    return float(d.mean()), float(d.std() / np.sqrt(d.size)), float((t > T_CRIT_4).mean())


def folder_dm(root, **kw) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), batch_size=2, img_size=32, num_classes=2,
                                 num_workers=0, auto_augment=None, **kw)


def rule_of(dm) -> tuple[str, bool]:
    """What a set-up data module does: the checkpoint its test scores, and whether its test
    split is its validation split (the same images)."""
    if hasattr(dm, "tensors"):  # in memory: the same images are the same tensor contents
        val, test = dm.tensors["val"][0], dm.tensors["test"][0]
        same = val.shape == test.shape and bool((val == test).all())
    else:
        same = dm.test_set is dm.val_set
    return data_selection(dm)["scored"], same


def test_choosing_and_scoring_on_one_split_is_biased_and_the_data_modules_do_not(tmp_path):
    old_bias, old_se, old_fp = simulate("best", same_split=True)
    assert old_bias > 50 * old_se and old_fp > 4 * NOMINAL  # +0.38 pt, 13% "better"
    fp_se = np.sqrt(NOMINAL * (1 - NOMINAL) / 20000)
    default = folder_dm(make_image_folder(tmp_path / "a"))
    held_out = folder_dm(make_image_folder(tmp_path / "b", per_class=8), val_fraction=0.25)
    digits = DigitsDataModule()
    for dm in (default, held_out, digits):
        dm.setup()
    rules = [rule_of(dm) for dm in (default, held_out, digits)]
    assert rules == [("last", True), ("best", False), ("best", False)]
    for scored, same in rules:
        bias, se, fp = simulate(scored, same)
        assert abs(bias) < 4 * se and abs(fp - NOMINAL) < 4 * fp_se, (scored, same, bias, fp)


def test_image_folder_tests_on_val_and_chooses_on_a_fixed_part_of_train(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=8)
    dm = folder_dm(root, val_fraction=0.25)
    dm.setup("fit")
    dm.setup("test")

    def files(ds) -> set[str]:
        base, idx = (ds.dataset, ds.indices) if hasattr(ds, "indices") else (ds, range(len(ds)))
        return {os.path.relpath(base.samples[i][0], root) for i in idx}

    train, chosen_on, tested_on = files(dm.train_set), files(dm.val_set), files(dm.test_set)
    assert len(chosen_on) == 4 and len(train) == 12 and len(tested_on) == 16
    assert all(f.startswith("train/") for f in train | chosen_on)
    assert not train & chosen_on and not chosen_on & tested_on
    assert tested_on == {f"val/class{c}/{i}.png" for c in range(2) for i in range(8)}
    # the held-out images are read as evaluated, the training ones as trained
    assert dm.val_set.dataset.transform is dm.eval_transform
    assert dm.train_set.dataset.transform is dm.train_transform
    # the same images in a new process (a resumed run), whatever the seed
    again = folder_dm(root, val_fraction=0.25, seed=7)
    again.setup("validate")
    assert files(again.val_set) == chosen_on
    assert dm.selection() == {"split": "held out 25% of train/", "scored": "best",
                              "test_is_selection": False}
    # the default: val/ validates and is tested on, so the last checkpoint is scored
    plain = folder_dm(root)
    plain.setup("test")
    assert files(plain.test_set) == tested_on and plain.test_set is plain.val_set
    assert plain.selection() == {"split": "val/", "scored": "last", "test_is_selection": False}
    with pytest.raises(Exception, match=r"data\.val_fraction=0\.01 of 16 training images "
                                        r"holds out 0"):
        folder_dm(root, val_fraction=0.01)


def test_cifar_without_a_held_out_split_scores_its_last_checkpoint(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    from lightning.pytorch.callbacks import ModelCheckpoint

    from caitlab.training.callbacks import BestCheckpoint

    _fake_cifar10(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    dm = Cifar10DataModule(root=str(tmp_path), batch_size=4, num_workers=0, val_fraction=0)
    dm.setup("fit")
    assert dm.val_set is dm.test_set
    assert data_selection(dm) == {"split": "test", "scored": "last", "test_is_selection": False}
    held = Cifar10DataModule(root=str(tmp_path), batch_size=4, num_workers=0, val_fraction=0.25)
    held.setup("fit")
    assert data_selection(held) == {"split": "held out 25% of train", "scored": "best",
                                    "test_is_selection": False}
    # the file the test reads for each
    latest = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    best = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/top1", mode="max",
                          latest=latest)
    latest.best_model_path, best.best_model_path = "ckpts/last.ckpt", "ckpts/best.ckpt"
    assert best.to_score(data_selection(dm)["scored"]) == "ckpts/last.ckpt"
    assert best.to_score(data_selection(held)["scored"]) == "ckpts/best.ckpt"
    latest.best_model_path = ""  # nothing written: the weights in memory, the last
    assert best.to_score("last") is None
    # a project's own data module that does not say keeps the best, the fact unknown
    assert data_selection(object()) == {"split": "val", "scored": "best",
                                        "test_is_selection": None}


def _write_run(sweep, name, **summary):
    folder = sweep / name
    folder.mkdir(parents=True)
    base = {"status": "completed", "signature": name, "seed": 0, "variant": name,
            "axes": {"model": "vit_tiny", "depth": 4}, "model": {"name": "vit_tiny"},
            "epochs": 3, "test/top1": 0.9}
    (folder / "summary.json").write_text(json.dumps({**base, **summary}))


def test_report_names_the_runs_tested_on_their_selection_split_once(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _write_run(sweep / "s", "forced", data="digits",
               selection={"split": "val", "scored": "best", "test_is_selection": True})
    _write_run(sweep / "s", "old_folder", data="imagefolder")  # before summaries said
    _write_run(sweep / "s", "old_cifar", data="cifar10",
               delta={"values": {"data.val_fraction": 0}})
    _write_run(sweep / "s", "new_folder", data="imagefolder",
               selection={"split": "val/", "scored": "last", "test_is_selection": False})
    _write_run(sweep / "s", "old_digits", data="digits")
    _write_run(sweep / "s", "failed", data="imagefolder", status="failed", **{"test/top1": None})
    runs = collect_runs(sweep)
    assert [r.name for r in runs if measured_on_selection(r.summary)] == [
        "failed", "forced", "old_cifar", "old_folder"]
    assert main([str(sweep)]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "chose its checkpoint" in ln]
    assert lines == [selection_warning(runs, sweep)]
    assert lines[0].startswith("warning: test/top1 of 3 runs was measured on the images that "
                               "chose its checkpoint")
    assert lines[0].endswith(": s/forced, s/old_cifar, s/old_folder")
    assert selection_warning([r for r in runs if r.name.startswith("new")]) is None


if __name__ == "__main__":  # the numbers: python tests/test_selection.py
    for rule, same in (("best", True), ("best", False), ("last", True)):
        bias, se, fp = simulate(rule, same)
        split = "the validation split" if same else "an independent test split"
        print(f"{rule} checkpoint scored on {split}: mean difference {bias:+.3f} pt "
              f"(+-{se:.3f}), 'better' in {100 * fp:.1f}% of sweeps (nominal 2.5%)")
