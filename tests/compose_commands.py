"""Composes ``caitlab-train`` commands with ``--cfg job``, one after another in one process, as
the console script would: reads ``[[folder, [argument, ...]], ...]`` as JSON on stdin, prints
``[[exit status, the end of stderr], ...]``. The docs test shows ~100 commands; a process
each would cost a minute of start-ups (tests/test_docs.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from hydra.core.global_hydra import GlobalHydra

from caitlab import train


def compose(folder: str, args: list[str]) -> list:
    os.chdir(folder)
    os.environ.pop("HYDRA_FULL_ERROR", None)  # caitlab-train sets it for its own process
    sys.argv = ["caitlab-train", *args, "--cfg", "job"]
    err = io.StringIO()
    status = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            train.main()
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except Exception as exc:  # noqa: BLE001 - reported as the command's failure
            status, _ = 1, print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    GlobalHydra.instance().clear()
    return [status, err.getvalue()[-2000:]]


if __name__ == "__main__":
    print(json.dumps([compose(folder, args) for folder, args in json.load(sys.stdin)]))
