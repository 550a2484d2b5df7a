"""Where a checkpoint's write happens: the file's bytes in the loop or in the writer thread,
and a file that is the old one or the new one, never half, whichever it is."""

from __future__ import annotations

import errno
import threading

import lightning as L
import pytest
import torch

from caitlab.cpus import available_cpus
from caitlab.record import AtomicWrite
from caitlab.training import preemption
from caitlab.training.preemption import BackgroundCheckpointIO, every_core_busy


def test_an_atomic_write_keeps_the_old_file_until_its_commit_in_another_thread(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_text("old")
    pending = AtomicWrite(path, lambda f: f.write("new"))
    # written, not yet renamed: a kill here leaves the old file and a whole temporary one
    assert path.read_text() == "old"
    (tmp,) = tmp_path.glob(".last.ckpt.*.tmp")
    assert tmp.read_text() == "new"
    committer = threading.Thread(target=pending.commit, kwargs={"sync_folder": True})
    committer.start()
    committer.join()
    assert path.read_text() == "new"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_refused_atomic_write_names_its_file_and_leaves_the_old_one(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_text("old")

    def full(f):
        f.write("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device: .*last\.ckpt"):
        AtomicWrite(path, full)
    assert path.read_text() == "old"
    assert not list(tmp_path.glob("*.tmp"))  # the space is given back


@pytest.mark.parametrize("in_loop", [True, False])
def test_the_checkpoint_holds_the_weights_of_its_save_in_either_mode(tmp_path, monkeypatch,
                                                                     in_loop):
    writers: list[bool] = []  # per torch.save: was it on the training loop's thread?
    save = torch.save

    def watched(obj, f, *args, **kwargs):
        writers.append(threading.current_thread() is threading.main_thread())
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(preemption.torch, "save", watched)
    io = BackgroundCheckpointIO(serialize_in_loop=in_loop)
    weights = torch.zeros(3)
    io.save_checkpoint({"w": weights}, tmp_path / "last.ckpt")
    io.release()  # the next training batch starts
    weights += 1  # training goes on
    io.save_checkpoint({"w": weights}, tmp_path / "last.ckpt")  # waits for the first
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"],
                       torch.zeros(3))
    io.teardown()  # waits for the second
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"],
                       torch.ones(3))
    # serialised in the loop with every core busy; in the writer thread with one to spare
    assert writers == [in_loop, in_loop]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(available_cpus() < 2, reason="needs a core beside the one thread")
def test_every_core_is_busy_with_a_torch_thread_per_core_and_not_with_one_to_spare():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(available_cpus())
        assert every_core_busy(trainer)
        torch.set_num_threads(available_cpus() - 1)
        assert not every_core_busy(trainer)
    finally:
        torch.set_num_threads(threads)


def test_checkpoints_load_to_the_cpu_whatever_device_wrote_them(tmp_path, monkeypatch):
    """Under DDP every rank reads rank 0's file: tensors saved on ``cuda:0`` must not all land
    there (Lightning moves what it restores to each rank's device)."""
    from caitlab.training.preemption import AtomicCheckpointIO, BackgroundCheckpointIO

    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    asked = []
    load = torch.load

    def spy(*args, **kwargs):
        asked.append(kwargs.get("map_location"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for io in (AtomicCheckpointIO(), BackgroundCheckpointIO()):
        assert torch.equal(io.load_checkpoint(path)["w"], torch.ones(2))
    assert asked == ["cpu", "cpu"]
