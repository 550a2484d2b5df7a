"""Faults lose nothing: SIGKILL at random moments, a disk that fills up while training.

The runs are forked from one warm process (``forkserver`` fixture) so that the many launches
these tests need do not each pay ~10 s of imports.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from caitlab.cpus import available_cpus
from conftest import FAULTS_OUTSIDE_SIGNATURE
from helpers import SigkillAt

# deterministic CPU training on digits, drop-path on (it draws random numbers every step):
# 3 epochs of 5 batches, so a kill can land in any epoch and between any two checkpoints
RUN = ("model=cait_tiny", "model.embed_dim=32", "model.depth=2", "model.drop_path_rate=0.1",
       "trainer.max_epochs=3", "trainer.limit_train_batches=5", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "trainer.deterministic=true", "logger=csv",
       FAULTS_OUTSIDE_SIGNATURE)
STEPS = 15
KILL_SEED = 20251123
KILLS = 4  # one per kind of moment in SigkillAt.WHERE, in a seeded order at seeded steps


def _only_run(out: Path) -> Path:
    runs = [p.parent for p in out.glob("*/*/summary.json")]
    assert len(runs) == 1, runs
    return runs[0]


def _final_weights(run: Path) -> tuple[dict, int]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def _temp_files(run: Path) -> list[Path]:
    return sorted(run.rglob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("threads", [
    # a torch thread per core: the checkpoint is written in the loop, fsync'ed in a thread
    "auto",
    # a core to spare: copied in the loop, written and fsync'ed in the writer thread
    pytest.param("1", marks=pytest.mark.skipif(available_cpus() < 2,
                                                reason="needs a core beside the one thread")),
])
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path, forkserver,
                                                                        threads):
    run_ = (*RUN, f"threads={threads}")
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref_out.mkdir(), out.mkdir()
    forkserver.run(ref_out, *run_)
    ref_weights, ref_step = _final_weights(_only_run(ref_out))
    assert ref_step == STEPS

    rng = random.Random(KILL_SEED)
    moments = list(zip(sorted(rng.sample(range(1, STEPS), KILLS)),
                       rng.sample(SigkillAt.WHERE, KILLS), strict=True))
    for step, where in moments:
        kill = ("+callbacks.kill._target_=helpers.SigkillAt", f"+callbacks.kill.step={step}",
                f"+callbacks.kill.where={where}")
        killed = forkserver.run(out, *run_, *kill, check=False)
        assert killed.returncode == -9, (step, where, killed.stderr[-3000:])
        run = _only_run(out)
        # never a broken checkpoint: every one left behind loads, whatever the moment
        for ckpt in (run / "checkpoints").glob("*.ckpt"):
            torch.load(ckpt, weights_only=True)
        json.loads((run / "summary.json").read_text())
        if where == "checkpoint":  # killed mid-write: the torn bytes are a temporary file
            assert _temp_files(run), "the kill did not land inside a checkpoint write"

    forkserver.run(out, *run_)
    run = _only_run(out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attempts"] == KILLS + 1
    assert not _temp_files(run)  # the torn write's leftovers were cleaned up at resume
    weights, step = _final_weights(run)
    assert step == ref_step
    assert weights.keys() == ref_weights.keys()
    for key, value in ref_weights.items():
        assert torch.equal(value, weights[key]), key


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs) to fill up; mounting one needs root."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


def _fill(disk: Path, leave: int, name: str = "filler") -> Path:
    """Takes all the free space of ``disk`` but ``leave`` bytes."""
    st = os.statvfs(disk)
    filler = disk / name
    size = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        if size > 0:
            os.posix_fallocate(f.fileno(), 0, size)
    return filler


@pytest.mark.slow
def test_disk_full_while_training_is_one_line_and_loses_nothing(small_disk, forkserver):
    stop = ("+callbacks.stop._target_=helpers.InterruptAtEpochStart", "+callbacks.stop.epoch=1")
    assert forkserver.run(small_disk, *RUN, *stop, check=False).returncode == 130
    run = _only_run(small_disk)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    # room for the summary and the log lines, not for the next checkpoint (~0.5 MB)
    filler = _fill(small_disk, leave=64 * 1024)
    full = forkserver.run(small_disk, *RUN, check=False)
    assert full.returncode == 1
    errors = [ln for ln in full.stderr.splitlines() if ln.startswith("caitlab-train:")]
    assert errors == [f"caitlab-train: error: no space left on device writing "
                      f"{run}/checkpoints/last.ckpt; files written before are intact: free "
                      f"space, then run the same command again (run folder {run})"], full.stderr
    assert "Traceback" not in full.stderr + full.stdout

    # what the first attempt wrote is whole: the checkpoints byte for byte, the log still
    # begins with what it held, metrics.csv still has its rows (under a wider header), and
    # the files rewritten for this attempt (config, summary) parse
    for path, data in before.items():
        rel = path.relative_to(run).as_posix()
        if rel.startswith("checkpoints/"):
            assert path.read_bytes() == data, rel
        elif rel == "train.log":
            assert path.read_bytes().startswith(data), rel
        elif rel == "metrics.csv":
            old, new = _csv_rows(data), _csv_rows(path.read_bytes())
            assert [{k: row[k] for k in old[0]} for row in new[:len(old)]] == old
        elif path.suffix == ".yaml":
            assert yaml.safe_load(path.read_text()), rel
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "no space left" in summary["error"]
    assert not _temp_files(run)

    filler.unlink()  # space again: the same command resumes and finishes
    forkserver.run(small_disk, *RUN)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attempts"] == 3


def test_metrics_csv_keeps_its_rows_when_the_disk_fills(small_disk):
    from caitlab.training.tracking import _AppendingWriter

    metrics = small_disk / "metrics.csv"
    writer = _AppendingWriter(log_dir=str(small_disk))
    writer.log_metrics({"loss": 1.0}, step=0)
    writer.save()
    before = metrics.read_bytes()

    # rows with the same columns are appended; the disk fills part-way through them
    _fill(small_disk, leave=4096)
    for step in range(1, 2000):  # ~20 KB
        writer.log_metrics({"loss": 0.5}, step=step)
    with pytest.raises(OSError, match="No space left"):
        writer.save()
    after = metrics.read_bytes()
    assert after.startswith(before) and after.endswith(b"\n")  # no half row at the end
    rows = list(csv.reader(io.StringIO(after.decode())))
    assert len(rows) > 2 and all(len(row) == len(rows[0]) for row in rows)

    # a new column: Lightning rewrites the whole file under the new header (truncating it
    # first); here the rewrite is atomic, so the rows survive a disk with no room for it
    _fill(small_disk, leave=0, name="filler2")
    writer.log_metrics({"loss": 0.5, "val/top1": 0.25}, step=2000)
    with pytest.raises(OSError, match="No space left on device: .*metrics.csv"):
        writer.save()
    assert metrics.read_bytes() == after
    assert not list(small_disk.glob(".*.tmp"))
