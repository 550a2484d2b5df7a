"""What each task of a sweep's job array runs, on the node: the launcher's own job."""

import pickle
from typing import Any

from hydra.core.utils import JobReturn, JobStatus


class ArrayTask:
    """What each task of a sweep's job array runs: the launcher's ``__call__`` (Hydra's
    ``run_job`` of the task's overrides), with the launcher and Hydra's state read from the one
    pickle the array shares. Checkpointable like the launcher itself: on preemption or
    time-out submitit requeues the task with the same reference and arguments.

    Args:
        shared: the pickle of (the launcher, Hydra's singletons' state).
    """

    def __init__(self, shared: str) -> None:
        self.shared = shared

    def _load(self) -> tuple[Any, dict]:
        with open(self.shared, "rb") as f:
            return pickle.load(f)

    def __call__(self, *args: Any) -> JobReturn:
        launcher, singleton_state = self._load()
        ret = launcher(*args, singleton_state)
        if isinstance(ret, JobReturn) and ret.status == JobStatus.FAILED:
            # Hydra keeps a failed task's error in its result, and the job would end with
            # exit status 0: SLURM would count a failed run as done, and start the stages
            # that wait on it (afterok). Raised, the job fails, and its trace has the line:
            # reading a failed job's result raises its error (Hydra's run does the same).
            ret.return_value  # noqa: B018
        return ret

    def checkpoint(self, *args: Any) -> Any:
        import submitit  # on the node, at preemption only

        return submitit.helpers.DelayedSubmission(self, *args)
