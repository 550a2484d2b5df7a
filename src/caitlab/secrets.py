"""Keeping secrets out of everything caitlab writes or prints.

A secret is the value of any environment variable whose name contains KEY, TOKEN, SECRET or
PASSWORD, and any login, account or password in ``~/.netrc``. Config dumps, summaries and the
wandb config pass through ``redact`` so a config that interpolates one
(``${oc.env:WANDB_API_KEY}``) cannot leak it. A secret typed on the command line itself is
swapped for an interpolation that resolves to it (``hide_in_argv``) before Hydra reads it.
"""

from __future__ import annotations

import netrc
import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
REDACTED = "<redacted>"
# Short values ("1", "true") would turn every number in a config into <redacted>.
MIN_SECRET_LENGTH = 6
NETRC_FIELDS = ("login", "account", "password")  # the order of netrc.netrc().hosts' tuples


def _netrc_hosts() -> dict[str, tuple[str, str, str]]:
    try:
        return netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return {}


def secret_references(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each secret value and an OmegaConf interpolation that resolves to it, longest value
    first (a secret that contains another is replaced whole)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    refs: dict[str, str] = {}
    for host, entry in _netrc_hosts().items():
        for field, value in zip(NETRC_FIELDS, entry, strict=True):
            if value:
                refs.setdefault(value, f"${{netrc:{host},{field}}}")
    for name, value in env.items():
        if SECRET_NAME.search(name):
            refs[value] = f"${{oc.env:{name}}}"
    return {v: refs[v] for v in sorted(refs, key=len, reverse=True)
            if len(v) >= MIN_SECRET_LENGTH}


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    return list(secret_references(environ))


def netrc_value(host: str, field: str) -> str:
    """``${netrc:host,field}``: a field of ``~/.netrc``'s entry for ``host``."""
    entry = _netrc_hosts().get(str(host))
    if entry is None or field not in NETRC_FIELDS:
        raise KeyError(f"no {field} for {host} in ~/.netrc")
    return entry[NETRC_FIELDS.index(field)] or ""


def register_netrc_resolver() -> None:
    from omegaconf import OmegaConf  # kept off caitlab-report, which reads wandb_mode here

    if not OmegaConf.has_resolver("netrc"):
        OmegaConf.register_new_resolver("netrc", netrc_value)


def hide_in_argv(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """``argv`` with every secret typed in it replaced by an interpolation that resolves to
    it: Hydra saves the overrides as typed (``.hydra/``), wandb records the command line and
    Lightning's DDP launcher runs it again; they all see the reference, the run the value."""
    refs = secret_references(environ)
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        # only override values take interpolations; flags and their values (-cd PATH) do not
        if eq and not arg.startswith("-"):
            for secret, ref in refs.items():
                value = value.replace(secret, ref)
            arg = f"{key}={value}"
        out.append(arg)
    return out


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``obj`` (nested dicts/lists/strings) with every secret value replaced."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        return obj
    if isinstance(obj, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    return obj


# where wandb keeps its API key in ~/.netrc
WANDB_HOST = "api.wandb.ai"


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` wins when set; otherwise online with an API key, offline without."""
    mode = os.environ.get("WANDB_MODE")
    if mode == "dryrun":  # wandb's old name for offline, which Lightning's logger sets
        return "offline"
    return mode or ("online" if wandb_api_key_configured() else "offline")
