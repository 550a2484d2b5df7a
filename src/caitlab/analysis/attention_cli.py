"""``caitlab-attention``: the command line that draws where a trained model's class token
looks (the maps themselves: ``caitlab.analysis.attention_maps``; the model, data and images:
``attention_data``; the PNGs: ``attention_plot``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "caitlab-attention"



DESCRIPTION = """\
Draw where a trained model's class token looks, per layer and per head. Reads a
caitlab checkpoint (or a run folder's) and image files or digits test images.
Writes one PNG per image into --out and prints its path: the input, then one
row per layer (the class-attention layers, or the last --last-layers
self-attention ones) and one column per head, each map overlaid on the image."""
EPILOG = """\
Examples:
caitlab-attention outputs/demo/8aac04fac3 --digits 0 5 17
caitlab-attention run/checkpoints/last.ckpt --images cat.jpg --out maps/ --last-layers 4
Docs: "Console scripts" in the docs site (make docs; site/reference/cli.html)"""


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs' CLI reference is written from it too)."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add, src = parser.add_argument, parser.add_mutually_exclusive_group(required=True)
    add("checkpoint", metavar="CHECKPOINT", help="a caitlab checkpoint (.ckpt), or a run "
        "folder: its checkpoints/best.ckpt, else last.ckpt")
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files (PNG, JPEG...)")
    src.add_argument("--digits", nargs="+", type=int, metavar="INDEX",
                     help="images of the digits test split, by index (from 0)")
    add("--out", type=Path, metavar="DIR",
        help="folder to write the PNGs into (default: the checkpoint's run folder/attention)")
    add("--last-layers", type=int, default=2, metavar="N", help="for a model whose class "
        "token is in self-attention (ViT, DeiT): its last N layers (default: %(default)s)")
    add("--mean", type=float, nargs="+", help="per-channel mean that normalises --images "
        "(default: ImageNet's for 3 channels, the digits' for 1)")
    add("--std", type=float, nargs="+", help="per-channel standard deviation that "
        "normalises --images (default: as for --mean)")
    add("--upsample", choices=("bilinear", "nearest"), default="bilinear",
        help="how maps are resized to the image (default: %(default)s)")
    add("--alpha", type=float, default=0.5,
        help="opacity of the maps over the image, 0 to 1 (default: %(default)s)")
    add("--cmap", default="jet", help="matplotlib colour map (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from caitlab.analysis.attention_maps import AttentionError  # imports torch: kept off --help

    try:
        return _run(args)
    except AttentionError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from caitlab.analysis.attention_data import (  # imports torch: kept off --help
        class_names,
        data_option,
        default_mean_std,
        load_digits,
        load_image_files,
        load_model,
        per_channel,
        run_data_config,
    )
    from caitlab.analysis.attention_maps import AttentionError, trace_attention  # torch: off --help
    from caitlab.analysis.attention_plot import plot_attention  # torch: off --help
    from caitlab.models.checkpoint import run_folder  # torch: off --help

    model, ckpt = load_model(args.checkpoint)
    if model.cls_token is None:
        raise AttentionError("no class token to visualise (class_token=none: the model "
                             "average-pools its patch tokens)")
    labels: list[int] | None = None
    data = run_data_config(ckpt)
    option = data_option(ckpt, data)
    if args.digits is not None:
        if option is not None and option != "digits":
            raise AttentionError(
                f"--digits: {run_folder(ckpt)} was trained on data={option}, not digits; "
                "give its images with --images")
        x, names, labels, mean, std = load_digits(model, args.digits, data)
    else:
        if args.mean is None or args.std is None:
            mean, std = default_mean_std(model)
        mean = tuple(args.mean) if args.mean is not None else mean
        std = tuple(args.std) if args.std is not None else std
        x, names = load_image_files(model, args.images, mean, std)

    # never empty: every class-attention stage has a layer, and --last-layers >= 1 reaches
    # the last SA layer, which always holds an input/insert class token
    trace = trace_attention(model, x, args.last_layers)
    chans = x.shape[1]
    mean_t, std_t = per_channel(mean, chans, "--mean"), per_channel(std, chans, "--std")
    shown = x * std_t[:, None, None] + mean_t[:, None, None]
    # without a head (num_classes=0) the logits are features: nothing to predict
    probs = trace.logits.softmax(dim=-1) if model.num_classes > 0 else None
    out = args.out if args.out is not None else run_folder(ckpt) / "attention"
    classes = class_names(data, option, trace.logits.shape[-1])

    def label(k: int) -> str:
        return classes[k] if classes is not None else str(k)

    for i, name in enumerate(names):
        title = name if labels is None else f"{name} (label {label(labels[i])})"
        if probs is not None:
            p, k = probs[i].max(dim=-1)
            title += f": predicted {label(int(k))} ({float(p):.2f})"
        path = plot_attention(shown[i], trace.layers, i,
                              out / f"attention_{name}.png", title, args.upsample,
                              args.alpha, args.cmap)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
