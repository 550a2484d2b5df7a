"""One image transformer that spans ViT/DeiT, CaiT and every ablation between them.

The knobs are the ablation axes of "Going deeper with image transformers" (Touvron et al.,
2021): where the class token lives, how residual branches are scaled, the LayerScale init,
talking-heads attention, depth and width; and two neighbouring ideas, static-key attention
(Hu, Zhou, Rostami, 2024) and EViT token reorganisation (Liang et al., 2022). Parameter
names follow timm's ``Cait`` and ``VisionTransformer`` wherever the two agree, so
checkpoints map with a few renames (see ``checkpoint.py``). The layers are in ``layers.py``,
the named variants in ``variants.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from caitlab.models.layers import Block, ClassAttentionBlock, reorganised_length

CLASS_TOKEN_PLACEMENTS = ("input", "insert", "class_attention", "none")
RESIDUAL_SCALINGS = ("none", "rezero", "rezero_norm", "layerscale")
DROP_PATH_SCHEDULES = ("uniform", "linear")
ATTENTIONS = ("standard", "static_key")

ClassToken = Literal["input", "insert", "class_attention", "none"]
Residual = Literal["none", "rezero", "rezero_norm", "layerscale"]


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


def _reorg_layers(value: tuple[int, ...] | list[int] | str, depth: int) -> tuple[int, ...]:
    """``reorg_layers`` as sorted zero-based indices; ``"auto"`` scales the paper's layers."""
    if value == "auto":
        # EViT reorganises at layers 4, 7, 10 of 12 (zero-based 3, 6, 9): 1/4, 1/2, 3/4 deep
        return tuple(sorted({depth * k // 12 for k in (3, 6, 9)}))
    ok = not isinstance(value, str)
    try:
        layers = tuple(value) if ok else ()
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


def _as_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    _check(
        len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair),
        f"{name}={value!r} must be a positive integer or a pair of them",
    )
    return pair  # type: ignore[return-value]


class ImageTransformer(nn.Module):
    """ViT/DeiT, CaiT and everything between them.

    Args:
        img_size, patch_size, in_chans, num_classes: input and output geometry.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: width and depth of the
            self-attention (SA) stack.
        class_token: ``input`` (ViT/DeiT: prepended before layer 0), ``insert`` (joins the SA
            stack after ``insert_layer`` layers), ``class_attention`` (CaiT: a stage of
            ``ca_depth`` class-attention layers after the SA stack) or ``none`` (global
            average pooling of patch tokens).
        residual: residual-branch scaling (paper Fig. 1): ``none`` (plain pre-norm),
            ``rezero`` (scalar init 0, no LayerNorm), ``rezero_norm`` (the same, LayerNorm
            kept) or ``layerscale`` (per-channel diagonal initialised at ``layerscale_init``).
        layerscale_init: a number, or ``"auto"`` for the paper's rule by depth.
        talking_heads: talking-heads attention in the SA layers (CaiT).
        drop_path_rate, drop_path_schedule: stochastic depth, the same rate in every SA layer
            (``uniform``, CaiT) or rising linearly from 0 (``linear``, DeiT).
        drop_rate: dropout before the head; ``pos_drop_rate``, ``attn_drop_rate`` and
            ``proj_drop_rate`` as in timm.
        attention: ``standard`` or ``static_key`` (Hu et al., 2024): every SA layer learns
            its keys, one per token position, sized to the tokens that layer sees.
        keep_rate, reorg_layers: EViT token reorganisation (Liang et al., 2022) in the SA layers
            ``reorg_layers`` (zero-based; ``"auto"``, the default: the paper's layers 4, 7, 10
            of 12 scaled to ``depth``), keeping ``keep_rate`` of the tokens there; off at
            ``keep_rate=1`` (the default) or with no layers. Needs a class token in
            self-attention (``input``/``insert``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: ClassToken = "input",
        insert_layer: int = 0,
        ca_depth: int = 2,
        residual: Residual = "none",
        layerscale_init: float | str = "auto",
        talking_heads: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_schedule: str = "uniform",
        norm_eps: float = 1e-6,
        attention: str = "standard",
        keep_rate: float = 1.0,
        reorg_layers: tuple[int, ...] | list[int] | str = "auto",
    ) -> None:
        super().__init__()
        img = _as_pair(img_size, "img_size")
        patch = _as_pair(patch_size, "patch_size")
        _check(
            img[0] % patch[0] == 0 and img[1] % patch[1] == 0,
            f"img_size={img_size} is not divisible by patch_size={patch_size}",
        )
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim),
                            ("depth", depth), ("num_heads", num_heads)):
            _check(isinstance(value, int) and value > 0,
                   f"{name}={value!r} must be a positive integer")
        _check(isinstance(num_classes, int) and num_classes >= 0,
               f"num_classes={num_classes!r} must be a non-negative integer")
        _check(embed_dim % num_heads == 0,
               f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        _check(mlp_ratio > 0, f"mlp_ratio={mlp_ratio!r} must be positive")
        _check(class_token in CLASS_TOKEN_PLACEMENTS,
               f"class_token={class_token!r} must be one of {', '.join(CLASS_TOKEN_PLACEMENTS)}")
        _check(residual in RESIDUAL_SCALINGS,
               f"residual={residual!r} must be one of {', '.join(RESIDUAL_SCALINGS)}")
        _check(drop_path_schedule in DROP_PATH_SCHEDULES,
               f"drop_path_schedule={drop_path_schedule!r} must be one of "
               f"{', '.join(DROP_PATH_SCHEDULES)}")
        if class_token == "insert":
            _check(isinstance(insert_layer, int) and 0 <= insert_layer < depth,
                   f"insert_layer={insert_layer!r} must be in [0, depth={depth})")
        if class_token == "class_attention":
            _check(isinstance(ca_depth, int) and ca_depth > 0,
                   f"ca_depth={ca_depth!r} must be a positive integer")
        for name, rate in (("drop_rate", drop_rate), ("pos_drop_rate", pos_drop_rate),
                           ("attn_drop_rate", attn_drop_rate),
                           ("proj_drop_rate", proj_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            _check(0.0 <= rate < 1.0, f"{name}={rate!r} must be in [0, 1)")
        if layerscale_init == "auto":
            eps = layerscale_eps_for_depth(depth)
        else:
            try:
                eps = float(layerscale_init)
            except (TypeError, ValueError):
                eps = -1.0
            _check(eps > 0, f"layerscale_init={layerscale_init!r} must be 'auto' or > 0")
        _check(attention in ATTENTIONS,
               f"attention={attention!r} must be one of {', '.join(ATTENTIONS)}")
        layers = _reorg_layers(reorg_layers, depth)
        _check(isinstance(keep_rate, (int, float)) and not isinstance(keep_rate, bool)
               and 0.0 < keep_rate <= 1.0, f"keep_rate={keep_rate!r} must be in (0, 1]")
        if keep_rate < 1.0 and layers:
            _check_reorg(class_token, insert_layer, attention, keep_rate, layers)
        else:
            keep_rate, layers = 1.0, ()  # off: one config for every way of saying so

        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.class_token = class_token
        self.insert_layer = insert_layer if class_token == "insert" else 0
        # Everything needed to rebuild this model; the report reads its ablation axes here.
        self.config = dict(
            img_size=list(img), patch_size=list(patch), in_chans=in_chans,
            num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token,
            insert_layer=self.insert_layer,
            ca_depth=ca_depth if class_token == "class_attention" else 0,
            residual=residual, layerscale_init=eps, talking_heads=talking_heads,
            attention=attention, keep_rate=float(keep_rate), reorg_layers=list(layers),
            drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, attn_drop_rate=attn_drop_rate,
            proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate,
            drop_path_schedule=drop_path_schedule, norm_eps=norm_eps,
        )

        self.patch_embed = PatchEmbed(img, patch, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = (
            nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token != "none" else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        if drop_path_schedule == "linear":
            dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        else:
            dpr = [drop_path_rate] * depth
        # Tokens each SA layer attends over: the class token joins at insert_layer (0 for
        # input), and a reorganising layer hands fewer tokens to the next one.
        self.layer_tokens: list[int] = []
        n = num_patches
        for i in range(depth):
            n += 1 if class_token in ("input", "insert") and i == self.insert_layer else 0
            self.layer_tokens.append(n)
            n = reorganised_length(n, keep_rate) if i in layers else n
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, talking_heads, residual, eps,
                  dpr[i], attn_drop_rate, proj_drop_rate, norm_eps,
                  static_keys=self.layer_tokens[i] if attention == "static_key" else None,
                  keep_rate=keep_rate if i in layers else 1.0)
            for i in range(depth)
        )
        # CaiT runs class attention without stochastic depth (timm and the official code agree).
        self.ca_blocks = nn.ModuleList(
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, residual, eps,
                                attn_drop_rate, proj_drop_rate, norm_eps)
            for _ in range(ca_depth if class_token == "class_attention" else 0)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # timm's param_groups_weight_decay also exempts every 1-d parameter (norms, biases,
        # LayerScale/ReZero gammas); these two are the n-d ones to exempt.
        return {"pos_embed", "cls_token"}

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def _cls(self, batch: int) -> torch.Tensor:
        return self.cls_token.expand(batch, -1, -1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``[cls, patches]`` (just ``patches`` when there is no class token).

        After EViT token reorganisation the patches are the kept ones, most attentive first,
        then the fused token: ``layer_tokens`` says how many each SA layer sees.
        """
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        insert_at = self.insert_layer if self.class_token in ("input", "insert") else None
        for i, block in enumerate(self.blocks):
            if i == insert_at:
                x = torch.cat((self._cls(x.shape[0]), x), dim=1)
            x = block(x)
        if self.ca_blocks:
            cls = self._cls(x.shape[0])
            for block in self.ca_blocks:
                cls = block(x, cls)
            x = torch.cat((cls, x), dim=1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1) if self.cls_token is None else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)  # type: ignore[return-value]
