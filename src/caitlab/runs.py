"""Run folders: the experiment signature, the files a run leaves, and its summary.

A run's folder is ``<outputs>/<experiment name>/<signature>``, the signature being a short
hash of what makes the run differ from the defaults (``caitlab.identity``). Launching the same
config again lands in the same folder, so a sweep resumes or skips instead of duplicating.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig

from caitlab.errors import STORAGE_ERRNOS
from caitlab.status import RETRY_ONLY, Status


class RunFailed(Exception):
    """A run that failed, or was skipped because it had failed before; its line is printed.

    In a sweep each job raises it (after its line) instead of returning: Hydra's launchers
    go on with the other jobs, and its sweeper re-raises the first once they have all run,
    so that the sweep's exit status is non-zero (``caitlab.train.main``). It lives here, not
    in ``caitlab.train``: run as ``python -m caitlab.train`` that module is ``__main__``,
    and the launcher's import of it would make a second, different class.
    """


class RunBlocked(Exception):
    """A stage of a chain whose upstream has not completed (``caitlab.stages``): its summary
    says ``blocked``, and a re-launch tries it again."""


def skip_reason(summary: dict[str, Any] | None, retry_failed: bool) -> str | None:
    """Why a (re-)launch must not train this run again, or None when it should run."""
    status = (summary or {}).get("status")
    if status == Status.COMPLETED:
        return Status.COMPLETED
    if status in RETRY_ONLY and not retry_failed:
        return f"{status} (pass retry_failed=true to run it again)"
    return None


def signature(cfg: DictConfig) -> str:
    """The signature of a config composed by the running Hydra app (``caitlab.identity``);
    of one composed by hand, the previous rule's."""
    from caitlab import identity

    delta = identity.run_delta(cfg)
    return identity.legacy(cfg) if delta is None else identity.signature_of(delta)


def variant_signature(cfg: DictConfig) -> str:
    """The signature without the seed: runs that differ only by seed are one variant."""
    from caitlab import identity

    delta = identity.run_delta(cfg)
    return identity.legacy_variant(cfg) if delta is None else identity.variant_of(delta)


def storage_error(err: BaseException | None) -> OSError | None:
    """The refused write (an ``OSError`` with one of ``STORAGE_ERRNOS``) behind ``err``, looked
    for along its cause/context chain: torch and Lightning re-raise a failed write as their own
    error types, with the ``OSError`` only as the context."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def name_path(err: BaseException, path: Path) -> BaseException:
    """A refused write as an ``OSError`` that names ``path``; a write into an open file fails
    without a file name, and ``No space left on device`` alone does not say where."""
    found = storage_error(err)
    if found is None or (found is err and found.filename):
        return err
    return OSError(found.errno, found.strerror, str(path))


def write_atomic(path: Path, write: Callable[[IO], Any], *, binary: bool = False,
                 sync_folder: bool = False) -> None:
    """``write(f)`` into a temporary file in ``path``'s folder, fsync, rename over ``path``:
    readers, and a process killed at any moment, see the old file or the new one, never half.
    ``sync_folder`` also fsyncs the folder, so the rename itself survives a crash of the node.
    A write the storage refuses (full disk...) raises an ``OSError`` that names ``path``."""
    AtomicWrite(path, write, binary=binary).commit(sync_folder=sync_folder)


class AtomicWrite:
    """:func:`write_atomic` in two halves: the constructor writes the temporary file, and
    :meth:`commit` (another thread may call it) fsyncs it and renames it over ``path``.

    Until the commit, ``path`` is the old file: a process killed in between leaves it, and
    the temporary file that :func:`remove_stale_temp_files` deletes. The fsyncs wait on the
    disk, not on a core or the GIL, which is why they may be left to a thread."""

    def __init__(self, path: Path, write: Callable[[IO], Any], *, binary: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                        suffix=".tmp")
        self._file = os.fdopen(fd, "wb" if binary else "w")
        with self._failing():
            write(self._file)
            self._file.flush()

    def commit(self, sync_folder: bool = False) -> None:
        with self._failing():
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
            if sync_folder:
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """On any error: the temporary file goes (a full disk gets its space back), and a
        refused write is raised naming ``path``."""
        try:
            yield
        except BaseException as err:
            with contextlib.suppress(OSError):
                self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            # torch reports a full disk as "unexpected pos ..." with the OSError as context
            named = name_path(err, self.path)
            if named is err:
                raise
            raise named from err


def check_writable(folder: Path) -> None:
    """Makes ``folder`` and writes (then deletes) a file of a name no other process uses:
    every DDP rank checks the run folder at once, and with one shared probe name a rank could
    delete another's probe before that one did (its ``FileNotFoundError`` ended it, and the
    other ranks waited for it at the DDP rendezvous). Raises the ``OSError`` of a refusal."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
    os.close(fd)
    os.unlink(probe)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` written with :func:`write_atomic`."""
    write_atomic(path, lambda f: f.write(text))


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Deletes the temporary files of atomic writes (``.<name>.<random>.tmp``) whose writer
    died before its rename (SIGKILL, node failure): a checkpoint's can be gigabytes. Call it
    only while holding the run's ``RunLock``, so that no live writer owns them."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for path in folder.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Summary:
    """``summary.json``: rewritten atomically at every state change and at every epoch end."""

    def __init__(self, run_dir: Path, initial: dict[str, Any], writable: bool = True) -> None:
        self.path = Path(run_dir) / "summary.json"
        self.writable = writable  # False on DDP ranks other than 0: one writer per folder
        previous = read_summary(run_dir) or {}
        self.data: dict[str, Any] = {**previous, **initial}
        self.data.setdefault("attempts", 0)

    def update(self, **values: Any) -> None:
        if isinstance(values.get("status"), Status):
            # the record holds the string, as read back from the file: what is handed on from
            # it (wandb's mirror of it) gets the string, not the member
            values["status"] = values["status"].value
        self.data.update(values)
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.writable:
            write_json_atomic(self.path, self.data)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock``: one process trains a run folder at a time.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed run never
    leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._fd = fd  # held open for the life of the process
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown pid"
        except OSError:
            return "unknown pid"


def checkpoint_is_readable(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:
        return False


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that loads: ``last.ckpt``, or, if that one is broken, the next
    newest (``best.ckpt``), with a warning. A folder whose checkpoints are all broken is an
    error: starting over silently would throw away the run's history."""
    import warnings

    candidates = sorted((p for p in Path(ckpt_dir).glob("*.ckpt") if p.is_file()),
                        key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)
    broken: list[Path] = []
    for path in candidates:
        if checkpoint_is_readable(path):
            if broken:
                warnings.warn(f"{', '.join(map(str, broken))} cannot be read; resuming from "
                              f"{path} instead", stacklevel=2)
            return path
        broken.append(path)
    if broken:
        names = ", ".join(p.name for p in broken)
        raise ResumeError(f"no readable checkpoint in {ckpt_dir} ({names} broken): "
                          "move them away to start this run over")
    return None


class ResumeError(RuntimeError):
    pass
