"""caitlab as a researcher gets it: the built wheel in a fresh venv, run from any folder, and
a project of their own (examples/own_project) adding a model, data and experiment of its own.

The slow tests build the wheel and install it into fresh venvs without the network (uv's
cache). The fast ones check, in this checkout, that ./conf, --config-dir, hydra.searchpath
and CAITLAB_CONFIG_DIR add options and that a model class of a project's own trains.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, clean_env

EXAMPLE = ROOT / "examples" / "own_project"
UV = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
# Tiny runs: caitlab's trainer=debug, one epoch (a recipe must not lengthen it).
TINY = ("trainer=debug", "trainer.max_epochs=1", "logger=csv",
        "trainer.enable_progress_bar=false")


def _console(name: str) -> str:
    """This venv's console script (make setup installs caitlab editable into .venv)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"{path} not installed (make setup)")
    return str(path)


def _project(tmp_path: Path) -> Path:
    """A copy of examples/own_project, as a researcher's own folder would be."""
    dest = tmp_path / "own_project"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


def _summaries(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("summary.json"))]


def _table(report_md: str) -> list[dict[str, str]]:
    lines = [ln for ln in report_md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]


# --- in this checkout (fast) ----------------------------------------------------------------


def test_project_options_come_from_conf_config_dir_searchpath_and_env(tmp_path):
    """./conf beside the code, --config-dir, hydra.searchpath and CAITLAB_CONFIG_DIR each add
    the project's model/data/experiment options next to caitlab's own."""
    project = _project(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    conf = project / "conf"
    train = _console("caitlab-train")
    env = clean_env()
    ways = {
        "./conf": (project, [], env),
        "--config-dir": (empty, ["--config-dir", str(conf)], env),
        "hydra.searchpath": (empty, [f"hydra.searchpath=[file://{conf}]"], env),
        "CAITLAB_CONFIG_DIR": (empty, [], clean_env(CAITLAB_CONFIG_DIR=str(conf))),
    }
    for way, (cwd, extra, how_env) in ways.items():
        out = _run([train, *extra, "model=mynet", "data=digits_small", "model.channels=8",
                    "--cfg", "job"], cwd, how_env).stdout
        assert "_target_: mynet.MyNet" in out and "channels: 8" in out, way
        assert "val_fraction: 0.3" in out and "_target_: caitlab.data.DigitsDataModule" in out
    # the experiment is a sweep of the project's model against caitlab's
    out = _run([train, "experiment=mynet_vs_vit", "--cfg", "hydra"], project, env).stdout
    assert "model: mynet,vit_tiny" in out
    # a mistyped option: one line that suggests the project's option
    proc = _run([train, "model=mynett", "--cfg", "job"], project, env, check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "model/mynett" in line and "did you mean mynet" in line
    # without the project's conf, caitlab's options only
    proc = _run([train, "model=mynet", "--cfg", "job"], empty, env, check=False)
    assert proc.returncode == 2 and "model/mynet" in proc.stderr


def test_a_model_class_of_a_projects_own_trains_with_its_axes(tmp_path, forkserver):
    project = _project(tmp_path)
    proc = forkserver.run(project, "model=mynet", "model.channels=8", "data=digits_small", *TINY)
    (summary,) = _summaries(project / "default")
    assert summary["status"] == "completed", proc.stderr[-2000:]
    assert 0.0 <= summary["test/top1"] <= 1.0
    assert summary["model"]["name"] == "MyNet" and summary["model"]["target"] == "mynet.MyNet"
    # the model's own constructor arguments are its axes (the data's input ones too)
    assert summary["axes"] == {"model": "MyNet", "in_chans": 1, "num_classes": 10,
                               "img_size": 8, "channels": 8, "kernel_size": 3}
    sys.path.insert(0, str(project))
    try:
        from mynet import MyNet

        from caitlab.models import count_macs, count_params

        net = MyNet(channels=8)
        assert summary["model"]["params"] == count_params(net)
        assert summary["model"]["macs"] == count_macs(net, 8, 1) > 0
    finally:
        sys.path.remove(str(project))
        for name in [m for m in sys.modules if m == "mynet" or m.startswith("mynet.")]:
            del sys.modules[name]


def test_a_projects_model_refusing_its_config_or_the_data_is_one_line(tmp_path, forkserver):
    project = _project(tmp_path)
    cases = {
        # a mistyped argument of the project's class: its closest argument suggested
        ("+model.kernal=5",): "model: mynet.net.MyNet: got an unexpected keyword argument "
                              "'kernal' (did you mean model.kernel_size?)",
        # the class's own check of a value
        ("model.kernel_size=4",): "model: mynet.net.MyNet: kernel_size=4 must be odd "
                                  "(same-size padding)",
        # a model for RGB images on the grey digits: found before training starts
        ("model.in_chans=3",): "model: MyNet cannot take one 1x8x8 image of the data "
                               "(data.in_chans, data.img_size): RuntimeError: ",
    }
    for overrides, expected in cases.items():
        proc = forkserver.run(project, "model=mynet", *overrides, *TINY, check=False)
        assert proc.returncode == 2, (overrides, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1].startswith(
            f"caitlab-train: error: {expected}"), (overrides, proc.stderr[-2000:])
    assert not (project / "default").exists()  # a refused config leaves no run folder


# --- the wheel (slow) -----------------------------------------------------------------------


def _source_tree(dest: Path) -> Path:
    """This checkout's files as git sees them (tracked, and new ones not ignored), plus what
    a working tree also holds and the wheel must not: bytecode, and cluster specifics put in
    the package's conf/local by mistake."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    planted = ["src/caitlab/conf/local/default.yaml", "src/caitlab/__pycache__/train.cpython.pyc"]
    for name in planted:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text("cluster: {account: planted-7f3a}\n")
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not Path(UV).exists():
        pytest.skip("uv not found")
    tree = _source_tree(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("dist")
    t0 = time.perf_counter()
    _run([UV, "build", "--wheel", "--offline", "-q", "-o", str(out)], tree, clean_env())
    print(f"\nwheel built in {time.perf_counter() - t0:.1f} s")
    (whl,) = out.glob("caitlab-*.whl")
    return whl


def test_the_wheel_ships_the_configs_and_nothing_git_ignored(wheel):
    zf = zipfile.ZipFile(wheel)
    names = zf.namelist()
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "src/caitlab/conf"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    shipped = {n for n in names if n.startswith("caitlab/conf/")}
    assert shipped == {t.removeprefix("src/") for t in tracked}
    assert "caitlab/conf/train.yaml" in shipped and "caitlab/conf/model/vit_tiny.yaml" in shipped
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/local/" in n
                or n.startswith(("tests/", "examples/", "scripts/"))]
    assert not [n for n in names if b"planted-7f3a" in zf.read(n)]
    assert "hydra_plugins/caitlab_launcher/launcher.py" in names
    entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("caitlab-train", "caitlab-report", "caitlab-sweep", "caitlab-bench",
                   "caitlab-attention"):
        assert f"{script} = " in entry_points


def _wheel_env() -> dict[str, str]:
    """No PYTHONPATH (tests/ and src/ must not leak in) and no project config dir."""
    env = clean_env()
    env.pop("PYTHONPATH", None)
    env.pop("CAITLAB_CONFIG_DIR", None)
    env.pop("CAITLAB_OUTPUT_DIR", None)
    return env


@pytest.mark.slow
def test_the_wheel_installs_offline_from_the_lock_into_a_fresh_venv(wheel, tmp_path):
    """A real install: every dependency from uv.lock (uv's cache, hard links), caitlab from
    the wheel; the configs are found from an empty folder."""
    venv = tmp_path / "venv"
    t0 = time.perf_counter()
    _run([UV, "sync", "--frozen", "--offline", "--no-install-project", "--no-dev", "-q",
          "--python", sys.executable], ROOT, {**clean_env(), "UV_PROJECT_ENVIRONMENT": str(venv)})
    _run([UV, "pip", "install", "--offline", "--no-deps", "-q", "--python",
          str(venv / "bin" / "python"), str(wheel)], ROOT, clean_env())
    print(f"\nfresh venv (uv sync --frozen --offline) + wheel: {time.perf_counter() - t0:.1f} s")
    _run([UV, "pip", "check", "--python", str(venv / "bin" / "python")], ROOT, clean_env())
    empty = tmp_path / "empty"
    empty.mkdir()
    help_text = _run([str(venv / "bin" / "caitlab-train"), "--help"], empty, _wheel_env()).stdout
    # caitlab's own help page, its options listed from the configs the wheel ships
    assert help_text.startswith("caitlab-train: trains") and "\nmodel: " in help_text
    assert "vit_tiny" in help_text.split("== Options of each group ==")[1]
    job = _run([str(venv / "bin" / "caitlab-train"), "trainer=debug", "--cfg", "job"], empty,
               _wheel_env()).stdout
    assert "limit_train_batches: 3" in job  # trainer=debug, from the wheel's configs


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with caitlab from the wheel only. Its dependencies come from this
    checkout's .venv (the same locked versions) through a .pth line: a venv of its own with
    compiled bytecode costs a minute here, and without bytecode every process recompiles
    torch (40 s an import). Only a site folder's .pth files run, so .venv's editable-install
    .pth (pointing at src/) does not; the wheel's own site-packages comes first."""
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    t0 = time.perf_counter()
    _run([UV, "venv", "-q", "--python", sys.executable, str(venv)], ROOT, clean_env())
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], ROOT, clean_env()).stdout.strip())
    (site / "_caitlab_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([UV, "pip", "install", "--offline", "--no-deps", "-q", "--python", str(python),
          str(wheel)], ROOT, clean_env())
    print(f"\nvenv + wheel: {time.perf_counter() - t0:.1f} s")
    return venv


@pytest.mark.slow
def test_installed_caitlab_runs_from_any_folder_and_a_projects_own(wheel_venv, tmp_path):
    bin_dir = wheel_venv / "bin"
    env = _wheel_env()
    empty = tmp_path / "empty"
    empty.mkdir()
    # caitlab is the wheel's, its declared dependencies are met, nothing of the checkout
    probe = _run([str(bin_dir / "python"), "-c", """
import importlib.metadata as md, sys
from packaging.requirements import Requirement
import caitlab
print(caitlab.__file__)
print(md.distribution("caitlab").locate_file(""))
bad = [r for r in map(Requirement, md.requires("caitlab") or [])
       if (r.marker is None or r.marker.evaluate({"extra": ""}))
       and not r.specifier.contains(md.version(r.name), prereleases=True)]
print(bad)
print(any("/src" in p or p.endswith("tests") for p in sys.path))
"""], empty, env).stdout.splitlines()
    site = str(wheel_venv)
    assert probe[0].startswith(site) and probe[1].startswith(site)
    assert probe[2] == "[]" and probe[3] == "False"

    # 1. from an empty folder: the run lands in ./outputs of that folder
    help_text = _run([str(bin_dir / "caitlab-train"), "--help"], empty, env).stdout
    assert "cait_tiny" in help_text.split("== Options of each group ==")[1]
    t0 = time.perf_counter()
    _run([str(bin_dir / "caitlab-train"), *TINY], empty, env)
    print(f"\ncaitlab-train trainer=debug from an empty folder: {time.perf_counter() - t0:.1f} s")
    (summary_path,) = (empty / "outputs" / "default").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["test/top1"] is not None
    assert summary_path.parent.name == summary["signature"]
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]  # nothing else written here
    status = _run([str(bin_dir / "caitlab-sweep"), "status", "outputs/default"], empty, env)
    counts = status.stdout.strip().splitlines()[-1]
    assert counts.startswith("1 run: 1 completed; ") and counts.endswith(" device-hours")
    maps = _run([str(bin_dir / "caitlab-attention"), str(summary_path.parent), "--digits", "0",
                 "--out", "maps"], empty, env)
    assert (empty / "maps" / "attention_digit0.png").stat().st_size > 1000, maps.stdout

    # 2. a project of its own: its experiment, its report, its model benched
    project = _project(tmp_path)
    t0 = time.perf_counter()
    _run([str(bin_dir / "caitlab-train"), "experiment=mynet_vs_vit", *TINY[1:],
          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
          "trainer.limit_test_batches=1"], project, env)
    print(f"mynet_vs_vit (4 runs): {time.perf_counter() - t0:.1f} s")
    sweep = project / "outputs" / "mynet_vs_vit"
    summaries = _summaries(sweep)
    assert [s["status"] for s in summaries] == ["completed"] * 4
    assert sorted(s["model"]["name"] for s in summaries) == ["MyNet"] * 2 + ["vit_tiny"] * 2
    report = _run([str(bin_dir / "caitlab-report"), "outputs/mynet_vs_vit"], project, env)
    rows = {r["model"]: r for r in _table((sweep / "report.md").read_text())}
    assert rows.keys() == {"MyNet", "vit_tiny"} and "2 completed" in report.stdout
    # the project's model's own arguments are columns; caitlab's internals are not
    assert (rows["MyNet"]["channels"], rows["MyNet"]["kernel_size"]) == ("16", "3")
    assert rows["vit_tiny"]["channels"] == "" and rows["vit_tiny"]["residual"] == "none"
    assert "talking_heads" not in rows["MyNet"] and "in_chans" not in rows["MyNet"]
    with open(sweep / "report.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2

    mynet_run = next(p.parent for p in sweep.glob("*/summary.json")
                     if json.loads(p.read_text())["model"]["name"] == "MyNet")
    mynet_summary = json.loads((mynet_run / "summary.json").read_text())
    bench = _run([str(bin_dir / "caitlab-bench"), f"outputs/mynet_vs_vit/{mynet_run.name}",
                  "--batch", "4", "--warmup", "0", "--repeats", "1", "--iters", "1",
                  "--device", "cpu", "--threads", "1", "--matmul-size", "64", "--json"],
                 project, env)
    result = json.loads(bench.stdout)
    assert result["built"] == "mynet.MyNet" and result["img_size"] == [8, 8]
    assert result["params"] == mynet_summary["model"]["params"]
    assert result["macs"] == mynet_summary["model"]["macs"] > 0
    assert result["training"]["images_per_s"] > 0
    assert os.path.isdir(project / "outputs")  # nothing written outside the project
