"""Model cost: parameters and multiply-accumulates (the paper's "FLOPs" are MACs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one input image, from a caitlab model's ``config``."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, dict) or "in_chans" not in cfg or "img_size" not in cfg:
        raise ValueError(f"{type(model).__name__} has no config with in_chans and img_size: "
                         "give the input's in_chans and img_size")
    return (cfg["in_chans"], *cfg["img_size"])


def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None,
               in_chans: int | None = None) -> int:
    """Multiply-accumulates of one forward pass for one image, counted by torch's
    ``FlopCounterMode`` (which counts 2 FLOPs per MAC for matmuls, convolutions and SDPA).

    Runs on the model's own device; a model built on ``meta`` costs nothing to count.
    ``img_size`` defaults to the model's; another size needs a matching position embedding.
    A model without caitlab's ``config`` (a project's own) needs both ``img_size`` and
    ``in_chans``: the data's images.
    Runs with autograd on: FlopCounterMode's module tracker fails under ``no_grad`` when a
    parameter view (the expanded class token) is a block input.
    """
    if img_size is None or in_chans is None:
        chans, h, w = input_shape(model)
    if in_chans is not None:
        chans = in_chans
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    param = next(model.parameters())
    x = torch.zeros(1, chans, h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
