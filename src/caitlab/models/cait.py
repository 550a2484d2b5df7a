"""One image transformer that spans ViT/DeiT, CaiT and every ablation between them.

The knobs are the ablation axes of "Going deeper with image transformers" (Touvron et al.,
2021): where the class token lives, how residual branches are scaled, the LayerScale init,
talking-heads attention, depth and width; and two neighbouring ideas, static-key attention
(Hu, Zhou, Rostami, 2024) and EViT token reorganisation (Liang et al., 2022). Parameter
names follow timm's ``Cait`` and ``VisionTransformer`` wherever the two agree, so
checkpoints map with a few renames (see ``checkpoint.py``). The arguments and their checks
are in ``spec.py``, the layers in ``layers.py``, the named variants in ``variants.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import nn

from caitlab import compat
from caitlab.models.layers import (
    Block,
    ClassAttentionBlock,
    follow_tokens,
    reorganised_length,
)
from caitlab.models.spec import (
    AttentionKind,
    ClassToken,
    DropPathSchedule,
    ModelSpec,
    Residual,
)


@dataclass
class ClassTokenAttention:
    """The class token's attention in one layer (``sa.<i>`` or ``ca.<j>``).

    ``weights``: (batch, heads, tokens) over every token the layer sees, the class token at
    index 0. ``positions``: (batch, tokens - 1), the patch-grid cell (row-major) of each other
    token, -1 for the token EViT fused the dropped ones into.
    """

    name: str
    weights: torch.Tensor
    positions: torch.Tensor


def _layer_tokens(num_patches: int, spec: ModelSpec) -> list[int]:
    """Tokens each SA layer attends over (``spec`` resolved): the class token joins at
    ``insert_layer`` (0 for input), and a reorganising layer hands fewer tokens to the next."""
    tokens, n = [], num_patches
    prefix = 2 if spec.distillation_token else 1
    for i in range(spec.depth):
        joins = spec.class_token in ("input", "insert") and i == spec.insert_layer
        n += prefix if joins else 0
        tokens.append(n)
        n = reorganised_length(n, spec.keep_rate) if i in spec.reorg_layers else n
    return tokens


def _drop_path_rates(spec: ModelSpec) -> list[float]:
    rate, depth = spec.drop_path_rate, spec.depth
    if spec.drop_path_schedule == "linear":
        return [rate * i / max(depth - 1, 1) for i in range(depth)]
    return [rate] * depth


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
        distillation_token: DeiT's distillation token beside the class token, with a head of
            its own (``head_dist``): it joins where the class token does (``input``,
            ``insert``) or goes through the class-attention stage with it
            (``class_attention``, each a query over ``[cls, dist, patches]``). In training
            with ``distilled_training`` the model returns both heads' logits, else their mean.

    Attributes:
        spec: the arguments as given, checked (``ModelSpec``); an impossible combination is
            refused with ``ModelConfigError`` before a module is made.
        config: the spec resolved (``ModelSpec.as_config``): what a caitlab checkpoint
            rebuilds the model from and a run's summary records.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
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
        drop_path_schedule: DropPathSchedule = "uniform",
        norm_eps: float = 1e-6,
        attention: AttentionKind = "standard",
        keep_rate: float = 1.0,
        reorg_layers: tuple[int, ...] | list[int] | str = "auto",
        distillation_token: bool = False,
    ) -> None:
        super().__init__()
        # the arguments as given, checked (ModelConfigError names the first bad one)
        self.spec = ModelSpec(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token,
            insert_layer=insert_layer, ca_depth=ca_depth, residual=residual,
            layerscale_init=layerscale_init, talking_heads=talking_heads, drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate, attn_drop_rate=attn_drop_rate,
            proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate,
            drop_path_schedule=drop_path_schedule, norm_eps=norm_eps, attention=attention,
            keep_rate=keep_rate, reorg_layers=reorg_layers,
            distillation_token=distillation_token,
        )
        spec = self.spec.resolved()  # what the model is built from
        self.config = spec.as_config()
        self.num_classes = spec.num_classes
        self.embed_dim = self.num_features = spec.embed_dim
        self.class_token = spec.class_token
        self.insert_layer = spec.insert_layer

        # Modules are made in this order because it is the order they draw their random
        # init in: a seed gives the same model as it always did.
        # timm types patch_size as an int; it takes the resolved pair too (to_2tuple)
        self.patch_embed = PatchEmbed(img_size=spec.img_size,
                                      patch_size=cast(int, spec.patch_size),
                                      in_chans=spec.in_chans, embed_dim=spec.embed_dim)
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
                          if spec.class_token != "none" else None)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.patch_embed.num_patches, spec.embed_dim))
        self.pos_drop = nn.Dropout(spec.pos_drop_rate)
        self.layer_tokens: list[int] = _layer_tokens(self.patch_embed.num_patches, spec)
        self.blocks = self._self_attention_stage(spec)
        self.ca_blocks = self._class_attention_stage(spec)
        self.norm: nn.Module = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)
        self.head_drop = nn.Dropout(spec.drop_rate)
        self.head = self._head(spec)

        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

        # made and drawn after everything else: the rest of the model is what the same seed
        # gives without it
        self.dist_token: nn.Parameter | None = None
        self.head_dist: nn.Module | None = None
        self.distilled_training = False  # set by a training with a teacher (timm's name)
        if spec.distillation_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
            self.head_dist = self._head(spec)
            trunc_normal_(self.dist_token, std=0.02)
            self.head_dist.apply(self._init_weights)

    def _self_attention_stage(self, spec: ModelSpec) -> nn.ModuleList:
        dpr = _drop_path_rates(spec)
        return nn.ModuleList(
            Block(
                dim=spec.embed_dim, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio,
                qkv_bias=spec.qkv_bias, talking_heads=spec.talking_heads,
                proj_drop=spec.proj_drop_rate, attn_drop=spec.attn_drop_rate,
                drop_path=dpr[i], residual=spec.residual,
                layerscale_init=float(spec.layerscale_init), norm_eps=spec.norm_eps,
                static_keys=self.layer_tokens[i] if spec.attention == "static_key" else None,
                keep_rate=spec.keep_rate if i in spec.reorg_layers else 1.0,
            )
            for i in range(spec.depth)
        )

    @staticmethod
    def _class_attention_stage(spec: ModelSpec) -> nn.ModuleList:
        # CaiT runs class attention without stochastic depth (timm and the official code agree).
        return nn.ModuleList(
            ClassAttentionBlock(
                dim=spec.embed_dim, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio,
                qkv_bias=spec.qkv_bias, proj_drop=spec.proj_drop_rate,
                attn_drop=spec.attn_drop_rate, residual=spec.residual,
                layerscale_init=float(spec.layerscale_init), norm_eps=spec.norm_eps,
            )
            for _ in range(spec.ca_depth)
        )

    @staticmethod
    def _head(spec: ModelSpec) -> nn.Module:
        if spec.num_classes > 0:
            return nn.Linear(spec.embed_dim, spec.num_classes)
        return nn.Identity()

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
        return {"pos_embed", "cls_token", "dist_token"}

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return both heads' logits ``(cls, dist)`` (timm's switch)."""
        self.distilled_training = enable

    @property
    def num_prefix_tokens(self) -> int:
        """The class token and, where there is one, the distillation token."""
        return (self.cls_token is not None) + (self.dist_token is not None)

    def _cls(self, batch: int) -> torch.Tensor:
        """The class token, then the distillation token where there is one: (B, 1 or 2, C)."""
        assert self.cls_token is not None  # asked for where the model has one
        if self.dist_token is None:
            return self.cls_token.expand(batch, -1, -1)
        return torch.cat((self.cls_token, self.dist_token), dim=1).expand(batch, -1, -1)

    @property
    def _joins_at(self) -> int | None:
        """The SA layer the class token joins (``input``: 0), None where it never does."""
        in_sa = self.class_token in ("input", "insert") and self.cls_token is not None
        return self.insert_layer if in_sa else None

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x) + self.pos_embed)

    def _enter(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The tokens SA layer ``layer`` takes: the class token joins ``x`` at ``_joins_at``."""
        return torch.cat((self._cls(x.shape[0]), x), dim=1) if layer == self._joins_at else x

    def forward_cls(self, x: torch.Tensor,
                    attention: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``[cls, x]`` after the class-attention stage (``x`` itself without one), as timm's
        ``Cait.forward_cls``; ``attention`` collects each CA layer's class-query weights."""
        if not self.ca_blocks:
            return x
        cls = self._cls(x.shape[0])
        for block in self.ca_blocks:
            if attention is None:
                cls = block(x, cls)
            else:
                cls, weights = block(x, cls, return_attention=True)
                attention.append(weights)
        return torch.cat((cls, x), dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``[cls, patches]`` (just ``patches`` when there is no class token).

        After EViT token reorganisation the patches are the kept ones, most attentive first,
        then the fused token: ``layer_tokens`` says how many each SA layer sees.
        """
        x = self._embed(x)
        for i, block in enumerate(self.blocks):
            x = block(self._enter(x, i))
        return self.norm(self.forward_cls(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """The SA layers' outputs, with timm's contract (``VisionTransformer`` and ``Cait``).

        ``indices``: the last ``n`` SA layers for an int, all for None, else the layers named
        (negative from the end). Each intermediate is the layer's patch tokens, (B, C, H, W)
        for ``output_fmt="NCHW"`` or (B, N, C) for ``"NLC"``; ``norm`` applies the final norm
        first. ``return_prefix_tokens`` (models whose class token is in self-attention) pairs
        each with its class token, (B, 1, C), or (B, 0, C) before an ``insert`` token joins.
        Returns the intermediates, or ``(forward_features(x), intermediates)``, where
        ``stop_early`` skips the SA layers after the last one taken (as timm, the features
        are then those of the shorter stack).
        After EViT token reorganisation the tokens leave the grid: only ``"NLC"`` shows them.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} must be 'NCHW' or 'NLC'")
        take, last = compat.take_indices(len(self.blocks), indices)
        height, width = x.shape[-2:]
        x = self._embed(x)
        taken, prefixes = [], []
        for i, block in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
            x = block(self._enter(x, i))
            if i in take:
                y = self.norm(x) if norm else x
                joined = self._joins_at is not None and i >= self._joins_at
                n_prefix = self.num_prefix_tokens if joined else 0
                prefixes.append(y[:, :n_prefix])
                y = y[:, n_prefix:]
                taken.append(self._on_grid(y, (height, width), i) if output_fmt == "NCHW" else y)
        if return_prefix_tokens and self._joins_at is not None:
            taken = list(zip(taken, prefixes, strict=True))
        return taken if intermediates_only else (self.norm(self.forward_cls(x)), taken)

    def _on_grid(self, tokens: torch.Tensor, size: tuple[int, int], layer: int) -> torch.Tensor:
        """(B, N, C) patch tokens as a (B, C, H, W) feature map."""
        h, w = self.patch_embed.dynamic_feat_size(size)
        if tokens.shape[1] != h * w:
            raise ValueError(f"output_fmt='NCHW': SA layer {layer} holds {tokens.shape[1]} "
                             f"patch tokens after EViT token reorganisation, not the {h}x{w} "
                             "grid; use output_fmt='NLC'")
        return tokens.reshape(len(tokens), h, w, -1).permute(0, 3, 1, 2).contiguous()

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drops the SA layers after the last of ``indices`` (as ``forward_intermediates``
        reads them) and, as timm does, the final norm (``prune_norm``) and the head with
        the class-attention stage and its class token (``prune_head``). Returns the absolute
        indices. ``config`` keeps describing the model as it was built."""
        take, last = compat.take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        self.layer_tokens = self.layer_tokens[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            if self.ca_blocks:
                self.ca_blocks = nn.ModuleList()
                self.cls_token = self.dist_token = None
            self.num_classes = 0
            self.head = nn.Identity()
            if self.head_dist is not None:
                self.head_dist = nn.Identity()
        return take

    def forward_attention(
        self, x: torch.Tensor, sa_layers: Iterable[int] = ()
    ) -> tuple[torch.Tensor, list[ClassTokenAttention]]:
        """Where the class token looks: ``(tokens, attention)``.

        ``tokens``: ``[cls, patches]`` as ``forward_features`` has them before its final
        norm. ``attention``, in forward order: the class token's row in each SA layer of
        ``sa_layers`` that holds it (the others have none), then every class-attention layer.
        The weights are those that multiply V, so after talking-heads mixing they need not
        sum to 1; ``positions`` follow the tokens through EViT reorganisation.
        """
        if self.cls_token is None:
            raise ValueError("class_token=none: there is no class token whose attention to show")
        watched = set(sa_layers)
        x = self._embed(x)
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        attention: list[ClassTokenAttention] = []
        for i, block in enumerate(self.blocks):
            x = self._enter(x, i)
            if self._joins_at is None or i < self._joins_at:
                x = block(x)
                continue
            x, row = block(x, return_class_row=True)
            if i in watched:
                attention.append(ClassTokenAttention(f"sa.{i}", self._no_dist(row),
                                                     positions))
            keep_rate = cast(Block, block).keep_rate  # ModuleList types its items Module
            positions = follow_tokens(positions, row, keep_rate)
        ca: list[torch.Tensor] = []
        x = self.forward_cls(x, ca)
        attention += [ClassTokenAttention(f"ca.{j}", self._no_dist(w), positions)
                      for j, w in enumerate(ca)]
        return x, attention

    def _no_dist(self, weights: torch.Tensor) -> torch.Tensor:
        """The class token's weights over ``[cls, patches]``: the distillation token's
        column, where there is one, left out (so that ``positions`` index the rest)."""
        if self.dist_token is None:
            return weights
        return torch.cat((weights[..., :1], weights[..., 2:]), dim=-1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.dist_token is not None and self.head_dist is not None:
            return self._distilled_head(x, pre_logits)
        x = x.mean(dim=1) if self.cls_token is None else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def _distilled_head(self, x: torch.Tensor, pre_logits: bool
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """DeiT's two heads: the class token's and the distillation token's; their mean (the
        prediction), or both in a distilled training."""
        if pre_logits:
            return (self.head_drop(x[:, 0]) + self.head_drop(x[:, 1])) / 2
        cls, dist = self._both_heads(x)
        if self.distilled_training and self.training:
            return cls, dist
        return (cls + dist) / 2

    def _both_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.head_dist is not None  # with a distillation token
        return self.head(self.head_drop(x[:, 0])), self.head_dist(self.head_drop(x[:, 1]))

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads' logits ``(cls, dist)`` whatever the mode: what evaluation logs."""
        if self.dist_token is None:
            raise ValueError("distillation_token=false: the model has one head")
        return self._both_heads(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)
