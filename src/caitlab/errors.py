"""Errors as one line each: what the user mistyped or asked for that cannot be, and where.

Hydra, OmegaConf and the constructors a config names raise errors that span lines (option
lists, search paths, ``full_key:``...); ``caitlab-train`` prints one line per mistake instead,
with the closest existing name where a name was mistyped.

Stdlib only at import: the run record (``caitlab.record``) imports it, and ``caitlab-sweep``
reads records without OmegaConf or Hydra.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import os
import re
from pathlib import Path
from typing import Any

from caitlab.compat import config_node, config_root, is_plain_mapping

# errno values that mean the storage refused a write: the disk or quota is full, the folder is
# read-only or not ours. None of them is a bug in the run, and none is fixed by retrying at once.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
STORAGE_ERRNOS = (*DISK_FULL_ERRNOS, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                  errno.EFBIG)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


def storage_message(err: OSError, where: Path | None = None) -> str:
    """One line for a write the storage refused, naming the file (or the folder written in)."""
    path = err.filename or where
    if err.errno in DISK_FULL_ERRNOS:
        return (f"no space left on device writing {path}; files written before are intact: "
                "free space, then run the same command again")
    return f"cannot write {path}: {err.strerror}"


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


def constructor_refusal(err: BaseException) -> str | None:
    """One line for a class that refused the arguments its config gave it (a TypeError or
    ValueError from its constructor, which Hydra's instantiate wraps, as from a project's own
    model): the config key, the class, the reason, and for a mistyped argument the closest
    one it takes. None for any other error."""
    from hydra.errors import InstantiationException  # Hydra: kept off caitlab-sweep
    from hydra.utils import get_object  # Hydra: kept off caitlab-sweep

    cause = err.__cause__
    if not isinstance(err, InstantiationException) or not isinstance(cause,
                                                                     (TypeError, ValueError)):
        return None
    text = str(err)
    key = (re.search(r"full_key: (\S+)", text) or (None, "model"))[1]
    target = (re.search(r"target '([^']+)'", text) or (None, "?"))[1]
    reason = re.sub(r"^[\w.]*__init__\(\) ", "", str(cause).splitlines()[0] if str(cause)
                    else type(cause).__name__)
    mistyped = re.search(r"unexpected keyword argument '(\w+)'", reason)
    if mistyped:
        try:
            takes = list(inspect.signature(get_object(target)).parameters)
        except Exception:  # nothing to suggest from
            takes = []
        close = difflib.get_close_matches(mistyped[1], takes, n=1, cutoff=0.5)
        if close:
            reason += f" (did you mean {key}.{close[0]}?)"
    return f"{key}: {target}: {reason}"


def _chain(err: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _closest(word: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None


def _config_groups() -> list[str]:
    """The config groups (``model``, ``model/residual``...): caitlab's and the project's."""
    from caitlab.config import CONF_DIR  # Hydra, OmegaConf: kept off caitlab-sweep

    groups: set[str] = set()
    for root in (Path(CONF_DIR), Path(os.environ.get("CAITLAB_CONFIG_DIR", "conf"))):
        if root.is_dir():
            groups.update(d.relative_to(root).as_posix() for d in root.rglob("*")
                          if d.is_dir() and not d.name.startswith((".", "_")))
    return sorted(groups)


def _shortlist(options: list[str], width: int = 110) -> str:
    shown = ""
    for i, option in enumerate(options):
        more = f", ... ({len(options)} in all)"
        if len(shown) + len(option) + 2 + (len(more) if i < len(options) - 1 else 0) > width:
            return shown + more
        shown = f"{shown}, {option}" if shown else option
    return shown


def _paths_named(node: Any, key: str) -> list[str]:
    """Every dotted path of the config ``node`` belongs to whose last part is ``key``."""
    root = config_root(node)
    found: list[str] = []

    def walk(cfg: Any, prefix: str) -> None:
        for k in cfg.keys():
            path = f"{prefix}{k}"
            if k == key:
                found.append(path)
            child = config_node(cfg, k)
            if is_plain_mapping(child):
                walk(child, f"{path}.")

    if is_plain_mapping(root):
        walk(root, "")
    return sorted(p for p in found if p != "hydra" and not p.startswith("hydra."))


def mistyped_name(err: BaseException) -> str | None:
    """One line for a config option or key that does not exist, with the closest existing
    name (difflib) -- Hydra's own message lists every option and its search path."""
    from hydra.errors import MissingConfigException  # Hydra: kept off caitlab-sweep
    from omegaconf.errors import ConfigKeyError  # OmegaConf: kept off caitlab-sweep

    chain = _chain(err)
    for e in chain:
        if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
            group, _, name = e.missing_cfg_file.rpartition("/")
            head = " ".join(str(e).strip().splitlines()[0].split())
            guess = _closest(name, list(e.options))
            if guess is not None:
                return f"{head}; did you mean {guess}?"
            return f"{head}; {group}= takes one of {_shortlist(list(e.options))}"
    for e in chain:
        parent, key = getattr(e, "parent_node", None), getattr(e, "key", None)
        if not (isinstance(e, (ConfigKeyError, AttributeError)) and isinstance(key, str)
                and parent is not None and "is not in struct" in str(e)):
            continue
        full_key = str(getattr(e, "full_key", None) or key)
        prefix = full_key[:-len(key)] if full_key.endswith(key) else ""
        messages = " ".join(str(x) for x in chain)
        typed = re.search(r"Could not override '([^']+)'", messages)
        override = typed.group(1) if typed else full_key
        rest = override[len(full_key):] if override.startswith(full_key) else ""
        options = [str(k) for k in parent.keys()]
        if not prefix:  # the top level: a key or a config group (model/residual=...)
            options += _config_groups()
        where = prefix.rstrip(".") or "the config"
        line = f"{override}: no key '{key}' in {where}"
        guess = _closest(key, options)
        if guess is not None:
            return f"{line}; did you mean {prefix}{guess}{rest}?"
        elsewhere = _paths_named(parent, key)
        if elsewhere:  # the right key in another section (data.teacher_weights)
            return f"{line}; did you mean {' or '.join(p + rest for p in elsewhere[:2])}?"
        # not Hydra's `+key=value` hint: the value may be a secret
        return f"{line} (to add a new key: +{override}=...)"
    return None


def one_line(err: BaseException) -> str:
    """Hydra/OmegaConf errors span lines (hints, option lists, full_key...): one line."""
    known = mistyped_name(err)
    if known is not None:
        return known
    # caitlab's own refusal, raised inside a resolver (the run folder's signature), is the line
    mine = next((e for e in _chain(err) if isinstance(e, UserError)), None)
    if mine is not None:
        return str(mine)
    parts = []
    for e in _chain(err):
        # Hydra appends every option of a group and its whole search path
        text = re.split(r"\n\s*(?:Available options in|Config search path)", str(e))[0]
        for line in text.splitlines():
            line = " ".join(line.split())
            if line and not line.startswith(("full_key:", "object_type=", "reference_type=")):
                parts.append(line.rstrip(":"))
    return "; ".join(dict.fromkeys(parts)) or "unknown error"
