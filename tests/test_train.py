"""caitlab-train end to end: run folders, resume, skip, summary, wandb offline, secrets."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FAULTS_OUTSIDE_SIGNATURE, caitlab_train, clean_env, make_image_folder

TINY_RUN = ("model.embed_dim=32", "model.depth=2", "trainer.max_epochs=2",
            "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1")

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
FAKE_TOKEN = "tok-SECRET-value-98765"


def _only_run(out: Path, name: str = "default") -> Path:
    runs = [p.parent for p in (out / name).glob("*/summary.json")]
    assert len(runs) == 1, runs
    return runs[0]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _epochs_in_metrics(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return sorted({int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/top1")})


@dataclass
class Launch:
    """One caitlab-train launch: what it printed, how long it took, and ``out``, a copy of the
    output folder as the launch left it (later launches rewrite the live folder)."""

    proc: subprocess.CompletedProcess
    seconds: float
    out: Path


@dataclass
class Attempts:
    """One wandb-logged run launched three times with the same command: interrupted at epoch
    1, resumed to completion, then launched again once completed. ``out`` is the live output
    folder, as the last launch left it."""

    out: Path
    first: Launch
    resume: Launch
    relaunch: Launch


def _launch(out: Path, snapshot: Path, *overrides: str, env: dict[str, str],
            check: bool = True) -> Launch:
    t0 = time.time()
    proc = caitlab_train(out, *overrides, env=env, check=check)
    seconds = time.time() - t0
    shutil.copytree(out, snapshot, symlinks=True)
    return Launch(proc, seconds, snapshot)


@pytest.fixture(scope="module")
def attempts(tmp_path_factory) -> Attempts:
    """The three launches, run once for the tests that each check one behaviour of them."""
    out = tmp_path_factory.mktemp("train")
    snapshots = tmp_path_factory.mktemp("snapshots")
    env = clean_env(WANDB_API_KEY=FAKE_KEY, MY_SERVICE_TOKEN=FAKE_TOKEN, WANDB_MODE="offline")
    # a config that interpolates a secret must not leak it into any dump either
    overrides = (*TINY_RUN, "logger=wandb", "+logger.wandb.notes=${oc.env:MY_SERVICE_TOKEN}",
                 FAULTS_OUTSIDE_SIGNATURE)
    interrupt = ("+callbacks.stop._target_=helpers.InterruptAtEpochStart",
                 "+callbacks.stop.epoch=1")
    first = _launch(out, snapshots / "first", *overrides, *interrupt, env=env, check=False)
    # same command without the interruption: the fault is no part of the signature
    resume = _launch(out, snapshots / "resume", *overrides, env=env)
    relaunch = _launch(out, snapshots / "relaunch", *overrides, env=env)
    return Attempts(out, first, resume, relaunch)


@pytest.mark.slow
def test_an_interrupted_run_exits_130_with_a_resumable_checkpoint(attempts):
    first = attempts.first.proc
    assert first.returncode == 130, first.stderr[-2000:]
    assert "interrupted" in first.stderr and "run the same command again" in first.stderr
    run = _only_run(attempts.first.out)
    s1 = _summary(run)
    assert s1["status"] == "interrupted" and s1["epochs"] == 1
    assert (run / "checkpoints" / "last.ckpt").is_file()
    wandb_id = s1["wandb_run_id"]
    assert re.fullmatch(r"[a-z0-9]{8}", wandb_id)


@pytest.mark.slow
def test_the_same_command_resumes_the_interrupted_run_and_its_wandb_run(attempts):
    first_run = _only_run(attempts.first.out)
    wandb_id = _summary(first_run)["wandb_run_id"]
    run = _only_run(attempts.resume.out)
    assert run.relative_to(attempts.resume.out) == first_run.relative_to(attempts.first.out)
    s2 = _summary(run)
    assert s2["status"] == "completed" and s2["attempts"] == 2 and s2["epochs"] == 2
    assert s2["wandb_run_id"] == wandb_id
    assert s2["resumed_from"].endswith("checkpoints/last.ckpt")
    # the second attempt continued at the next epoch: one row per epoch, the first kept
    assert _epochs_in_metrics(run) == [0, 1]
    # both attempts logged into the same wandb run
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(wandb_id) for p in offline)
    # offline, the run's config lives in the run's record file (uncompressed protobuf)
    record = next(offline[0].glob("run-*.wandb")).read_bytes()
    assert b"cait_tiny" in record and b"class_attention" in record and b"seed" in record


@pytest.mark.slow
def test_device_hours_and_throughput_accumulate_over_the_attempts(attempts):
    s1 = _summary(_only_run(attempts.first.out))
    run = _only_run(attempts.resume.out)
    s2 = _summary(run)
    first_s = attempts.first.seconds
    both_s = first_s + attempts.resume.seconds
    # device-hours (one CPU device) add up over the attempts, within the processes' lifetimes
    assert s2["device"] == "cpu" and s2["world_size"] == 1
    assert 0 < s1["device_hours"] * 3600 < first_s
    assert s1["device_hours"] < s2["device_hours"] and s2["device_hours"] * 3600 < both_s
    # every epoch's throughput is kept across the attempts, as metrics.csv logged it; the run
    # is credited with the median of the epochs after the first (the first pays warm-up)
    with open(run / "metrics.csv", newline="") as f:
        logged = {r["epoch"]: float(r["perf/images_per_s"]) for r in csv.DictReader(f)
                  if r.get("perf/images_per_s")}
    assert s2["images_per_s_by_epoch"] == pytest.approx(logged) and set(logged) == {"0", "1"}
    assert s2["images_per_s"] == pytest.approx(logged["1"])


@pytest.mark.slow
def test_a_completed_run_records_its_summary_and_files(attempts):
    run = _only_run(attempts.resume.out)
    s2 = _summary(run)
    assert s2["data"] == "digits"
    for key in ("signature", "overrides", "model", "val/top1_best", "test/top1", "test/top5",
                "epochs", "wall_s", "images_per_s", "wandb_run_id"):
        assert s2.get(key) is not None, key
    assert s2["signature"] == run.name
    assert s2["model"]["params"] > 0 and s2["model"]["macs"] > 0
    assert 0 <= s2["test/top1"] <= s2["test/top5"] <= 1
    for name in ("config.yaml", "overrides.yaml", "metrics.csv", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name


@pytest.mark.slow
def test_a_completed_run_is_skipped_on_relaunch_and_left_unchanged(attempts):
    # a completed run is skipped when launched again, and nothing in it changes
    resumed = _only_run(attempts.resume.out)
    before = (resumed / "summary.json").read_text()
    third = attempts.relaunch.proc
    assert "already completed" in third.stdout
    run = attempts.out / resumed.relative_to(attempts.resume.out)
    assert (run / "summary.json").read_text() == before


@pytest.mark.slow
def test_no_secret_leaks_into_any_file_or_output(attempts):
    # no secret in any file the runs wrote, nor in what they printed
    first, third = attempts.first.proc, attempts.relaunch.proc
    outputs = first.stdout + first.stderr + third.stdout + third.stderr
    assert FAKE_KEY not in outputs and FAKE_TOKEN not in outputs
    for path in attempts.out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_KEY.encode() not in data, path
            assert FAKE_TOKEN.encode() not in data, path
    run = _only_run(attempts.out)
    assert "<redacted>" in (run / "config.yaml").read_text()


# One preset of each kind (CaiT at 224, 384 and 448 px, DeiT, the digits-sized pair); every
# preset takes a training step in test_config.
FIT_PRESETS = ["cait_m48_448", "cait_s24_384", "cait_xxs24_224", "cait_tiny",
               "deit_small_patch16_224", "vit_tiny"]


@pytest.mark.slow
def test_model_presets_train(tmp_path):
    # Named variants shrunk to 32 px and one layer: this checks each preset's wiring (class
    # token, residual, talking heads, drop path) through a real fit/test, not its size.
    caitlab_train(
        tmp_path, "-m", f"model={','.join(FIT_PRESETS)}", "data=synthetic",
        "model.img_size=32", "model.depth=1", "data.num_classes=10", "data.batch_size=4",
        "data.num_train=16", "data.num_val=8", "data.num_test=8", "trainer=debug",
        "logger=csv", "name=presets",
    )
    runs = [p.parent for p in (tmp_path / "presets").glob("*/summary.json")]
    summaries = {_summary(r)["model"]["name"]: _summary(r) for r in runs}
    assert set(summaries) == set(FIT_PRESETS)
    for name, s in summaries.items():
        assert s["status"] == "completed", (name, s.get("error"))
        assert s["test/top1"] is not None


@pytest.mark.slow
def test_data_presets_digits_synthetic_and_imagefolder(tmp_path):
    root = make_image_folder(tmp_path / "images")
    caitlab_train(tmp_path, "-m", "data=digits,synthetic", "data.batch_size=16",
                  "model=vit_tiny", *TINY_RUN, "logger=csv", "name=data")
    caitlab_train(tmp_path, "data=imagefolder", f"data.root={root}", "data.num_classes=2",
                  "data.batch_size=4", "data.num_workers=0", "model=vit_tiny",
                  "model.img_size=16", "model.patch_size=4", *TINY_RUN,
                  "logger=[csv,tensorboard]", "name=folder")
    runs = [p.parent for p in tmp_path.glob("*/*/summary.json")]
    targets = {}
    for run in runs:
        assert _summary(run)["status"] == "completed", _summary(run).get("error")
        target = re.search(r"_target_: caitlab\.data\.(\w+)", (run / "config.yaml").read_text())
        targets[target.group(1)] = _summary(run)
    assert set(targets) == {"DigitsDataModule", "SyntheticDataModule", "ImageFolderDataModule"}
    folder_run = _only_run(tmp_path, "folder")
    # several loggers at once: tensorboard events beside the always-on metrics.csv
    assert list((folder_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert (folder_run / "metrics.csv").is_file()
