"""The arguments of an ``ImageTransformer``, typed and checked: ``ModelSpec``.

A spec is made from the same keyword arguments as the model, with the same defaults (a test
holds the two signatures equal), and refuses an impossible one with ``ModelConfigError``, one
line naming the argument. ``resolved()`` is the one spelling of a model ("auto" replaced by
what it means, settings that are off in one form), the spec the model is built from;
``as_config()`` that as the model's ``config`` dict, which checkpoints and run summaries store.

Stdlib only: a spec can be made and checked without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

ClassToken = Literal["input", "insert", "class_attention", "none"]
Residual = Literal["none", "rezero", "rezero_norm", "layerscale"]
DropPathSchedule = Literal["uniform", "linear"]
AttentionKind = Literal["standard", "static_key"]

CLASS_TOKEN_PLACEMENTS: tuple[str, ...] = get_args(ClassToken)
RESIDUAL_SCALINGS: tuple[str, ...] = get_args(Residual)
DROP_PATH_SCHEDULES: tuple[str, ...] = get_args(DropPathSchedule)
ATTENTIONS: tuple[str, ...] = get_args(AttentionKind)

_DROP_RATES = ("drop_rate", "pos_drop_rate", "attn_drop_rate", "proj_drop_rate",
               "drop_path_rate")


class ModelConfigError(ValueError):
    """An impossible combination of model arguments; the message names the argument."""


def layerscale_eps_for_depth(depth: int) -> float:
    """The paper's rule (Sec. 3): 0.1 up to depth 18, 1e-5 at depth 24, 1e-6 deeper."""
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ModelConfigError(message)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r} must be one of {', '.join(choices)}")


def _as_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    _check(
        len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair),
        f"{name}={value!r} must be a positive integer or a pair of them",
    )
    return pair[0], pair[1]


def _layerscale_eps(layerscale_init: float | str, depth: int) -> float:
    if layerscale_init == "auto":
        return layerscale_eps_for_depth(depth)
    try:
        eps = float(layerscale_init)
    except (TypeError, ValueError):
        eps = -1.0
    _check(eps > 0, f"layerscale_init={layerscale_init!r} must be 'auto' or > 0")
    return eps


def _reorg_layers(value: tuple[int, ...] | list[int] | str, depth: int) -> tuple[int, ...]:
    """``reorg_layers`` as sorted zero-based indices; ``"auto"`` scales the paper's layers."""
    if value == "auto":
        # EViT reorganises at layers 4, 7, 10 of 12 (zero-based 3, 6, 9): 1/4, 1/2, 3/4 deep
        return tuple(sorted({depth * k // 12 for k in (3, 6, 9)}))
    ok = not isinstance(value, str)
    try:
        layers: tuple[Any, ...] = tuple(value) if ok else ()  # checked just below
    except TypeError:
        ok = False
    _check(ok and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
           f"reorg_layers={value!r} must be 'auto' or a list of layer indices")
    bad = [i for i in layers if not 0 <= i < depth]
    _check(not bad, f"reorg_layers={list(layers)}: layer {bad[0] if bad else ''} is not in "
                    f"[0, depth={depth})")
    _check(len(set(layers)) == len(layers), f"reorg_layers={list(layers)} repeats a layer")
    return tuple(sorted(layers))


def _check_reorg(class_token: str, insert_layer: int, attention: str, keep_rate: float,
                 layers: tuple[int, ...]) -> None:
    """Token reorganisation is ranked by the class token's attention in the same SA layer."""
    what = f"keep_rate={keep_rate} (EViT token reorganisation at layers {list(layers)})"
    _check(class_token != "class_attention",
           f"{what} is not possible with class_token=class_attention: the class token only "
           "exists in the class-attention stage, so it cannot rank patch tokens in "
           "self-attention")
    _check(class_token != "none",
           f"{what} is not possible with class_token=none: there is no class token to rank "
           "patch tokens")
    early = [i for i in layers if class_token == "insert" and i < insert_layer]
    _check(not early, f"reorg_layers={list(layers)}: layer {early[0] if early else ''} comes "
                      f"before the class token joins (insert_layer={insert_layer}), so no "
                      "class token can rank the tokens there")
    _check(attention != "static_key",
           f"attention=static_key cannot be combined with {what}: a static key belongs to a "
           "token position, and positions lose their meaning once tokens are reordered "
           "and fused")


def _frozen(value: Any) -> Any:
    """A list (or Hydra's ListConfig) as a tuple, so that a spec holds nothing mutable."""
    return value if isinstance(value, (str, int)) else tuple(value)


@dataclass(frozen=True)
class ModelSpec:
    """Every argument of ``ImageTransformer``, with its type and default (documented there).

    Made checked: an impossible value or combination raises ``ModelConfigError`` naming the
    first bad argument, in the order the fields are listed. The values are kept as given
    (``"auto"`` stays ``"auto"``, so ``dataclasses.replace(spec, depth=36)`` means the same
    choices at another depth); lists become tuples.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: ClassToken = "input"
    insert_layer: int = 0
    ca_depth: int = 2
    residual: Residual = "none"
    layerscale_init: float | str = "auto"
    talking_heads: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_schedule: DropPathSchedule = "uniform"
    norm_eps: float = 1e-6
    attention: AttentionKind = "standard"
    keep_rate: float = 1.0
    reorg_layers: tuple[int, ...] | list[int] | str = "auto"
    distillation_token: bool = False

    def __post_init__(self) -> None:
        self._resolve()  # the checks; the resolved values are for resolved()
        for name in ("img_size", "patch_size", "reorg_layers"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def resolved(self) -> ModelSpec:
        """The same model in its one spelling: image and patch sizes as pairs,
        ``layerscale_init`` as the eps it means, ``insert_layer``/``ca_depth`` 0 where their
        placement is not chosen, token reorganisation off as ``keep_rate=1.0`` with no
        layers, else the sorted layers. Two specs of the same model resolve equal."""
        return dataclasses.replace(self, **self._resolve())

    def as_config(self) -> dict[str, Any]:
        """The resolved spec as the model's ``config``: what a caitlab checkpoint rebuilds the
        model from and a run's summary records (lists, not tuples: it is saved as YAML and
        JSON). Its keys and their order are part of the saved format."""
        r = self.resolved()
        assert isinstance(r.img_size, tuple) and isinstance(r.patch_size, tuple)  # pairs
        return dict(
            img_size=list(r.img_size), patch_size=list(r.patch_size),
            in_chans=r.in_chans, num_classes=r.num_classes, embed_dim=r.embed_dim,
            depth=r.depth, num_heads=r.num_heads, mlp_ratio=r.mlp_ratio, qkv_bias=r.qkv_bias,
            class_token=r.class_token, insert_layer=r.insert_layer, ca_depth=r.ca_depth,
            residual=r.residual, layerscale_init=r.layerscale_init,
            talking_heads=r.talking_heads, attention=r.attention, keep_rate=r.keep_rate,
            reorg_layers=list(r.reorg_layers), drop_rate=r.drop_rate,
            pos_drop_rate=r.pos_drop_rate, attn_drop_rate=r.attn_drop_rate,
            proj_drop_rate=r.proj_drop_rate, drop_path_rate=r.drop_path_rate,
            drop_path_schedule=r.drop_path_schedule, norm_eps=r.norm_eps,
            distillation_token=r.distillation_token,
        )

    def _resolve(self) -> dict[str, Any]:
        """Checks every argument (``ModelConfigError`` names the first bad one) and returns
        the fields whose resolved value can differ from the one given."""
        img, patch = self._check_geometry()
        self._check_placement()
        eps = _layerscale_eps(self.layerscale_init, self.depth)
        _check_choice("attention", self.attention, ATTENTIONS)
        keep_rate, layers = self._token_reorganisation()
        self._check_distillation(keep_rate)
        return dict(
            img_size=img, patch_size=patch,
            insert_layer=self.insert_layer if self.class_token == "insert" else 0,
            ca_depth=self.ca_depth if self.class_token == "class_attention" else 0,
            layerscale_init=eps, keep_rate=keep_rate, reorg_layers=layers,
            distillation_token=bool(self.distillation_token),
        )

    def _check_geometry(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Image, patch, width and depth arguments; returns (img_size, patch_size) as pairs."""
        img = _as_pair(self.img_size, "img_size")
        patch = _as_pair(self.patch_size, "patch_size")
        _check(
            img[0] % patch[0] == 0 and img[1] % patch[1] == 0,
            f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}",
        )
        for name in ("in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0,
                   f"{name}={value!r} must be a positive integer")
        _check(isinstance(self.num_classes, int) and self.num_classes >= 0,
               f"num_classes={self.num_classes!r} must be a non-negative integer")
        _check(self.embed_dim % self.num_heads == 0,
               f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        _check(self.mlp_ratio > 0, f"mlp_ratio={self.mlp_ratio!r} must be positive")
        return img, patch

    def _check_placement(self) -> None:
        """The class token, residual and drop-path choices, and the stage sizes they need."""
        _check_choice("class_token", self.class_token, CLASS_TOKEN_PLACEMENTS)
        _check_choice("residual", self.residual, RESIDUAL_SCALINGS)
        _check_choice("drop_path_schedule", self.drop_path_schedule, DROP_PATH_SCHEDULES)
        if self.class_token == "insert":
            _check(isinstance(self.insert_layer, int) and 0 <= self.insert_layer < self.depth,
                   f"insert_layer={self.insert_layer!r} must be in [0, depth={self.depth})")
        if self.class_token == "class_attention":
            _check(isinstance(self.ca_depth, int) and self.ca_depth > 0,
                   f"ca_depth={self.ca_depth!r} must be a positive integer")
        for name in _DROP_RATES:
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"{name}={value!r} must be in [0, 1)")

    def _token_reorganisation(self) -> tuple[float, tuple[int, ...]]:
        """(keep_rate, reorg_layers) checked; (1.0, ()) when off, one config for every way of
        saying so."""
        layers = _reorg_layers(self.reorg_layers, self.depth)
        keep_rate = self.keep_rate
        _check(isinstance(keep_rate, (int, float)) and not isinstance(keep_rate, bool)
               and 0.0 < keep_rate <= 1.0, f"keep_rate={keep_rate!r} must be in (0, 1]")
        if keep_rate < 1.0 and layers:
            _check_reorg(self.class_token, self.insert_layer, self.attention, keep_rate, layers)
            return float(keep_rate), layers
        return 1.0, ()

    def _check_distillation(self, keep_rate: float) -> None:
        if not self.distillation_token:
            return
        _check(self.class_token != "none",
               "distillation_token=true needs a class token: with class_token=none there is "
               "no token for it to sit beside")
        _check(keep_rate == 1.0,
               f"distillation_token=true cannot be combined with keep_rate={keep_rate} (EViT "
               "token reorganisation): EViT ranks and fuses the tokens after a single class "
               "token")
