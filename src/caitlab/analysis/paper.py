"""The CaiT and DeiT papers' parameter and MAC counts, and ours beside them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from caitlab.analysis.model_source import build_model

if TYPE_CHECKING:
    from caitlab.models import ImageTransformer

# Parameters (M) of the papers' variants, at 224 px and 1000 classes: CaiT Table 3 (the
# 384/448 px models are listed with their 224 px count). DeiT's own table rounds to whole
# millions (5M/22M/86M); these are the exact counts of the released DeiT models.
PAPER_PARAMS_M: dict[str, float] = {
    "cait_xxs24_224": 12.0, "cait_xxs24_384": 12.0, "cait_xxs36_224": 17.3,
    "cait_xxs36_384": 17.3, "cait_xs24_224": 26.6, "cait_xs24_384": 26.6, "cait_xs36_224": 38.6,
    "cait_s24_224": 46.9, "cait_s24_384": 46.9, "cait_s36_384": 68.2, "cait_s48_224": 89.5,
    "cait_m24_224": 185.9, "cait_m36_384": 270.9, "cait_m48_448": 356.0,
    "deit_tiny_patch16_224": 5.7, "deit_small_patch16_224": 22.1,
    "deit_base_patch16_224": 86.6,
    # the distilled ones: a distillation token and a second head more (timm's counts)
    "deit_tiny_distilled_patch16_224": 5.9, "deit_small_distilled_patch16_224": 22.4,
    "deit_base_distilled_patch16_224": 87.3,
}

# GMACs per image at each variant's native resolution (the papers' "FLOPs" are MACs). Only
# values we could trace to the CaiT paper / its official release (README_cait.md of
# facebookresearch/deit) are filled in; None where unconfirmed (printed as "-"). The DeiT
# paper lists no FLOPs; 1.3 / 4.6 are the values every later table (CaiT's included) cites
# for DeiT-Ti / DeiT-S, while DeiT-B is cited as both 17.5 and 17.6, so it is left out.
PAPER_GMACS: dict[str, float | None] = {
    "cait_xxs24_224": 2.5, "cait_xxs24_384": 9.5, "cait_xxs36_224": 3.8,
    "cait_xxs36_384": 14.2, "cait_xs24_224": 5.4, "cait_xs24_384": 19.3,
    "cait_xs36_224": None, "cait_s24_224": 9.4, "cait_s24_384": 32.2, "cait_s36_384": 48.0,
    "cait_s48_224": None, "cait_m24_224": 36.0, "cait_m36_384": 173.3, "cait_m48_448": 329.6,
    "deit_tiny_patch16_224": 1.3, "deit_small_patch16_224": 4.6, "deit_base_patch16_224": None,
    # one token more costs nothing the papers' rounding shows
    "deit_tiny_distilled_patch16_224": 1.3, "deit_small_distilled_patch16_224": 4.6,
    "deit_base_distilled_patch16_224": None,
}


def paper_variants() -> list[str]:
    """The CaiT/DeiT variants to compare with the papers: the table's names that are
    registered, then any other registered ``cait_*``/``deit_*`` except the CPU-sized
    ``*_tiny`` toys (those get "-" for the paper)."""
    from caitlab.models import list_models  # torch: off caitlab-bench --help's path

    registered = list_models()
    named = [n for n in PAPER_PARAMS_M if n in registered]
    extra = [n for n in registered if n.startswith(("cait_", "deit_"))
             and n not in PAPER_PARAMS_M and not n.endswith("_tiny")]
    return named + extra


def params_at_size(model: ImageTransformer, img_size: int) -> int:
    """Parameters of ``model`` rebuilt at ``img_size`` px, without rebuilding it: the learned
    position embedding (one ``embed_dim`` vector per patch) is the only parameter whose size
    depends on the image size."""
    from caitlab.models import count_params  # torch: off caitlab-bench --help's path

    gh, gw = (img_size // p for p in model.config["patch_size"])
    return count_params(model) - model.pos_embed.numel() + gh * gw * model.embed_dim


def compare_paper() -> list[dict[str, Any]]:
    """Our params (at 224 px, 1000 classes) and MACs (at native resolution) beside the papers'.

    Every model is built on the meta device, so even M-48 at 448 px costs nothing.
    """
    from caitlab.models import count_macs  # torch: off caitlab-bench --help's path

    rows = []
    for name in paper_variants():
        native = build_model(name, {"num_classes": 1000, "in_chans": 3})
        params, macs = params_at_size(native, 224), count_macs(native)
        paper_p, paper_g = PAPER_PARAMS_M.get(name), PAPER_GMACS.get(name)
        params_m, gmacs = params / 1e6, macs / 1e9
        rows.append(dict(
            model=name, img_size=native.config["img_size"][0],
            params=params, params_m=round(params_m, 2), paper_params_m=paper_p,
            params_diff_m=None if paper_p is None else round(params_m - paper_p, 2),
            macs=macs, gmacs=round(gmacs, 2), paper_gmacs=paper_g,
            gmacs_diff=None if paper_g is None else round(gmacs - paper_g, 2),
        ))
    return rows
