"""A run's record: the folder it owns, its ``summary.json``, and every change of its state.

As Dora's ``XP``, one small object owns what a run leaves on disk. A run's folder is
``<outputs>/<experiment name>/<signature>`` (``caitlab.identity``): launching the same config
again lands in the same folder, so a sweep resumes or skips instead of duplicating.

- **Layout**: the names of a run folder's files (:data:`SUMMARY`, :data:`CONFIG`,
  :data:`OVERRIDES`, :data:`CHECKPOINTS`; the lock's is ``caitlab.record.files``').
- **State**: ``summary.json``'s ``status`` (``caitlab.status.Status``) changes only through
  :class:`RunRecord`'s methods (``pending``, ``start``, ``complete``, ``fail``, ``diverge``,
  ``interrupt``, ``block``, ``cancel``), whoever writes it: the training run, the launchers,
  ``caitlab-sweep``.
- **Reading**: :func:`read_summary` and :func:`load_summary` return a summary written by
  any version of caitlab in today's form (:func:`upgrade`); :func:`find_folder` finds a run
  in a folder named by the previous signature rule.
- **Writing**: every file is written atomically (:func:`write_atomic`); one process trains a
  folder at a time (:class:`RunLock`): both in ``caitlab.record.files``. A refused config
  removes only the folders this process made (:func:`tidy_unstarted`).

Stdlib only at import, and nothing of caitlab's above the status and the errors:
``caitlab-sweep`` reads records without omegaconf, torch or Hydra.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caitlab.record.files import (
    AtomicWrite,
    RunLock,
    check_writable,
    remove_stale_temp_files,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)
from caitlab.status import RETRY_ONLY, SUBMITTED_OVER, Status

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["CHECKPOINTS", "CONFIG", "OVERRIDES", "SUMMARY", "SUMMARY_VERSION", "AtomicWrite",
           "RunBlocked", "RunFailed", "RunLock", "RunRecord", "check_writable", "data_choice",
           "find_folder", "has_checkpoint", "load_summary", "read_summary",
           "remove_stale_temp_files", "skip_reason", "tidy_unstarted", "upgrade",
           "write_atomic", "write_json_atomic", "write_text_atomic"]

# The form of summary.json this code writes (its ``summary_version``). A summary without one
# was written before caitlab recorded it: :func:`upgrade` brings it to this form.
SUMMARY_VERSION = 2
# a run folder's files (caitlab.models.checkpoint, below this layer, spells "checkpoints" too)
SUMMARY = "summary.json"
CONFIG = "config.yaml"
OVERRIDES = "overrides.yaml"
CHECKPOINTS = "checkpoints"


class RunFailed(Exception):
    """A run that failed, or was skipped because it had failed before; its line is printed.

    In a sweep each job raises it (after its line) instead of returning: Hydra's launchers
    go on with the other jobs, and its sweeper re-raises the first once they have all run,
    so that the sweep's exit status is non-zero (``caitlab.train.main``). It lives here, not
    in ``caitlab.train``: run as ``python -m caitlab.train`` that module is ``__main__``,
    and the launcher's import of it would make a second, different class.
    """


class RunBlocked(Exception):
    """A stage of a chain whose upstream run (``upstream``, its signature) has not completed
    (``caitlab.stages``): its summary says ``blocked``, and a re-launch tries it again."""

    def __init__(self, message: str, upstream: str | None = None) -> None:
        super().__init__(message)
        self.upstream = upstream


def skip_reason(summary: dict[str, Any] | None, retry_failed: bool) -> str | None:
    """Why a (re-)launch must not train this run again, or None when it should run."""
    status = (summary or {}).get("status")
    if status == Status.COMPLETED:
        return Status.COMPLETED
    if status in RETRY_ONLY and not retry_failed:
        return f"{status} (pass retry_failed=true to run it again)"
    return None


def load_summary(path: Path) -> dict[str, Any]:
    """The summary in ``path`` in today's form (:func:`upgrade`).

    Raises:
        OSError: it cannot be read.
        ValueError: it is no JSON object (cut short by a crash or a full disk).
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object")
    return upgrade(data, Path(path).parent)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of the run in ``run_dir`` in today's form; None where it has none, or one
    that cannot be read."""
    try:
        return load_summary(Path(run_dir) / SUMMARY)
    except (OSError, ValueError):
        return None


def upgrade(summary: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """A summary written by an older caitlab (no ``summary_version``) in today's form; a
    current one as it is. ``run_dir``: its folder, whose ``config.yaml`` says what the summary
    did not record (None for a summary read from wandb).

    What version 1 lacked:

    - ``data``, the data's config choice: the datamodule class's name (``digits`` for
      ``DigitsDataModule``), from the run's ``config.yaml``;
    - ``selection.test_is_selection``, whether ``test/top1`` was measured on the images that
      chose the checkpoint: so for data that validated on its test images (``imagefolder``,
      whose val/ was both; CIFAR with ``data.val_fraction=0``).
    """
    if summary.get("summary_version", 1) >= SUMMARY_VERSION:
        return summary
    summary = dict(summary)
    if not summary.get("data") and run_dir is not None:
        summary["data"] = data_choice(run_dir)
    if summary.get("selection") is None:
        data = summary.get("data")
        values = (summary.get("delta") or {}).get("values") or {}
        on_test = data == "imagefolder" or (
            data in ("cifar10", "cifar100") and values.get("data.val_fraction") == 0)
        if on_test:
            summary["selection"] = {"test_is_selection": True}
    return summary


def data_choice(run_dir: Path) -> str | None:
    """The data option a run's ``config.yaml`` names by its datamodule class (``digits`` for
    ``DigitsDataModule``): what a summary that does not record ``data`` trained on."""
    import yaml  # off caitlab-sweep's path: only summaries written before version 2 need it

    try:
        config = yaml.safe_load((Path(run_dir) / CONFIG).read_text()) or {}
        target = str(((config.get("data") or {}).get("_target_")) or "")
    except Exception:  # noqa: BLE001 - a name for a table; the run's numbers still count
        return None
    return target.rsplit(".", 1)[-1].removesuffix("DataModule").lower() or None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a job of the run in ``run_dir`` would resume (``resume_checkpoint`` picks which
    file): a folder, not its summary, answers it."""
    folder = Path(run_dir) / CHECKPOINTS
    return folder.is_dir() and any(p.is_file() for p in folder.glob("*.ckpt"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunRecord:
    """A run folder's record: its files, and ``summary.json`` rewritten atomically at every
    change of state and at every epoch end.

    Parameters:
        run_dir: the run's folder.
        facts: what this writer knows of the run (identity, model...), over what the folder's
            summary holds.
        writable: False on DDP ranks other than 0: one writer per folder.
    """

    def __init__(self, run_dir: Path, facts: Mapping[str, Any] | None = None,
                 writable: bool = True) -> None:
        self.dir = Path(run_dir)
        self.writable = writable
        self.data: dict[str, Any] = {**(read_summary(self.dir) or {}), **(facts or {})}
        self.data.setdefault("attempts", 0)

    @property
    def path(self) -> Path:
        return self.dir / SUMMARY

    @property
    def status(self) -> str | None:
        return self.data.get("status")

    def update(self, **values: Any) -> None:
        """Records ``values`` (an epoch's metrics, the attempt's devices), the state as it is."""
        if "status" in values:
            raise TypeError("a run's status changes through RunRecord's state methods")
        self._write(values)

    def _write(self, values: Mapping[str, Any]) -> None:
        self.data.update(values)
        self.data["summary_version"] = SUMMARY_VERSION
        self.data["updated_at"] = _now()
        if self.writable:
            write_json_atomic(self.path, self.data)

    def _to(self, status: Status, **fields: Any) -> None:
        # the record holds the string, as read back from the file: what is handed on from it
        # (wandb's mirror of it) gets the string, not the member
        self._write({"status": status.value, **fields})

    def pending(self, job_id: str) -> bool:
        """Submitted as ``job_id``: pending until its job starts. A run whose job has already
        started (and written ``running`` or more) keeps its newer state; returns whether
        ``pending`` was written."""
        if self.status not in SUBMITTED_OVER:
            return False
        self._to(Status.PENDING, slurm_job_id=job_id)
        return True

    def start(self, **fields: Any) -> None:
        """A new attempt begins (``attempts`` counts it)."""
        self._to(Status.RUNNING, attempts=self.data["attempts"] + 1, **fields)

    def complete(self, **fields: Any) -> None:
        """Trained and tested: ``fields`` hold the test metrics."""
        self._to(Status.COMPLETED, finished_at=_now(), **fields)

    def fail(self, error: str, **fields: Any) -> None:
        """Raised, or refused: ``error`` says why."""
        self._to(Status.FAILED, error=error, **fields)

    def diverge(self, epoch: int, step: int, error: str, **fields: Any) -> None:
        """The loss went non-finite at ``epoch`` (optimizer step ``step``)."""
        self._to(Status.DIVERGED, diverged_epoch=epoch, diverged_step=step, error=error,
                 **fields)

    def interrupt(self, by: str, **fields: Any) -> None:
        """Stopped part-way, its checkpoint whole, by ``by`` (a signal's name, a refused
        write's reason): the same command resumes it."""
        self._to(Status.INTERRUPTED, interrupted_by=by, **fields)

    def block(self, upstream: str | None, error: str, **fields: Any) -> None:
        """A chain's stage waiting for its ``upstream`` run (a signature) to complete."""
        self._to(Status.BLOCKED, error=error, blocked_by=upstream, **fields)

    def cancel(self) -> None:
        """Its job was cancelled (``caitlab-sweep cancel``): a re-launch resumes it."""
        self._to(Status.CANCELLED)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def find_folder(parent: str | Path | None, sig: str, cfg: DictConfig) -> str:
    """The name of the folder under ``parent`` that holds the run of ``cfg``: ``sig``, or,
    where no folder of that name exists, a folder named by the previous signature rule (a
    hash of the whole config) whose recorded config is this one
    (``caitlab.identity.first_difference``: the keys the signature leaves out and those added
    since aside). ``sig`` where there is none."""
    if parent is None or (Path(parent) / sig).exists():
        return sig
    from omegaconf import OmegaConf  # omegaconf: caitlab-sweep reads records without it

    from caitlab import identity  # omegaconf, hydra: caitlab-sweep reads records without them
    from caitlab.secrets import redact  # omegaconf: caitlab-sweep reads records without it

    candidates = _previous_rule_folders(Path(parent), identity.signature_of)
    if not candidates:
        return sig
    patterns = identity.exclusions(cfg)
    # the keys left out are not resolved (paths name Hydra's run folder, being resolved now),
    # but for the list of callbacks that change no result, which the comparison reads
    requested = redact({str(k): identity.resolved(cfg, str(k)) for k in cfg
                        if (str(k) == "signature_exclude_callbacks"
                            or not identity.excluded(str(k), patterns))
                        and not OmegaConf.is_missing(cfg, str(k))})
    for folder in candidates:
        try:
            recorded = OmegaConf.to_container(OmegaConf.load(folder / CONFIG))
        except Exception:  # noqa: BLE001 - an unreadable config holds no run to find
            continue
        if isinstance(recorded, dict) and \
                identity.first_difference(recorded, requested, patterns) is None:
            return folder.name
    return sig


# parent folder -> its folders named by the previous rule: listed once per process (a
# launcher asks for every job of a sweep, and no such folder is made any more)
_previous_rule: dict[Path, list[Path]] = {}


def _previous_rule_folders(parent: Path, signature_of: Callable[[Any], str]) -> list[Path]:
    """The run folders of ``parent`` not named by today's rule: their summary has no
    ``delta`` (written before it), or one whose signature is not the folder's name (an old
    run resumed since)."""
    key = parent.absolute()
    if key not in _previous_rule:
        found = []
        for path in sorted(parent.glob(f"*/{SUMMARY}")):
            try:
                delta = json.loads(path.read_text()).get("delta")
                named = delta is not None and signature_of(delta) == path.parent.name
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            if not named and (path.parent / CONFIG).is_file():
                found.append(path.parent)
        _previous_rule[key] = found
    return _previous_rule[key]


def tidy_unstarted(run_dir: Path, created: list[Path]) -> None:
    """Hydra makes the run folder (``.hydra/``, ``train.log``) before caitlab checks the
    config: a rejected config leaves nothing behind. Only the folders in ``created`` (those
    this process made) are removed, each only when nothing but Hydra's files is in it: a
    folder holding anything else (a run's files, another process's lock) is left as it is."""
    made = {p.absolute() for p in created}
    run_dir = run_dir.absolute()
    if run_dir not in made:
        return
    hydra_dir = run_dir / ".hydra"
    try:
        if {p.name for p in run_dir.iterdir()} - {".hydra", "train.log"}:
            return
        hydra_files = list(hydra_dir.iterdir()) if hydra_dir.is_dir() else []
        if {p.name for p in hydra_files} - {"config.yaml", "hydra.yaml", "overrides.yaml"}:
            return
        for path in hydra_files:
            path.unlink()
        if hydra_dir.is_dir():
            hydra_dir.rmdir()
        (run_dir / "train.log").unlink(missing_ok=True)
        folder = run_dir
        while folder in made:  # <output_dir>/<name>/, when this run made it
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass  # only ever tidying: whatever could not go stays
