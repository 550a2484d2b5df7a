"""One image transformer that spans ViT/DeiT, CaiT and every ablation between them.

The knobs are the ablation axes of "Going deeper with image transformers" (Touvron et al.,
2021): where the class token lives, how residual branches are scaled, the LayerScale init,
talking-heads attention, depth and width; and two neighbouring ideas, static-key attention
(Hu, Zhou, Rostami, 2024) and EViT token reorganisation (Liang et al., 2022). Parameter
names follow timm's ``Cait`` and ``VisionTransformer`` wherever the two agree, so
checkpoints map with a few renames (see ``checkpoint.py``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch import nn

from caitlab.models._registry import register_model

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


class ResidualScale(nn.Module):
    """Multiplies a residual branch: a per-channel diagonal (LayerScale) or one scalar (ReZero).

    Named ``ls1``/``ls2`` with a ``gamma`` parameter, as in timm's ``LayerScale``.
    """

    def __init__(self, dim: int, init: float, per_channel: bool) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim if per_channel else 1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _branch_scale(residual: str, dim: int, eps: float) -> tuple[nn.Module, bool]:
    """Returns (scale module, keep the pre-norm?) for one residual branch."""
    if residual == "none":
        return nn.Identity(), True
    if residual == "layerscale":
        return ResidualScale(dim, eps, per_channel=True), True
    # ReZero / SkipInit: a scalar that starts at 0, so each block starts as the identity.
    return ResidualScale(dim, 0.0, per_channel=False), residual == "rezero_norm"


class Attention(nn.Module):
    """Multi-head self-attention, optionally with talking heads (Shazeer et al., 2020) and
    static keys (Hu, Zhou, Rostami, "Static Key Attention in Vision", 2024).

    With ``static_keys=N`` the layer has no key projection (``qv`` projects queries and values
    only); its keys are a learned ``static_key`` of shape (heads, N, head_dim), one key per
    token position, so the layer only accepts sequences of exactly N tokens.

    Plain attention runs through ``F.scaled_dot_product_attention`` (fused kernels). Talking
    heads mix the heads of the logits before the softmax (``proj_l``) and of the weights after
    it (``proj_w``); that cannot go through SDPA, so it is written out, with the head mixing
    as one batched matmul over the head axis instead of two permute-linear-permute copies.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        talking_heads: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        static_keys: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.talking_heads = talking_heads
        self.static_key: nn.Parameter | None = None
        if static_keys is None:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            # Static-key attention: queries and values are projected from the tokens, the keys
            # are parameters, one per head and token position. The paper gives no init; like
            # the position embedding (also one vector per position) they start at
            # trunc_normal(std=0.02), so attention starts near uniform as with projected keys.
            self.qv = nn.Linear(dim, dim * 2, bias=qkv_bias)
            self.static_key = nn.Parameter(torch.empty(num_heads, static_keys, self.head_dim))
            trunc_normal_(self.static_key, std=0.02)
        self.attn_drop = nn.Dropout(attn_drop)
        if talking_heads:
            self.proj_l = nn.Linear(num_heads, num_heads)
            self.proj_w = nn.Linear(num_heads, num_heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def _mix_heads(attn: torch.Tensor, mix: nn.Linear, scale: float = 1.0) -> torch.Tensor:
        """``mix`` applied over the head axis of ``scale * attn`` (batch, heads, n, m).

        One bmm with the (heads x heads) weight expanded over the batch as a view: no copy of
        the n x m maps, where ``matmul(weight, attn)`` folds the batch into a transposed copy
        and timm's permute-linear-permute copies twice (3-7x slower here, fwd and bwd).
        ``scale`` is folded into the small weight instead of a pass over the maps.
        """
        b, h, n, m = attn.shape
        weight = mix.weight * scale if scale != 1.0 else mix.weight
        mixed = torch.bmm(weight.expand(b, h, h), attn.reshape(b, h, n * m))
        return (mixed + mix.bias[:, None]).view(b, h, n, m)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each (batch, heads, tokens, head_dim).

        Static keys are the same for every image: expanded over the batch as a view (no copy),
        so static-key attention still runs through SDPA.
        """
        b, n, _ = x.shape
        if self.static_key is None:
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
        qv = self.qv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, v = qv.unbind(0)
        return q, self.static_key.expand(b, -1, -1, -1), v

    def class_row(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The class token's (index 0) attention weights over all tokens: (batch, heads, tokens).

        Only the class query's row is computed, at a cost linear in the tokens. Talking heads
        mix its logits (``proj_l``) and weights (``proj_w``): the mixing is per (query, key)
        entry and the softmax per row, so this is exactly the row of the full matrix that
        multiplies V.
        """
        logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # (b, h, 1, n)
        if self.talking_heads:
            weights = self._mix_heads(self._mix_heads(logits, self.proj_l).softmax(dim=-1),
                                      self.proj_w)
        else:
            weights = logits.softmax(dim=-1)
        return weights[:, :, 0]

    def forward(
        self, x: torch.Tensor, with_class_row: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The attention output; with ``with_class_row``, also ``class_row`` (for EViT)."""
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        if self.talking_heads:
            attn = self._mix_heads(q @ k.transpose(-2, -1), self.proj_l, self.scale)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(self._mix_heads(attn, self.proj_w))
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        x = x.transpose(1, 2).reshape(b, n, c)
        out = self.proj_drop(self.proj(x))
        return (out, self.class_row(q, k)) if with_class_row else out


class ClassAttention(nn.Module):
    """CaiT's class attention: the class token is the only query; keys/values are all tokens.

    Cost is linear in the number of tokens, since no patch token is ever a query.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax weights of the class query over all tokens: (batch, heads, tokens)."""
        q = self._heads(self.q(x[:, :1]))
        k = self._heads(self.k(x))
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        q = self._heads(self.q(x[:, :1]))
        k, v = self._heads(self.k(x)), self._heads(self.v(x))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, 1, c)))


def kept_tokens(num_tokens: int, keep_rate: float) -> int:
    """EViT's ``ceil(keep_rate * num_tokens)``, the attentive tokens a layer keeps.

    The 1e-9 absorbs float noise (0.7 * 10 is 7.000000000000001 in binary) that would
    otherwise keep one token more than the rate says.
    """
    return math.ceil(keep_rate * num_tokens - 1e-9)


def reorganised_length(n: int, keep_rate: float) -> int:
    """Sequence length after a reorganising layer that sees ``n`` tokens (class token first)."""
    keep = kept_tokens(n - 1, keep_rate)
    return n if keep >= n - 1 else 1 + keep + 1  # class, attentive tokens, the fused token


def rank_tokens(class_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attentiveness of the non-class tokens and their order, most attentive first.

    ``class_row``: (batch, heads, tokens), the class token's attention weights with the class
    token itself at index 0. Attentiveness is the weight averaged over heads (EViT, Eq. 3);
    returns (scores, order), both (batch, tokens - 1), ``order`` indexing ``x[:, 1:]``.
    """
    scores = class_row[:, :, 1:].mean(dim=1)
    return scores, scores.argsort(dim=1, descending=True)


def reorganise_tokens(x: torch.Tensor, class_row: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """EViT token reorganisation (Liang et al., ICLR 2022) of ``x`` = [cls, tokens].

    Keeps the class token and the ``ceil(keep_rate * (N - 1))`` tokens the class token attends
    to most (in that order), and fuses the others into one token, ``sum_i a_i x_i`` over them
    with ``a_i`` their attentiveness: the paper's Eq. 4 and the official code, which do not
    renormalise the weights. Returns ``x`` itself when nothing would be dropped.
    """
    b, n, c = x.shape
    keep = kept_tokens(n - 1, keep_rate)
    if keep >= n - 1:
        return x
    scores, order = rank_tokens(class_row)
    tokens = x[:, 1:]
    kept = tokens.gather(1, order[:, :keep, None].expand(-1, -1, c))
    rest = order[:, keep:]
    weights = scores.gather(1, rest).to(x.dtype)
    fused = tokens.gather(1, rest[..., None].expand(-1, -1, c)) * weights[..., None]
    return torch.cat((x[:, :1], kept, fused.sum(dim=1, keepdim=True)), dim=1)


class Block(nn.Module):
    """Pre-norm transformer block whose two residual branches are scaled by ``residual``.

    With ``keep_rate < 1`` the block reorganises its tokens as EViT does: after the attention
    branch and before the MLP, using the class token's attention of this same layer (so the
    MLP, and every later layer, runs on fewer tokens). ``static_keys``: see ``Attention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        talking_heads: bool = False,
        residual: str = "none",
        layerscale_init: float = 1e-5,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        static_keys: int | None = None,
        keep_rate: float = 1.0,
    ) -> None:
        super().__init__()
        self.keep_rate = keep_rate
        self.ls1, keep_norm = _branch_scale(residual, dim, layerscale_init)
        self.ls2, _ = _branch_scale(residual, dim, layerscale_init)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.attn = Attention(dim, num_heads, qkv_bias, talking_heads, attn_drop, proj_drop,
                              static_keys)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_rate < 1.0:
            out, class_row = self.attn(self.norm1(x), with_class_row=True)
            x = reorganise_tokens(x + self.drop_path(self.ls1(out)), class_row, self.keep_rate)
        else:
            x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class ClassAttentionBlock(nn.Module):
    """Updates the class token only: ``forward(patches, cls)`` returns the new ``cls``.

    Patch tokens are read (normalised as keys/values) but never written, which is what lets
    CaiT separate patch processing from class embedding.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        residual: str = "none",
        layerscale_init: float = 1e-5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.ls1, keep_norm = _branch_scale(residual, dim, layerscale_init)
        self.ls2, _ = _branch_scale(residual, dim, layerscale_init)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        u = self.norm1(torch.cat((cls, patches), dim=1))
        cls = cls + self.ls1(self.attn(u))
        return cls + self.ls2(self.mlp(self.norm2(cls)))


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



# --- named variants (paper Table 3 for CaiT; DeiT Table 1) -------------------------------
# CaiT: patch 16, 2 class-attention layers, talking heads, LayerScale, qkv bias. The eps
# values are those of the official release (XXS-36 keeps 1e-5); the rest follow the rule.


def _cait(depth: int, embed_dim: int, num_heads: int, eps: float, size: int, overrides: dict):
    args = dict(
        img_size=size, patch_size=16, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, class_token="class_attention", ca_depth=2,
        residual="layerscale", layerscale_init=eps, talking_heads=True,
        drop_path_schedule="uniform",
    )
    return ImageTransformer(**{**args, **overrides})


def _deit(embed_dim: int, num_heads: int, overrides: dict):
    args = dict(
        img_size=224, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads,
        class_token="input", residual="none", drop_path_schedule="linear",
    )
    return ImageTransformer(**{**args, **overrides})


@register_model
def cait_xxs24_224(**kwargs):
    return _cait(24, 192, 4, 1e-5, 224, kwargs)


@register_model
def cait_xxs24_384(**kwargs):
    return _cait(24, 192, 4, 1e-5, 384, kwargs)


@register_model
def cait_xxs36_224(**kwargs):
    return _cait(36, 192, 4, 1e-5, 224, kwargs)


@register_model
def cait_xxs36_384(**kwargs):
    return _cait(36, 192, 4, 1e-5, 384, kwargs)


@register_model
def cait_xs24_224(**kwargs):
    return _cait(24, 288, 6, 1e-5, 224, kwargs)


@register_model
def cait_xs24_384(**kwargs):
    return _cait(24, 288, 6, 1e-5, 384, kwargs)


@register_model
def cait_xs36_224(**kwargs):
    return _cait(36, 288, 6, 1e-6, 224, kwargs)


@register_model
def cait_s24_224(**kwargs):
    return _cait(24, 384, 8, 1e-5, 224, kwargs)


@register_model
def cait_s24_384(**kwargs):
    return _cait(24, 384, 8, 1e-5, 384, kwargs)


@register_model
def cait_s36_384(**kwargs):
    return _cait(36, 384, 8, 1e-6, 384, kwargs)


@register_model
def cait_s48_224(**kwargs):
    return _cait(48, 384, 8, 1e-6, 224, kwargs)


@register_model
def cait_m24_224(**kwargs):
    return _cait(24, 768, 16, 1e-5, 224, kwargs)


@register_model
def cait_m36_384(**kwargs):
    return _cait(36, 768, 16, 1e-6, 384, kwargs)


@register_model
def cait_m48_448(**kwargs):
    return _cait(48, 768, 16, 1e-6, 448, kwargs)


@register_model
def deit_tiny_patch16_224(**kwargs):
    return _deit(192, 3, kwargs)


@register_model
def deit_small_patch16_224(**kwargs):
    return _deit(384, 6, kwargs)


@register_model
def deit_base_patch16_224(**kwargs):
    return _deit(768, 12, kwargs)


# Small members of the family for CPU runs on the digits data (8x8 images, patch 2).


@register_model
def vit_tiny(**kwargs):
    return ImageTransformer(**{**_TINY, "class_token": "input", "residual": "none", **kwargs})


@register_model
def cait_tiny(**kwargs):
    args = {**_TINY, "class_token": "class_attention", "ca_depth": 2, "residual": "layerscale",
            "layerscale_init": "auto", "talking_heads": True}
    return ImageTransformer(**{**args, **kwargs})


_TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
             num_heads=4, mlp_ratio=2.0)
