"""MyNet: a small CNN, the kind of model a project brings to compare with caitlab's ViTs."""

from __future__ import annotations

import torch
from torch import nn


class MyNet(nn.Module):
    """Two convolution stages (the second halves the resolution), global average pooling and
    a linear head. caitlab passes the data's ``in_chans``/``num_classes``/``img_size``; the
    rest (``channels``, ``kernel_size``) are this model's own axes."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: int = 8,
                 channels: int = 16, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd (same-size padding)")
        if img_size < 2:
            raise ValueError(f"img_size={img_size} must be >= 2 (one stride-2 stage)")
        pad = kernel_size // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, channels, kernel_size, padding=pad),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, 2 * channels, kernel_size, stride=2, padding=pad),
            nn.BatchNorm2d(2 * channels),
            nn.GELU(),
        )
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
