"""A run's processes under DDP: which rank this one is, and rank 0 watching the others.

A rank that dies leaves the others in their next collective (or, before the rendezvous,
waiting for it to join) until the process group's timeout. Under SLURM, ``srun
--kill-on-bad-exit`` ends the job's step at once (the launcher asks for it); on one machine,
where Lightning starts the other ranks as child processes of rank 0, Lightning's own
observer kills every process, rank 0 included, with SIGKILL: :class:`RankWatch` comes first,
so that the run folder says which rank failed and why.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caitlab import compat


def process_rank(devices_per_node: int = 1) -> int:
    """This process's global rank as its environment says, before the trainer exists (Lightning
    starts a machine's other ranks with ``LOCAL_RANK`` and, across machines, ``NODE_RANK``;
    SLURM runs one task per rank)."""
    env = os.environ
    if env.get("RANK"):
        return int(env["RANK"])
    if env.get("SLURM_PROCID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    return int(env.get("NODE_RANK") or 0) * devices_per_node + int(env.get("LOCAL_RANK") or 0)


def error_log_name(rank: int) -> str:
    """The file a rank's traceback goes to: ``error.log`` for rank 0, ``error.rank<k>.log``
    for the others, so that no rank overwrites another's cause."""
    return "error.log" if rank == 0 else f"error.rank{rank}.log"


def error_text(error: str, trace: str) -> str:
    """An error log's text: the error in one line, then the traceback it came with."""
    return f"error: {' '.join(error.split())}\n\n{trace}"


def last_error_line(path: Path) -> str | None:
    """An error log's one-line error (or, for a bare traceback, its last line); None where the
    file is missing or empty."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    if lines and lines[0].startswith("error: "):
        return lines[0].removeprefix("error: ")
    return lines[-1].strip() if lines else None


def other_ranks_errors(run_dir: Path) -> dict[int, str]:
    """{rank: its error's last line} for every other rank that left an error log."""
    found = {}
    for path in sorted(Path(run_dir).glob("error.rank*.log")):
        rank = path.name.removeprefix("error.rank").removesuffix(".log")
        line = last_error_line(path)
        if rank.isdigit() and line:
            found[int(rank)] = line
    return found


def first_rank_error(run_dir: Path) -> tuple[str, dict[str, str]] | None:
    """Where other ranks left error logs: the lowest one's error as one line, ``rank k:
    <error> (error.rank<k>.log)``, and every one's error by rank (for the summary's
    ``rank_errors``); None where none did."""
    others = other_ranks_errors(run_dir)
    if not others:
        return None
    rank, error = min(others.items())
    return f"rank {rank}: {error} ({error_log_name(rank)})", {str(k): v for k, v in others.items()}


class RankWatch:
    """Rank 0 watching the ranks Lightning started on this machine: when one exits with an
    error, ``on_death(message)`` records the cause, the other ranks are killed and this
    process exits with status 1 (it may be waiting for that rank to join, or in a collective
    that would only time out). A rank that ends its part of an interrupted attempt exits 0.

    Parameters
    ----------
    trainer: the run's trainer (its launcher holds the child processes once fit starts).
    run_dir: the run folder, where a dead rank's error log is.
    on_death: called with one line naming the rank, its exit status and its error.
    first_rank: the global rank of this machine's first child (``node_rank * devices + 1``).
    stopping: whether this process is being stopped (Ctrl-C, a signal): then the ranks'
        exits are that stop's, which rank 0 records itself.
    """

    def __init__(self, trainer: Any, run_dir: Path, on_death: Callable[[str], None],
                 first_rank: int = 1, poll_s: float = 0.5,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.trainer, self.run_dir, self.on_death = trainer, Path(run_dir), on_death
        self.first_rank, self.poll_s, self.stopping = first_rank, poll_s, stopping
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="caitlab-rank-watch",
                                        daemon=True)

    def start(self) -> RankWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """The attempt ended in this process: nothing left to watch for."""
        self._stop.set()

    def _dead(self) -> tuple[int, int] | None:
        for i, proc in enumerate(compat.launched_ranks(self.trainer)):
            code = proc.poll()
            if code not in (None, 0):
                return self.first_rank + i, code
        return None

    def _watch(self) -> None:
        retired = False
        while not self._stop.wait(self.poll_s):
            if not retired and compat.launched_ranks(self.trainer):
                retired = compat.retire_lightning_observer()
            dead = self._dead()
            if dead is None or self.stopping():
                continue
            rank, code = dead
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            line = last_error_line(self.run_dir / error_log_name(rank))
            message = (f"rank {rank} {how}" + (f": {line}" if line else "")
                       + f" ({error_log_name(rank)})" * bool(line))
            try:
                self.on_death(message)
            finally:
                print(f"caitlab-train: failed: {message}; ending the other ranks "
                      f"(run folder {self.run_dir})", file=sys.stderr, flush=True)
                for proc in compat.launched_ranks(self.trainer):
                    if proc.poll() is None:
                        proc.kill()
                time.sleep(0.1)
                os._exit(1)  # the main thread may be blocked in C++ for the whole timeout
