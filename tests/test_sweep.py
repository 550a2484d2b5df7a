"""caitlab-sweep status: reconciling run folders with squeue, the table, --json, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caitlab.analysis.report import collect_runs
from caitlab.record import write_json_atomic
from caitlab.sweeps import cli as sweep
from caitlab.sweeps import slurm

SHARED = ["experiment=demo", "paths.output_dir=/data/outputs"]

# signature -> (summary fields, overrides that vary)
RUNS = {
    "aaaaaaaaa1": ({"status": "completed", "slurm_job_id": "100", "epochs": 30,
                    "val/top1": 0.9, "val/top1_best": 0.91, "test/top1": 0.93871},
                   ["model=vit_tiny", "seed=0"]),
    "aaaaaaaaa2": ({"status": "running", "slurm_job_id": "101_0", "epochs": 4,
                    "val/top1": 0.5123}, ["model=vit_tiny", "seed=1"]),
    "aaaaaaaaa3": ({"status": "running", "slurm_job_id": "101_1", "epochs": 7,
                    "val/top1": 0.61}, ["model=cait_tiny", "seed=0"]),
    "aaaaaaaaa4": ({"status": "pending", "slurm_job_id": "102"}, ["model=cait_tiny", "seed=1"]),
    "aaaaaaaaa5": ({"status": "failed", "slurm_job_id": "103", "epochs": 1,
                    "error": "RuntimeError: boom"}, ["model=vit_tiny", "seed=2"]),
    "aaaaaaaaa6": ({"status": "diverged", "slurm_job_id": "104", "diverged_epoch": 3,
                    "epochs": 3, "val/top1": 0.1}, ["model=cait_tiny", "seed=2"]),
    "aaaaaaaaa7": ({"status": "completed", "epochs": 30, "val/top1": 0.88,
                    "test/top1": 0.8}, ["model=vit_tiny", "seed=3"]),  # local: no job id
}
# 101_1 (aaaaaaaaa3) is missing: its job died without writing a final state
SQUEUE = {"100": "COMPLETED", "101_0": "RUNNING", "102": "RUNNING", "103": "FAILED",
          "104": "COMPLETED", "999": "PENDING"}


def make_sweep(root: Path, runs: dict = RUNS) -> Path:
    sweep_dir = root / "outputs" / "demo"
    for sig, (fields, overrides) in runs.items():
        summary = {"signature": sig, "overrides": [*overrides, *SHARED], "attempts": 1,
                   "updated_at": "2026-01-01T00:00:00+0000", **fields}
        write_json_atomic(sweep_dir / sig / "summary.json", summary)
    # Hydra's own files in the sweep folder are not runs
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    (sweep_dir / ".submitit" / "101_0").mkdir(parents=True)
    (sweep_dir / ".submitit" / "101_0" / "101_0_submitted.pkl").write_bytes(b"x")
    (sweep_dir / "report.md").write_text("| x |\n")
    return sweep_dir


@pytest.fixture
def sweep_dir(tmp_path):
    return make_sweep(tmp_path)


def by_sig(statuses):
    return {s.signature: s for s in statuses}


def test_run_states_reconciles_with_squeue(sweep_dir):
    statuses = by_sig(sweep.run_states(collect_runs(sweep_dir), SQUEUE))
    assert set(statuses) == set(RUNS)  # Hydra files are not runs
    got = {sig: (s.state, s.label, s.slurm_state) for sig, s in statuses.items()}
    assert got == {
        "aaaaaaaaa1": ("completed", "completed", "COMPLETED"),
        "aaaaaaaaa2": ("running", "running", "RUNNING"),
        "aaaaaaaaa3": ("lost", "lost (last: running)", None),
        "aaaaaaaaa4": ("running", "running", "RUNNING"),  # pending summary, job started
        "aaaaaaaaa5": ("failed", "failed", "FAILED"),
        "aaaaaaaaa6": ("diverged", "diverged at epoch 3", "COMPLETED"),
        "aaaaaaaaa7": ("completed", "completed", None),
    }
    assert statuses["aaaaaaaaa1"].metric_name == "test/top1"
    assert statuses["aaaaaaaaa1"].metric_text == "93.87 (test)"
    assert statuses["aaaaaaaaa2"].metric_text == "51.23 (val)"
    assert statuses["aaaaaaaaa4"].metric is None and statuses["aaaaaaaaa4"].metric_text == ""
    assert statuses["aaaaaaaaa5"].error == "RuntimeError: boom"
    assert statuses["aaaaaaaaa2"].slurm_job_id == "101_0"
    assert statuses["aaaaaaaaa7"].slurm_job_id is None


def test_run_states_without_squeue_keeps_folder_states(sweep_dir):
    statuses = by_sig(sweep.run_states(collect_runs(sweep_dir), None))
    assert statuses["aaaaaaaaa3"].label == "running"  # unknown, so not lost
    assert statuses["aaaaaaaaa4"].label == "pending"
    assert statuses["aaaaaaaaa6"].label == "diverged at epoch 3"
    assert all(s.slurm_state is None for s in statuses.values())


@pytest.mark.parametrize("summary, live, expected", [
    ({"status": "pending", "slurm_job_id": "7"}, "PENDING", ("pending", "pending")),
    ({"status": "pending", "slurm_job_id": "7"}, None, ("lost", "lost (last: pending)")),
    ({"status": "pending", "slurm_job_id": "7"}, "CANCELLED", ("lost", "lost (last: pending)")),
    ({"status": "running", "slurm_job_id": "7"}, "NODE_FAIL", ("lost", "lost (last: running)")),
    ({"status": "running", "slurm_job_id": "7"}, "PENDING",
     ("pending", "pending (requeued, last: running)")),
    ({"status": "running", "slurm_job_id": "7"}, "COMPLETING", ("running", "running")),
    ({"status": "running"}, None, ("running", "running")),  # local run: never lost
    ({"status": "running", "slurm_job_id": None}, None, ("running", "running")),
    ({"status": "interrupted", "slurm_job_id": "7"}, "PENDING",
     ("interrupted", "interrupted (requeued)")),
    ({"status": "interrupted", "slurm_job_id": "7"}, None, ("interrupted", "interrupted")),
    ({"status": "completed", "slurm_job_id": "7"}, None, ("completed", "completed")),
    ({"status": "diverged", "slurm_job_id": "7", "diverged_epoch": 12}, None,
     ("diverged", "diverged at epoch 12")),
])
def test_reconcile(summary, live, expected):
    squeue = {"8": "RUNNING"} if live is None else {"7": live}
    state, label, got_live = sweep.reconcile(summary, squeue)
    assert (state, label) == expected
    assert got_live == live


def test_varying_overrides():
    assert sweep.varying_overrides([["a=1", "b=1", "x=0"], ["a=2", "b=1", "x=0"]]) == [
        ["a=1"], ["a=2"]]
    # nothing varies (or a single run): show them all
    assert sweep.varying_overrides([["a=1", "x=0"], ["a=1", "x=0"]]) == [
        ["a=1", "x=0"], ["a=1", "x=0"]]
    assert sweep.varying_overrides([["a=1", "x=0"]]) == [["a=1", "x=0"]]
    assert sweep.varying_overrides([]) == []


def test_counts_line(sweep_dir):
    statuses = sweep.run_states(collect_runs(sweep_dir), SQUEUE)
    assert sweep.counts_line(statuses) == (
        "7 runs: 2 completed, 2 running, 1 lost, 1 failed, 1 diverged")
    one = sweep.run_states(collect_runs(sweep_dir), SQUEUE)[:1]
    assert sweep.counts_line(one) == "1 run: 1 completed"


def fake_squeue(monkeypatch, states=SQUEUE, reasons=None):
    monkeypatch.setattr(slurm, "query_queue",
                        lambda timeout=None: slurm.Queue(dict(states), dict(reasons or {})))


def test_status_table(sweep_dir, monkeypatch, capsys):
    fake_squeue(monkeypatch)
    assert sweep.main(["status", str(sweep_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["signature", "state", "job", "slurm", "epochs", "top1", "%",
                              "attempts", "overrides"]
    rows = {line.split()[0]: line for line in out[1:-1]}
    assert set(rows) == set(RUNS)
    assert rows["aaaaaaaaa3"].split()[:6] == ["aaaaaaaaa3", "lost", "(last:", "running)",
                                              "101_1", "-"]
    assert "diverged at epoch 3" in rows["aaaaaaaaa6"]
    assert "93.87 (test)" in rows["aaaaaaaaa1"] and "51.23 (val)" in rows["aaaaaaaaa2"]
    # only what varies: model and seed, not experiment= / paths.output_dir=
    assert rows["aaaaaaaaa2"].endswith("model=vit_tiny seed=1")
    assert all("experiment=" not in line and "paths.output_dir" not in line for line in out)
    assert out[-1] == "7 runs: 2 completed, 2 running, 1 lost, 1 failed, 1 diverged"


def test_status_json(sweep_dir, monkeypatch, capsys):
    fake_squeue(monkeypatch)
    assert sweep.main(["status", str(sweep_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list) and len(data) == len(RUNS)
    rows = {row["signature"]: row for row in data}
    assert rows["aaaaaaaaa3"]["state"] == "lost"
    assert rows["aaaaaaaaa3"]["label"] == "lost (last: running)"
    assert rows["aaaaaaaaa3"]["summary_status"] == "running"
    assert rows["aaaaaaaaa4"]["state"] == "running"
    assert rows["aaaaaaaaa4"]["slurm_state"] == "RUNNING"
    assert rows["aaaaaaaaa1"]["metric_name"] == "test/top1"
    assert rows["aaaaaaaaa1"]["metric"] == pytest.approx(0.93871)
    assert rows["aaaaaaaaa6"]["label"] == "diverged at epoch 3"
    assert rows["aaaaaaaaa7"]["slurm_job_id"] is None
    assert rows["aaaaaaaaa2"]["overrides"] == ["model=vit_tiny", "seed=1"]
    assert rows["aaaaaaaaa2"]["attempts"] == 1


def test_status_all_overrides_shared(tmp_path, monkeypatch, capsys):
    fake_squeue(monkeypatch, {})
    sweep_dir = make_sweep(tmp_path, {"bbbbbbbbb1": ({"status": "completed"}, ["seed=0"])})
    assert sweep.main(["status", str(sweep_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("seed=0 experiment=demo paths.output_dir=/data/outputs")
    assert out[-1] == "1 run: 1 completed"


def test_status_squeue_unavailable(sweep_dir, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(sweep_dir))  # no squeue there
    assert sweep.main(["status", str(sweep_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(squeue unavailable: squeue not found on PATH)"
    rows = {line.split()[0]: line for line in out[2:-1]}
    assert rows["aaaaaaaaa3"].split()[1:4] == ["running", "101_1", "-"]  # unknown: not lost
    assert out[-1] == "7 runs: 2 completed, 2 running, 1 pending, 1 failed, 1 diverged"


def write_fake_squeue(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "squeue"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_query_squeue_with_a_fake_binary(tmp_path, monkeypatch):
    args_file = tmp_path / "args"
    write_fake_squeue(tmp_path / "bin", f'echo "$@" > {args_file}\n'
                      'printf "  100|RUNNING\\n101_3|PENDING\\nbad line\\n"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert sweep.squeue_states() == {"100": "RUNNING", "101_3": "PENDING"}
    args = args_file.read_text().split()
    assert {"--noheader", "--format=%i|%T|%r", "--states=all", "--array"} <= set(args)


def test_query_squeue_failure_and_timeout(tmp_path, monkeypatch):
    write_fake_squeue(tmp_path / "fail", "echo 'slurm_load_jobs error: Unable to contact "
                      "slurm controller' >&2\nexit 1\n")
    write_fake_squeue(tmp_path / "slow", "sleep 5\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fail'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(sweep.SqueueUnavailable, match="Unable to contact slurm controller"):
        sweep.query_squeue()
    assert sweep.squeue_states() is None
    monkeypatch.setenv("PATH", f"{tmp_path / 'slow'}{os.pathsep}{os.environ['PATH']}")
    t0 = time.monotonic()
    assert sweep.squeue_states(timeout=0.5) is None
    assert time.monotonic() - t0 < 4


def _controller_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "UP" in proc.stdout


def test_real_squeue_states():
    if shutil.which("squeue") is None:
        assert sweep.squeue_states() is None
        return
    if _controller_up():
        assert isinstance(sweep.squeue_states(timeout=20), dict)
    else:  # squeue installed, cluster stopped: reported unavailable, in bounded time
        t0 = time.monotonic()
        assert sweep.squeue_states(timeout=2) is None
        assert time.monotonic() - t0 < 10


def test_cli_missing_or_empty_folder(tmp_path, capsys):
    assert sweep.main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err
    (tmp_path / "empty" / ".submitit").mkdir(parents=True)
    assert sweep.main(["status", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no runs" in err


def test_entry_point_is_light_and_exits_2(tmp_path):
    exe = Path(sys.executable).parent / "caitlab-sweep"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "caitlab.sweeps.cli"]
    proc = subprocess.run([*cmd, "status", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.startswith("caitlab-sweep: error:")
    code = ("import sys, caitlab.sweeps.cli; "
            "print(sorted(m for m in ('torch', 'lightning', 'hydra') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "[]"


def test_log_reads_a_runs_job_output_and_train_log(tmp_path, capsys):
    from caitlab.sweeps.cli import main as sweep_main

    sweep = tmp_path / "sweep"
    for sig, job in (("abc1234567", "77_1"), ("abd7654321", None)):
        (sweep / sig).mkdir(parents=True)
        (sweep / sig / "summary.json").write_text(json.dumps(
            {"status": "running", "slurm_job_id": job, "signature": sig}))
        (sweep / sig / "train.log").write_text("".join(f"{sig} line {i}\n" for i in range(5)))
    jobs = sweep / ".submitit" / "77_1"  # submitit's layout for task 1 of array 77
    jobs.mkdir(parents=True)
    (jobs / "77_1_0_log.out").write_text("out 1\nout 2\nout 3\n")
    (jobs / "77_1_0_log.err").write_text("err 1\nTraceback: boom\n")
    assert sweep_main(["log", str(sweep), "abc", "--tail", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"==> {jobs / '77_1_0_log.out'} <==", "out 2", "out 3",
                   f"==> {sweep / 'abc1234567' / 'train.log'} <==", "abc1234567 line 3",
                   "abc1234567 line 4"]
    assert sweep_main(["log", str(sweep), "1", "--err", "--tail", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"==> {jobs / '77_1_0_log.err'} <==", "Traceback: boom"]
    assert sweep_main(["log", str(sweep), "2", "--tail", "0"]) == 0  # by row, every line
    assert capsys.readouterr().out.count("abd7654321 line") == 5
    assert sweep_main(["log", str(sweep), "ab"]) == 2
    assert "'ab' starts 2 signatures" in capsys.readouterr().err
    assert sweep_main(["log", str(sweep), "zzz"]) == 2
    assert "no run 'zzz' in the sweep (signatures: abc1234567, abd7654321)" in \
        capsys.readouterr().err


def test_squeue_reasons_and_the_ones_that_never_start():
    queue = slurm.parse_squeue("1|PENDING|BeginTime\n2|RUNNING|None\n"
                               "3_1|PENDING|ReqNodeNotAvail, UnavailableNodes:n1\n"
                               "4|PENDING|QOSMaxCpuPerJobLimit\n5|PENDING|InvalidAccount\n"
                               "6|PENDING|InvalidQOS\n7|PENDING|PartitionConfig\n")
    assert queue.states["2"] == "RUNNING" and "2" not in queue.reasons  # only waiting jobs
    assert queue.reasons["3_1"] == "ReqNodeNotAvail, UnavailableNodes:n1"
    never = {job: slurm.never_starts(r) for job, r in queue.reasons.items()}
    assert never["1"] is None and never["4"] is None  # waits its turn
    assert "cluster.partition" in never["3_1"] and "cluster.partition" in never["7"]
    assert "cluster.account" in never["5"] and "cluster.qos" in never["6"]


def test_status_says_why_each_pending_job_waits(tmp_path, monkeypatch, capsys):
    sweep_dir = make_sweep(tmp_path, {
        "ccccccccc1": ({"status": "pending", "slurm_job_id": "5_0"}, ["seed=0"]),
        "ccccccccc2": ({"status": "pending", "slurm_job_id": "5_1"}, ["seed=1"]),
        "ccccccccc3": ({"status": "running", "slurm_job_id": "5_2"}, ["seed=2"]),
    })
    fake_squeue(monkeypatch, {"5_0": "PENDING", "5_1": "PENDING", "5_2": "RUNNING"},
                {"5_0": "Priority", "5_1": "InvalidQOS"})
    assert sweep.main(["status", str(sweep_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[1:4]}
    assert rows["ccccccccc1"].split()[1:3] == ["pending", "(Priority)"]
    assert rows["ccccccccc2"].split()[1:5] == ["pending", "(InvalidQOS:", "never", "starts)"]
    assert rows["ccccccccc3"].split()[1] == "running"
    assert out[4] == "3 runs: 1 running, 2 pending"
    assert out[5:] == ["ccccccccc2: job 5_1 can never start (InvalidQOS): SLURM does not know "
                       "this QOS, or it is not yours: change cluster.qos"]
    assert sweep.main(["status", str(sweep_dir), "--json"]) == 0
    data = {r["signature"]: r for r in json.loads(capsys.readouterr().out)}
    assert data["ccccccccc1"]["reason"] == "Priority" and not data["ccccccccc1"]["never_starts"]
    assert "cluster.qos" in data["ccccccccc2"]["never_starts"]


def test_status_shows_device_hours_where_runs_recorded_them(tmp_path, monkeypatch, capsys):
    fake_squeue(monkeypatch, {})
    sweep_dir = make_sweep(tmp_path, {
        "ddddddddd1": ({"status": "completed", "device_hours": 1.25}, ["seed=0"]),
        "ddddddddd2": ({"status": "completed", "device_hours": 0.5}, ["seed=1"]),
        "ddddddddd3": ({"status": "completed"}, ["seed=2"]),  # written before caitlab did
    })
    assert sweep.main(["status", str(sweep_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].split()
    assert header[-2:] == ["device-h", "overrides"]
    column = out[0].index("device-h")
    cells = {line.split()[0]: line[column:column + 8].strip() for line in out[1:4]}
    assert cells == {"ddddddddd1": "1.25", "ddddddddd2": "0.5", "ddddddddd3": ""}
    assert out[4] == "3 runs: 3 completed; 1.75 device-hours"


def test_cancel_patterns_match_every_key_by_fnmatch():
    overrides = ["model=cait_tiny", "model.depth=12", "+recipe.note=x", "seed=1"]
    assert sweep.matches(overrides, [])
    assert sweep.matches(overrides, ["model=cait_*", "model.depth=1?"])
    assert sweep.matches(overrides, ["recipe.note=x"])  # + and ~ are not part of the key
    assert not sweep.matches(overrides, ["model=cait_*", "seed=0"])
    assert not sweep.matches(overrides, ["model.depth=1"])  # the whole value
    assert not sweep.matches(overrides, ["lr=*"])  # no such override


def test_cancel_scancels_the_matching_live_jobs_and_marks_them(tmp_path, monkeypatch, capsys):
    sweep_dir = make_sweep(tmp_path, {
        "eeeeeeeee1": ({"status": "pending", "slurm_job_id": "5_0"}, ["model.depth=1"]),
        "eeeeeeeee2": ({"status": "running", "slurm_job_id": "5_1"}, ["model.depth=2"]),
        "eeeeeeeee3": ({"status": "completed", "slurm_job_id": "5_2"}, ["model.depth=2"]),
    })
    bin_dir, done = tmp_path / "bin", tmp_path / "scancelled"
    bin_dir.mkdir()
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" > {done}\n')
    write_fake_squeue(bin_dir, f'if [ -f {done} ]; then printf "5_1|CANCELLED|None\\n"; '
                      'else printf "5_0|PENDING|Priority\\n5_1|RUNNING|None\\n"; fi\n')
    (bin_dir / "scancel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert sweep.main(["cancel", str(sweep_dir), "model.depth=2"]) == 0
    assert done.read_text().split() == ["5_1"]  # the completed run's job is not touched
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cancelled eeeeeeeee2 (job 5_1)")
    assert out[1] == ("1 of 2 matching runs cancelled (the others have no live job); "
                      "re-launching the sweep resumes them")
    states = {r.folder.name: r.summary["status"] for r in collect_runs(sweep_dir)}
    assert states == {"eeeeeeeee1": "pending", "eeeeeeeee2": "cancelled",
                      "eeeeeeeee3": "completed"}
    assert sweep.main(["status", str(sweep_dir)]) == 0
    assert "1 cancelled" in capsys.readouterr().out.splitlines()[-1]
    assert sweep.main(["cancel", str(sweep_dir), "model.depth=3"]) == 2
    assert "no run of" in capsys.readouterr().err


def test_request_refusal_reads_the_partitions_nodes(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # two kinds of node: 4 CPUs + 2 GPUs, 8 CPUs without GPU
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf '4|16000|gpu:a100:2(S:0-1)\\n"
                                   "8|64000|(null)\\n'\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert slurm.request_refusal({"cpus_per_task": 8}, "p") is None
    assert slurm.request_refusal({"cpus_per_task": 2, "tasks_per_node": 2,
                                  "gpus_per_node": 2, "mem_gb": 15}, "p") is None
    assert slurm.request_refusal({"cpus_per_task": 9}, "p") == (
        "cluster.cpus_per_task=9: partition p's nodes have at most 8 CPUs; "
        "set cluster.cpus_per_task=8 or lower")
    assert slurm.request_refusal({"cpus_per_task": 3, "tasks_per_node": 4}, "p") == (
        "cluster.cpus_per_task=3 x trainer.devices=4 tasks: partition p's nodes have at most "
        "8 CPUs; set cluster.cpus_per_task=2 or lower")
    assert slurm.request_refusal({"mem_gb": 100}, "p") == (
        "cluster.mem_gb=100: partition p's nodes have at most 62 GB of memory; "
        "set cluster.mem_gb=62 or lower")
    assert slurm.request_refusal({"gpus_per_node": 4}, "p") == (
        "trainer.devices=4: partition p's nodes have at most 2 GPUs; "
        "set trainer.devices=2 or lower")
    # each fits some node, no node fits both
    assert slurm.request_refusal({"cpus_per_task": 8, "gpus_per_node": 1}, "p").startswith(
        "no node of partition p has cluster.cpus_per_task=8")


def test_runs_in_a_code_snapshot_are_not_the_sweeps(sweep_dir, monkeypatch, capsys):
    # a submission's code snapshot (caitlab.sweeps.snapshot) holds the checkout's test fixtures
    fixture = sweep_dir / ".submitit" / "code-abc" / "code" / "tests" / "fixtures" / "f0f0f0f0f0"
    write_json_atomic(fixture / "summary.json", {"status": "completed", "overrides": ["seed=2"]})
    fake_squeue(monkeypatch)
    assert sweep.main(["status", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "f0f0f0f0f0" not in out and out.splitlines()[-1].startswith("7 runs:")
