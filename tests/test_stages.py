"""Multi-stage experiments (caitlab.stages): a chain's jobs, its identity, blocked stages."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from caitlab.stages import Chain, StageError, parse, references
from conftest import caitlab_train, clean_env

TINY = ("model.embed_dim=32", "model.depth=2", "trainer=debug", "logger=csv")


def _expand(lines: list[str]) -> list[list[str]]:
    """Hydra's sweep expansion, for plain ``key=a,b`` lines."""
    choices = []
    for line in lines:
        key, _, value = line.partition("=")
        choices.append([f"{key}={v}" for v in value.split(",")])
    return [list(c) for c in itertools.product(*choices)]


def _folder(job: list[str]) -> str:
    return "f" + "".join(o.split("=")[1][:1] for o in job if o.startswith("model="))


def test_a_chain_expands_each_stage_and_a_fine_tune_follows_each_pretrain():
    chain = Chain({"pretrain": {"model": "a,b", "trainer.max_epochs": 4},
                   "finetune": {"model.img_size": 16, "finetune_from": "${stage:pretrain}"},
                   "scratch": {"model.img_size": 16}})
    (p, pre), (f, fine), (s, scratch) = chain.jobs([["seed=0"], ["seed=1"]], _expand, _folder)
    assert (p, f, s) == ("pretrain", "finetune", "scratch")
    assert pre[:2] == [["seed=0", "model=a", "trainer.max_epochs=4", "stage=pretrain"],
                       ["seed=0", "model=b", "trainer.max_epochs=4", "stage=pretrain"]]
    # a fine-tune per pretrain, with its model, per job of the sweep (seed)
    assert fine == [[f"seed={seed}", f"model={m}", "model.img_size=16",
                     f"finetune_from=stage:pretrain@f{m}", "stage=finetune"]
                    for seed in (0, 1) for m in "ab"]
    assert scratch == [["seed=0", "model.img_size=16", "stage=scratch"],
                       ["seed=1", "model.img_size=16", "stage=scratch"]]
    (ref,) = references(fine[0])
    assert (ref.key, ref.stage, ref.signature) == ("finetune_from", "pretrain", "fa")
    assert parse("stage\\:teacher@0a1b2c3d4e") == ("teacher", "0a1b2c3d4e")  # as Hydra escapes


def test_one_pretrain_fans_out_to_fine_tunes_at_384_and_448():
    chain = Chain({"pretrain": {"model": "a,b"},
                   "finetune": {"model.img_size": "384,448",
                                "finetune_from": "${stage:pretrain}"}})
    (_, pre), (_, fine) = chain.jobs([[]], _expand, _folder)
    assert len(pre) == 2
    assert fine == [["model=a", "model.img_size=384", "finetune_from=stage:pretrain@fa",
                     "stage=finetune"],
                    ["model=a", "model.img_size=448", "finetune_from=stage:pretrain@fa",
                     "stage=finetune"],
                    ["model=b", "model.img_size=384", "finetune_from=stage:pretrain@fb",
                     "stage=finetune"],
                    ["model=b", "model.img_size=448", "finetune_from=stage:pretrain@fb",
                     "stage=finetune"]]


def test_a_stage_overrides_what_the_sweep_sets_and_one_teacher_feeds_many_students():
    chain = Chain({"teacher": {"model": "t"},
                   "student": {"model": "x,y", "distillation": "soft,hard",
                               "distillation.teacher": "${stage:teacher}"}})
    (_, teachers), (_, students) = chain.jobs([["model=z", "seed=3"]], _expand, _folder)
    assert teachers == [["seed=3", "model=t", "stage=teacher"]]
    assert len(students) == 4
    assert {o for job in students for o in job if o.startswith("distillation.teacher")} == \
        {"distillation.teacher=stage:teacher@ft"}
    assert all(job[0] == "seed=3" and "model=z" not in job for job in students)


@pytest.mark.parametrize(("stages", "line"), [
    ({"teacher": {"model": "t"}, "student": {"distillation.teacher": "${stage:teachr}"}},
     "stages.student.distillation.teacher: ${stage:teachr} names no earlier stage "
     "(did you mean teacher?); earlier: teacher"),
    ({"student": {"distillation.teacher": "${stage:student}"}},
     "stages.student.distillation.teacher: ${stage:student} names no earlier stage; "
     "earlier: none"),
    ({"a": {"model": "t"}, "b": {"optim.lr": "${stage:a}"}},
     "stages.b.optim.lr: ${stage:...} can set finetune_from or distillation.teacher"),
    ({"a": {"name": "other"}}, "stages.a.name: a stage cannot set name"),
    ({"a": {"model": "t"}, "b": {"finetune_from": "runs/${stage:a}"}},
     "stages.b.finetune_from=runs/${stage:a}: a reference is the whole value"),
    ({"a": "model=t"}, "stages.a: must map override keys to values"),
])
def test_a_chain_that_cannot_be_expanded_is_one_line_naming_the_key(stages, line):
    with pytest.raises(StageError) as err:
        Chain(stages)
    assert str(err.value).startswith(line)


CHAIN = """\
# @package _global_
name: chain
stages:
  teacher:
    model: cait_tiny
{teacher}
  student:
    model: vit_tiny
    model/dist_token: "on"
    distillation: soft,hard
    distillation.teacher: ${{stage:teacher}}
hydra:
  mode: MULTIRUN
"""


def _summaries(sweep) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def _status(out, sweep) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caitlab.sweeps.cli", "status", str(sweep)],
                          cwd=out, env=clean_env(), capture_output=True, text=True, timeout=60)


def test_a_chain_runs_in_order_is_blocked_by_a_failed_upstream_and_skips_when_done(tmp_path):
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    # a teacher that fails as it starts: its data is not there
    (conf / "chain.yaml").write_text(CHAIN.format(
        teacher="    data: imagefolder\n    data.root: /nonexistent/images"))
    sweep = tmp_path / "chain"

    bad = caitlab_train(tmp_path, "experiment=chain", *TINY, check=False)
    assert bad.returncode == 1
    runs = _summaries(sweep)
    (teacher,) = [s for s in runs.values() if s.get("stage") == "teacher"]
    assert teacher["status"] == "failed" and "/nonexistent/images" in teacher["error"]
    blocked = {k: s for k, s in runs.items() if s.get("stage") == "student"}
    assert [s["status"] for s in blocked.values()] == ["blocked", "blocked"]
    assert all(s["blocked_by"] == teacher["signature"] for s in blocked.values())
    assert f"blocked: its upstream stage teacher ({teacher['signature']}) is failed" in bad.stderr
    assert not any((sweep / k / "checkpoints").exists() for k in blocked)
    status = _status(tmp_path, sweep)
    assert "3 runs: 1 failed, 2 blocked" in status.stdout, status.stdout

    (conf / "chain.yaml").write_text(CHAIN.format(teacher=""))  # the teacher mended
    good = caitlab_train(tmp_path, "experiment=chain", *TINY)
    runs = _summaries(sweep)
    (teacher,) = [s for s in runs.values() if s.get("stage") == "teacher"
                  and s["status"] == "completed"]
    students = {k: s for k, s in runs.items()
                if s.get("stage") == "student" and s["status"] == "completed"}
    assert len(students) == 2
    for folder, s in students.items():
        # the teacher is the upstream's best checkpoint, named by signature, not by path
        assert s["upstream"] == {"distillation.teacher": {"stage": "teacher",
                                                          "signature": teacher["signature"]}}
        assert s["teacher"]["source"] == str(sweep / teacher["signature"] / "checkpoints"
                                             / "best.ckpt")
        assert (f"distillation.teacher=stage\\:teacher@{teacher['signature']}"
                in s["overrides"])
        # the same student overrides under another teacher: another run, another folder
        assert folder not in blocked
    assert sorted(s["overrides"][-3] for s in students.values()) == \
        sorted(s["overrides"][-3] for s in blocked.values())  # distillation=hard / soft
    # in order: the students started after the teacher had completed
    teacher_done = (sweep / teacher["signature"] / "checkpoints" / "best.ckpt").stat().st_mtime
    assert all((sweep / k / "config.yaml").stat().st_mtime > teacher_done for k in students)

    again = caitlab_train(tmp_path, "experiment=chain", *TINY)
    assert again.stderr.count("already completed, skipping") + \
        again.stdout.count("already completed, skipping") == 3
    assert {k: s["attempts"] for k, s in _summaries(sweep).items() if k in students} == \
        dict.fromkeys(students, 1)
    assert good.returncode == 0

    # the report: a stage column, the students compared among themselves, not with the teacher
    report = subprocess.run([sys.executable, "-m", "caitlab.analysis.report", str(sweep)],
                            cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    data = json.loads((sweep / "report.json").read_text())
    rows = [(r["stage"], r["distillation"], r["comparison"]) for r in data["rows"]
            if r["state"] == "completed"]
    assert rows == [("teacher", "none", None), ("student", "soft", "baseline"),
                    ("student", "hard", "too few seeds")], rows
    assert data["stage_baselines"]["student"] == {"distillation": "soft"}
    (verdict,) = [v for v in data["verdicts"] if v["stage"] == "student"]
    assert verdict["question"] == "student: hard vs soft (digits)"


SLURM = ("hydra/launcher=slurm", "cluster.cpus_per_task=1", "cluster.timeout_min=10")
TWO = CHAIN.replace("distillation: soft,hard", "distillation: soft")
# a student long enough to be preempted while it trains (full digits epochs)
LONG = TWO.replace("distillation: soft\n",
                   "distillation: soft\n    trainer.max_epochs: 6\n"
                   "    trainer.limit_train_batches: 1.0\n")


def _sacct(*jobs: str) -> dict[str, dict[str, str]]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(jobs),
                          "--format=JobID,State,Start,End"], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: {"state": r[1], "start": r[2], "end": r[3]} for r in rows}


def _wait_for(predicate, timeout: float, what: str):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _by_stage(sweep) -> dict[str, dict]:
    return {s["stage"]: s for s in _summaries(sweep).values()}


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_on_slurm_a_chain_is_submitted_at_once_and_its_second_job_waits_on_the_first(tmp_path):
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "chain.yaml").write_text(LONG.format(teacher=""))
    sweep = tmp_path / "chain"
    caitlab_train(tmp_path, "experiment=chain", *SLURM, *TINY, "hydra.launcher.wait=false")
    runs = _by_stage(sweep)
    up, down = runs["teacher"]["slurm_job_id"], runs["student"]["slurm_job_id"]
    assert up.split("_")[0] != down.split("_")[0]  # an array per stage, both submitted
    depends = subprocess.run(["squeue", "-h", "--array", "-j", down, "-o", "%E"],
                             capture_output=True, text=True, check=True).stdout
    assert f"afterok:{up}" in depends
    # the student preempted as it trains (submitit's signal): requeued, resumed, its teacher
    # still its upstream's best checkpoint
    _wait_for(lambda: (s := _by_stage(sweep)["student"]).get("epochs", 0) >= 1
              and s["status"] == "running", 180, "the student's first epoch")
    subprocess.run(["scancel", "--signal=USR2", down], check=True)
    _wait_for(lambda: _by_stage(sweep)["student"]["status"] in ("interrupted", "completed"),
              60, "the student's checkpoint at the signal")
    live = (None, "PENDING", "RUNNING", "REQUEUED")
    jobs = _wait_for(lambda: (j := _sacct(up, down)) and all(
        j.get(k, {}).get("state") not in live for k in (up, down)) and j, 300, "both jobs to end")
    assert jobs[up]["state"] == jobs[down]["state"] == "COMPLETED"
    assert {s["status"] for s in _by_stage(sweep).values()} == {"completed"}
    assert jobs[down]["start"] >= jobs[up]["end"]  # ISO times: it started once the first ended
    student = _by_stage(sweep)["student"]
    assert student["teacher"]["source"].endswith(
        f"{runs['teacher']['signature']}/checkpoints/best.ckpt")
    assert student["attempts"] == 2 and student["slurm_job_id"] == down  # requeued in place
    assert student["requeued"] is True and student["resumed_from"].endswith("last.ckpt")
    assert student["epochs"] == 6

    again = caitlab_train(tmp_path, "experiment=chain", *SLURM, *TINY)
    assert (again.stdout + again.stderr).count("0 to run, 1 already done") == 2
    assert {s["slurm_job_id"] for s in _by_stage(sweep).values()} == {up, down}  # none new


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_on_slurm_a_stage_whose_upstream_job_fails_is_cancelled_and_blocked(tmp_path):
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "chain.yaml").write_text(TWO.format(
        teacher="    data: imagefolder\n    data.root: /nonexistent/images"))
    sweep = tmp_path / "chain"
    proc = caitlab_train(tmp_path, "experiment=chain", *SLURM, *TINY, check=False)
    assert proc.returncode == 1
    runs = _by_stage(sweep)
    teacher, student = runs["teacher"], runs["student"]
    assert teacher["status"] == "failed"
    assert student["status"] == "blocked" and student["blocked_by"] == teacher["signature"]
    assert student["error"].startswith(f"blocked: its upstream stage teacher "
                                       f"({teacher['signature']}) is failed")
    job = _sacct(student["slurm_job_id"])[student["slurm_job_id"]]
    assert job["state"].startswith("CANCELLED") and job["start"] in ("None", "Unknown")
    status = _status(tmp_path, sweep)
    assert "2 runs: 1 failed, 1 blocked" in status.stdout, status.stdout
    # launched again, the student is blocked before anything is submitted
    again = caitlab_train(tmp_path, "experiment=chain", *SLURM, *TINY, check=False)
    assert again.returncode == 1 and "0 to run, 1 already done" in again.stdout + again.stderr
    assert _by_stage(sweep)["student"]["slurm_job_id"] is None
