from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# The faults the tests inject through these callbacks change when a run stops, not what it
# trains: a re-launch without them is the same run (caitlab.identity counts other callbacks)
FAULTS_OUTSIDE_SIGNATURE = "signature_exclude_callbacks=[" + ",".join(
    f"helpers.{name}" for name in ("InterruptAtEpochStart", "PoisonLossAt", "SignalAtStep",
                                   "CrashAt", "FailBeforeRendezvous", "WeightsDigest",
                                   "SigkillAt")) + ",test_console.Boom]"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(PYTHONPATH=str(TESTS), WANDB_MODE="offline", WANDB_SILENT="true",
               HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


_server = None  # the session's fork server (tests/forkserver.py), started on first use


def fork_server():
    global _server
    if _server is None:
        from forkserver import ForkServer

        _server = ForkServer()
    return _server


def caitlab_train(out: Path, *overrides: str, env: dict[str, str] | None = None,
                  timeout: float = 600, check: bool = True, fresh: bool = False):
    """Runs caitlab-train as a user would, with tiny defaults, outputs under ``out``.

    Forked from the session's warm process (tests/forkserver.py: the same ``main()``, its
    own process, without ~10 s of imports), or with ``fresh=True`` the command itself in a
    new interpreter: for what a fresh process decides (its thread count from the CPUs it was
    given, the README's first command as it is)."""
    if env is not None and env.get("PYTHONPATH") != clean_env()["PYTHONPATH"]:
        fresh = True  # the server's imports came from its own path
    if not fresh:
        return fork_server().run(out, *overrides, env=env, check=check, timeout=timeout)
    flags = [o for o in overrides if o.startswith("-")]
    cmd = [sys.executable, "-m", "caitlab.train", *flags, f"paths.output_dir={out}",
           "trainer.enable_progress_bar=false", *(o for o in overrides if o not in flags)]
    proc = subprocess.run(cmd, cwd=out, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def last_weights(run_dir: Path) -> tuple[dict, int]:
    """The weights in a run folder's ``last.ckpt``, and the global step they were saved at."""
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def assert_same_weights(ref: dict, got: dict) -> None:
    """Every tensor of ``ref`` equals ``got``'s, bit for bit."""
    import torch

    for key, value in ref.items():
        assert torch.equal(value, got[key]), key


def make_image_folder(root: Path, per_class: int = 4) -> Path:
    """``root/{train,val}/class{0,1}/{0..per_class-1}.png``: a tiny ImageNet-layout folder,
    two colours."""
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in enumerate(("red", "blue")):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20 + i, 24), colour).save(folder / f"{i}.png")
    return root


def tiny_teacher(folder, in_chans: int = 1, num_classes: int = 10, img_size: int = 8) -> list[str]:
    """A tiny timm teacher's weights, saved in ``folder``; the overrides that distil from it."""
    import timm
    import torch

    kwargs = {"img_size": img_size, "patch_size": 2, "embed_dim": 16, "depth": 1,
              "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=in_chans,
                              num_classes=num_classes, **kwargs)
    torch.save(model.state_dict(), folder / "teacher.pth")
    return ["distillation=soft", "distillation.teacher=vit_tiny_patch16_224",
            f"distillation.teacher_weights={folder / 'teacher.pth'}",
            *(f"+distillation.teacher_kwargs.{k}={v}" for k, v in kwargs.items())]


# make test runs the suite on two pytest-xdist workers (-n 2 --dist loadgroup). A file's tests
# share a worker, so its module fixtures are made once; the tests that take both cores
# themselves (DDP over two ranks, the local SLURM cluster's jobs, a core per run, threads per
# core, SIGKILLs at chosen moments) share one, so that no two of them overlap, and each meets
# at most one other process for the cores.
BOTH_CORES = {"test_ddp.py", "test_slurm.py", "test_slots.py", "test_cpus.py",
              "test_gpu_check.py", "test_faults.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        both = name in BOTH_CORES or "slurm_cluster" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group("both-cores" if both else name))


# Where Lightning keeps the process's global rank: the last Trainer made in a process sets it,
# and its rank_zero_only functions (the CSV logger's writes) do nothing on any other rank.
RANK_ZERO_MODULES = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero",
                     "lightning_utilities.core.rank_zero")


@pytest.fixture(autouse=True)
def _rank_zero_restored():
    """A test that builds a Trainer as rank 1 (tests/test_ranks.py) leaves the next test of its
    worker, which trains in-process, a rank that logs nothing: each test starts at rank 0."""
    yield
    for name in RANK_ZERO_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module.rank_zero_only, "rank", 0) != 0:
            module.rank_zero_only.rank = 0


@pytest.fixture
def train_cmd(tmp_path):
    def run(*overrides, **kwargs):
        return caitlab_train(tmp_path, *overrides, **kwargs)

    run.out = tmp_path
    return run


def slurm_up() -> bool:
    import shutil

    if shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "UP" in out.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    if not slurm_up():
        pytest.skip("the local SLURM cluster is not running: scripts/slurm/start.sh (as root; "
                    "make test starts it)")


@pytest.fixture(scope="session")
def forkserver():
    """Runs ``caitlab-train`` without paying its imports again (see tests/forkserver.py)."""
    return fork_server()


@pytest.fixture(scope="session", autouse=True)
def _close_fork_server():
    yield
    if _server is not None:
        _server.close()


def write_summary(run_dir: Path, **data: object) -> None:
    """A run folder as some process left it: its ``summary.json`` holding ``data`` (a status
    as its string, as the record writes it)."""
    from caitlab.record import write_json_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "summary.json",
                      {"attempts": 0, **{k: getattr(v, "value", v) for k, v in data.items()}})
