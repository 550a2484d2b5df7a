"""Reusing a run folder: only for the run it holds, and saying when the code differs.

A run's folder is named by its signature (``caitlab.identity``); a re-launch skips or
resumes whatever that folder holds. So before it does, the folder's recorded config is
compared with the one asked for: any two configs that got one signature, by a gap in the
signature rule known or not, are refused instead of passing for each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from caitlab import identity
from caitlab.console import say
from caitlab.errors import UserError, one_line
from caitlab.provenance import commit_of, current_commit
from caitlab.secrets import redact

log = logging.getLogger("caitlab")


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def check_reuse(run_dir: Path, previous: Mapping[str, Any] | None, cfg: DictConfig) -> None:
    """Refuses to reuse ``run_dir`` for ``cfg`` where its recorded ``config.yaml`` disagrees
    with ``cfg`` on a key that can change the result (:func:`first_difference`).

    Parameters:
        run_dir: the run's folder.
        previous: its summary (None: nothing trained there yet, nothing to check).
        cfg: the config asked for, as the task gets it.

    Raises:
        UserError: the first key they disagree on, with the folder.
    """
    from caitlab.training.lifecycle import shown_path  # a cycle: lifecycle imports this module

    path = Path(run_dir) / "config.yaml"
    if previous is None or not path.is_file():
        return
    try:
        recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # noqa: BLE001 - yaml's and OmegaConf's errors alike
        say(log, f"warning: {shown_path(path)} cannot be read ({one_line(err)}): reusing its "
                 "folder without checking that it holds this config")
        return
    requested = redact(OmegaConf.to_container(cfg, resolve=True))
    recorded = recorded if isinstance(recorded, dict) else {}
    found = identity.first_difference(recorded, requested, identity.exclusions(cfg))
    if found is not None:
        key, old, new = found
        raise UserError(f"{shown_path(Path(run_dir))} holds a run of {key}={_shown(old)}, not "
                        f"{key}={_shown(new)} as asked: two configs got one signature; move "
                        "that folder away to train this one")
    _check_data(run_dir, previous, recorded, requested)


def _root(config: Mapping[str, Any]) -> str | None:
    root = (config.get("data") or {}).get("root") if isinstance(config, Mapping) else None
    return root if isinstance(root, str) else None


def _check_data(run_dir: Path, previous: Mapping[str, Any], recorded: Mapping[Any, Any],
                requested: Mapping[str, Any]) -> None:
    """The data's location is no part of a run's identity, so data found elsewhere must be
    the data the run trained on: where the location changed, what lies there is compared
    with the run's ``data_fingerprint``."""
    from caitlab.training.lifecycle import shown_path  # a cycle: lifecycle imports this module

    before, now = _root(recorded), _root(requested)
    if before is None or now is None or before == now:
        return  # the same place: read as the same data, and a skip stays fast
    then = previous.get("data_fingerprint")
    if then is None:  # recorded before caitlab kept fingerprints: what the old place holds
        then = data_fingerprint(before)
    found = data_fingerprint(now)
    if then is not None and found is not None and then != found:
        raise UserError(f"{shown_path(Path(run_dir))} was trained on the data at {before}; "
                        f"{now} holds other files (data.root): point data.root at the same "
                        "data, or train this data under another name")


def data_fingerprint(root: str | Path) -> str | None:
    """A short hash of what lies under a data folder: every sub-folder with the names of its
    files, and the sizes of the files of small folders (a dataset's archives, CIFAR's
    batches). Reading names only keeps it to seconds for ImageNet's 1.3 M images.

    Returns:
        The hash, or None where ``root`` is no folder.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    digest = hashlib.sha1()
    for folder, _, files in sorted(os.walk(root)):
        rel = os.path.relpath(folder, root)
        small = len(files) <= 100
        for name in sorted(files):
            size = os.path.getsize(os.path.join(folder, name)) if small else ""
            digest.update(f"{rel}/{name}:{size}\n".encode())
    return digest.hexdigest()[:12]


def code_note(previous: Mapping[str, Any] | None) -> str:
    """`` (trained by code A; this is code B)`` where the code that trained a run differs
    from this process's, uncommitted edits included; empty otherwise."""
    before, now = commit_of(dict(previous or {})), current_commit()
    return f" (trained by code {before}; this is {now})" if before and now and \
        before != now else ""
