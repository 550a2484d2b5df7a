"""What caitlab-train prints when its output is not a terminal (a pipe, a file, a SLURM log):
each line once, one line per epoch, one line of result, and a failed run named in one line.

The runs are forked from one warm process (``forkserver`` fixture), their stdout a file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from caitlab.record import tidy_unstarted
from conftest import FAULTS_OUTSIDE_SIGNATURE, clean_env

TINY = ("model=vit_tiny", "model.embed_dim=32", "model.depth=1", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "sched=constant",
        FAULTS_OUTSIDE_SIGNATURE)
EPOCH = re.compile(r"^epoch (\d+)/3  train/loss \d+\.\d{3}  val/loss \d+\.\d{3}  "
                   r"val/top1 (\d+\.\d)  \d+\.\d s$")


class Boom(Callback):
    """Fails the run at its second step with a multi-line message, as a DataLoader worker's
    error (which carries the worker's traceback) would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            raise RuntimeError("boom\n" + "\n".join(f"  line {i} of a traceback"
                                                    for i in range(30)))


def _summary(out: Path) -> tuple[Path, dict]:
    (path,) = out.rglob("summary.json")
    return path.parent, json.loads(path.read_text())


def test_a_run_prints_each_line_once_one_per_epoch_and_its_result(tmp_path, forkserver):
    env = clean_env()
    env.pop("WANDB_SILENT")  # as a user runs it: wandb's chatter is kept out by caitlab itself
    # the progress bar is on (the default), but stdout is a file: epoch lines instead
    proc = forkserver.run(tmp_path, *TINY, "trainer.max_epochs=3",
                          "trainer.enable_progress_bar=true", env=env)
    run_dir, summary = _summary(tmp_path)
    lines = proc.stdout.splitlines()
    assert len(lines) == len(set(lines)), proc.stdout  # nothing twice
    epochs = [m for m in map(EPOCH.match, lines) if m]
    assert [int(m.group(1)) for m in epochs] == [1, 2, 3], proc.stdout
    assert float(epochs[-1].group(2)) == pytest.approx(100 * summary["val/top1"], abs=0.06)
    # the last line is the run's result
    assert lines[-1] == (f"test/top1 {100 * summary['test/top1']:.1f}  best val/top1 "
                         f"{100 * summary['val/top1_best']:.1f}  3 epochs  "
                         f"{summary['wall_s']:.0f} s  -> default/{run_dir.name}")
    # wandb: only caitlab's line on where the offline run is and how to upload it
    assert [ln for ln in lines if ln.startswith("wandb")] == [
        f"wandb: no API key configured, logging offline; upload later with: wandb sync "
        f"{run_dir}/wandb/offline-run-*"]
    # no progress-bar redraws, no Lightning advert or prefix, nothing else
    assert not any("━" in ln or "Tip" in ln or ln.startswith("INFO") for ln in lines)
    assert len(lines) == 3 + 3, proc.stdout  # wandb, GPU available, 3 epochs, result
    assert "Traceback" not in proc.stdout + proc.stderr
    # train.log has every line, each once, the epoch lines included
    log = (run_dir / "train.log").read_text().splitlines()
    for line in lines[1:]:  # the wandb line is printed, not logged
        assert sum(entry.endswith(f" - {line}") for entry in log) == 1, (line, log)
    assert sum("GPU available" in entry for entry in log) == 1
    assert any("Restoring states from the checkpoint path" in entry for entry in log)


def test_a_failed_run_is_skipped_in_one_line_and_exits_non_zero(tmp_path, forkserver):
    boom = "+callbacks.boom._target_=test_console.Boom"
    first = forkserver.run(tmp_path, *TINY, "trainer.max_epochs=1", "logger=csv", boom,
                           check=False)
    assert first.returncode == 1
    run_dir, summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["error"].count("\n") == 30
    # the same config again (the fault is no part of its signature): skipped, in one line
    again = forkserver.run(tmp_path, *TINY, "trainer.max_epochs=1", "logger=csv", check=False)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"caitlab-train: skipped default/{run_dir.name}: failed before (RuntimeError: boom); "
        "not run again without retry_failed=true"]
    assert "traceback" not in again.stdout + again.stderr
    retried = forkserver.run(tmp_path, *TINY, "trainer.max_epochs=1", "logger=csv",
                             "retry_failed=true")
    assert retried.stdout.splitlines()[-1].startswith("test/top1 ")
    assert _summary(tmp_path)[1]["status"] == "completed"


def test_a_sweep_goes_on_past_a_failed_run_and_exits_non_zero(tmp_path, forkserver):
    # embed_dim=30 is refused (not divisible by 4 heads); the other run trains
    sweep = ("-m", *TINY, "trainer.max_epochs=1", "logger=csv", "model.embed_dim=30,32")
    first = forkserver.run(tmp_path, *sweep, check=False)
    assert first.returncode == 1, first.stderr
    errors = [ln for ln in first.stderr.splitlines() if ln.startswith("caitlab-train")]
    assert errors == [
        "caitlab-train: error: embed_dim=30 is not divisible by num_heads=4",
        "caitlab-train: error: 1 run(s) of the sweep failed or were skipped as failed (lines "
        "above); the others ran"], first.stderr
    states = sorted(json.loads(p.read_text())["status"] for p in tmp_path.rglob("summary.json"))
    assert states == ["completed", "failed"]
    # launched again: the completed run is skipped, the failed one too, and still counts
    again = forkserver.run(tmp_path, *sweep, check=False)
    assert again.returncode == 1
    assert sum(ln.startswith("already completed, skipping: test/top1 ")
               for ln in again.stdout.splitlines()) == 1, again.stdout
    skipped = [ln for ln in again.stderr.splitlines() if ln.startswith("caitlab-train: skipped")]
    assert len(skipped) == 1 and skipped[0].endswith(
        "failed before (embed_dim=30 is not divisible by num_heads=4); not run again without "
        "retry_failed=true")


def test_only_a_folder_hydra_alone_made_is_removed(tmp_path):
    def folder(name: str, *files: str) -> Path:
        run = tmp_path / "out" / name / "abc"
        for f in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
                  "train.log", *files):
            (run / f).parent.mkdir(parents=True, exist_ok=True)
            (run / f).write_text("x")
        return run

    fresh = folder("fresh")
    tidy_unstarted(fresh, [fresh, fresh.parent])
    assert not fresh.parent.exists()  # nor the experiment's folder this process made for it
    for name, extra in (("started", "summary.json"), ("locked", ".lock"),
                        ("ckpt", "checkpoints/last.ckpt"), ("own", ".hydra/mine.txt")):
        run = folder(name, extra)
        tidy_unstarted(run, [run, run.parent])
        assert (run / extra).read_text() == "x" and (run / "train.log").exists(), name


def test_a_refused_config_removes_no_folder_this_process_did_not_make(tmp_path, forkserver):
    mine = tmp_path / "mine"  # the user's own, empty: the run folder goes in it
    mine.mkdir()
    proc = forkserver.run(tmp_path, "trainer.max_epochs=-3", f"hydra.run.dir={mine}/run",
                          check=False)
    assert proc.returncode == 2 and "trainer.max_epochs" in proc.stderr, proc.stderr
    assert mine.is_dir() and not (mine / "run").exists()


def test_a_submitit_sweep_exits_non_zero_for_a_failed_or_skipped_failed_run(tmp_path,
                                                                            forkserver):
    # submitit's local executor: the jobs run in processes of their own, as on SLURM
    sweep = ("-m", "hydra/launcher=local", *TINY, "trainer.max_epochs=1", "logger=csv",
             "model.embed_dim=30,32", "name=mixed")
    first = forkserver.run(tmp_path, *sweep, check=False)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stderr.splitlines()[-1] == ("caitlab-train: error: a run of the sweep failed: "
                                             "embed_dim=30 is not divisible by num_heads=4")
    again = forkserver.run(tmp_path, *sweep, check=False)
    assert again.returncode == 1
    printed = again.stdout + again.stderr
    assert "0 to run, 2 already done" in printed
    assert "failed before (embed_dim=30 is not divisible by num_heads=4); not run again " \
        "without retry_failed=true" in printed


def test_every_offline_run_of_a_sweep_says_how_to_upload_it(monkeypatch, tmp_path):
    from caitlab.secrets import wandb_mode
    from caitlab.training.tracking import build_loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")  # restored afterwards, as WANDB_MODE is
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no API key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger",
                                      "project": "p"}})
    build_loggers(cfg, tmp_path, name="n", group="g", tags=[], config={}, wandb_id="abc")
    # Lightning's logger sets WANDB_MODE=dryrun for an offline run: the next run of the
    # same process (a sweep's) is offline too, and says so
    assert wandb_mode() == "offline"


def test_lightnings_lines_reach_the_console_once_even_when_it_is_imported_late():
    # the task sets logging up before anything has imported Lightning, as caitlab-train does
    code = ("import logging, sys\n"
            "logging.basicConfig(stream=sys.stdout, format='%(message)s', level=logging.INFO)\n"
            "from caitlab.console import one_handler_per_line\n"
            "assert 'lightning' not in sys.modules\n"
            "one_handler_per_line()\n"
            "logging.getLogger('lightning.pytorch.utilities.rank_zero').info('GPU available')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "GPU available\n" and proc.stderr == ""
