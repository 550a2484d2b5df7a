"""Reusing a run folder: only for the run it holds, and saying when the code differs.

A run's folder is named by its signature (``caitlab.identity``); a re-launch skips or
resumes whatever that folder holds. So before it does, the folder's recorded config is
compared with the one asked for: any two configs that got one signature, by a gap in the
signature rule known or not, are refused instead of passing for each other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from caitlab import identity
from caitlab.console import say
from caitlab.errors import UserError, one_line
from caitlab.secrets import redact

log = logging.getLogger("caitlab")


# A checkpoint a run starts from is named by the run that wrote it (<signature>/checkpoints/
# best.ckpt), not by where its outputs folder lies now
_WEIGHTS_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors", ".bin")


def _comparable(value: Any) -> Any:
    if isinstance(value, str) and value.endswith(_WEIGHTS_SUFFIXES) and "/" in value:
        return "/".join(value.split("/")[-3:])
    return value


# Keys caitlab's config gained after runs were written, with the value those runs had
# implicitly: a run without the key differs from a request that sets another value
IMPLICIT_BEFORE = {"data.remode": "const"}


def first_difference(recorded: Mapping[Any, Any], requested: dict[str, Any],
                     patterns: Iterable[str]) -> tuple[str, Any, Any] | None:
    """The first key (sorted) whose value a run folder's recorded config and a requested one
    disagree on, as ``(key, recorded value, requested value)``; None when they agree.

    ``recorded`` and ``requested``: resolved configs as plain data. Keys ``patterns`` leave out
    (display, logging, places) and the data's location are not compared, nor keys only the
    request has (added since with their defaults, they change nothing; those whose earlier
    value :data:`IMPLICIT_BEFORE` knows are compared with it); a key only the
    recorded run has was deleted (``~ema``), and is a difference (requested value
    :data:`caitlab.identity.DELETED`)."""
    patterns = tuple(patterns)
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for config, flat in ((recorded, old), (requested, new)):
        for key, value in config.items():
            if key == "callbacks" and isinstance(value, dict):
                value = identity.without_display_callbacks(value, requested)
            if not identity.excluded(str(key), patterns):
                identity.flatten(value, str(key), flat, patterns)
    for key, value in IMPLICIT_BEFORE.items():
        if key in new and key not in old:
            old[key] = value
    for key in sorted(old):
        if key in identity.LOCATION_KEYS:
            continue
        if key not in new:
            return key, old[key], identity.DELETED
        a, b = _comparable(old[key]), _comparable(identity.normal(key, new[key], old[key]))
        if not identity.same(identity.normal(key, a, a), b):
            return key, old[key], new[key]
    return None


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
    from caitlab.training.lifecycle import shown_path

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
    found = first_difference(recorded, requested, identity.exclusions(cfg))
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
    from caitlab.training.lifecycle import shown_path

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
    import hashlib
    import os

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
    from caitlab.provenance import commit_of, current_commit

    before, now = commit_of(dict(previous or {})), current_commit()
    return f" (trained by code {before}; this is {now})" if before and now and \
        before != now else ""
