"""The sweep launcher's plan: every job's config and run folder as Hydra's full composition
gives them, from one composition per set of config-group overrides (no SLURM needed)."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from caitlab.identity import signature
from caitlab.record import read_summary
from caitlab.resolvers import register_resolvers
from caitlab.status import Status
from caitlab.train import CONF_DIR
from conftest import write_summary

# Hydra's plugin scan re-executes the plugin's modules, redefining their classes: always look
# them up through the module, never keep an imported class.
from hydra_plugins.caitlab_launcher import compose
from hydra_plugins.caitlab_launcher import follow as following
from hydra_plugins.caitlab_launcher import plan as planning
from hydra_plugins.caitlab_launcher import task as array_task

TASK = ["model.embed_dim=32", "trainer=debug", "logger=csv", "paths.output_dir=/tmp/plan"]

# Jobs in the order a sweep would give them, covering each way of applying value overrides:
# in place (the same keys, plain values; +add and ~delete kept from the job before), a fresh
# copy (other keys, another +add, a list, a key set twice), new group choices, values other
# keys interpolate (data.seed: ${seed}, data.img_size: ${model.img_size}) and a value that
# moves the sweep folder (name).
JOBS = [
    ["model=vit_tiny", "seed=0", "model.depth=2"],
    ["model=vit_tiny", "seed=1", "model.depth=2"],
    ["model=vit_tiny", "seed=1", "model.depth=3"],
    ["model=vit_tiny", "seed=2", "model.img_size=16"],
    ["model=vit_tiny", "seed=2", "model.depth=3"],
    ["model=cait_tiny", "model/residual=none", "seed=0", "model.depth=2"],
    ["model=cait_tiny", "model/residual=layerscale", "seed=0", "model.depth=2"],
    ["model=vit_tiny", "+recipe.note=abc", "seed=0"],
    ["model=vit_tiny", "+recipe.note=abc", "seed=1"],
    ["model=vit_tiny", "+recipe.note=xyz", "seed=1"],
    ["model=vit_tiny", "seed=0", "model.depth=2"],
    ["model=vit_tiny", "~ema", "seed=4"],
    ["model=vit_tiny", "~ema", "seed=3"],
    ["model=vit_tiny", "model.depth=4", "model.depth=5"],
    ["model=vit_tiny", "model.depth=4", "model.depth=6"],
    ["model=vit_tiny", "seed=5", "trainer.devices=[0]"],
    ["model=vit_tiny", "seed=5", "name=other"],
    ["model=vit_tiny", "seed=5", "model.depth=2"],
]


@pytest.fixture
def hydra_loader():
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", TASK, run_mode=RunMode.MULTIRUN)
        yield loader, master


def test_plan_gives_every_job_hydras_config_and_run_folder(hydra_loader):
    loader, master = hydra_loader
    plan = compose.SweepPlan(loader, master)
    expected = set()
    for job in JOBS:
        overrides = TASK + job
        full = loader.load_sweep_config(master, overrides)
        planned = plan.config(overrides)
        assert _without_hydra(planned) == _without_hydra(full), job
        assert planned.hydra.sweep.dir == full.hydra.sweep.dir
        expected.add(Path(full.hydra.sweep.dir) / signature(full))
        assert plan.run_dir(overrides) == Path(full.hydra.sweep.dir) / signature(full), job
    assert {plan.run_dir(TASK + job) for job in JOBS} == expected
    # one composition per set of group overrides, not per job (3), each also without the
    # left-out groups' options (logger=csv: the values they set count), and the defaults'
    # (the signature hashes the group choices that differ from theirs)
    assert len(plan._bases) == 3 * 2 + 1


# an unknown key, an unknown group option, adding a key that exists, an unparsable value
@pytest.mark.parametrize("job", [["model.no_such_key=1"], ["model=no_such_model"],
                                 ["+seed=3"], ["seed=[1"]])
def test_plan_refuses_what_hydra_refuses(hydra_loader, job):
    loader, master = hydra_loader
    with pytest.raises(Exception) as hydra_error:
        loader.load_sweep_config(master, TASK + job)
    with pytest.raises(type(hydra_error.value)):
        compose.SweepPlan(loader, master).config(TASK + job)


def test_array_task_runs_the_shared_launcher_and_requeues_itself(tmp_path):
    shared = tmp_path / "launcher.pkl"
    with open(shared, "wb") as f:
        pickle.dump((_Echo(), {"state": 1}), f)
    task = array_task.ArrayTask(str(shared))
    assert pickle.loads(pickle.dumps(task))(["seed=1"], "hydra.sweep.dir", 3, "id") == \
        (["seed=1"], "hydra.sweep.dir", 3, "id", {"state": 1})
    requeued = task.checkpoint(["seed=1"], "hydra.sweep.dir", 3, "id")
    assert requeued.function is task and requeued.args == (["seed=1"], "hydra.sweep.dir", 3,
                                                           "id")


@contextlib.contextmanager
def _local_launcher(sweep: Path, monkeypatch, *config: str):
    """The local launcher of a sweep into ``sweep`` (wait=false, no snapshot) and the list
    its jobs are submitted to: submitit's executor stands in, submitting nothing."""
    import submitit
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    submitted = []

    class Executor:  # submitit's, without submitting
        def __init__(self, cluster: str, **params) -> None:
            assert cluster == "local"

        def update_parameters(self, **params) -> None:
            pass

        def map_array(self, fn, *args):
            submitted.extend(zip(*args, strict=True))
            return [type("Job", (), {"job_id": f"7_{i}"})() for i in range(len(args[0]))]

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "train", [*TASK, "hydra/launcher=local", "hydra.launcher.wait=false",
                      "hydra.launcher.snapshot=false", f"hydra.sweep.dir={sweep}", *config],
            run_mode=RunMode.MULTIRUN)
        yield Plugins.instance().instantiate_launcher(
            hydra_context=HydraContext(config_loader=loader, callbacks=None),
            task_function=lambda cfg: None, config=master), submitted


def test_launch_gives_the_sweep_folder_the_mode_hydra_sweep_mode_asks(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    with _local_launcher(sweep, monkeypatch, "+hydra.sweep.mode=750") as (launcher, submitted):
        launcher.launch([[*TASK, "seed=1"], [*TASK, "seed=2"]], initial_job_idx=0)
    assert len(submitted) == 2
    assert sweep.stat().st_mode & 0o777 == 0o750  # as hydra-submitit-launcher's own launch


def test_a_blocked_run_submitted_again_says_pending_with_its_job(tmp_path, monkeypatch):
    # while its job waits for its upstream's, caitlab-sweep shows it pending, a second
    # re-launch sees that job instead of submitting another, and its code snapshot stays (a
    # blocked run's can go)
    with _local_launcher(tmp_path / "sweep", monkeypatch) as (launcher, submitted):
        job = [*TASK, "seed=1"]
        run_dir = launcher.sweep_plan.run_dir(job)
        write_summary(run_dir, status=Status.BLOCKED, slurm_job_id=None)
        launcher.launch([job], initial_job_idx=0)
    assert len(submitted) == 1
    summary = read_summary(run_dir)
    assert (summary["status"], summary["slurm_job_id"]) == ("pending", "7_0")


# A sweep folder as a re-launch finds it: each kind of run a plan must tell apart.
SWEPT = {"completed": ["seed=1"], "failed": ["seed=2"], "interrupted": ["seed=3"],
         "new": ["seed=4"], "gone": ["seed=6"]}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """(the plan of a re-launch over a folder of completed, failed, interrupted and blocked
    runs and one no longer in the sweep, each job's run folder, the sweep folder's files
    before planning, after)."""
    sweep = tmp_path_factory.mktemp("planned") / "sweep"
    with pytest.MonkeyPatch.context() as mp, _local_launcher(sweep, mp) as (launcher, _):
        jobs = {kind: [*TASK, *job] for kind, job in SWEPT.items()}
        dirs = {kind: launcher.sweep_plan.run_dir(job) for kind, job in jobs.items()}
        # a stage of a chain whose upstream (the failed run) did not complete
        jobs["blocked"] = [*TASK, "seed=5", f"finetune_from=stage\\:pretrain@{dirs['failed'].name}",
                           "stage=finetune"]
        dirs["blocked"] = launcher.sweep_plan.run_dir(jobs["blocked"])
        for kind, status in [("completed", Status.COMPLETED), ("failed", Status.FAILED),
                             ("interrupted", Status.INTERRUPTED), ("blocked", Status.BLOCKED),
                             ("gone", Status.COMPLETED)]:
            write_summary(dirs[kind], overrides=jobs[kind],
                          status=status, error="boom" if kind == "failed" else None)
        (dirs["interrupted"] / "checkpoints").mkdir()
        (dirs["interrupted"] / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        before = _files(sweep)
        plan = launcher.plan([job for kind, job in jobs.items() if kind != "gone"])
        after = _files(sweep)
    return plan, dirs, before, after


def _files(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and folder under ``folder``: its modification time and its contents."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns,
                                         p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _entry(plan, run_dir: Path):
    (entry,) = [e for e in plan.entries if e.run_dir == run_dir]
    return entry


def test_planning_a_relaunch_writes_nothing(planned):
    _, _, before, after = planned
    assert len(before) > 5  # the runs' folders and files
    assert after == before


def test_the_plan_skips_a_completed_run(planned):
    plan, dirs, _, _ = planned
    entry = _entry(plan, dirs["completed"])
    assert (entry.action, entry.failed) == (planning.Action.SKIP, False)
    assert entry.why == f"completed ({dirs['completed']})"


def test_the_plan_skips_a_failed_run_as_failed_saying_how_to_retry(planned):
    plan, dirs, _, _ = planned
    entry = _entry(plan, dirs["failed"])
    assert (entry.action, entry.failed) == (planning.Action.SKIP, True)
    assert entry.why.endswith(": failed before (boom); not run again without "
                              "retry_failed=true")


def test_the_plan_resumes_an_interrupted_run_and_runs_a_new_one(planned):
    plan, dirs, _, _ = planned
    assert _entry(plan, dirs["interrupted"]).action == planning.Action.RESUME
    assert _entry(plan, dirs["new"]).action == planning.Action.RUN
    assert [e.run_dir for e in plan.to_submit] == [dirs["interrupted"], dirs["new"]]


def test_the_plan_blocks_a_stage_on_its_failed_upstream(planned):
    plan, dirs, _, _ = planned
    entry = _entry(plan, dirs["blocked"])
    assert (entry.action, entry.failed) == (planning.Action.BLOCKED, True)
    assert entry.blocked_by == dirs["failed"].name
    assert entry.why.startswith(f"blocked: its upstream stage pretrain ({dirs['failed'].name})"
                                " is failed (boom)")


def test_the_plan_lists_the_runs_no_longer_in_the_sweep(planned):
    plan, dirs, _, _ = planned
    assert [g.run_dir for g in plan.removed] == [dirs["gone"]]


def test_a_stage_waits_for_its_upstreams_live_job_in_an_array_of_its_own(tmp_path):
    upstream = tmp_path / "0a1b2c3d4e"
    write_summary(upstream, status=Status.PENDING, slurm_job_id="5_0")
    job = ["seed=1", f"finetune_from=stage\\:pretrain@{upstream.name}", "stage=finetune"]
    plan = planning.make_plan([(["seed=1"], tmp_path / "a"), (job, tmp_path / "b")],
                              retry_failed=False, live_job=lambda s: s.get("slurm_job_id"))
    assert [e.after for e in plan.entries] == [(), ("5_0",)]
    assert [(after, [e.run_dir.name for e in group]) for after, group in plan.arrays()] == \
        [((), ["a"]), (("5_0",), ["b"])]


def test_acting_on_the_plan_marks_a_blocked_stage_and_submits_nothing_for_it(tmp_path,
                                                                             monkeypatch):
    with _local_launcher(tmp_path / "sweep", monkeypatch) as (launcher, submitted):
        upstream = launcher.sweep_plan.run_dir([*TASK, "seed=2"])
        write_summary(upstream, status=Status.FAILED, error="boom")
        job = [*TASK, "seed=5", f"finetune_from=stage\\:pretrain@{upstream.name}",
               "stage=finetune"]
        (returned,) = launcher.launch([job], initial_job_idx=0)
        run_dir = launcher.sweep_plan.run_dir(job)
    summary = read_summary(run_dir)
    assert (summary["status"], summary["blocked_by"]) == ("blocked", upstream.name)
    assert summary["error"].startswith(f"blocked: its upstream stage pretrain ({upstream.name})")
    assert returned.status == JobStatus.FAILED and not submitted


def _without_hydra(cfg) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"}


class _Echo:
    def __call__(self, *args):
        return args


class _Job:
    """A submitted job as the launcher follows it: its id, and done after ``polls`` polls."""

    def __init__(self, job_id: str, polls: int) -> None:
        self.job_id, self.polls = job_id, polls

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def _queues(monkeypatch, *answers):
    """squeue answering ``answers`` ({job: reason} of pending jobs), one per poll."""
    from caitlab.sweeps import slurm

    left = list(answers)
    monkeypatch.setattr(following, "FOLLOW_POLL_S", 0)
    monkeypatch.setattr(slurm, "query_queue", lambda timeout=None: slurm.Queue(
        {j: "PENDING" for j in left[0]}, dict(left.pop(0) if len(left) > 1 else left[0])))


def test_waiting_launcher_says_when_a_jobs_reason_changes(tmp_path, monkeypatch, caplog):
    _queues(monkeypatch, {"9_0": "Priority", "9_1": "Priority"}, {"9_0": "Priority"},
            {"9_0": "Resources"}, {})
    jobs = [_Job("9_0", 3), _Job("9_1", 1)]
    with caplog.at_level("INFO", logger=following.__name__):
        following.follow(jobs, [tmp_path / "a", tmp_path / "b"], tmp_path)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["job 9_0 (a) waits: Priority", "job 9_1 (b) waits: Priority",
                    "job 9_0 (a) waits: Resources"]


def test_waiting_launcher_stops_once_every_job_left_can_never_start(tmp_path, monkeypatch,
                                                                      caplog):
    from caitlab.config import ConfigError

    _queues(monkeypatch, {"9_0": "Priority", "9_1": "InvalidAccount"},
            {"9_1": "InvalidAccount"})
    jobs = [_Job("9_0", 1), _Job("9_1", 99)]
    with caplog.at_level("INFO", logger=following.__name__), \
            pytest.raises(ConfigError) as err:
        following.follow(jobs, [tmp_path / "a", tmp_path / "b"], tmp_path)
    assert str(err.value) == (
        "every job still queued can never start: 9_1 (InvalidAccount): SLURM does not know "
        f"this account: change cluster.account; then caitlab-sweep cancel {tmp_path} and "
        "launch again")
    assert jobs[1].polls > 90  # it stopped at once, not when the job would have ended
    assert "job 9_1 (b) waits: InvalidAccount: never starts: SLURM does not know this " \
        "account: change cluster.account" in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(("trainer", "gpus"), [(["trainer=gpu"], 1),
                                               (["trainer=gpu", "trainer.devices=2"], 2),
                                               (["trainer=cpu"], None)])
def test_local_jobs_of_a_gpu_run_see_its_gpus(trainer, gpus):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration("train", [*TASK, "hydra/launcher=local", *trainer],
                                        run_mode=RunMode.MULTIRUN)
    # submitit's local executor sets CUDA_VISIBLE_DEVICES to this many GPUs ("" for none)
    assert cfg.hydra.launcher.gpus_per_node == gpus
