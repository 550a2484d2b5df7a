"""Which code produced a run: the git commit of caitlab's source (dirty or not, with the
diff), the versions of caitlab and the libraries that decide the numbers, and the device.

A sweep submitted with a code snapshot (``snapshot.py``) runs from a copy that is no git
checkout; the snapshot carries the facts of the checkout it was taken from
(``SNAPSHOT_FILE``), read here instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

SNAPSHOT_FILE = ".caitlab-snapshot.json"
LIBRARIES = ("torch", "torchvision", "lightning", "timm", "hydra-core", "torchmetrics")


def source_root() -> Path | None:
    """The folder of caitlab's checkout (``<root>/src/caitlab``, or a snapshot of one); None
    for an installed package (whose folder may lie inside some other project's checkout)."""
    src = Path(__file__).resolve().parents[1]
    return src.parent if src.name == "src" else None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty", "diff"}`` of the checkout ``root`` is in (None outside one). The
    diff is the working tree against the commit, untracked files listed after it."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    status = _git(root, "status", "--porcelain", "--untracked-files=normal") or ""
    diff = _git(root, "diff", "HEAD", "--no-color", "--no-ext-diff") or ""
    untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
    if untracked:
        diff += "".join(f"# untracked: {name}\n" for name in untracked)
    return {"root": top.strip(), "commit": commit, "dirty": bool(status.strip()),
            "diff": diff}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device() -> dict[str, Any]:
    try:
        import torch  # heavy: caitlab-sweep and caitlab-report read provenance

        if torch.cuda.is_available():
            return {"type": "cuda", "name": torch.cuda.get_device_name(0),
                    "count": torch.cuda.device_count()}
    except Exception:  # a broken CUDA set-up must not stop the run from saying what it had
        pass
    return {"type": "cpu", "name": platform.processor() or platform.machine(),
            "count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}


def code_state() -> dict[str, Any] | None:
    """The git facts of the code this process runs: its snapshot's record, or its checkout's."""
    root = source_root()
    if root is None:
        return None
    snap = root / SNAPSHOT_FILE
    if snap.is_file():
        try:
            return {**json.loads(snap.read_text()), "snapshot": str(root)}
        except (OSError, ValueError):
            return None
    return git_state(root)


def diff_hash(diff: str) -> str | None:
    """A short hash of an uncommitted diff: runs whose code differs only in its edits differ
    here (None for a clean tree)."""
    return hashlib.sha1(diff.encode()).hexdigest()[:8] if diff.strip() else None


def provenance() -> tuple[dict[str, Any], str]:
    """(what the summary records, the diff to save beside it: empty when the tree is clean)."""
    git = code_state()
    diff = (git or {}).pop("diff", "") if git else ""
    if git:
        git["diff_sha"] = diff_hash(diff)
    return {
        "git": git,
        "caitlab": _version("caitlab"),
        "python": sys.version.split()[0],
        "libraries": {name: _version(name) for name in LIBRARIES},
        "device": device(),
    }, diff


def commit_of(summary: dict[str, Any]) -> str | None:
    """The short commit a run's summary records, if any: ``+dirty.<hash of the diff>`` when the
    tree had uncommitted edits (``+dirty`` where the summary predates the hash)."""
    git = (summary.get("provenance") or {}).get("git") or {}
    if not git.get("commit"):
        return None
    if not git.get("dirty"):
        return git["commit"][:10]
    return git["commit"][:10] + "+dirty" + (f".{git['diff_sha']}" if git.get("diff_sha")
                                            else "")


def current_commit() -> str | None:
    """:func:`commit_of` for the code this process runs (None for an installed package)."""
    git = code_state()
    if not git:
        return None
    git = {**git, "diff_sha": diff_hash(git.get("diff") or "")}
    return commit_of({"provenance": {"git": git}})
