"""Our model against timm's reference model of the identical configuration and weights.

    .venv/bin/python scripts/bench_model.py                      # CPU: CaiT-XXS24 +/- TH, DeiT-Ti
    .venv/bin/python scripts/bench_model.py --device cuda --precision bf16 --compile \
        --cait cait_s24_224 --deit deit_small_patch16_224 --batch 64

Three cases: CaiT with talking heads (timm ``Cait``), CaiT without them (timm ``Cait`` with
plain ``Attention`` blocks) and DeiT (timm ``VisionTransformer``). timm's weights are copied
into ours (``remap_state_dict``) and the logits compared before timing. Forward (eval,
inference mode) and forward + backward (train mode) take turns, ours and timm's, repeat by
repeat after warm-up; the ratio is ours/timm throughput from the medians (>= 1.00: we are at
least as fast). Every throughput also prints its model FLOP utilisation against a large
matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table
from caitlab.analysis.model_source import build_model
from caitlab.analysis.timing import (
    PRECISIONS,
    device_name,
    images_per_s,
    inference_step,
    median_ratio,
    mfu,
    precision_label,
    prepare_device,
    time_interleaved,
    training_step,
)
from caitlab.models import count_macs, create_model
from caitlab.models.checkpoint import remap_state_dict


def timm_reference(case: str, name: str, device) -> torch.nn.Module:
    import timm
    from timm.models.cait import Cait
    from timm.models.vision_transformer import Attention

    with torch.device(device):
        if case != "cait-noth":
            return timm.create_model(name, pretrained=False)
        # timm's own Cait class, its plain (fused SDPA) attention in the SA blocks; the
        # geometry read from our variant, built on the meta device for nothing
        c = build_model(name).config
        return Cait(img_size=tuple(c["img_size"]), patch_size=c["patch_size"][0],
                    embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                    attn_block=Attention, init_values=c["layerscale_init"])


def ours_like(case: str, name: str, ref: torch.nn.Module, device) -> torch.nn.Module:
    with torch.device(device):
        model = create_model(name, **({"talking_heads": False} if case == "cait-noth" else {}))
    model.load_state_dict(remap_state_dict(ref.state_dict(), model), strict=True)
    return model


def steps_for(model, x, y, precision: str, device, compile: bool):
    fwd = torch.compile(model) if compile else model
    return (inference_step(fwd, x, device, precision),
            training_step(fwd, model.parameters(), x, y, device, precision))


def run_case(case: str, name: str, args, device, peak: float) -> list[dict]:
    torch.manual_seed(0)
    ref = timm_reference(case, name, device)
    ours = ours_like(case, name, ref, device)
    macs = count_macs(ours)
    h, w = ours.config["img_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, 3, h, w, device=device, generator=gen)
    y = torch.randint(0, 1000, (args.batch,), device=device, generator=gen)
    ours.eval(), ref.eval()
    with torch.inference_mode():
        diff = (ours(x[:2]) - ref(x[:2])).abs().max().item()

    rows = []
    for mode in ("forward", "forward+backward"):
        training = mode != "forward"
        ours.train(training), ref.train(training)
        steps = {"ours": steps_for(ours, x, y, args.precision, device, args.compile),
                 "timm": steps_for(ref, x, y, args.precision, device, args.compile)}
        pick = 1 if training else 0
        times = time_interleaved({k: v[pick] for k, v in steps.items()}, device,
                                 args.warmup, args.repeats, args.iters)
        ips = {k: images_per_s(t, args.batch, args.iters) for k, t in times.items()}
        rows.append(dict(
            case=case, model=name, mode=mode, max_abs_diff=diff,
            ours_img_s=ips["ours"], timm_img_s=ips["timm"],
            ratio=median_ratio(times["ours"], times["timm"]),
            ours_mfu=mfu(ips["ours"], macs, peak, training),
            timm_mfu=mfu(ips["timm"], macs, peak, training),
        ))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cait", default=None, help="CaiT variant (default: cait_xxs24_224 on "
                   "CPU, cait_s24_224 on CUDA)")
    p.add_argument("--deit", default=None, help="DeiT variant (default: deit_tiny_patch16_224 "
                   "on CPU, deit_small_patch16_224 on CUDA)")
    p.add_argument("--cases", default="cait,cait-noth,deit")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    add_doc_args(p)
    args = p.parse_args(argv)

    device, peak, n = prepare_device(args.device, args.precision, args.threads)
    cuda = device.type == "cuda"
    args.batch = args.batch or (64 if cuda else 8)
    names = {"cait": args.cait or ("cait_s24_224" if cuda else "cait_xxs24_224"),
             "deit": args.deit or ("deit_small_patch16_224" if cuda else "deit_tiny_patch16_224")}
    names["cait-noth"] = names["cait"]

    print(f"device {device} ({device_name(device)}), precision "
          f"{precision_label(args.precision)}, batch {args.batch}"
          f"{', compiled' if args.compile else ''}; median of {args.repeats} interleaved "
          f"repeats x {args.iters} batches after {args.warmup} warm-up")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({n}x{n}); MFU = 2 x MACs x (3 if "
          "training) x img/s / peak\n")
    header = (f"{'case':<10}{'model':<24}{'mode':<18}{'ours img/s':>11}{'timm img/s':>11}"
              f"{'ours/timm':>10}{'MFU ours':>9}{'MFU timm':>9}{'max|dlogit|':>12}")
    print(header + "\n" + "-" * len(header))
    rows = []
    for case in args.cases.split(","):
        for r in run_case(case, names[case], args, device, peak):
            rows.append(r)
            print(f"{r['case']:<10}{r['model']:<24}{r['mode']:<18}{r['ours_img_s']:>11.2f}"
                  f"{r['timm_img_s']:>11.2f}{r['ratio']:>10.3f}{100 * r['ours_mfu']:>8.1f}%"
                  f"{100 * r['timm_mfu']:>8.1f}%{r['max_abs_diff']:>12.1e}", flush=True)
    worst = min(rows, key=lambda r: r["ratio"])
    verdict = (f"lowest ours/timm: {worst['ratio']:.3f} ({worst['case']}, {worst['mode']}); "
               f"target >= 1.00: {'met' if worst['ratio'] >= 1.0 else 'NOT met'}")
    print("\n" + verdict)
    if not args.no_doc:
        table = markdown_table(
            ["case", "model", "mode", "ours img/s", "timm img/s", "ours/timm", "MFU ours",
             "MFU timm", "max abs logit diff"],
            [[r["case"], f"`{r['model']}`", r["mode"], f"{r['ours_img_s']:.2f}",
              f"{r['timm_img_s']:.2f}", f"**{r['ratio']:.3f}**",
              f"{100 * r['ours_mfu']:.1f}%", f"{100 * r['timm_mfu']:.1f}%",
              f"{r['max_abs_diff']:.1e}"] for r in rows], right=range(3, 9))
        setup = (f"Device {device} ({device_name(device)}), precision "
                 f"{precision_label(args.precision)}, batch {args.batch}"
                 f"{', compiled' if args.compile else ''}; median of {args.repeats} interleaved "
                 f"repeats x {args.iters} batches after {args.warmup} warm-up; matmul peak "
                 f"{peak / 1e9:.1f} GFLOP/s ({n}x{n}).")
        write_doc_table("bench_model", "Our model against timm's", f"{setup}\n\n{table}\n\n"
                        f"{verdict[0].upper()}{verdict[1:]}.", command_line(__file__, argv),
                        args.doc_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
