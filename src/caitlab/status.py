"""A run's status (``summary.json``'s ``status``), and the sets of them its readers ask about.

``Status`` is a ``StrEnum``: a member equals its string (``Status.FAILED == "failed"``, in
either order, as a dict key or in a set), formats as it (f-strings, ``str``) and ``json``
writes it as the plain string, so a summary written with a member reads back as the string
it always held. Only wandb needs the string itself (``.value``): its encoder writes an Enum
by its *name* (``FAILED``). A summary read from disk holds plain strings, or anything a
hand-edited file holds: the sets are tuples, in which any value can be looked up (an
unhashable one, a list, raises in a frozenset).

Stdlib only, and nothing of caitlab's: ``caitlab-sweep`` imports it without torch or hydra,
and every layer may.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class Status(enum.StrEnum):
    # Written by the launcher for a submitted run until its job starts; a summary without a
    # status (a folder whose job never began) reads as this too.
    PENDING = "pending"
    # The attempt is training (written as it starts, and kept through every epoch's update).
    RUNNING = "running"
    # Trained and tested: the test metrics are in the summary; a re-launch skips it.
    COMPLETED = "completed"
    # The attempt raised (a bug, a refused config in a sweep, a rank that died); ``error``
    # says why. A re-launch re-runs it only with retry_failed=true.
    FAILED = "failed"
    # The loss went non-finite (``diverged_epoch``, ``diverged_step``): a result of the config,
    # not an accident. A re-launch re-runs it only with retry_failed=true.
    DIVERGED = "diverged"
    # Stopped part-way with its checkpoint whole (Ctrl-C, SLURM's preemption or time limit, a
    # full disk): the same command, or SLURM's requeue, resumes it.
    INTERRUPTED = "interrupted"
    # A stage of a chain whose upstream stage has not completed (``blocked_by``): it never
    # trained, and its job, if it had one, has ended or been cancelled; a re-launch tries it
    # again.
    BLOCKED = "blocked"
    # Its job was cancelled (``caitlab-sweep cancel``, or a re-launch's cancel_removed=true
    # for a run no longer in the sweep); a re-launch resumes it.
    CANCELLED = "cancelled"
    # Display only, never written: caitlab-sweep's name for a run whose summary says pending
    # or running while its SLURM job has ended (SIGKILL, a node failure) without a word.
    LOST = "lost"
    # Display only, never written: the reports' and caitlab-sweep's name for a summary.json
    # that could not be read (cut short by a crash or a full disk).
    UNREADABLE = "unreadable"


# A re-launch re-runs these only with retry_failed=true (``runs.skip_reason``): re-running a
# crashed or diverged config usually gives the same result.
RETRY_ONLY = (Status.FAILED, Status.DIVERGED)

# caitlab-sweep reconciles these with SLURM's queue (``sweeps.states.reconcile``): the run's
# job has to move on from them, so where that job is no longer queued or running the run
# is shown lost. The other states are final for this attempt.
ACTIVE = (Status.PENDING, Status.RUNNING)

# The run's SLURM job may still be alive, queued or running (interrupted: SLURM requeues a
# preempted or timed-out job): a re-launch does not submit a second job for the run while it
# is (the launcher's ``follow.Squeue.live_job``), ``caitlab-sweep cancel`` cancels it
# (``sweeps.slurm.live_job``), and the launcher, where a DDP job died of one of its ranks,
# writes the rank's error in.
LIVE = (*ACTIVE, Status.INTERRUPTED)

# Nothing more happens to the run without a re-launch, and a re-launch submits its job with
# a code snapshot of its own: once every run of a submission is in one of these, that
# submission's snapshot can go (``sweeps.snapshot.clean``). Blocked belongs: no job of the
# run is left, and a re-launch that submits one writes pending first (SUBMITTED_OVER).
FINAL = (Status.COMPLETED, Status.FAILED, Status.DIVERGED, Status.BLOCKED, Status.CANCELLED)

# What a run's summary may say when the launcher has just submitted a job for it, for the
# launcher to write ``pending`` and the new job's id over (no summary at all, None, counts
# too): every state a previous attempt left. Running and completed are left as they are:
# the job may have started before this write (submitit's local executor starts it at once),
# and what it wrote is newer.
SUBMITTED_OVER = (None, Status.PENDING, Status.INTERRUPTED, Status.CANCELLED, Status.BLOCKED,
                  *RETRY_ONLY)

# The order of caitlab-sweep's counts line; a state not listed here (a value no caitlab
# wrote) comes after these, in alphabetical order.
DISPLAY_ORDER = (Status.COMPLETED, Status.RUNNING, Status.PENDING, Status.INTERRUPTED,
                 Status.CANCELLED, Status.LOST, Status.FAILED, Status.DIVERGED, Status.BLOCKED,
                 Status.UNREADABLE)

# wandb's run states (``Run.state``) as ours, for a run whose wandb summary holds no status
# of caitlab's (it died before writing one): the report reads it like a summary.json.
WANDB_STATES = {"finished": Status.COMPLETED, "running": Status.RUNNING,
                "crashed": Status.FAILED, "failed": Status.FAILED,
                "killed": Status.INTERRUPTED}


def diverged_label(summary: Mapping[str, Any]) -> str:
    """How caitlab-sweep's table and the report's state column show a diverged run."""
    return f"diverged at epoch {summary.get('diverged_epoch', '?')}"
