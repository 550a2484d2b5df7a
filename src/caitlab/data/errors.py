"""The data's errors, and the checks of config values that raise them: every message is one
line naming ``data.<key>`` or the path, so that ``caitlab-train`` can print it as it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np


class DataConfigError(ValueError):
    """A data config that cannot work; the one-line message names ``data.<key>`` or the path."""


class ImageReadError(DataConfigError):
    """Reading or transforming one image raised (not for a corrupt file: ``on_corrupt``); the
    one line names the file and the cause, the traceback is worth keeping."""


def data_error_message(err: Exception) -> str:
    """``err``'s one line, also when a DataLoader worker raised it: torch re-raises a worker's
    error in the main process with the worker's whole traceback as the message, and the
    original message as its last line."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__name__}: "
    return last.removeprefix(name)


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(text).split())


def error_reason(err: BaseException) -> str:
    """``Type: message`` of ``err``, on one line: the cause in a message naming a file."""
    return one_line(f"{type(err).__name__}: {err}")


def check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataConfigError(f"data.{key}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(key: str, value: Any, low: float, high: float, *,
                low_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise DataConfigError(f"data.{key}: must be a number in {bracket}{low}, {high}], "
                              f"got {value!r}")
    return value


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise DataConfigError(f"data.{key}: must be one of {', '.join(choices)}, "
                              f"got {value!r}")
    return value


def check_workers(value: Any) -> int | Literal["auto"]:
    """``num_workers``: an integer >= 0, or ``auto`` (:func:`caitlab.data.base.loader_workers`)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise DataConfigError(f"data.num_workers: must be an integer >= 0 or auto, "
                              f"got {value!r}")
    return int(value)
