"""Where the class token looks, per layer and per head (``caitlab-attention`` draws it).

For a CaiT-style model (``class_token=class_attention``) the maps are the class-attention
weights of every head of every class-attention (CA) layer, as visualised in "Going deeper with
image transformers". For a model whose class token takes part in self-attention (``input``,
ViT/DeiT, or ``insert``) they are the class token's attention row in the last ``N`` self-
attention (SA) layers. A model without a class token (``none``) has nothing to show.

The images and the run's data come from ``caitlab.analysis.attention_data``, the PNGs are
drawn by ``caitlab.analysis.attention_plot``.

Talking-heads layers: the SA maps are the weights that multiply V, i.e. after the post-softmax
head mixing (``proj_w``). Those are linear mixtures of softmax rows, so they need not sum to 1
per head and may be negative; everywhere else the weights over all tokens sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caitlab.models import ImageTransformer
from caitlab.models.layers import Attention


class AttentionError(ValueError):
    """Something the user gave cannot be visualised; the message says what."""


@dataclass
class LayerAttention:
    """The class token's attention in one layer.

    ``weights``: (batch, heads, tokens) over every token the layer sees, the class token at
    index 0 (sums to 1 per head, except after talking-heads mixing). ``maps``: the same
    weights over the patch tokens only, on the patch grid: (batch, heads, gh, gw).
    """

    name: str
    weights: torch.Tensor
    maps: torch.Tensor


@dataclass
class AttentionTrace:
    """The per-layer attention plus what the model computed on the way.

    ``tokens`` are ``[cls, patches]`` just before ``model.norm`` (what ``forward_features``
    normalises), ``logits`` the model's output for the same images.
    """

    layers: list[LayerAttention]
    tokens: torch.Tensor
    logits: torch.Tensor


# --- the maps ------------------------------------------------------------------------------


def class_row_attention(attn: Attention, u: torch.Tensor) -> torch.Tensor:
    """The class token's (index 0) weights over all tokens in ``attn`` for the normed input ``u``.

    Returns (batch, heads, tokens): ``softmax(q_cls k^T * scale)``, with the talking-heads
    mixing before (``proj_l``) and after (``proj_w``) the softmax when the layer has it, so
    that the result is exactly the row that multiplies V. Static-key layers use their learned
    keys. This is the row EViT token reorganisation ranks tokens by.
    """
    q, k, _ = attn.qkv_heads(u)
    return attn.class_row(q, k)


def _layer(name: str, weights: torch.Tensor, grid: tuple[int, int],
           positions: torch.Tensor) -> LayerAttention:
    """``positions``: (batch, tokens - 1), the grid cell of each non-class token, -1 for a
    token fused by EViT; cells whose token was dropped stay 0 in the map."""
    b, h, _ = weights.shape
    patch_weights = weights[:, :, 1:] * (positions >= 0)[:, None]
    maps = weights.new_zeros(b, h, grid[0] * grid[1]).scatter_add_(
        2, positions.clamp(min=0)[:, None].expand(-1, h, -1), patch_weights)
    return LayerAttention(name=name, weights=weights, maps=maps.view(b, h, *grid))


def trace_attention(model: ImageTransformer, images: torch.Tensor,
                    last_layers: int = 2) -> AttentionTrace:
    """Runs ``model`` on ``images`` (eval mode, no grad) through its ``forward_attention``,
    keeping the class token's attention: every CA layer for ``class_attention`` models, the
    last ``last_layers`` SA layers that contain the class token for ``input``/``insert`` ones.

    After an EViT reorganising layer the maps follow each kept token back to its grid cell:
    dropped patches are 0, and the fused token is left out of the maps (its weight stays in
    ``weights``).
    """
    if not hasattr(model, "forward_attention"):  # (a torch.compile wrapper forwards it)
        raise AttentionError(f"{type(model).__name__} is not a caitlab ImageTransformer")
    if model.cls_token is None:
        raise AttentionError("no class token to visualise (class_token=none: the model "
                             "average-pools its patch tokens)")
    if last_layers < 1:
        raise AttentionError(f"--last-layers must be at least 1, got {last_layers}")
    grid = tuple(model.grid_size)
    depth = len(model.blocks)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tokens, attention = model.forward_attention(
                images, range(max(0, depth - last_layers), depth))
            logits = model.forward_head(model.norm(tokens))
            layers = [_layer(a.name, a.weights, grid, a.positions) for a in attention]
    finally:
        model.train(was_training)
    # clones made outside inference mode are ordinary tensors, usable anywhere afterwards
    layers = [LayerAttention(la.name, la.weights.clone(), la.maps.clone()) for la in layers]
    return AttentionTrace(layers=layers, tokens=tokens.clone(), logits=logits.clone())


def attention_maps(model: ImageTransformer, images: torch.Tensor,
                   last_layers: int = 2) -> list[LayerAttention]:
    """Per layer (``ca.<i>`` or ``sa.<i>``, in forward order): name, the class token's
    weights over all tokens (batch, heads, tokens) and its patch maps (batch, heads, gh, gw).
    """
    return trace_attention(model, images, last_layers).layers


def upsample_maps(maps: torch.Tensor, size: tuple[int, int],
                  mode: str = "bilinear") -> torch.Tensor:
    """(batch, heads, gh, gw) -> (batch, heads, H, W) with ``F.interpolate``."""
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.float(), size=size, mode=mode, **kwargs)
