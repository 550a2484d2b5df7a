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
import difflib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "caitlab-bench"

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
}

PRECISIONS = ("32", "bf16")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class BenchError(Exception):
    """A bad request: reported as one ``caitlab-bench: error: ...`` line, exit status 2."""


# --- model construction --------------------------------------------------------------------


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["depth=12", "talking_heads=false", "layerscale_init=1e-5"]`` -> constructor kwargs.

    Values are YAML scalars (``false``, ``null``, ``[224, 224]``); a string that is a number
    in exponent notation (YAML 1.1 leaves ``1e-5`` a string) becomes a float.
    """
    import yaml

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


@dataclass
class ModelSource:
    """Where a MODEL argument's model comes from: caitlab's registry, a run folder's
    ``config.yaml`` (its ``model`` section), or a class/factory of a project's own."""

    label: str  # what the table shows beside MODEL: the registered name or the dotted path
    build: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)  # its arguments before --set
    data: dict[str, Any] = field(default_factory=dict)  # a run's data: its in_chans/img_size


def _import_object(path: str) -> Any:
    """``pkg.module.Name`` -> the object, importing ``pkg.module`` (a project's own package in
    the folder caitlab-bench runs in included)."""
    import importlib

    from caitlab.train import project_on_path

    project_on_path()
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BenchError(f"cannot import {path}: {e} (run caitlab-bench in the folder that "
                         "holds it, or install it)") from None
    if not hasattr(module, attr):
        close = difflib.get_close_matches(attr, [n for n in dir(module)
                                                 if not n.startswith("_")], n=3)
        hint = f" (did you mean {', '.join(f'{module_name}.{c}' for c in close)}?)" if close else ""
        raise BenchError(f"cannot import {path}: {module_name} has no {attr!r}{hint}")
    return getattr(module, attr)


def _from_run(path: Path) -> ModelSource:
    import yaml

    config = path / "config.yaml" if path.is_dir() else path
    if not config.is_file():
        raise BenchError(f"{path}: no config.yaml there (a caitlab-train run folder holds one)")
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise BenchError(f"{config}: cannot read it ({e.__class__.__name__})") from None
    if isinstance(cfg, dict) and cfg.get("_target_"):  # a model config (conf/model/x.yaml)
        model, cfg = cfg, {}
    else:
        model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model.get("_target_"):
        raise BenchError(f"{config}: no model._target_ (neither a caitlab-train run's "
                         "config.yaml nor a model config)")
    target = str(model["_target_"])
    # values taken from elsewhere in a model config (${data.in_chans}) are left to the
    # constructor's defaults or --set; a run's config.yaml has them resolved
    kwargs = {k: v for k, v in model.items() if not str(k).startswith("_")
              and not (isinstance(v, str) and "${" in v)}
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    label = str(kwargs["name"]) if target == "caitlab.models.create_model" else target
    return ModelSource(label, _import_object(target), kwargs, data)


def resolve_model(spec: str) -> ModelSource:
    """MODEL: a registered variant (``cait_tiny``), a run folder or its ``config.yaml``
    (``outputs/demo/8aac04fac3``: the model it trained, as configured), a model config
    (``conf/model/mynet.yaml``), or the dotted path of a model class or factory of a
    project's own (``mynet.MyNet``, arguments by --set)."""
    from caitlab.models import create_model, list_models

    if spec in list_models():
        return ModelSource(spec, lambda **kw: create_model(spec, **kw))
    path = Path(spec)
    if path.exists() or "/" in spec or spec.endswith((".yaml", ".yml")):
        if not path.exists():
            raise BenchError(f"{spec}: no such run folder or file")
        return _from_run(path)
    if "." in spec and all(part.isidentifier() for part in spec.split(".")):
        return ModelSource(spec, _import_object(spec))
    close = difflib.get_close_matches(spec, list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BenchError(f"unknown model name {spec!r}{hint}; give a registered variant "
                     f"({', '.join(list_models())}), a run folder, or module.Class of your own")


def _construct(source: ModelSource, kwargs: dict[str, Any], device: Any):
    import torch

    from caitlab.models import ModelConfigError, UnknownModelError

    try:
        try:
            with torch.device(device):
                return source.build(**kwargs)
        except (NotImplementedError, RuntimeError):
            if str(device) != "meta":
                raise
            # a project's model that does real work on its tensors at construction: it is
            # only counted, so the CPU does as well as meta (for a small model)
            return source.build(**kwargs)
    except (UnknownModelError, ModelConfigError) as e:
        raise BenchError(str(e)) from None
    except (TypeError, ValueError) as e:  # an unknown keyword, or a value it refuses
        msg = re.sub(r"^[\w.]*__init__\(\) ", "", str(e))
        raise BenchError(f"bad model arguments {kwargs}: {msg}") from None


def _input_shape(model, source: ModelSource, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of one input: a caitlab model's ``config``, else the
    ``in_chans``/``img_size`` it was built with (--set, the run's config, the run's data, the
    constructor's defaults)."""
    import inspect

    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and "in_chans" in cfg and "img_size" in cfg:
        return (int(cfg["in_chans"]), *(int(x) for x in cfg["img_size"]))
    try:
        defaults = {k: p.default for k, p in inspect.signature(source.build).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):
        defaults = {}

    def pick(key: str) -> Any:
        for where in (kwargs, source.data, defaults):
            if where.get(key) is not None:
                return where[key]
        return None

    chans, size = pick("in_chans"), pick("img_size")
    if chans is None or size is None:
        raise BenchError(f"{source.label}: cannot tell the size of its input images: give "
                         "--set in_chans=C --set img_size=N, or bench a run folder of it")
    h, w = (size, size) if isinstance(size, int) else size
    return int(chans), int(h), int(w)


def build(name: str, overrides: dict[str, Any] | None = None, img_size: int | None = None,
          device: Any = "meta") -> tuple[Any, ModelSource, tuple[int, int, int]]:
    """(model, where it came from, its input's (C, H, W)) for MODEL ``name``: see
    :func:`resolve_model` and :func:`build_model`."""
    source = resolve_model(name)
    kwargs = {**source.kwargs, **(overrides or {})}
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = _construct(source, kwargs, device)
    return model, source, _input_shape(model, source, kwargs)


def build_model(name: str, overrides: dict[str, Any] | None = None,
                img_size: int | None = None, device: Any = "meta"):
    """Builds MODEL ``name`` (:func:`resolve_model`) with ``overrides`` (``img_size`` wins over
    an override) on ``device``.

    Raises :class:`BenchError` for an unknown name or an impossible combination of arguments.
    """
    return build(name, overrides, img_size, device)[0]


def paper_variants() -> list[str]:
    """The CaiT/DeiT variants to compare with the papers: the table's names that are
    registered, then any other registered ``cait_*``/``deit_*`` except the CPU-sized
    ``*_tiny`` toys (those get "-" for the paper)."""
    from caitlab.models import list_models

    registered = list_models()
    named = [n for n in PAPER_PARAMS_M if n in registered]
    extra = [n for n in registered if n.startswith(("cait_", "deit_"))
             and n not in PAPER_PARAMS_M and not n.endswith("_tiny")]
    return named + extra


def params_at_size(model, img_size: int) -> int:
    """Parameters of ``model`` rebuilt at ``img_size`` px, without rebuilding it: the learned
    position embedding (one ``embed_dim`` vector per patch) is the only parameter whose size
    depends on the image size."""
    from caitlab.models import count_params

    gh, gw = (img_size // p for p in model.config["patch_size"])
    return count_params(model) - model.pos_embed.numel() + gh * gw * model.embed_dim


def compare_paper() -> list[dict[str, Any]]:
    """Our params (at 224 px, 1000 classes) and MACs (at native resolution) beside the papers'.

    Every model is built on the meta device, so even M-48 at 448 px costs nothing.
    """
    from caitlab.models import count_macs

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


# --- measurement ---------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BenchError(f"--device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise BenchError(f"--device {name}: only cpu and cuda are supported")
    return device


def _dtype(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def _autocast(device, precision: str):
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def _time_repeats(step, device, warmup: int, repeats: int, iters: int) -> list[float]:
    """Seconds for each of ``repeats`` runs of ``iters`` steps, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(steps: dict[str, Any], device, warmup: int, repeats: int,
                     iters: int) -> dict[str, list[float]]:
    """Seconds per repeat of each named step, the steps taking turns repeat by repeat.

    Side-by-side comparisons (ours against a reference) alternate so that a change of clock,
    cache or load during the run hits every contender alike; each gets ``warmup`` untimed
    calls first.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        # Reverse the order every other repeat: whoever goes first pays no systematic price.
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name] += _time_repeats(steps[name], device, 0, 1, iters)
    return times


def median_ratio(ours: list[float], reference: list[float]) -> float:
    """Throughput of ours over the reference's, from their median times."""
    return statistics.median(reference) / statistics.median(ours)


def default_matmul_size(device) -> int:
    import torch

    return 4096 if torch.device(device).type == "cuda" else 1024


def matmul_peak_flops(device, dtype, size: int | None = None, repeats: int = 5,
                      target_s: float = 0.05) -> float:
    """FLOP/s of a ``size x size @ size x size`` matmul in ``dtype`` on ``device``: the median
    of ``repeats`` timed runs, each long enough (about ``target_s``) to time reliably.

    The MFU denominator: a practical peak measured here, not the datasheet's.
    """
    import torch

    device = torch.device(device)
    n = size or default_matmul_size(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def step():
        torch.mm(a, b, out=out)

    # Calibrate: how many matmuls make one timed repeat last about target_s.
    one = min(_time_repeats(step, device, warmup=1, repeats=2, iters=1))
    iters = max(1, min(1000, math.ceil(target_s / max(one, 1e-9))))
    times = _time_repeats(step, device, warmup=0, repeats=repeats, iters=iters)
    return 2 * n**3 * iters / statistics.median(times)


def prepare_device(name: str | None, precision: str, threads: int | None = None):
    """(device, matmul peak FLOP/s, matmul size) for a benchmark script: ``threads`` CPU
    threads when given, TF32 matmuls on CUDA (as training uses them), and the MFU
    denominator timed now, on this device and precision."""
    import torch

    device = _resolve_device(name)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n = default_matmul_size(device)
    return device, matmul_peak_flops(device, _dtype(precision), n), n


def mfu(images_per_s: float, macs_per_image: float, peak: float, training: bool) -> float:
    """Model FLOP utilisation as a fraction: achieved FLOP/s over ``peak`` FLOP/s.

    Forward FLOPs per image are 2 x MACs; a training step (forward, backward with input and
    weight gradients) is counted as 3 x forward.
    """
    flops_per_image = 2 * macs_per_image * (3 if training else 1)
    return images_per_s * flops_per_image / peak


class _PeakMemory:
    """Peak memory of one phase: CUDA's max allocated, or the growth of the process's peak
    RSS on the CPU (``ru_maxrss`` is a high-water mark: a phase that stays below an earlier
    peak reads 0)."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.kind = "cuda_max_allocated" if self.cuda else "process_peak_rss_growth"

    @staticmethod
    def _maxrss_bytes() -> int | None:
        try:
            import resource
        except ImportError:  # not on Windows
            return None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = None if self.cuda else self._maxrss_bytes()
        self.bytes = None
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self.start is not None:
            self.bytes = max(0, self._maxrss_bytes() - self.start)


def _phase_result(times: list[float], batch: int, iters: int, macs: int, peak: float,
                  training: bool, mem: _PeakMemory) -> dict[str, Any]:
    t = statistics.median(times)
    images_per_s = batch * iters / t
    return dict(
        images_per_s=images_per_s, ms_per_batch=1000 * t / iters,
        mfu=mfu(images_per_s, macs, peak, training),
        peak_mem_bytes=mem.bytes, peak_mem_kind=mem.kind,
        repeat_s=[round(x, 6) for x in times],
    )


def measure_throughput(model, *, batch: int, device, precision: str, macs: int, peak: float,
                       warmup: int = 3, repeats: int = 5, iters: int = 5,
                       compile: bool = False,
                       input_shape: tuple[int, int, int] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Inference (eval, ``inference_mode``) and training (forward + cross-entropy + backward
    + AdamW step) throughput on random data: ``{"inference": {...}, "training": {...}}``.

    ``model`` must already be on ``device``; ``input_shape`` (C, H, W) defaults to a caitlab
    model's own. Each figure is the median over ``repeats`` timed runs of ``iters`` batches,
    after ``warmup`` untimed batches.
    """
    import torch
    import torch.nn.functional as F

    from caitlab.models.cost import input_shape as model_input

    chans, h, w = input_shape or model_input(model)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, chans, h, w, device=device, generator=gen)
    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int):  # a project's own model: as many classes as it outputs
        model.eval()
        with torch.no_grad():
            out = model(x[:1])
        classes = out.shape[-1] if out.dim() == 2 else 0
    y = torch.randint(0, max(classes, 1), (batch,), device=device, generator=gen)
    forward = torch.compile(model) if compile else model
    if compile:
        warmup = max(warmup, 1)  # the first call compiles; never time it

    results = {}
    model.eval()
    with _PeakMemory(device) as mem, torch.inference_mode(), _autocast(device, precision):
        times = _time_repeats(lambda: forward(x), device, warmup, repeats, iters)
    results["inference"] = _phase_result(times, batch, iters, macs, peak, False, mem)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4,
                            fused=True if torch.device(device).type == "cuda" else None)

    def train_step():
        with _autocast(device, precision):
            out = forward(x)
        out = out.float()
        loss = F.cross_entropy(out, y) if classes > 0 else out.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with _PeakMemory(device) as mem:
        times = _time_repeats(train_step, device, warmup, repeats, iters)
    results["training"] = _phase_result(times, batch, iters, macs, peak, True, mem)
    return results


def _warnings(result: dict[str, Any], device) -> list[str]:
    """Notes on figures not to trust: a busy CPU, or an MFU above 100%."""
    import os

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


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f
                         if ln.startswith("model name")), None)
    except OSError:
        pass
    if not name:
        import platform

        name = platform.processor() or "cpu"
    return f"{name}, {torch.get_num_threads()} threads"


def bench(name: str, overrides: dict[str, Any] | None = None, *, img_size: int | None = None,
          batch: int = 32, device: str | None = None, precision: str = "32",
          warmup: int = 3, repeats: int = 5, iters: int = 5, compile: bool = False,
          throughput: bool = True, matmul_size: int | None = None,
          threads: int | None = None) -> dict[str, Any]:
    """Everything ``caitlab-bench`` reports for one model, as the ``--json`` dict."""
    from caitlab.models import count_macs, count_params

    if precision not in PRECISIONS:
        raise BenchError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if compile:
        warmup = max(warmup, 1)  # the first call compiles; never time it
    meta, source, shape = build(name, overrides, img_size)  # costs nothing, whatever the size
    try:
        params, macs = count_params(meta), count_macs(meta, shape[1:], shape[0])
    except Exception as e:  # a project's model that cannot take the input it was given
        first = str(e).splitlines()[0] if str(e) else ""
        raise BenchError(f"{source.label} cannot take one {'x'.join(map(str, shape))} input "
                         f"(in_chans x img_size): {type(e).__name__}: {first}") from None
    result: dict[str, Any] = dict(
        model=name, built=source.label, overrides=dict(overrides or {}),
        in_chans=shape[0], img_size=list(shape[1:]), params=params, macs=macs, device=None,
        device_name=None, precision=precision,
        batch=batch, compile=compile, timing=dict(warmup=warmup, repeats=repeats, iters=iters),
        inference=None, training=None, matmul_peak_flops=None, matmul_size=None,
        threads=None, warnings=[],
    )
    if not throughput:
        return result

    import torch

    dev = _resolve_device(device)
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BenchError(f"--precision bf16: {torch.cuda.get_device_name(dev)} has no bf16")
    for flag, value, least in (("--batch", batch, 1), ("--repeats", repeats, 1),
                               ("--iters", iters, 1), ("--warmup", warmup, 0)):
        if value < least:
            raise BenchError(f"{flag} must be >= {least}, got {value}")
    if threads is not None and threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result.update(device=str(dev), device_name=_device_name(dev))
        n = matmul_size or default_matmul_size(dev)
        peak = matmul_peak_flops(dev, _dtype(precision), n, repeats=max(repeats, 3))
        result.update(matmul_peak_flops=peak, matmul_size=n)
        model = build(name, overrides, img_size, device=dev)[0]
        result.update(measure_throughput(
            model, batch=batch, device=dev, precision=precision, macs=macs, peak=peak,
            warmup=warmup, repeats=repeats, iters=iters, compile=compile, input_shape=shape))
        result["threads"] = torch.get_num_threads()
        result["warnings"] = _warnings(result, dev)
    except torch.OutOfMemoryError:
        raise BenchError(f"out of memory on {dev} at --batch {batch}") from None
    finally:
        torch.set_num_threads(saved_threads)
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
        prec = "bf16 autocast" if r["precision"] == "bf16" else "fp32"
        lines.append(f"device {r['device']} ({r['device_name']})  precision {prec}  "
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
    def num(v, fmt):
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a registered variant (cait_s24_224, deit_small_patch16_224, "
                        "cait_tiny...), a caitlab-train run folder (the model it trained, "
                        "yours included), a model config (conf/model/mynet.yaml), or "
                        "module.Class / module.factory of your own "
                        "(mynet.MyNet; its input from --set in_chans=/img_size= or its "
                        "defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor override, the value parsed as a YAML scalar "
                        "(depth=12, residual=layerscale, talking_heads=false); repeatable")
    p.add_argument("--img-size", type=_positive_int, metavar="N",
                   help="rebuild the model at N px (default: the model's own size)")
    p.add_argument("--batch", type=_positive_int, default=32, metavar="B",
                   help="images per batch (default: 32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="32",
                   help="32 = fp32; bf16 = torch.autocast to bfloat16 (default: 32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--warmup", type=_non_negative_int, default=3, metavar="W",
                   help="untimed batches before timing (default: 3; >= 1 with --compile)")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="R",
                   help="timed repeats; the median is reported (default: 5)")
    p.add_argument("--iters", type=_positive_int, default=5, metavar="K",
                   help="batches per timed repeat (default: 5)")
    p.add_argument("--matmul-size", type=_positive_int, metavar="N",
                   help="side of the square matmul that measures peak FLOP/s "
                        "(default: 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads for torch (default: torch's own choice); on a busy "
                        "machine fewer threads than cores often time far more steadily")
    p.add_argument("--no-throughput", action="store_true",
                   help="only params and MACs, counted on the meta device (instant)")
    p.add_argument("--compare", metavar="KEY=V1,V2,...",
                   help="bench MODEL once per value of one constructor argument and print "
                        "the MACs and img/s of each with ratios to the first value "
                        "(keep_rate=1.0,0.7,0.5; depth=12,24,36; attention=standard,static_key)")
    p.add_argument("--compare-paper", action="store_true",
                   help="every CaiT/DeiT variant's params and GMACs beside the papers'")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    return p


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
        out: dict[str, Any] = {}
        if args.compare is not None:
            key, values = parse_compare(args.compare)
            out["compare"] = {"key": key, "results": [
                bench(args.model, {**parse_overrides(args.overrides), key: value},
                      img_size=args.img_size, batch=args.batch, device=args.device,
                      precision=args.precision, warmup=args.warmup, repeats=args.repeats,
                      iters=args.iters, compile=args.compile,
                      throughput=not args.no_throughput, matmul_size=args.matmul_size,
                      threads=args.threads)
                for value in values]}
        elif args.model is not None:
            out = bench(args.model, parse_overrides(args.overrides), img_size=args.img_size,
                        batch=args.batch, device=args.device, precision=args.precision,
                        warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                        compile=args.compile, throughput=not args.no_throughput,
                        matmul_size=args.matmul_size, threads=args.threads)
        if args.compare_paper:
            out["compare_paper"] = compare_paper()
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
