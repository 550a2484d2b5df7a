"""DDP as users run it, over two CPU ranks (gloo) started by Lightning on this machine: the
defaults (wandb offline, EMA), ranks that decide together, and ranks that fail fast.

Each run is the command itself in a fresh interpreter: Lightning starts rank 1 as a copy of
it. The same over two tasks of a SLURM job is in test_slurm.py."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import FAULTS_OUTSIDE_SIGNATURE, caitlab_train, make_image_folder, tiny_teacher

pytestmark = pytest.mark.slow

DDP = ("trainer.devices=2", "trainer.strategy=ddp", "threads=1")
TINY = ("model.embed_dim=32", "model.depth=2", "trainer.max_epochs=2",
        "+trainer.limit_train_batches=6", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2", "+callbacks.digest._target_=helpers.WeightsDigest",
        FAULTS_OUTSIDE_SIGNATURE)


def _run_dir(out):
    (summary,) = out.glob("*/*/summary.json")
    return summary.parent


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _digests(run_dir) -> list[str]:
    return [p.read_text() for p in sorted(run_dir.glob("weights.rank*.txt"))]


def _no_rank_failed(proc) -> None:
    # every rank prints one "caitlab-train: ..." line when it fails; none may have
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caitlab-train:" not in proc.stderr, proc.stderr[-3000:]


def test_the_defaults_with_what_users_combine_complete_on_both_ranks(tmp_path):
    # wandb (offline) and EMA, with an image folder and its loader workers, EViT, a teacher
    # and compile (a CPU backend): each broke a DDP run on its own before
    data = make_image_folder(tmp_path / "images", per_class=8)
    proc = caitlab_train(tmp_path, *DDP, *TINY, "ema.enabled=true", "model=vit_tiny",
                         "model/token_reorg=evit", "data=imagefolder", f"data.root={data}",
                         "data.num_classes=2", "data.batch_size=2", "data.num_workers=2",
                         "model.img_size=32", "model.patch_size=8",
                         *tiny_teacher(tmp_path, in_chans=3, num_classes=2, img_size=32),
                         "compile=aot_eager", fresh=True, check=False)
    _no_rank_failed(proc)
    run = _run_dir(tmp_path)
    summary = _summary(run)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["attempts"] == 1
    assert summary["teacher"]["name"] == "vit_tiny_patch16_224"
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one wandb run, not one a rank
    first, second = _digests(run)
    assert first == second  # every rank ends with the same weights (EMA's included)


def test_a_nan_on_one_rank_ends_both_as_diverged_within_seconds(tmp_path):
    poison = ("+callbacks.nan._target_=helpers.PoisonLossAt", "+callbacks.nan.step=3",
              "+callbacks.nan.rank=1")
    t0 = time.monotonic()
    proc = caitlab_train(tmp_path, *DDP, *TINY, "logger=csv", *poison, fresh=True,
                         check=False, timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = _summary(_run_dir(tmp_path))
    assert summary["status"] == "diverged", summary.get("error")
    assert summary["diverged_step"] == 3
    assert took < 120  # the run's own time; a rank left waiting would take dist_timeout_s


# deterministic, with drop-path: a resumed rank must draw what it would have drawn
RESUMABLE = (*DDP, *TINY, "logger=csv", "trainer.deterministic=true", "model.drop_path_rate=0.1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    caitlab_train(out, *RESUMABLE, fresh=True)
    return _run_dir(out)


@pytest.mark.parametrize("where", ["mid-epoch", "validation"])
def test_a_signal_to_one_rank_stops_both_at_one_checkpoint_and_resumes_exactly(
        tmp_path, uninterrupted, where):
    at = (("+callbacks.sig.step=8",) if where == "mid-epoch" else
          ("+callbacks.sig.step=0", "+callbacks.sig.at_validation=true"))
    first = caitlab_train(tmp_path, *RESUMABLE, "+callbacks.sig._target_=helpers.SignalAtStep",
                          "+callbacks.sig.rank=1", "+callbacks.sig.sig=SIGTERM", *at,
                          fresh=True, check=False, timeout=300)
    assert first.returncode == 130, first.stderr[-3000:]
    run = _run_dir(tmp_path)
    summary = _summary(run)
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # stopped at the batch after the signal on every rank: one checkpoint of one step
    assert ckpt["global_step"] == (9 if where == "mid-epoch" else 6)
    assert len(ckpt["caitlab"]["rng_by_rank"]) == 2  # each rank's draws resume as its own

    caitlab_train(tmp_path, *RESUMABLE, fresh=True)
    assert _summary(run)["status"] == "completed"
    assert _digests(run) == _digests(uninterrupted)


def test_a_rank_that_fails_before_the_rendezvous_ends_the_run_with_its_cause(tmp_path):
    t0 = time.monotonic()
    proc = caitlab_train(tmp_path, *DDP, *TINY, "logger=csv",
                         "+callbacks.die._target_=helpers.FailBeforeRendezvous", fresh=True,
                         check=False, timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert took < 90  # not the process group's timeout (dist_timeout_s: 300)
    run = _run_dir(tmp_path)
    assert "injected: rank 1 cannot start" in (run / "error.rank1.log").read_text()
    summary = _summary(run)
    assert summary["status"] == "failed"
    assert summary["error"].startswith("rank 1 exited with status 1: ")
    assert "error.rank1.log" in summary["error"]


def test_a_rank_that_fails_mid_training_is_named_in_the_summary(tmp_path):
    proc = caitlab_train(tmp_path, *DDP, *TINY, "logger=csv",
                         "+callbacks.crash._target_=helpers.CrashAt", "+callbacks.crash.step=4",
                         "+callbacks.crash.rank=1", fresh=True, check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = _run_dir(tmp_path)
    assert "injected crash on rank 1" in (run / "error.rank1.log").read_text()
    summary = _summary(run)
    assert summary["status"] == "failed"
    assert "rank 1" in summary["error"] and "injected crash on rank 1" in summary["error"]


def test_ctrl_c_twice_on_every_rank_leaves_the_run_interrupted(tmp_path):
    """A terminal's Ctrl-C reaches every process of the command; the second one stops at once:
    rank 0 records an interruption, not a failure of the rank it stopped."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import clean_env

    cmd = [sys.executable, "-m", "caitlab.train", f"paths.output_dir={tmp_path}",
           "trainer.enable_progress_bar=false", *DDP, *TINY, "logger=csv",
           "trainer.max_epochs=50"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = list(tmp_path.glob("*/*/summary.json"))
            if found and (json.loads(found[0].read_text()).get("epochs") or 0) >= 1:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    summary = _summary(_run_dir(tmp_path))
    assert summary["status"] == "interrupted", (summary.get("error"), err[-2000:])
    # 130, or ended by the second SIGINT itself while exiting: a shell reads both as 130
    assert proc.returncode in (130, -2), err[-2000:]
