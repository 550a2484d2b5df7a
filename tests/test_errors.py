"""Bad input gets one clear line and a non-zero exit; broken state is recovered or named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from caitlab.runs import ResumeError, RunLock, resume_checkpoint
from conftest import caitlab_train


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("caitlab-train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=nope"], "Could not find 'model/nope'"),
        (["experiment=nope"], "Could not find 'experiment/nope'"),
        (["optim.momentum=0.9"], "Key 'momentum' is not in struct"),
        (["model.name=cait_xxl"], "unknown model name 'cait_xxl'"),
        (["model.embed_dim=30"], "embed_dim=30 is not divisible by num_heads=4"),
        (["model.img_size=9"], "img_size=9 is not divisible by patch_size=2"),
        (["model/class_token=insert", "model.insert_layer=4"], "insert_layer=4 must be in [0"),
        (["model.depth=0"], "depth=0 must be a positive integer"),
        (["model.num_heads=-1"], "num_heads=-1"),
        (["optim.lr=0"], "optim.lr=0.0 is not allowed: must be > 0"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed"),
        (["data.batch_size=0"], "data.batch_size"),
        (["trainer.devices=64"], "trainer.devices=64 is not allowed"),
        (["data=imagefolder", "data.root=/no/such/folder"], "/no/such/folder"),
        (["finetune_from=/no/such.ckpt"], "checkpoint not found: /no/such.ckpt"),
    ],
)
def test_user_errors_are_one_line_with_the_key(tmp_path, overrides, message):
    proc = caitlab_train(tmp_path, *overrides, "logger=csv", check=False)
    assert proc.returncode == 2
    assert message in _error_line(proc)
    assert not list(tmp_path.rglob("summary.json"))  # nothing was started


def test_checkpoint_of_another_architecture_for_finetuning(tmp_path):
    path = tmp_path / "deit.pth"
    from caitlab.models import create_model

    torch.save(create_model("deit_tiny_patch16_224").state_dict(), path)
    proc = caitlab_train(tmp_path, f"finetune_from={path}", "logger=csv", check=False)
    assert proc.returncode == 2
    assert "does not fit ImageTransformer" in _error_line(proc)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = caitlab_train(tmp_path, f"paths.output_dir={blocker}/out", "logger=csv",
                         check=False)
    assert proc.returncode == 2
    line = _error_line(proc)  # Hydra creates the folder first; its error names the path
    assert "Not a directory" in line and str(blocker) in line
    assert blocker.read_text() == "not a folder"


def test_run_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from caitlab.runs import RunLock
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
