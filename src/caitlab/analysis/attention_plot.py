"""The PNG ``caitlab-attention`` writes per image, from the class token's attention maps.

One PNG per image (``attention_digit17.png``, ``attention_<file stem>.png``): the input in
the first column, then one row per layer and one column per head, each map upsampled to the
image and overlaid on it, normalised per map (min to max). The maps themselves:
``caitlab.analysis.attention_maps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from caitlab.analysis.attention_maps import LayerAttention, upsample_maps


def _pyplot() -> ModuleType:
    """pyplot on the Agg backend (files only, no display), set once a map is drawn."""
    import matplotlib  # matplotlib only once there is a map to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen on import

    return plt


def plot_attention(image: torch.Tensor, layers: Sequence[LayerAttention], index: int,
                   path: str | Path, title: str | None = None, mode: str = "bilinear",
                   alpha: float = 0.5, cmap: str = "jet") -> Path:
    """One PNG: ``image`` (C, H, W, values in [0, 1]) in the first column, then per layer a
    row with each head's map of sample ``index``, upsampled to H x W and overlaid."""
    plt = _pyplot()
    path = Path(path)
    c, h, w = image.shape
    shown = image.clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    base = dict(cmap="gray", vmin=0, vmax=1) if c == 1 else {}
    if c == 1:
        shown = shown[..., 0]
    heads = max(layer.maps.shape[1] for layer in layers)
    rows, cols = len(layers), heads + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows + 0.4), squeeze=False)
    try:
        for r, layer in enumerate(layers):
            up = upsample_maps(layer.maps[index:index + 1], (h, w), mode)[0]
            axes[r, 0].imshow(shown, interpolation="nearest", **base)
            axes[r, 0].set_title("input" if r == 0 else "", fontsize=9)
            axes[r, 0].set_ylabel(layer.name, fontsize=10)
            for head in range(heads):
                ax = axes[r, head + 1]
                if head < up.shape[0]:
                    m = up[head]
                    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
                    ax.imshow(shown, interpolation="nearest", **base)
                    ax.imshow(m.cpu().numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                              interpolation="nearest")
                    ax.set_title(f"{layer.name} / head {head}", fontsize=9)
                else:
                    ax.set_visible(False)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
