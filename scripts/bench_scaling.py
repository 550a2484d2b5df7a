"""How a CaiT-S config's cost grows with depth and image size.

    .venv/bin/python scripts/bench_scaling.py                  # depth 12/24/36 x 224/384 px
    .venv/bin/python scripts/bench_scaling.py --device cuda --precision bf16 --batch 64

For each point: MACs per image, inference and training images/s with their model FLOP
utilisation (against one large matmul timed in the same run), and the measured cost per image
relative to depth 12 at 224 px beside what the MACs predict. Self-attention layers cost
linearly in depth; tokens grow (384/224)^2 = 2.94x from 224 to 384 px, and attention's
token-pair terms grow with their square, so the MACs rise a little faster than 2.94x.
"""

from __future__ import annotations

import argparse
import sys

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table
from caitlab.analysis.model_source import build_model
from caitlab.analysis.timing import (
    PRECISIONS,
    device_name,
    measure_throughput,
    precision_label,
    prepare_device,
)
from caitlab.models import count_macs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cait_s24_224", help="the CaiT-S config (default)")
    p.add_argument("--depths", default="12,24,36")
    p.add_argument("--sizes", default="224,384")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 64 on CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    add_doc_args(p)
    args = p.parse_args(argv)

    device, peak, _ = prepare_device(args.device, args.precision, args.threads)
    batch = args.batch or (64 if device.type == "cuda" else 2)
    print(f"{args.model} on {device} ({device_name(device)}), "
          f"{precision_label(args.precision)}, batch {batch}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s; median of {args.repeats} x {args.iters} "
          f"batches after {args.warmup} warm-up\n")
    header = (f"{'depth':>5}{'img':>5}{'GMACs':>8}{'infer img/s':>12}{'MFU':>7}"
              f"{'train img/s':>12}{'MFU':>7}{'cost x':>8}{'MACs x':>8}")
    print(header + "\n" + "-" * len(header))
    base = None
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for depth in (int(d) for d in args.depths.split(",")):
            model = build_model(args.model, {"depth": depth}, size, device=device)
            macs = count_macs(model)
            r = measure_throughput(model, batch=batch, device=device,
                                   precision=args.precision, macs=macs, peak=peak,
                                   warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                                   compile=args.compile)
            train_s_per_img = 1 / r["training"]["images_per_s"]
            if base is None:
                base = (train_s_per_img, macs)
            print(f"{depth:>5}{size:>5}{macs / 1e9:>8.2f}"
                  f"{r['inference']['images_per_s']:>12.2f}{100 * r['inference']['mfu']:>6.1f}%"
                  f"{r['training']['images_per_s']:>12.2f}{100 * r['training']['mfu']:>6.1f}%"
                  f"{train_s_per_img / base[0]:>8.2f}{macs / base[1]:>8.2f}", flush=True)
            rows.append([depth, size, f"{macs / 1e9:.2f}",
                         f"{r['inference']['images_per_s']:.2f}",
                         f"{100 * r['inference']['mfu']:.0f}%",
                         f"{r['training']['images_per_s']:.2f}",
                         f"{100 * r['training']['mfu']:.0f}%",
                         f"**{train_s_per_img / base[0]:.2f}**", f"{macs / base[1]:.2f}"])
            del model
    print("\ncost x: training seconds per image relative to the first row; MACs x: the same "
          "ratio predicted by the MACs. Equal columns: cost grows exactly as the arithmetic.")
    if not args.no_doc:
        table = markdown_table(["depth", "img", "GMACs", "infer img/s", "MFU", "train img/s",
                                "MFU", "train cost x", "MACs x"], rows, right=range(9))
        write_doc_table(
            "bench_scaling", "Scaling with depth and image size",
            f"`{args.model}` with `depth` overridden on {device} ({device_name(device)}), "
            f"{precision_label(args.precision)}, batch {batch}"
            f"{', compiled' if args.compile else ''}; median of {args.repeats} x {args.iters} "
            f"batches after {args.warmup} warm-up; MFU against a matmul timed in the same run "
            f"({peak / 1e9:.1f} GFLOP/s). Train cost x: training seconds per image relative to "
            f"the first row; MACs x: the same ratio predicted by the MACs.\n\n{table}",
            command_line(__file__, argv), args.doc_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
