"""Which rank a process is before the trainer exists, and how a rank's error is kept."""

from __future__ import annotations

import pytest

from caitlab.training.ranks import (
    error_log_name,
    error_text,
    last_error_line,
    other_ranks_errors,
    process_rank,
)

RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.mark.parametrize(("env", "devices", "rank"), [
    ({}, 1, 0),
    ({"LOCAL_RANK": "1"}, 2, 1),  # Lightning's child process on one machine
    ({"LOCAL_RANK": "1", "NODE_RANK": "1"}, 4, 5),  # across machines without SLURM
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, 2, 3),  # a task of a SLURM job
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 1, 0),
    ({"RANK": "6", "LOCAL_RANK": "2"}, 4, 6),  # torchrun's
])
def test_process_rank_reads_the_launchers_environment(monkeypatch, env, devices, rank):
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert process_rank(devices) == rank


def test_each_rank_has_its_own_error_file_and_rank_0_reads_the_others(tmp_path):
    assert error_log_name(0) == "error.log" and error_log_name(2) == "error.rank2.log"
    (tmp_path / "error.rank2.log").write_text(
        error_text("ValueError: bad\nvalue", "Traceback (most recent call last):\n  ...\n"))
    (tmp_path / "error.rank1.log").write_text("Traceback ...\nKeyError: 'x'\n")  # bare
    (tmp_path / "error.log").write_text(error_text("RuntimeError: rank 0's", ""))
    assert last_error_line(tmp_path / "error.rank2.log") == "ValueError: bad value"
    assert other_ranks_errors(tmp_path) == {1: "KeyError: 'x'", 2: "ValueError: bad value"}
    assert last_error_line(tmp_path / "missing.log") is None


def test_a_task_bound_to_its_device_trains_as_its_rank_on_it(monkeypatch):
    """Where SLURM binds each task to its own GPU, each rank trains on its task's only device
    (``cuda:0`` there; the CPU stands in for it here): the node's ranks are the strategy's,
    the trainer's ``devices`` is 1, and the ranks still come from SLURM."""
    import lightning as L
    import torch
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from caitlab.training.task import _ddp_strategy

    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "caitlab", "SLURM_NODELIST": "localhost"}
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    cpu = torch.device("cpu")
    strategy = _ddp_strategy("ddp", 300, [cpu, cpu])
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False,
                        plugins=[SLURMEnvironment(auto_requeue=False)],
                        enable_checkpointing=False)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (2, 1, 1)
    assert trainer.strategy.root_device == cpu and trainer.num_devices == 2
