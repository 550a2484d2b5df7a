"""Bad input gets one clear line and a non-zero exit; broken state is recovered or named.

The ``caitlab-train`` runs are forked from one warm process (``forkserver`` fixture,
tests/forkserver.py): the same ``main()`` as the console script, without ~10 s of imports each.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from caitlab.config import CONF_DIR
from caitlab.models.checkpoint import ResumeError, resume_checkpoint
from caitlab.record import RunLock
from conftest import clean_env, make_image_folder


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("caitlab-train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=nope"], "Could not find 'model/nope'; model= takes one of cait_m24_224, "),
        (["experiment=nope"], "Could not find 'experiment/nope'"),
        (["optim.momentum=0.9"], "optim.momentum: no key 'momentum' in optim (to add a new key: "
                                 "+optim.momentum=...)"),
        (["optim.lr=fast"], "optim.lr='fast' must be a number"),
        (["model.name=cait_xxl"], "unknown model name 'cait_xxl'"),
        (["model.embed_dim=30"], "embed_dim=30 is not divisible by num_heads=4"),
        (["model.img_size=9"], "img_size=9 is not divisible by patch_size=2"),
        (["model/class_token=insert", "model.insert_layer=4"], "insert_layer=4 must be in [0"),
        (["model.depth=0"], "depth=0 must be a positive integer"),
        (["model.depth=-2"], "depth=-2 must be a positive integer"),
        (["model.num_heads=0"], "num_heads=0 must be a positive integer"),
        (["model.num_heads=-1"], "num_heads=-1"),
        (["optim.lr=0"], "optim.lr=0.0 is not allowed: must be > 0"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 is not allowed: must be > 0"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed"),
        (["trainer.max_epochs=-3"], "trainer.max_epochs=-3 is not allowed"),
        (["data.batch_size=0"], "data.batch_size: must be an integer >= 1, got 0"),
        (["data.batch_size=-8"], "data.batch_size: must be an integer >= 1, got -8"),
        (["trainer.devices=64"], "trainer.devices=64 is not allowed"),
        (["data=imagefolder", "data.root=/no/such/folder"], "/no/such/folder does not exist"),
        (["data=imagefolder", "data.root={tmp}/no_classes"],
         "{tmp}/no_classes has no class folders under train/"),
        (["finetune_from=/no/such.ckpt"], "checkpoint not found: /no/such.ckpt"),
        (["finetune_from={tmp}/notes.txt"],
         "{tmp}/notes.txt is not a checkpoint: it is a text file (starting 'not a checkpoint')"),
    ],
)
def test_user_errors_are_one_line_with_the_key(tmp_path, forkserver, overrides, message):
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    (tmp_path / "no_classes" / "val").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    proc = forkserver.run(tmp_path, *overrides, "logger=csv", check=False)
    assert proc.returncode == 2
    assert message.format(tmp=tmp_path) in _error_line(proc)
    # nothing was started, and Hydra's folder for the run is gone again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_classes", "notes.txt"]


def _refused_with_a_project_option(tmp_path, forkserver, name: str, text: str) -> str:
    """The error line of a plain run beside ``./conf/<name>`` holding ``text``; nothing but
    the project's conf/ is left."""
    path = tmp_path / "conf" / name
    path.parent.mkdir(parents=True)
    path.write_text(text)
    proc = forkserver.run(tmp_path, "logger=csv", check=False)
    assert proc.returncode == 2
    assert [p.name for p in tmp_path.iterdir()] == ["conf"]
    return _error_line(proc)


def test_a_local_option_that_changes_the_result_is_refused_in_one_line(tmp_path, forkserver):
    line = _refused_with_a_project_option(tmp_path, forkserver, "local/default.yaml",
                                          "# @package _global_\ndata:\n  batch_size: 256\n")
    assert line.startswith(
        "caitlab-train: error: conf/local/default.yaml sets data.batch_size=256: the local "
        "option in effect by default may set only what changes no result")


def test_a_project_option_named_like_caitlabs_is_refused_naming_both(tmp_path, forkserver):
    line = _refused_with_a_project_option(tmp_path, forkserver, "model/cait_tiny.yaml",
                                          "defaults:\n  - cait_tiny\n  - _self_\ndepth: 12\n")
    assert line == (
        "caitlab-train: error: conf/model/cait_tiny.yaml has the name of caitlab's "
        f"model/cait_tiny.yaml ({CONF_DIR}/model/cait_tiny.yaml), which Hydra would use "
        "instead: rename yours (model=my_cait_tiny)")


@pytest.mark.parametrize("overrides,message", [
        (["model=vit_tine"], "In 'train': Could not find 'model/vit_tine'; did you mean "
                             "vit_tiny?"),
        (["data=digit"], "Could not find 'data/digit'; did you mean digits?"),
        (["experiment=dem"], "Could not find 'experiment/dem'; did you mean demo?"),
        (["model/residual=layerscal"], "Could not find 'model/residual/layerscal'; did you mean "
                                       "layerscale?"),
        (["model/residal=none"], "model/residal: no key 'model/residal' in the config; did you "
                                 "mean model/residual?"),
        (["trainer.max_epoch=3"], "trainer.max_epoch: no key 'max_epoch' in trainer; did you "
                                  "mean trainer.max_epochs?"),
        (["trainr.max_epochs=3"], "did you mean trainer.max_epochs?"),
        (["model.layerscale_int=1e-5"], "did you mean model.layerscale_init?"),
        (["+model.extra.alpha=1", "model.extra.alfa=2"], "model.extra.alfa: no key 'alfa' in "
                                                          "model.extra; did you mean "
                                                          "model.extra.alpha?"),
        # the right name in another section: the teacher's weights are distillation's
        (["data.teacher_weights=/w.pth"], "data.teacher_weights: no key 'teacher_weights' in "
                                          "data; did you mean distillation.teacher_weights?"),
])
def test_mistyped_names_get_the_closest_one_in_a_short_line(tmp_path, forkserver, overrides,
                                                            message):
    proc = forkserver.run(tmp_path, *overrides, "logger=csv", check=False)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert line.startswith("caitlab-train: error: ") and line.endswith(message), line
    assert len(line) < 200, line  # not every option of the group, nor Hydra's search path
    assert not list(tmp_path.iterdir())


def test_checkpoint_of_another_architecture_for_finetuning(tmp_path, forkserver):
    path = tmp_path / "deit.pth"
    from caitlab.models import create_model

    torch.save(create_model("deit_tiny_patch16_224").state_dict(), path)
    proc = forkserver.run(tmp_path, f"finetune_from={path}", "logger=csv", check=False)
    assert proc.returncode == 2
    assert "does not fit ImageTransformer" in _error_line(proc)


def test_output_folder_under_a_file(tmp_path, forkserver):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = forkserver.run(tmp_path, f"paths.output_dir={blocker}/out", "logger=csv",
                          check=False)
    assert proc.returncode == 2
    assert _error_line(proc).startswith(
        f"caitlab-train: error: cannot write {blocker}/out/default/")
    assert "Not a directory; paths.output_dir (or CAITLAB_OUTPUT_DIR) must be a writable " \
        "folder" in _error_line(proc)
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into: a read-only mount as root (root ignores modes)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"as root only a read-only mount makes a folder unwritable, and this "
                    f"machine refuses one: {proc.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_read_only_output_folder(read_only_folder, forkserver, tmp_path):
    proc = forkserver.run(tmp_path, f"paths.output_dir={read_only_folder}/out", "logger=csv",
                          check=False)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert line.startswith(f"caitlab-train: error: cannot write {read_only_folder}/out")
    assert ("Read-only file system" if os.geteuid() == 0 else "Permission denied") in line
    assert "paths.output_dir (or CAITLAB_OUTPUT_DIR) must be a writable folder" in line


def _check_often(folder: str) -> str | None:
    from caitlab.record import check_writable

    try:
        for _ in range(300):
            check_writable(Path(folder))
    except OSError as err:
        return repr(err)
    return None


def test_ranks_checking_the_run_folder_at_once_do_not_trip_each_other(tmp_path):
    """Every DDP rank checks the run folder as it starts. None may take another's check for
    a refusal: with one shared probe file, one rank deleted it under another, which ended
    rank 1 of a SLURM job while rank 0 waited for it at the rendezvous."""
    with multiprocessing.get_context("fork").Pool(4) as pool:
        assert pool.map(_check_often, [str(tmp_path / "run")] * 4) == [None] * 4
    assert list((tmp_path / "run").iterdir()) == []  # no probe left behind


# two loader workers: the path every real image folder takes (data.num_workers defaults to 8)
IMAGES = ("data=imagefolder", "data.num_classes=2", "data.batch_size=4", "data.num_workers=2",
          "model=vit_tiny", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
          "model.depth=1", "trainer.max_epochs=1", "logger=csv")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_corrupt_image_in_the_folder_stops_or_is_skipped(tmp_path, forkserver, policy):
    root, out = tmp_path / "images", tmp_path / "out"
    out.mkdir()
    bad = make_image_folder(root) / "train" / "class1" / "2.png"
    bad.write_bytes(b"not a png \x00\x01" * 10)
    proc = forkserver.run(out, *IMAGES, f"data.root={root}", f"data.on_corrupt={policy}",
                          check=False)
    (summary,) = [json.loads(p.read_text()) for p in out.rglob("summary.json")]
    if policy == "stop":
        assert proc.returncode == 2
        assert _error_line(proc) == (
            f"caitlab-train: error: data.root: cannot decode image {bad} (UnidentifiedImageError:"
            f" cannot identify image file <_io.BufferedReader name='{bad}'>); fix or remove it,"
            " or set data.on_corrupt=skip")
        assert summary["status"] == "failed" and str(bad) in summary["error"]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert summary["status"] == "completed"
        warned = [ln for ln in proc.stdout.splitlines()
                  if f"data.on_corrupt=skip: skipping undecodable image {bad}" in ln]
        assert warned  # once per worker process that met it


def test_slurm_without_partition_where_the_cluster_has_no_default(tmp_path, forkserver):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # the SLURM client of a cluster none of whose partitions is the default (no '*' in sinfo)
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'cpu\\ngpu\\n'\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = forkserver.run(tmp_path, "-m", "hydra/launcher=slurm", "model.depth=1,2",
                          "logger=csv", env=env, check=False)
    assert proc.returncode == 2
    assert _error_line(proc) == (
        "caitlab-train: error: cluster.partition=null is not allowed: this SLURM cluster has no "
        "default partition; set one of cpu, gpu")
    assert not (tmp_path / "submitted").exists()  # refused before anything was submitted
    assert not list(tmp_path.rglob("summary.json"))


@pytest.mark.slurm
def test_partition_check_reads_the_real_cluster(slurm_cluster, monkeypatch):
    from caitlab.config import ConfigError
    from caitlab.sweeps.slurm import slurm_partitions
    from hydra_plugins.caitlab_launcher.launcher import check_partition

    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    names, default = slurm_partitions()
    assert default == "debug" and names == ["debug"]  # scripts/slurm/slurm.conf.in
    check_partition({"partition": None})  # the default partition takes the jobs
    check_partition({"partition": "debug"})
    with pytest.raises(ConfigError, match=r"cluster.partition='nope' is not allowed: this SLURM "
                                          r"cluster has no partition nope; use one of debug"):
        check_partition({"partition": "nope"})


def test_run_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from caitlab.record import RunLock
        assert RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = RunLock(tmp_path)
        assert not lock.acquire()
        assert f"pid {holder.pid}" in lock.holder()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert RunLock(tmp_path).acquire()  # the kernel released it with the dead holder


def test_broken_last_checkpoint_falls_back_to_the_newest_good_one(tmp_path):
    good = tmp_path / "best.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    last = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, last)
    os.utime(good, (1, 1))
    assert resume_checkpoint(tmp_path) == last
    last.write_bytes(last.read_bytes()[:100])  # torn write
    with pytest.warns(UserWarning, match="last.ckpt cannot be read; resuming from .*best.ckpt"):
        assert resume_checkpoint(tmp_path) == good
    good.write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="no readable checkpoint"):
        resume_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path / "empty") is None


@pytest.mark.parametrize("env, zero", [
    ({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False), ({"RANK": "3"}, False),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, False),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, True)])
def test_only_global_rank_zero_takes_the_run_folder(monkeypatch, env, zero):
    """Lightning starts a machine's other DDP ranks as copies of the command with LOCAL_RANK
    set (no RANK): they must not take the run's lock (they did, and trainer=ddp on one
    machine without SLURM stopped with 'being trained by another process')."""
    from caitlab.training.lifecycle import is_rank_zero

    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_rank_zero() is zero
