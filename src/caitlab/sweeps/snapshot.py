"""Code snapshots for queued jobs: a sweep's jobs run the code it was submitted with.

A SLURM job that waits in the queue, or is requeued after a preemption, would import
whatever the checkout holds when it starts. At submission the launcher copies caitlab's
checkout (its git-tracked and untracked, not ignored, files as they are in the working
tree: what the user launched) into the sweep's ``.submitit/`` folder, once per submission,
and the jobs import from it (``PYTHONPATH``: sbatch and submitit's local executor hand the
submitting environment to the job, and a requeued job keeps it).

Why a copy of the working tree and not submitit's ``RsyncSnapshot`` or Dora's clone per
experiment: both take committed files only (uncommitted edits, the very thing one tries
out, would be lost) and ``RsyncSnapshot`` changes the working directory, which moves
relative run folders (``outputs/``) into the snapshot. A clone per run would copy the code
once per run instead of once per submission.

The snapshot records the commit, the dirty flag and the diff of the checkout it was taken
from (``provenance.SNAPSHOT_FILE``), so runs still say which code they ran. It is removed
when the sweep has finished: at once by a launcher that waits for its jobs, otherwise by
the next launch or ``caitlab-sweep status`` once all its runs are in a final state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from caitlab.provenance import SNAPSHOT_FILE, git_state, source_root
from caitlab.record import read_summary
from caitlab.status import FINAL

PREFIX = "code-"
RUNS_FILE = "runs.json"  # beside the code: the run folders whose jobs use it


def checkout_root() -> Path | None:
    """caitlab's git checkout, or None (an installed package, or a snapshot already)."""
    root = source_root()
    if root is None or (root / SNAPSHOT_FILE).exists():
        return None
    return root if git_state(root) is not None else None


def take(folder: Path, run_dirs: list[Path]) -> Path | None:
    """Copies the checkout into ``folder/code-<id>/code``; None when there is no checkout."""
    root = checkout_root()
    if root is None:
        return None
    git = git_state(root)
    if git is None:
        return None
    top = Path(git["root"])
    listed = subprocess.run(
        ["git", "-C", str(top), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True).stdout.decode().split("\0")
    snap = folder / f"{PREFIX}{uuid.uuid4().hex[:12]}"
    code = snap / "code"
    for name in filter(None, listed):
        src = top / name
        if src.is_file():  # a tracked file deleted in the working tree is not in the snapshot
            dest = code / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    rel = root.relative_to(top)
    (code / rel / SNAPSHOT_FILE).write_text(json.dumps(git, indent=1) + "\n")
    (snap / RUNS_FILE).write_text(json.dumps([str(p) for p in run_dirs], indent=1) + "\n")
    return code / rel


@contextlib.contextmanager
def on_path(code: Path | None) -> Iterator[None]:
    """``PYTHONPATH`` names the snapshot's ``src`` while jobs are submitted (and only then)."""
    if code is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code / "src"), before]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def remove(code: Path | None) -> None:
    if code is not None:
        shutil.rmtree(_snapshot_of(code), ignore_errors=True)


def _snapshot_of(code: Path) -> Path:
    for parent in code.parents:
        if parent.name.startswith(PREFIX):
            return parent
    raise ValueError(f"{code} is not in a snapshot")


def clean(sweep_dir: Path) -> list[Path]:
    """Removes the snapshots under ``sweep_dir/.submitit`` whose runs are all finished."""
    removed = []
    for snap in sorted((Path(sweep_dir) / ".submitit").glob(f"{PREFIX}*")):
        try:
            runs = json.loads((snap / RUNS_FILE).read_text())
        except (OSError, ValueError):
            continue
        if all((read_summary(Path(r)) or {}).get("status") in FINAL for r in runs):
            shutil.rmtree(snap, ignore_errors=True)
            removed.append(snap)
    return removed
