"""Sweeps on a real SLURM cluster (scripts/slurm/start.sh), submitted through Hydra."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import caitlab_train, make_image_folder, tiny_teacher

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

SLURM = ("hydra/launcher=slurm", "cluster.cpus_per_task=1", "cluster.timeout_min=10",
         "logger=csv")
TINY = ("model.embed_dim=32", "model.depth=2")


def _summaries(sweep_dir) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def _sacct_jobs(array_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-j", array_id, "--format=JobID%30"],
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_sweep_is_one_array_and_a_relaunch_skips_what_completed(tmp_path):
    caitlab_train(tmp_path, "-m", *SLURM, *TINY, "model=vit_tiny,cait_tiny", "trainer=debug",
                  "name=pair")
    runs = _summaries(tmp_path / "pair")
    assert len(runs) == 2
    assert {s["status"] for s in runs.values()} == {"completed"}
    job_ids = sorted(s["slurm_job_id"] for s in runs.values())
    array = job_ids[0].split("_")[0]
    assert job_ids == [f"{array}_0", f"{array}_1"]  # one array, two tasks

    again = caitlab_train(tmp_path, "-m", *SLURM, *TINY, "model=vit_tiny,cait_tiny",
                          "trainer=debug", "name=pair")
    assert "0 to run, 2 already done" in again.stdout + again.stderr
    assert _summaries(tmp_path / "pair") == runs  # nothing was submitted or touched
    assert len(_sacct_jobs(array)) == 2


# what users run: the default logger (wandb, offline here) and EMA
DDP_TASKS = ("hydra/launcher=slurm", "cluster.cpus_per_task=1", "cluster.timeout_min=10",
             *TINY, "model=vit_tiny", "trainer.devices=2", "trainer.strategy=ddp",
             "ema.enabled=true", "+callbacks.digest._target_=helpers.WeightsDigest")


def test_ddp_over_two_slurm_tasks_with_the_defaults_completes_on_both(tmp_path):
    # what users combine: an image folder with a loader worker, EViT, a teacher, compile
    data = make_image_folder(tmp_path / "images", per_class=8)
    caitlab_train(tmp_path, "-m", *DDP_TASKS, "trainer=debug", "name=ddp",
                  "model/token_reorg=evit", "data=imagefolder", f"data.root={data}",
                  "data.num_classes=2", "data.batch_size=2", "data.num_workers=1",
                  "model.img_size=32", "model.patch_size=8",
                  *tiny_teacher(tmp_path, in_chans=3, num_classes=2, img_size=32),
                  "compile=aot_eager")
    ((name, summary),) = _summaries(tmp_path / "ddp").items()
    assert summary["status"] == "completed", summary.get("error")
    assert summary["world_size"] == 2
    assert summary["attempts"] == 1  # rank 1 did not write its own attempt
    run = tmp_path / "ddp" / name
    log = (run / "train.log").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in log
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    first, second = [p.read_text() for p in sorted(run.glob("weights.rank*.txt"))]
    assert first == second
    # both tasks of the job step ended well: SLURM counts the job COMPLETED
    def ended():
        state = subprocess.run(["sacct", "-n", "-X", "-j", summary["slurm_job_id"],
                                "--format=State%20"], capture_output=True, text=True).stdout
        return state.split() if state.split() not in ([], ["RUNNING"]) else None

    assert _wait_for(ended, 60, "the job to end") == ["COMPLETED"]


def test_a_slurm_task_that_fails_before_the_rendezvous_ends_the_job_with_its_cause(tmp_path):
    t0 = time.monotonic()
    proc = caitlab_train(tmp_path, "-m", *DDP_TASKS, "trainer=debug", "logger=csv",
                         "+callbacks.die._target_=helpers.FailBeforeRendezvous", "name=die",
                         check=False)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert took < 120  # srun --kill-on-bad-exit, not the process group's timeout (300 s)
    ((name, summary),) = _summaries(tmp_path / "die").items()
    assert "injected: rank 1 cannot start" in (tmp_path / "die" / name /
                                               "error.rank1.log").read_text()
    assert summary["status"] == "failed"
    assert summary["error"].startswith("rank 1: InstantiationException: ")
    assert "injected: rank 1 cannot start" in summary["error"]


def test_a_preemption_signal_to_one_slurm_task_requeues_the_job_once(tmp_path):
    # rank 1 alone gets submitit's signal, mid-epoch; the step runs --kill-on-bad-exit
    caitlab_train(tmp_path, "-m", *DDP_TASKS, "trainer.max_epochs=2",
                  "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=2",
                  "+trainer.limit_test_batches=2", "+callbacks.sig._target_=helpers.SignalAtStep",
                  "+callbacks.sig.step=3", "+callbacks.sig.rank=1", "+callbacks.sig.sig=SIGUSR2",
                  "name=pre2")
    (summary,) = _summaries(tmp_path / "pre2").values()
    assert summary["status"] == "completed", summary.get("error")
    assert summary["attempts"] == 2 and summary["resumed_from"].endswith("last.ckpt")
    assert summary["interrupted_by"] == "SIGUSR2" and summary["requeued"] is True


def test_one_failing_run_does_not_stop_the_others_and_is_retried_only_on_request(tmp_path):
    # embed_dim 30 is not divisible by the 4 heads: that run fails, the other trains
    # every launch exits 1: a run of the sweep failed, or was skipped as failed
    first = caitlab_train(tmp_path, "-m", *SLURM, "model=vit_tiny", "model.embed_dim=30,32",
                          "trainer=debug", "name=mixed", check=False)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "a run of the sweep failed: embed_dim=30 is not divisible" in first.stderr
    states = {s["status"]: s for s in
              _summaries(tmp_path / "mixed").values()}
    assert set(states) == {"completed", "failed"}
    assert "embed_dim=30 is not divisible by num_heads=4" in states["failed"]["error"]
    again = caitlab_train(tmp_path, "-m", *SLURM, "model=vit_tiny", "model.embed_dim=30,32",
                          "trainer=debug", "name=mixed", check=False)
    assert again.returncode == 1
    assert "0 to run, 2 already done" in again.stdout + again.stderr
    assert "failed before (embed_dim=30 is not divisible by num_heads=4); not run again " \
        "without retry_failed=true" in again.stdout + again.stderr
    retry = caitlab_train(tmp_path, "-m", *SLURM, "model=vit_tiny", "model.embed_dim=30,32",
                          "trainer=debug", "name=mixed", "retry_failed=true", check=False)
    assert retry.returncode == 1  # it failed again
    assert "1 to run, 1 already done" in retry.stdout + retry.stderr


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_preempted_run_is_requeued_resumes_and_ends_with_the_same_weights(tmp_path):
    run = (*TINY, "model=cait_tiny", "trainer.max_epochs=6", "trainer.deterministic=true",
           "model.drop_path_rate=0.1")
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "slurm"
    ref_dir.mkdir()
    dir_.mkdir()
    # uninterrupted, here, with the one thread the SLURM job gets (cluster.cpus_per_task=1):
    # float sums in another number of threads need not end bit for bit the same
    caitlab_train(ref_dir, *run, "logger=csv", "threads=1")
    caitlab_train(dir_, "-m", *SLURM, *run, "hydra.launcher.wait=false", "name=pre")

    def summary():
        found = _summaries(dir_ / "pre")
        return next(iter(found.values())) if found else None

    running = _wait_for(lambda: (s := summary()) and s.get("epochs", 0) >= 1
                        and s["status"] == "running" and s, 120, "the first epoch")
    job = running["slurm_job_id"]
    # what SLURM sends before a time limit or a preemption (submitit's signal)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _wait_for(lambda: summary()["status"] == "interrupted", 60, "the checkpoint at the signal")
    interrupted = summary()
    assert interrupted["requeued"] is True and interrupted["interrupted_by"] == "SIGUSR2"
    done = _wait_for(lambda: (s := summary())["status"] == "completed" and s, 240,
                     "the requeued job to finish")
    assert done["attempts"] == 2 and done["slurm_job_id"] == job  # same job, requeued
    assert done["resumed_from"].endswith("last.ckpt")

    (ref_run,) = [p.parent for p in ref_dir.glob("*/*/summary.json")]
    (slurm_run,) = [p.parent for p in (dir_ / "pre").glob("*/summary.json")]
    assert ref_run.name == slurm_run.name  # the launcher does not change the signature
    ref = torch.load(ref_run / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(slurm_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == ref["global_step"]
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key


HOLD = "+cluster.additional_parameters.begin=now+1hour"  # sbatch --begin: pending for an hour


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caitlab.sweeps.cli", *args],
                          capture_output=True, text=True, timeout=120)


def _status_rows(sweep_dir) -> dict[str, str]:
    out = _sweep("status", str(sweep_dir)).stdout.splitlines()
    return {line.split()[0]: line for line in out if line[:10] in _summaries(sweep_dir)}


def _live_jobs(array: str) -> list[str]:
    out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--jobs={array}"],
                         capture_output=True, text=True).stdout
    return out.split()


def test_a_request_no_node_can_take_is_refused_before_submitting(tmp_path):
    # the test cluster's one node has the host's CPUs (scripts/slurm/slurm.conf.in)
    cpus = int(subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c"],
                              capture_output=True, text=True, check=True).stdout.split()[0])
    proc = caitlab_train(tmp_path, "-m", *SLURM, *TINY, "cluster.cpus_per_task=64",
                         "model.depth=1,2", "name=big", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert lines[-1] == (f"caitlab-train: error: cluster.cpus_per_task=64: partition debug's "
                         f"nodes have at most {cpus} CPUs; set cluster.cpus_per_task={cpus} "
                         "or lower")
    assert not list(tmp_path.rglob("summary.json"))  # nothing submitted
    assert "submitted" not in proc.stdout + proc.stderr


def test_status_says_why_a_job_waits_and_cancel_ends_it(tmp_path):
    caitlab_train(tmp_path, "-m", *SLURM, *TINY, "trainer=debug", "model.depth=1", HOLD,
                  "hydra.launcher.wait=false", "name=held")
    sweep_dir = tmp_path / "held"
    (summary,) = _summaries(sweep_dir).values()
    job = summary["slurm_job_id"]
    row = _wait_for(lambda: next(iter(_status_rows(sweep_dir).values()), None), 30, "status")
    assert row.split()[1:4] == ["pending", "(BeginTime)", job]
    cancel = _sweep("cancel", str(sweep_dir))
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.startswith(f"cancelled {summary['signature']} (job {job})")
    assert not _live_jobs(job.split("_")[0])
    assert next(iter(_status_rows(sweep_dir).values())).split()[1] == "cancelled"


def test_a_run_cancelled_by_pattern_stops_the_other_completes_and_a_relaunch_resumes(tmp_path):
    sweep = ("-m", *SLURM, *TINY, "model=vit_tiny", "trainer=debug", "seed=1,2", "name=steer")
    caitlab_train(tmp_path, *sweep, "hydra.launcher.wait=false")
    sweep_dir = tmp_path / "steer"
    cancel = _sweep("cancel", str(sweep_dir), "seed=2")
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.splitlines()[-1].startswith("1 of 1 matching runs cancelled")

    def states():
        return {next(o for o in s["overrides"] if o.startswith("seed=")): s["status"]
                for s in _summaries(sweep_dir).values()}

    _wait_for(lambda: states()["seed=1"] == "completed", 240, "the other run to complete")
    assert states() == {"seed=1": "completed", "seed=2": "cancelled"}
    status = _sweep("status", str(sweep_dir)).stdout.splitlines()
    assert "2 runs: 1 completed, 1 cancelled" in status[-1]
    again = caitlab_train(tmp_path, *sweep)
    assert "1 to run, 1 already done" in again.stdout + again.stderr
    assert states() == {"seed=1": "completed", "seed=2": "completed"}


def test_a_relaunch_lists_runs_no_longer_in_the_sweep_and_cancels_them_on_request(tmp_path):
    grid = ("-m", *SLURM, *TINY, "model=vit_tiny", "trainer=debug", HOLD, "name=grid",
            "hydra.launcher.wait=false")
    caitlab_train(tmp_path, *grid, "seed=1,2")
    sweep_dir = tmp_path / "grid"
    first = _summaries(sweep_dir)
    sig = {next(o for o in s["overrides"] if o.startswith("seed=")): k for k, s in first.items()}
    listed = caitlab_train(tmp_path, *grid, "seed=1")
    out = listed.stdout + listed.stderr
    assert f"1 runs of {sweep_dir} are no longer in the sweep:" in out
    assert f"{sig['seed=2']} (pending): " in out
    assert "hydra.launcher.cancel_removed=true cancels their SLURM jobs" in out
    # the run still in the sweep has its job queued: not submitted twice
    assert "0 to run, 1 already done" in out and "is still queued or running" in out
    assert _summaries(sweep_dir) == first  # listing touches nothing
    cancelled = caitlab_train(tmp_path, *grid, "seed=1", "hydra.launcher.cancel_removed=true")
    assert f"cancelled {sig['seed=2']} (job {first[sig['seed=2']]['slurm_job_id']}): no " \
        "longer in the sweep" in cancelled.stdout + cancelled.stderr
    now = _summaries(sweep_dir)
    assert now[sig["seed=2"]]["status"] == "cancelled"
    assert now[sig["seed=1"]]["status"] == "pending"
    assert _live_jobs(first[sig["seed=1"]]["slurm_job_id"]) == \
        [first[sig["seed=1"]]["slurm_job_id"]]
    assert _sweep("cancel", str(sweep_dir)).returncode == 0  # the held one too


def test_a_waiting_launcher_stops_when_its_jobs_can_never_start(tmp_path):
    from conftest import clean_env

    cmd = [sys.executable, "-m", "caitlab.train", "-m", f"paths.output_dir={tmp_path}", *SLURM,
           *TINY, "trainer=debug", HOLD, "name=stuck"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        job = _wait_for(lambda: (s := _summaries(tmp_path / "stuck")) and
                        next(iter(s.values())).get("slurm_job_id"), 60, "the submission")
        # a request SLURM can no longer place: the job waits for PartitionConfig for ever
        # (scontrol says so, and exits 1, for each update of it)
        for change in ("NumCPUs=64", "StartTime=now"):
            subprocess.run(["scontrol", "update", f"JobId={job}", change], capture_output=True)
        out, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
        subprocess.run(["scancel", job.split("_")[0]])
    assert launcher.returncode == 2, out[-3000:]
    assert f"job {job} (" in out and "waits: PartitionConfig: never starts: the partition " \
        "cannot take this request" in out
    assert out.rstrip().splitlines()[-1] == (
        f"caitlab-train: error: every job still queued can never start: {job} "
        "(PartitionConfig): the partition cannot take this request: change cluster.partition, "
        "or ask less (cluster.cpus_per_task, cluster.mem_gb, trainer.devices); then "
        f"caitlab-sweep cancel {tmp_path / 'stuck'} and launch again")
