"""Which code produced a run: provenance in summary.json, wandb and the report, code
snapshots that queued jobs run from, and the one-line answer to "what is this folder?"."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caitlab import provenance
from caitlab.analysis.report import Run, build_report, mixed_code_warning
from caitlab.sweeps import snapshot
from caitlab.sweeps.cli import main as sweep_main
from conftest import ROOT, caitlab_train, clean_env, slurm_up

TINY = ("trainer=debug", "model.embed_dim=16", "model.depth=1")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout


def _checkout(tmp_path: Path) -> Path:
    """A git checkout of caitlab as this working tree has it, committed."""
    repo = tmp_path / "caitlab"
    files = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, files.split("\0")):
        src = ROOT / name
        if src.is_file() and "fixtures" not in name:
            dest = repo / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    return repo


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _env(repo: Path, **extra: str) -> dict[str, str]:
    return clean_env(PYTHONPATH=f"{repo / 'src'}:{ROOT / 'tests'}", **extra)


def test_git_state_of_a_checkout_says_commit_dirty_and_diff(tmp_path):
    repo = _checkout(tmp_path)
    head = _git(repo, "rev-parse", "HEAD").strip()
    clean = provenance.git_state(repo)
    assert clean["commit"] == head and not clean["dirty"] and clean["diff"] == ""
    _append(repo / "src" / "caitlab" / "models" / "__init__.py", "# edited\n")
    (repo / "mine.py").write_text("x = 1\n")
    dirty = provenance.git_state(repo)
    assert dirty["commit"] == head and dirty["dirty"]
    assert "+# edited" in dirty["diff"] and "# untracked: mine.py" in dirty["diff"]
    assert provenance.git_state(tmp_path / "nowhere") is None


@pytest.mark.slow
def test_a_run_records_the_code_that_produced_it(tmp_path):
    repo = _checkout(tmp_path)
    _append(repo / "src" / "caitlab" / "training" / "callbacks.py", "# an uncommitted change\n")
    out = tmp_path / "out"
    out.mkdir()
    caitlab_train(out, *TINY, "logger=wandb", env=_env(repo, WANDB_MODE="offline"))
    (run,) = [p.parent for p in (out / "default").glob("*/summary.json")]
    prov = json.loads((run / "summary.json").read_text())["provenance"]
    assert prov["git"]["commit"] == _git(repo, "rev-parse", "HEAD").strip()
    # the wandb config carries it too (offline: in the run's uncompressed record file)
    record = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"provenance" in record and prov["git"]["commit"].encode() in record
    assert prov["git"]["dirty"] is True and prov["git"]["root"] == str(repo)
    assert "+# an uncommitted change" in (run / "code.diff").read_text()
    assert prov["git"]["diff_sha"] == provenance.diff_hash(
        provenance.git_state(repo)["diff"])
    import lightning
    import timm
    import torch

    assert prov["libraries"]["torch"] == torch.__version__.split("+")[0]
    assert prov["libraries"]["lightning"] == lightning.__version__
    assert prov["libraries"]["timm"] == timm.__version__
    assert prov["caitlab"] and prov["device"]["type"] == "cpu" and prov["device"]["count"] >= 1
    line = subprocess.run([sys.executable, "-m", "caitlab.sweeps.cli", "show", str(run)],
                          capture_output=True, text=True, env=_env(repo), check=True).stdout
    assert line.startswith(f"{run.name}: trainer=debug ")
    assert "model.depth=1 model.embed_dim=16" in line
    assert f"code {prov['git']['commit'][:10]}+dirty.{prov['git']['diff_sha']}" in line


def _run(name: str, commit: str | None, variant: str = "v1", top1: float = 0.9) -> Run:
    prov = {"git": {"commit": commit, "dirty": False}} if commit else {}
    summary = {"status": "completed", "signature": name, "variant": variant, "seed": 0,
               "test/top1": top1, "axes": {"model": "vit_tiny", "depth": 4},
               "model": {"name": "vit_tiny"}, "provenance": prov}
    return Run(name, summary, [])


def test_report_warns_about_mixed_code_and_splits_by_commit(tmp_path):
    same = [_run("a", "1" * 40), _run("b", "1" * 40)]
    assert mixed_code_warning(same) is None
    rows = build_report(same, tmp_path / "one").rows
    assert len(rows) == 1 and "code" not in rows[0]
    mixed = [_run("a", "1" * 40), _run("b", "2" * 40, top1=0.5), _run("c", None)]
    warning = mixed_code_warning(mixed)
    assert "3 versions of the code" in warning and "1111111111" in warning \
        and "unknown" in warning
    rows = build_report(mixed, tmp_path / "mixed").rows
    assert len(rows) == 1 and rows[0]["code"].count(",") == 2
    rows = build_report(mixed, tmp_path / "split", by_commit=True).rows
    assert sorted(r["code"] for r in rows) == ["1111111111", "2222222222", "unknown"]
    assert sorted(r["test top-1"] for r in rows) == ["50.00", "90.00", "90.00"]


def test_report_warns_when_runs_differ_only_in_uncommitted_edits():
    runs = [_run("a", "1" * 40), _run("b", "1" * 40)]
    for run, diff in zip(runs, ("+# one edit\n", "+# another\n"), strict=True):
        run.summary["provenance"]["git"].update(dirty=True, diff_sha=provenance.diff_hash(diff))
    warning = mixed_code_warning(runs)
    assert "2 versions of the code" in warning
    assert f"1111111111+dirty.{provenance.diff_hash('+# one edit' + chr(10))}" in warning


def test_the_same_uncommitted_edits_are_one_version_of_the_code():
    runs = [_run("a", "1" * 40), _run("b", "1" * 40)]
    for run in runs:
        run.summary["provenance"]["git"].update(dirty=True, diff_sha=provenance.diff_hash("+x"))
    assert mixed_code_warning(runs) is None


def test_sweep_show_refuses_what_is_not_a_run(tmp_path, capsys):
    assert sweep_main(["show", str(tmp_path)]) == 2
    assert "not a run folder's summary" in capsys.readouterr().err


def test_snapshot_copies_the_working_tree_and_goes_when_its_runs_are_done(tmp_path,
                                                                        monkeypatch):
    repo = _checkout(tmp_path)
    _append(repo / "src" / "caitlab" / "training" / "callbacks.py", "# uncommitted\n")
    (repo / "src" / "caitlab" / "extra.py").write_text("X = 1\n")  # untracked, not ignored
    (repo / "outputs").mkdir(exist_ok=True)
    (repo / "outputs" / "big.bin").write_bytes(b"0" * 1000)  # git-ignored: left out
    monkeypatch.setattr(snapshot, "source_root", lambda: repo)
    sweep = tmp_path / "sweep"
    run = sweep / "abc"
    code = snapshot.take(sweep / ".submitit", [run])
    changed = code / "src" / "caitlab" / "training" / "callbacks.py"
    assert changed.read_text().endswith("# uncommitted\n")
    assert (code / "src" / "caitlab" / "extra.py").exists()
    assert not (code / "outputs" / "big.bin").exists()
    record = json.loads((code / provenance.SNAPSHOT_FILE).read_text())
    assert record["commit"] == _git(repo, "rev-parse", "HEAD").strip() and record["dirty"]
    with snapshot.on_path(code):
        assert str(code / "src") in __import__("os").environ["PYTHONPATH"]
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert snapshot.clean(sweep) == [] and code.exists()  # a requeue may still need it
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert len(snapshot.clean(sweep)) == 1 and not code.exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_queued_slurm_job_runs_the_code_it_was_submitted_with(tmp_path):
    if not slurm_up():
        pytest.skip("the local SLURM cluster is not running: scripts/slurm/start.sh")
    repo = _checkout(tmp_path)
    head = _git(repo, "rev-parse", "HEAD").strip()
    slurm = ("-m", "hydra/launcher=slurm", "cluster.cpus_per_task=1", "cluster.timeout_min=10",
             "hydra.launcher.wait=false", "+cluster.additional_parameters.hold=true", "logger=csv",
             *TINY)
    out = tmp_path / "out"
    out.mkdir()
    jobs = {}
    for name, snap in (("snap", "true"), ("nosnap", "false")):
        caitlab_train(out, *slurm, f"name={name}", f"cluster.snapshot_code={snap}",
                      env=_env(repo))
        (summary,) = [json.loads(p.read_text()) for p in (out / name).glob("*/summary.json")]
        assert summary["status"] == "pending"
        jobs[name] = summary["slurm_job_id"]
    # the jobs wait in the queue; meanwhile the source changes so that any run importing it
    # fails
    _append(repo / "src" / "caitlab" / "training" / "callbacks.py",
            '\nraise RuntimeError("code edited after submission")\n')
    subprocess.run(["scontrol", "release", *jobs.values()], check=True)
    deadline = time.time() + 300
    while time.time() < deadline and subprocess.run(
            ["squeue", "--noheader", "--jobs", ",".join(jobs.values())],
            capture_output=True, text=True).stdout.strip():
        time.sleep(1)
    states = {n: json.loads(next((out / n).glob("*/summary.json")).read_text()) for n in jobs}
    snap, nosnap = states["snap"], states["nosnap"]
    assert snap["status"] == "completed", snap.get("error")
    assert snap["provenance"]["git"]["commit"] == head
    assert snap["provenance"]["git"]["dirty"] is False  # the tree as it was at submission
    assert "snapshot" in snap["provenance"]["git"]
    # without the snapshot the job imported the edited code (the test can fail)
    assert nosnap["status"] == "failed" or "code edited after submission" in \
        " ".join(p.read_text() for p in (out / "nosnap" / ".submitit").rglob("*.err"))
    # the job's own output reads back from caitlab (submitit's log, then train.log)
    logged = subprocess.run([sys.executable, "-m", "caitlab.sweeps.cli", "log", str(out / "snap"),
                             "1", "--tail", "50"], capture_output=True, text=True,
                            env=_env(repo))
    assert logged.returncode == 0, logged.stderr
    assert f"{jobs['snap']}_0_log.out <==" in logged.stdout and "test/top1" in logged.stdout
    # once the sweep's runs are done its snapshot goes
    status = subprocess.run([sys.executable, "-m", "caitlab.sweeps.cli", "status",
                             str(out / "snap")],
                            capture_output=True, text=True, env=_env(repo))
    assert status.returncode == 0, status.stderr
    assert not list((out / "snap" / ".submitit").glob("code-*"))
