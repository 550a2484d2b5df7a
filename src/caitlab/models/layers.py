"""The layers of the image-transformer family: attention, class attention, the residual-branch
scales, the two block types, and EViT's token reorganisation.

Parameter names follow timm's ``Cait`` and ``VisionTransformer`` layers wherever the two agree
(``qkv``, ``proj``, ``ls1.gamma``, ``norm1``...), so checkpoints map with a few renames.
The layers take keyword arguments only: several are rates of the same type (``proj_drop``,
``attn_drop``, ``drop_path``), which a positional call could swap without an error. They are
listed in timm's order all the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn


class ResidualScale(nn.Module):
    """Multiplies a residual branch: a per-channel diagonal (LayerScale) or one scalar (ReZero).

    Named ``ls1``/``ls2`` with a ``gamma`` parameter, as in timm's ``LayerScale``.
    """

    def __init__(self, *, dim: int, init: float, per_channel: bool) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim if per_channel else 1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _branch_scale(residual: str, dim: int, eps: float) -> tuple[nn.Module, bool]:
    """Returns (scale module, keep the pre-norm?) for one residual branch."""
    if residual == "none":
        return nn.Identity(), True
    if residual == "layerscale":
        return ResidualScale(dim=dim, init=eps, per_channel=True), True
    # ReZero / SkipInit: a scalar that starts at 0, so each block starts as the identity.
    return ResidualScale(dim=dim, init=0.0, per_channel=False), residual == "rezero_norm"


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
        *,
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

        Weight and bias are cast to the maps' dtype: under autocast the maps are bf16/fp16
        while the parameters stay fp32, and an fp32 bias added to them would promote the
        maps (and the softmax over them) to fp32. ``baddbmm`` adds the bias in the same pass.
        """
        b, h, n, m = attn.shape
        weight = mix.weight * scale if scale != 1.0 else mix.weight
        mixed = torch.baddbmm(mix.bias.to(attn.dtype)[:, None],
                              weight.to(attn.dtype).expand(b, h, h), attn.reshape(b, h, n * m))
        return mixed.view(b, h, n, m)

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

    Cost is linear in the number of tokens, since no patch token is ever a query. With a
    distillation token the first ``queries`` tokens (class, distillation) each query.
    """

    def __init__(
        self,
        *,
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

    def forward(self, x: torch.Tensor, queries: int = 1) -> torch.Tensor:
        b, _, c = x.shape
        q = self._heads(self.q(x[:, :queries]))
        k, v = self._heads(self.k(x)), self._heads(self.v(x))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, queries, c)))


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


def follow_tokens(positions: torch.Tensor, class_row: torch.Tensor,
                  keep_rate: float) -> torch.Tensor:
    """Where the non-class tokens of ``reorganise_tokens``' output came from.

    ``positions``: (batch, tokens - 1), a label per non-class token of the input (e.g. its
    grid cell); returns the labels of the kept tokens, in their new order, then -1 for the
    fused token (``positions`` itself when nothing is dropped).
    """
    keep = kept_tokens(positions.shape[1], keep_rate)
    if keep >= positions.shape[1]:
        return positions
    order = rank_tokens(class_row)[1][:, :keep]
    return torch.cat((positions.gather(1, order), positions.new_full((len(positions), 1), -1)),
                     dim=1)


class Block(nn.Module):
    """Pre-norm transformer block whose two residual branches are scaled by ``residual``.

    With ``keep_rate < 1`` the block reorganises its tokens as EViT does: after the attention
    branch and before the MLP, using the class token's attention of this same layer (so the
    MLP, and every later layer, runs on fewer tokens). ``static_keys``: see ``Attention``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        talking_heads: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        residual: str = "none",
        layerscale_init: float = 1e-5,
        norm_eps: float = 1e-6,
        static_keys: int | None = None,
        keep_rate: float = 1.0,
    ) -> None:
        super().__init__()
        self.keep_rate = keep_rate
        self.ls1, keep_norm = _branch_scale(residual, dim, layerscale_init)
        self.ls2, _ = _branch_scale(residual, dim, layerscale_init)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias,
                              talking_heads=talking_heads, attn_drop=attn_drop,
                              proj_drop=proj_drop, static_keys=static_keys)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio),
                       act_layer=nn.GELU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_class_row: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block's output; with ``return_class_row``, also the class token's (index 0)
        attention weights of this layer, (batch, heads, tokens): see ``Attention.class_row``."""
        if self.keep_rate < 1.0 or return_class_row:
            out, class_row = self.attn(self.norm1(x), with_class_row=True)
            x = x + self.drop_path(self.ls1(out))
            if self.keep_rate < 1.0:
                x = reorganise_tokens(x, class_row, self.keep_rate)
        else:
            x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return (x, class_row) if return_class_row else x


class ClassAttentionBlock(nn.Module):
    """Updates the class token only: ``forward(patches, cls)`` returns the new ``cls``.

    Patch tokens are read (normalised as keys/values) but never written, which is what lets
    CaiT separate patch processing from class embedding.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        residual: str = "none",
        layerscale_init: float = 1e-5,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.ls1, keep_norm = _branch_scale(residual, dim, layerscale_init)
        self.ls2, _ = _branch_scale(residual, dim, layerscale_init)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.attn = ClassAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if keep_norm else nn.Identity()
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio),
                       act_layer=nn.GELU, drop=proj_drop)

    def forward(
        self, patches: torch.Tensor, cls: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The new ``cls``; with ``return_attention``, also the class query's weights over
        ``[cls, patches]``, (batch, heads, tokens): see ``ClassAttention.attention_map``."""
        u = self.norm1(torch.cat((cls, patches), dim=1))
        out = cls + self.ls1(self.attn(u, queries=cls.shape[1]))
        out = out + self.ls2(self.mlp(self.norm2(out)))
        return (out, self.attn.attention_map(u)) if return_attention else out
