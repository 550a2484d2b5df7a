"""Keeping secrets out of everything caitlab writes or prints.

A secret is the value of any environment variable whose name contains KEY, TOKEN, SECRET or
PASSWORD, and any password in ``~/.netrc``. Config dumps, summaries and the wandb config
pass through ``redact`` so a config that interpolates one (``${oc.env:WANDB_API_KEY}``)
cannot leak it.
"""

from __future__ import annotations

import netrc
import os
import re
from typing import Any

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
REDACTED = "<redacted>"
# Short values ("1", "true") would turn every number in a config into <redacted>.
MIN_SECRET_LENGTH = 6


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_NAME.search(k)}
    try:
        for login, account, password in netrc.netrc().hosts.values():
            values.update(v for v in (login, account, password) if v)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    # longest first, so a secret that contains another is replaced whole
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


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
