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
