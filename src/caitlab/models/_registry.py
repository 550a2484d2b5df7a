"""A registry of named model variants, as in timm: each variant is a small function."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds the named variant; ``overrides`` replace any of its constructor arguments."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(
            f"unknown model name {name!r}{hint}; known: {', '.join(list_models())}"
        )
    return _MODELS[name](**overrides)
