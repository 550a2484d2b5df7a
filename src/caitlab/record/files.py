"""A run folder's files written whole: atomic writes (a reader, or a process killed at any
moment, sees the old file or the new one, never half), and the lock one process trains a
folder under. Stdlib only."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from caitlab.errors import name_path

LOCK = ".lock"


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


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock``: one process trains a run folder at a time.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed run never
    leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> bool:
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


