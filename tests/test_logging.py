"""What a run logs, and when: metrics.csv rows, epoch metrics, the best checkpoint."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from caitlab.resolvers import register_resolvers
from caitlab.train import CONF_DIR, train

register_resolvers()

STEPS_PER_EPOCH, EPOCHS, EVERY = 6, 4, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logging")
    overrides = ["model=vit_tiny", "model.embed_dim=32", "model.depth=2", "logger=csv",
                 f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
                 "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                 f"trainer.log_every_n_steps={EVERY}", "trainer.enable_progress_bar=false",
                 "optim.lr=3e-3", "optim.scale_lr=false", "sched=constant",
                 f"paths.output_dir={out}", f"paths.run_dir={out}/run"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    summary = train(cfg)
    assert summary["status"] == "completed"
    return out / "run"


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_step_metrics_follow_log_every_n_steps(run):
    rows = _rows(run)
    step_rows = [r for r in rows if r.get("train/loss_step")]
    # Lightning writes a step row when (optimizer steps done + 1) % EVERY == 0
    expected = [s for s in range(STEPS_PER_EPOCH * EPOCHS) if (s + 1) % EVERY == 0]
    assert [int(r["step"]) for r in step_rows] == expected
    assert all(float(r["train/loss_step"]) > 0 for r in step_rows)
    lr_steps = [int(r["step"]) for r in rows if r.get("lr")]
    assert lr_steps == expected


def test_one_row_of_epoch_metrics_per_epoch(run):
    rows = _rows(run)
    for key in ("val/top1", "val/top5", "val/loss", "train/top1", "train/loss_epoch",
                "perf/images_per_s"):
        epochs = [int(r["epoch"]) for r in rows if r.get(key)]
        assert epochs == list(range(EPOCHS)), key
    for r in rows:
        for key in ("val/top1", "val/top5", "train/top1"):
            if r.get(key):
                assert 0.0 <= float(r[key]) <= 1.0
    val = [float(r["val/top1"]) for r in rows if r.get("val/top1")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val/top1"] == pytest.approx(val[-1])
    assert summary["val/top1_best"] == pytest.approx(max(val))
    assert 0.0 <= summary["test/top1"] <= 1.0 and summary["test/loss"] > 0


def test_best_checkpoint_is_the_best_epoch_and_shares_last_when_it_is_last(run):
    val = [float(r["val/top1"]) for r in _rows(run) if r.get("val/top1")]
    best_epoch = val.index(max(val))  # a later equal score does not replace the best
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    b = torch.load(best, map_location="cpu", weights_only=True)
    last_ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert b["epoch"] == best_epoch and last_ckpt["epoch"] == EPOCHS - 1
    # best.ckpt is a hard link to that epoch's last.ckpt, not a second serialisation
    same_file = os.stat(best).st_ino == os.stat(last).st_ino
    assert same_file == (best_epoch == EPOCHS - 1)
    assert os.stat(best).st_nlink == (2 if same_file else 1)
    if not same_file:
        assert not torch.equal(b["state_dict"]["model.head.weight"],
                               last_ckpt["state_dict"]["model.head.weight"])
    leftovers = [p.name for p in best.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
