"""The ablation axes: the values of a model's config that its runs are compared along."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def ablation_axes(model_config: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """The values a comparison is made along, as stored in the summary and the wandb tags.

    Every scalar (or list of scalars) of the model's config, whatever the model: caitlab's
    own or a project's (``model._target_=mypkg.MyNet`` with its own arguments). Nested keys
    are dotted; Hydra's ``_target_``-style keys and ``name`` (the ``model`` axis) are left
    out. Which of them tell a sweep's runs apart is for the report to find.
    """
    axes: dict[str, Any] = {}

    def add(prefix: str, mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if str(key).startswith("_") or name == "name":
                continue
            if isinstance(value, Mapping):
                add(f"{name}.", value)
            elif _is_scalar(value):
                axes[name] = value
            elif isinstance(value, (list, tuple)) and all(_is_scalar(v) for v in value):
                axes[name] = list(value)

    add("", model_config)
    if "layerscale_init" in axes and axes.get("residual") != "layerscale":
        axes["layerscale_init"] = None  # eps means nothing without LayerScale
    if "reorg_layers" in axes and not axes["reorg_layers"]:
        axes["keep_rate"] = axes["reorg_layers"] = None  # no token reorganisation
    return {"model": model_name, **axes}
