"""``caitlab-bench``: parameters, MACs, throughput, MFU and peak memory of one model variant.

    caitlab-bench cait_s24_224 --batch 64 --precision bf16
    caitlab-bench cait_tiny --set depth=2 --set talking_heads=false --json
    caitlab-bench cait_m48_448 --no-throughput        # params/MACs on the meta device
    caitlab-bench --compare-paper --no-throughput      # every CaiT/DeiT variant vs the papers
    caitlab-bench outputs/mynet_vs_vit/3f2a9c01d4     # the model a run trained, as configured
    caitlab-bench mynet.MyNet --set channels=32        # a project's own class (in this folder)

MFU (model FLOP utilisation) is the achieved FLOP/s divided by the FLOP/s of one large
square matmul timed in the same run, on the same device and precision. Forward FLOPs are
2 x MACs per image; training (forward + backward) counts 3 x forward FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import TYPE_CHECKING, Any

from caitlab.analysis.model_source import BenchError, build
from caitlab.analysis.paper import compare_paper
from caitlab.analysis.timing import (
    PRECISIONS,
    compute_dtype,
    default_matmul_size,
    device_name,
    matmul_peak_flops,
    measure_throughput,
    num_threads,
    precision_label,
    resolve_device,
)

if TYPE_CHECKING:
    import torch

PROG = "caitlab-bench"
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["depth=12", "talking_heads=false", "layerscale_init=1e-5"]`` -> constructor kwargs.

    Values are YAML scalars (``false``, ``null``, ``[224, 224]``); a string that is a number
    in exponent notation (YAML 1.1 leaves ``1e-5`` a string) becomes a float.
    """
    import yaml  # kept off caitlab-bench --help

    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise BenchError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise BenchError(
                f"--set {key}: cannot parse {text!r} ({e.__class__.__name__})") from None
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        overrides[key] = value
    return overrides


def _warnings(result: dict[str, Any], device: torch.device) -> list[str]:
    """Notes on figures not to trust: a busy CPU, or an MFU above 100%."""
    notes = []
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores - 0.5:
            notes.append(f"load average {load:.1f} on {cores} cores: other processes compete "
                         "for the CPU, so timings are noisy (fewer --threads help)")
    high = [p for p in ("inference", "training") if result[p]["mfu"] > 1]
    if high:
        notes.append(f"MFU above 100% ({', '.join(high)}): the matmul peak was timed under "
                     "other conditions than the model (contention, clocks); rerun")
    return notes


def _counted(name: str, overrides: dict[str, Any] | None, img_size: int | None,
             settings: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` dict with params and MACs counted on the meta device, nothing timed yet;
    ``settings`` (precision, batch, compile, timing) recorded as asked."""
    from caitlab.models import count_macs, count_params  # torch: kept off caitlab-bench --help

    meta, source, shape = build(name, overrides, img_size)  # costs nothing, whatever the size
    try:
        params, macs = count_params(meta), count_macs(meta, shape[1:], shape[0])
    except Exception as e:  # a project's model that cannot take the input it was given
        first = str(e).splitlines()[0] if str(e) else ""
        raise BenchError(f"{source.label} cannot take one {'x'.join(map(str, shape))} input "
                         f"(in_chans x img_size): {type(e).__name__}: {first}") from None
    return dict(
        model=name, built=source.label, overrides=dict(overrides or {}),
        in_chans=shape[0], img_size=list(shape[1:]), params=params, macs=macs, device=None,
        device_name=None, **settings, inference=None, training=None, matmul_peak_flops=None,
        matmul_size=None, threads=None, warnings=[],
    )


def _timing_device(device: str | None, precision: str, threads: int | None,
                   counts: dict[str, int]) -> torch.device:
    """The device to time on, once the request (``counts``: batch, warmup, repeats, iters)
    is known to be one it can honour."""
    import torch  # heavy: kept off caitlab-bench --help

    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BenchError(f"--precision bf16: {torch.cuda.get_device_name(dev)} has no bf16")
    for flag, least in (("batch", 1), ("repeats", 1), ("iters", 1), ("warmup", 0)):
        if counts[flag] < least:
            raise BenchError(f"--{flag} must be >= {least}, got {counts[flag]}")
    if threads is not None and threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    return dev


def bench(name: str, overrides: dict[str, Any] | None = None, *, img_size: int | None = None,
          batch: int = 32, device: str | None = None, precision: str = "32",
          warmup: int = 3, repeats: int = 5, iters: int = 5, compile: bool = False,
          throughput: bool = True, matmul_size: int | None = None,
          threads: int | None = None) -> dict[str, Any]:
    """Everything ``caitlab-bench`` reports for one model, as the ``--json`` dict."""
    if precision not in PRECISIONS:
        raise BenchError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if compile:
        warmup = max(warmup, 1)  # the first call compiles; never time it
    timing = dict(warmup=warmup, repeats=repeats, iters=iters)
    result = _counted(name, overrides, img_size, dict(precision=precision, batch=batch,
                                                      compile=compile, timing=timing))
    if not throughput:
        return result

    import torch  # heavy: kept off caitlab-bench --help

    dev = _timing_device(device, precision, threads, dict(batch=batch, **timing))
    with num_threads(threads):
        try:
            result.update(device=str(dev), device_name=device_name(dev))
            n = matmul_size or default_matmul_size(dev)
            peak = matmul_peak_flops(dev, compute_dtype(precision), n, repeats=max(repeats, 3))
            result.update(matmul_peak_flops=peak, matmul_size=n)
            model = build(name, overrides, img_size, device=dev)[0]
            result.update(measure_throughput(
                model, batch=batch, device=dev, precision=precision, macs=result["macs"],
                peak=peak, compile=compile, input_shape=(result["in_chans"],
                                                         *result["img_size"]), **timing))
            result["threads"] = torch.get_num_threads()
            result["warnings"] = _warnings(result, dev)
        except torch.OutOfMemoryError:
            raise BenchError(f"out of memory on {dev} at --batch {batch}") from None
    return result


# --- output --------------------------------------------------------------------------------


def _gmacs(macs: float) -> str:
    g = macs / 1e9
    return f"{g:.2f}" if g >= 0.1 else f"{g:.3g}"


def _mem(nbytes: int | None, kind: str | None) -> str:
    if nbytes is None:
        return "n/a"
    size = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
    return size if kind == "cuda_max_allocated" else f"+{size} RSS"


def _flops(f: float) -> str:
    return f"{f / 1e12:.1f} TFLOP/s" if f >= 1e12 else f"{f / 1e9:.1f} GFLOP/s"


def format_table(r: dict[str, Any]) -> str:
    """The human-readable report of :func:`bench`'s result."""
    h, w = r["img_size"]
    sets = " ".join(f"{k}={v}" for k, v in r["overrides"].items())
    built = f" ({r['built']})" if r.get("built", r["model"]) != r["model"] else ""
    lines = [f"{r['model']}{built}{'  [' + sets + ']' if sets else ''}  img {h}x{w}"]
    if r["inference"] is not None:
        lines.append(f"device {r['device']} ({r['device_name']})  "
                     f"precision {precision_label(r['precision'])}  "
                     f"batch {r['batch']}{'  compiled' if r['compile'] else ''}")
        t = r["timing"]
        n = r["matmul_size"]
        lines.append(f"matmul peak {_flops(r['matmul_peak_flops'])} ({n}x{n} @ {n}x{n}, "
                     f"{'bf16' if r['precision'] == 'bf16' else 'fp32'}); timing: median of "
                     f"{t['repeats']} x {t['iters']} batches after {t['warmup']} warm-up")
    header = (f"{'phase':<10}{'params (M)':>12}{'GMACs/img':>11}{'img/s':>11}{'ms/batch':>10}"
              f"{'MFU %':>8}  peak memory")
    lines += ["", header, "-" * (len(header) + 4)]
    params, gmacs = f"{r['params'] / 1e6:.2f}", _gmacs(r["macs"])
    if r["inference"] is None:
        lines.append(f"{'model':<10}{params:>12}{gmacs:>11}{'-':>11}{'-':>10}{'-':>8}  -")
    for phase in ("inference", "training"):
        p = r[phase]
        if p is None:
            continue
        lines.append(f"{phase:<10}{params:>12}{gmacs:>11}{p['images_per_s']:>11.1f}"
                     f"{p['ms_per_batch']:>10.2f}{100 * p['mfu']:>8.2f}  "
                     f"{_mem(p['peak_mem_bytes'], p['peak_mem_kind'])}")
    if r["inference"] is not None:
        lines.append("")
        lines.append("MFU: model FLOPs (2 x MACs per image; training 3x) / matmul peak. "
                     + ("Peak memory: max allocated (CUDA)." if r["device"].startswith("cuda")
                        else "Peak memory: growth of the process's peak RSS during the phase."))
        lines += [f"warning: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)


def format_variants(key: str, results: list[dict[str, Any]]) -> str:
    """One row per value of ``key``: MACs, img/s and their ratios to the first value's."""
    base = results[0]
    timed = base["inference"] is not None
    lines = [f"{base['model']}: {key} compared ({'img/s ' if timed else ''}ratios are to "
             f"{key}={base['overrides'][key]!r})", ""]
    header = f"{key:<16}{'params (M)':>11}{'GMACs':>9}{'MACs x':>8}"
    if timed:
        header += f"{'infer img/s':>12}{'x':>7}{'train img/s':>12}{'x':>7}{'train MFU':>10}"
    lines += [header, "-" * len(header)]
    for r in results:
        row = (f"{r['overrides'][key]!s:<16}{r['params'] / 1e6:>11.2f}{_gmacs(r['macs']):>9}"
               f"{r['macs'] / base['macs']:>8.2f}")
        if timed:
            inf, tr = r["inference"]["images_per_s"], r["training"]["images_per_s"]
            row += (f"{inf:>12.1f}{inf / base['inference']['images_per_s']:>7.2f}"
                    f"{tr:>12.1f}{tr / base['training']['images_per_s']:>7.2f}"
                    f"{100 * r['training']['mfu']:>9.1f}%")
        lines.append(row)
    return "\n".join(lines)


def parse_compare(text: str) -> tuple[str, list[Any]]:
    """``"keep_rate=1.0,0.7,0.5"`` -> ``("keep_rate", [1.0, 0.7, 0.5])``."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip().isidentifier() or not values.strip():
        raise BenchError(f"--compare expects KEY=V1,V2,..., got {text!r}")
    parsed = [parse_overrides([f"{key.strip()}={v}"])[key.strip()] for v in values.split(",")]
    if len(parsed) < 2:
        raise BenchError(f"--compare {key}: give at least two values")
    return key.strip(), parsed


def format_compare(rows: list[dict[str, Any]]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["Paper comparison: params (M) counted at 224 px and 1000 classes as in the papers' "
             "tables; GMACs per image at the variant's native resolution (the papers' "
             "\"FLOPs\" are MACs).",
             "",
             f"{'variant':<24}{'img':>5}{'params':>9}{'paper':>8}{'diff':>7}"
             f"{'GMACs':>9}{'paper':>8}{'diff':>7}"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        lines.append(
            f"{r['model']:<24}{r['img_size']:>5}{r['params'] / 1e6:>9.1f}"
            f"{num(r['paper_params_m'], '.1f'):>8}{num(r['params_diff_m'], '+.2f'):>7}"
            f"{r['gmacs']:>9.2f}{num(r['paper_gmacs'], '.1f'):>8}"
            f"{num(r['gmacs_diff'], '+.2f'):>7}")
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


DESCRIPTION = """\
Measure one model: its parameters and MACs per image and, timed on this
machine, its inference and training speed (images/s), MFU and peak memory.
MODEL is a registered variant, a caitlab-train run folder, a model config file
or a class of your own. Prints a table, or one JSON object with --json, and
writes nothing. MFU (model FLOP utilisation) is the model's FLOP/s divided by
that of one large matmul timed in the same run, on the same device and
precision."""

EPILOG = """\
Examples:
caitlab-bench cait_s24_224 --batch 64 --precision bf16
caitlab-bench cait_tiny --set depth=2 --set talking_heads=false --json
caitlab-bench cait_m48_448 --no-throughput
caitlab-bench deit_small_patch16_224 --compare keep_rate=1.0,0.7,0.5
caitlab-bench --compare-paper --no-throughput
caitlab-bench outputs/demo/8aac04fac3
caitlab-bench mynet.MyNet --set channels=32
Docs: "Console scripts" in the docs site (make docs; site/reference/cli.html)"""


def build_parser() -> argparse.ArgumentParser:
    """The ``caitlab-bench`` command line (also read by the docs' CLI reference)."""
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="the model to measure: a registered variant (cait_s24_224, "
                        "deit_small_patch16_224, cait_tiny...), a caitlab-train run folder "
                        "(the model it trained, yours included), a model config "
                        "(conf/model/mynet.yaml), or module.Class / module.factory of your "
                        "own (mynet.MyNet; its input size from --set in_chans=/img_size= or "
                        "its defaults); not needed with --compare-paper alone")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change one constructor argument of the model, the value read as "
                        "YAML (depth=12, residual=layerscale, talking_heads=false); repeat "
                        "for several (default: none)")
    p.add_argument("--img-size", type=_positive_int, metavar="N",
                   help="rebuild the model for N x N pixel images (default: the model's own "
                        "size)")
    p.add_argument("--batch", type=_positive_int, default=32, metavar="B",
                   help="images per timed batch (default: %(default)s)")
    p.add_argument("--device",
                   help="where to time: cpu, cuda or cuda:1 (default: cuda if available, "
                        "else cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="32",
                   help="the number format to time in: 32 (fp32) or bf16 (torch.autocast to "
                        "bfloat16) (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model before timing it (default: off)")
    p.add_argument("--warmup", type=_non_negative_int, default=3, metavar="W",
                   help="untimed batches before timing; at least 1 with --compile "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="R",
                   help="timed repeats, of which the median is reported "
                        "(default: %(default)s)")
    p.add_argument("--iters", type=_positive_int, default=5, metavar="K",
                   help="batches per timed repeat (default: %(default)s)")
    p.add_argument("--matmul-size", type=_positive_int, metavar="N",
                   help="side of the square matmul that measures the peak FLOP/s MFU is "
                        "relative to (default: 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads for torch; on a busy machine fewer threads than cores "
                        "often time far more steadily (default: torch's own choice)")
    p.add_argument("--no-throughput", action="store_true",
                   help="only count params and MACs, on the meta device: instant, whatever "
                        "the model's size (default: off)")
    p.add_argument("--compare", metavar="KEY=V1,V2,...",
                   help="measure MODEL once per value of one constructor argument and print "
                        "the MACs and img/s of each with their ratios to the first value "
                        "(keep_rate=1.0,0.7,0.5; depth=12,24,36; attention=standard,static_key)")
    p.add_argument("--compare-paper", action="store_true",
                   help="print every CaiT/DeiT variant's params and GMACs beside the "
                        "papers' figures (default: off)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (default: off)")
    return p


def _bench_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`bench`'s keyword arguments from the command line (all but MODEL and --set)."""
    return dict(img_size=args.img_size, batch=args.batch, device=args.device,
                precision=args.precision, warmup=args.warmup, repeats=args.repeats,
                iters=args.iters, compile=args.compile, throughput=not args.no_throughput,
                matmul_size=args.matmul_size, threads=args.threads)


def _results(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--json`` object of one command line."""
    out: dict[str, Any] = {}
    options = _bench_options(args)
    if args.compare is not None:
        key, values = parse_compare(args.compare)
        out["compare"] = {"key": key, "results": [
            bench(args.model, {**parse_overrides(args.overrides), key: value}, **options)
            for value in values]}
    elif args.model is not None:
        out = bench(args.model, parse_overrides(args.overrides), **options)
    if args.compare_paper:
        out["compare_paper"] = compare_paper()
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    if args.compare is not None and args.model is None:
        return fail("--compare needs a MODEL")
    if args.model is None and not args.compare_paper:
        return fail("give a MODEL, or --compare-paper")
    try:
        out = _results(args)
    except BenchError as e:
        return fail(str(e))

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    parts = []
    if "compare" in out:
        parts.append(format_variants(out["compare"]["key"], out["compare"]["results"]))
    elif args.model is not None:
        parts.append(format_table(out))
    if args.compare_paper:
        parts.append(format_compare(out["compare_paper"]))
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
