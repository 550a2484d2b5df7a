"""The ablation axes: the values of a model's config that its runs are compared along.

Every scalar of a model's config is an axis (:func:`ablation_axes`: the summary's ``axes`` and
the wandb tags), whatever the model. caitlab's architecture axes are declared here, once each
(:data:`ARCHITECTURE`), with what the rest reads from them: the constructor arguments an axis
covers, the config group that switches it, the report's column and how a value reads there, its
part of a plot label and of the row order, and when its value means something. Adding an axis
is a constructor argument (:class:`caitlab.models.ImageTransformer`), a declaration here and a
config group (``conf/model/<group>/``).

Stdlib only: caitlab-report reads these declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Axes = Mapping[str, Any]


def text(value: Any) -> str:
    """An axis value as an override types it (``true``, ``1e-05``, ``1,2``); None is empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(text(v) for v in value)
    return str(value)


def rank(value: Any) -> tuple:
    """Orders values of one axis: None first, numbers by value, anything else by its text."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, text(value))


@dataclass(frozen=True)
class Axis:
    """One of caitlab's architecture axes.

    ``keys``: the constructor arguments it covers; a model has the axis when it has the first.
    ``group``: the config group that switches it (``model/residual=layerscale``), if any.
    ``column``: the report's column; ``cell`` how the axes read there (default: the first
    key's :func:`text`); ``always``: the column even for runs without it; ``unused``: cells
    that mean "not used", the column then shown only where some run uses the axis.
    ``label``: its part of a plot label (empty: none); ``sort``: whether rows are sorted on
    it, by ``order`` (default: :func:`rank` of the first key).
    ``applies``: when its values mean something; elsewhere they are stored as None.
    """

    column: str
    keys: tuple[str, ...]
    group: str | None = None
    cell: Callable[[Axes], str] | None = None
    always: bool = False
    unused: tuple[str, ...] = ()
    label: Callable[[Axes], str] | None = None
    sort: bool = True
    order: Callable[[Axes], Any] | None = None
    applies: Callable[[Axes], bool] | None = None

    def shown(self, axes: Axes) -> str:
        return self.cell(axes) if self.cell else text(axes.get(self.keys[0]))

    def part(self, axes: Axes) -> str:
        return self.label(axes) if self.label else ""

    def rank(self, axes: Axes) -> Any:
        return self.order(axes) if self.order else rank(axes.get(self.keys[0]))


def _placement(axes: Axes) -> str:
    token = axes.get("class_token")
    if token == "insert":
        return f"insert@{axes.get('insert_layer')}"
    return "" if token is None else str(token)


def _token_reorg(axes: Axes) -> str:
    """EViT's keep rate and layers, e.g. ``0.7 @ 1,2``; empty without reorganisation."""
    layers = axes.get("reorg_layers")
    if not layers or axes.get("keep_rate") is None:
        return ""
    return f"{axes['keep_rate']:g} @ {','.join(str(i) for i in layers)}"


# The report's columns in this order; its rows sorted by the axes that sort, in this order.
ARCHITECTURE = (
    Axis("model", ("model",), group="model", always=True,
         label=lambda a: str(a.get("model", "?"))),
    Axis("class token", ("class_token", "insert_layer"), group="model/class_token",
         cell=_placement, label=_placement),
    Axis("CA layers", ("ca_depth",), cell=lambda a: str(a.get("ca_depth") or ""),
         sort=False),
    Axis("residual", ("residual",), group="model/residual",
         label=lambda a: text(a.get("residual"))),
    Axis("eps", ("layerscale_init",), sort=False,
         applies=lambda a: a.get("residual") == "layerscale"),
    Axis("depth", ("depth",), group="model/depth",
         label=lambda a: "" if a.get("depth") is None else f"d{a['depth']}"),
    Axis("width", ("embed_dim",)),
    Axis("attention", ("attention",), group="model/attention", unused=("", "standard"),
         label=lambda a: "" if a.get("attention") in (None, "standard")
         else str(a["attention"]).replace("_", "-")),
    # keep everything first: a lower keep rate reorganises more
    Axis("token reorg", ("reorg_layers", "keep_rate"), group="model/token_reorg",
         cell=_token_reorg, unused=("",), order=lambda a: -(a.get("keep_rate") or 1.0),
         label=lambda a: f"keep {a['keep_rate']:g}" if _token_reorg(a) else "",
         applies=lambda a: bool(a.get("reorg_layers"))),
    Axis("dist token", ("distillation_token",), group="model/dist_token",
         unused=("", "false"), label=lambda a: "dist" if a.get("distillation_token") else ""),
)
ARCHITECTURE_KEYS = frozenset(key for axis in ARCHITECTURE for key in axis.keys)
# The input's, not the model's choice (caitlab passes the data's)
INPUT_KEYS = frozenset({"in_chans", "num_classes", "img_size"})


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def ablation_axes(model_config: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """The values a comparison is made along, as stored in the summary and the wandb tags.

    Every scalar (or list of scalars) of the model's config, whatever the model: caitlab's
    own or a project's (``model._target_=mypkg.MyNet`` with its own arguments). Nested keys
    are dotted; Hydra's ``_target_``-style keys and ``name`` (the ``model`` axis) are left
    out. An axis that does not apply (eps without LayerScale) is None. Which of them tell a
    sweep's runs apart is for the report to find.
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
    for axis in ARCHITECTURE:
        if axis.applies and axis.keys[0] in axes and not axis.applies(axes):
            axes.update(dict.fromkeys(axis.keys))
    return {"model": model_name, **axes}
