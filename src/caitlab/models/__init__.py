"""The CaiT/ViT model family: ``create_model(name, **overrides)`` and its helpers.

``spec`` holds the model's arguments and their checks (``ModelSpec``), ``layers`` the
building blocks, ``cait`` the ``ImageTransformer`` family, ``variants`` the named variants,
``axes`` the ablation axes, ``checkpoint`` the loading of timm, official and caitlab
checkpoints, ``cost`` parameters and MACs.

The names below are imported on first use (PEP 562): ``caitlab.models.axes``, which the
report and ``caitlab-sweep`` read, must not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "UnknownModelError": "_registry", "create_model": "_registry", "list_models": "_registry",
    "ATTENTIONS": "spec", "CLASS_TOKEN_PLACEMENTS": "spec", "DROP_PATH_SCHEDULES": "spec",
    "RESIDUAL_SCALINGS": "spec", "ModelConfigError": "spec", "ModelSpec": "spec",
    "layerscale_eps_for_depth": "spec", "ImageTransformer": "cait",
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
    "count_macs": "cost", "count_params": "cost",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module("caitlab.models.variants")  # registers the named variants
    value = getattr(importlib.import_module(f"caitlab.models.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
