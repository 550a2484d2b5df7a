"""``caitlab-train``: the Hydra app that trains one configuration into its run folder.

The run folder is named by the config's signature (``caitlab.identity``): launching a config
that already completed skips it, one that stopped part-way resumes from ``last.ckpt``. The
run itself is ``caitlab.training.task.train``; this module turns what went wrong into one line
and an exit status: here for a run (``run``), in ``main`` for what Hydra refused before any.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings

import hydra
from omegaconf import DictConfig

from caitlab.config import CONF_DIR, project_on_path
from caitlab.errors import (
    DISK_FULL_ERRNOS,
    UserError,
    one_line,
    storage_error,
    storage_message,
)
from caitlab.record import RunBlocked, RunFailed, read_summary, tidy_unstarted
from caitlab.resolvers import register_resolvers
from caitlab.secrets import hide_in_argv, redact
from caitlab.status import Status
from caitlab.training.folders import new_folders
from caitlab.training.lifecycle import (
    RankDone,
    is_multirun,
    is_rank_zero,
    job_run_dir,
)
from caitlab.training.ranks import error_log_name, error_text, process_rank
from caitlab.training.task import train

__all__ = ["CONF_DIR", "main", "project_on_path", "run", "train"]

register_resolvers()
# train.yaml's searchpath names ./conf, which most folders do not have: not worth a warning.
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=.* is not")

# the lines of this process's sweep jobs that failed or were skipped as failed
_failed_runs: list[str] = []


def failure_line(err: BaseException, cfg: DictConfig) -> tuple[str, int]:
    """The line a failed or refused run prints, and its exit status."""
    run_dir = job_run_dir(cfg)
    if isinstance(err, RunFailed):  # skipped: it failed before
        return f"caitlab-train: skipped {redact(str(err))}", 1
    if isinstance(err, RunBlocked):
        return f"caitlab-train: {redact(str(err))} (run folder {run_dir})", 1
    if isinstance(err, UserError):
        return f"caitlab-train: error: {redact(str(err))}", 2
    refused = storage_error(err)
    if refused is not None:
        return (f"caitlab-train: error: {redact(storage_message(refused, run_dir))} "
                f"(run folder {run_dir})", 1)
    status = (read_summary(run_dir) or {}).get("status", Status.FAILED)
    first = redact(str(err)).splitlines()[0] if str(err) else ""
    return f"caitlab-train: {status}: {first} (run folder {run_dir})", 1


def run(cfg: DictConfig) -> float | None:
    """Hydra task: returns the test top-1 (Hydra sweepers can optimise it). In a sweep a
    failed run raises ``RunFailed`` after its line: the sweep's other runs go on."""
    multirun = is_multirun()
    try:
        return train(cfg).get("test/top1")
    except RankDone:
        raise  # another rank's part is done: rank 0 requeues the job
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C into SystemExit(1) after its graceful shutdown
        status = (read_summary(job_run_dir(cfg)) or {}).get("status")
        if isinstance(err, SystemExit) and status != Status.INTERRUPTED:
            raise
        print(f"caitlab-train: interrupted; run the same command again to resume "
              f"({job_run_dir(cfg)})", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        _keep_rank_error(err, cfg)
        if isinstance(err, UserError) and not multirun:
            # a sweep's refused run keeps its summary for the sweep's table
            tidy_unstarted(job_run_dir(cfg), new_folders())
        line, code = failure_line(err, cfg)
        print(line, file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(code)
        _failed_runs.append(line)
        raise RunFailed(line.removeprefix("caitlab-train: ").removeprefix("error: ")) from None


def _keep_rank_error(err: BaseException, cfg: DictConfig) -> None:
    """A rank other than 0 that fails before its attempt began (its data, its config) leaves
    its cause where rank 0 and the user look: ``error.rank<k>.log`` in the run folder."""
    run_dir = job_run_dir(cfg)
    devices = cfg.trainer.get("devices")
    path = run_dir / error_log_name(process_rank(devices if isinstance(devices, int) else 1))
    if is_rank_zero() or not run_dir.is_dir() or path.exists():
        return
    with contextlib.suppress(OSError):
        path.write_text(redact(error_text(f"{type(err).__name__}: {err}",
                                          traceback.format_exc())))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run(cfg)


def main() -> None:
    """``caitlab-train``: Hydra's app, with config mistakes reported in one line.

    ``HYDRA_FULL_ERROR=1`` (or ``--debug``, an alias) shows Hydra's full trace instead.
    """
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    full = debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
    sys.argv[1:] = hide_in_argv(sys.argv[1:])  # before Hydra saves the overrides as typed
    project_on_path()
    try:
        _hydra_main()
    except RunFailed as err:  # Hydra's sweeper re-raises a failed job's, once all have run
        if _failed_runs:
            print(f"caitlab-train: error: {len(_failed_runs)} run(s) of the sweep failed or "
                  "were skipped as failed (lines above); the others ran", file=sys.stderr)
        else:  # the jobs ran elsewhere (submitit): the first failure's line
            print(f"caitlab-train: error: a run of the sweep failed: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        if full:
            raise
        # Hydra creates the run folder, its .hydra/ files and train.log before our code runs
        refused = storage_error(err)
        if refused is None:
            message = one_line(err)
        elif refused.errno in DISK_FULL_ERRNOS:
            message = storage_message(refused)
        else:
            message = (f"{storage_message(refused)}; paths.output_dir (or CAITLAB_OUTPUT_DIR) "
                       "must be a writable folder")
        print(f"caitlab-train: error: {redact(message)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
