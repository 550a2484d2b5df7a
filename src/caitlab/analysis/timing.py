"""Timing models on one device: the library behind ``caitlab-bench`` and ``scripts/bench_*``.

Device preparation (CPU threads, TF32), bf16 autocast, each step timed after warm-up with the
device synchronised, contenders timed in turns, the measured matmul peak and model FLOP
utilisation (MFU) against it, and the inference/training throughput of one model.

MFU is the achieved FLOP/s divided by the FLOP/s of one large square matmul timed in the same
run, on the same device and precision. Forward FLOPs are 2 x MACs per image; training (forward
+ backward) counts 3 x forward FLOPs.

torch is imported inside the functions, not at the top: ``caitlab-bench --help`` imports this
module and must not pay for torch.
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # torch is imported where used: importing this stays cheap
    import torch
    from torch import nn

    Device = torch.device | str  # a device, or its name

if sys.platform != "win32":  # no resource module on Windows
    import resource

PRECISIONS = ("32", "bf16")


def resolve_device(name: str | None) -> torch.device:
    """The ``torch.device`` for ``name`` (cpu, cuda, cuda:1; None: cuda if available, else
    cpu), a bare ``cuda`` pinned to the current index. ValueError for one this machine lacks."""
    import torch  # heavy: kept off caitlab-bench --help

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here")
        if cast("int | None", device.index) is None:  # torch types it int; bare cuda's is None
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of ``precision`` (one of :data:`PRECISIONS`) run in."""
    import torch  # heavy: kept off caitlab-bench --help

    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: Device, precision: str) -> AbstractContextManager[Any]:
    """bf16 autocast on ``device`` for ``precision="bf16"``; nothing for fp32."""
    import torch  # heavy: kept off caitlab-bench --help

    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def precision_label(precision: str) -> str:
    return "bf16 autocast" if precision == "bf16" else "fp32"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the torch threads timing runs on."""
    import torch  # heavy: kept off caitlab-bench --help

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
        name = platform.processor() or "cpu"
    return f"{name}, {torch.get_num_threads()} threads"


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (None: left as they are), restored afterwards."""
    import torch  # heavy: kept off caitlab-bench --help

    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def sync(device: Device) -> None:
    """Waits for ``device``'s queued work, so a clock read after it times that work."""
    import torch  # heavy: kept off caitlab-bench --help

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(step: Callable[[], Any], device: Device, warmup: int, repeats: int,
                 iters: int) -> list[float]:
    """Seconds for each of ``repeats`` runs of ``iters`` steps, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(steps: dict[str, Callable[[], Any]], device: Device, warmup: int,
                     repeats: int, iters: int) -> dict[str, list[float]]:
    """Seconds per repeat of each named step, the steps taking turns repeat by repeat.

    Side-by-side comparisons (ours against a reference) alternate so that a change of clock,
    cache or load during the run hits every contender alike; each gets ``warmup`` untimed
    calls first.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        # Reverse the order every other repeat: whoever goes first pays no systematic price.
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name] += time_repeats(steps[name], device, 0, 1, iters)
    return times


def images_per_s(times: list[float], batch: int, iters: int) -> float:
    """Throughput of repeats of ``iters`` batches of ``batch`` images, from their median."""
    return batch * iters / statistics.median(times)


def median_ratio(ours: list[float], reference: list[float]) -> float:
    """Throughput of ours over the reference's, from their median times."""
    return statistics.median(reference) / statistics.median(ours)


def default_matmul_size(device: Device) -> int:
    import torch  # heavy: kept off caitlab-bench --help

    return 4096 if torch.device(device).type == "cuda" else 1024


def matmul_peak_flops(device: Device, dtype: torch.dtype, size: int | None = None, repeats: int = 5,
                      target_s: float = 0.05) -> float:
    """FLOP/s of a ``size x size @ size x size`` matmul in ``dtype`` on ``device``: the median
    of ``repeats`` timed runs, each long enough (about ``target_s``) to time reliably.

    The MFU denominator: a practical peak measured here, not the datasheet's.
    """
    import torch  # heavy: kept off caitlab-bench --help

    device = torch.device(device)
    n = size or default_matmul_size(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def step() -> None:
        torch.mm(a, b, out=out)

    # Calibrate: how many matmuls make one timed repeat last about target_s.
    one = min(time_repeats(step, device, warmup=1, repeats=2, iters=1))
    iters = max(1, min(1000, math.ceil(target_s / max(one, 1e-9))))
    times = time_repeats(step, device, warmup=0, repeats=repeats, iters=iters)
    return 2 * n**3 * iters / statistics.median(times)


def prepare_device(name: str | None, precision: str,
                   threads: int | None = None) -> tuple[torch.device, float, int]:
    """(device, matmul peak FLOP/s, matmul size) for a benchmark script: ``threads`` CPU
    threads when given (for the rest of the process), TF32 matmuls on CUDA (as training uses
    them), and the MFU denominator timed now, on this device and precision."""
    import torch  # heavy: kept off caitlab-bench --help

    device = resolve_device(name)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n = default_matmul_size(device)
    return device, matmul_peak_flops(device, compute_dtype(precision), n), n


def mfu(images_per_s: float, macs_per_image: float, peak: float, training: bool) -> float:
    """Model FLOP utilisation as a fraction: achieved FLOP/s over ``peak`` FLOP/s.

    Forward FLOPs per image are 2 x MACs; a training step (forward, backward with input and
    weight gradients) is counted as 3 x forward.
    """
    flops_per_image = 2 * macs_per_image * (3 if training else 1)
    return images_per_s * flops_per_image / peak


class PeakMemory:
    """Peak memory of one phase: CUDA's max allocated, or the growth of the process's peak
    RSS on the CPU (``ru_maxrss`` is a high-water mark: a phase that stays below an earlier
    peak reads 0)."""

    def __init__(self, device: Device) -> None:
        import torch  # heavy: kept off caitlab-bench --help

        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.kind = "cuda_max_allocated" if self.cuda else "process_peak_rss_growth"

    @staticmethod
    def _maxrss_bytes() -> int | None:
        if sys.platform == "win32":
            return None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux

    def __enter__(self) -> PeakMemory:
        import torch  # heavy: kept off caitlab-bench --help

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = None if self.cuda else self._maxrss_bytes()
        self.bytes: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        import torch  # heavy: kept off caitlab-bench --help

        if self.cuda:
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self.start is not None and (end := self._maxrss_bytes()) is not None:
            self.bytes = max(0, end - self.start)


def inference_step(forward: Callable, x: torch.Tensor, device: Device,
                   precision: str) -> Callable[[], None]:
    """One batch of inference: ``forward(x)`` under ``inference_mode`` and ``precision``."""
    import torch  # heavy: kept off caitlab-bench --help

    def step() -> None:
        with torch.inference_mode(), autocast(device, precision):
            forward(x)

    return step


def training_step(forward: Callable, params: Iterable[torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None, device: Device, precision: str,
                  optimizer: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One batch of training: ``forward(x)`` under ``precision``, the loss in fp32 (cross
    entropy with labels ``y``; the mean square of the outputs when ``y`` is None), backward,
    then ``optimizer``'s step when given, and the gradients of ``params`` dropped."""
    import torch.nn.functional as F  # heavy: kept off caitlab-bench --help

    params = list(params)

    def step() -> None:
        with autocast(device, precision):
            out = forward(x)
        out = out.float()
        loss = F.cross_entropy(out, y) if y is not None else out.square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for p in params:
            p.grad = None

    return step


def _random_batch(model: nn.Module, batch: int, device: Device,
                  input_shape: tuple[int, int, int] | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random images of ``input_shape`` (default: a caitlab model's own) and labels for as
    many classes as the model has (None for a model whose output is not one row of logits)."""
    import torch  # heavy: kept off caitlab-bench --help

    from caitlab.models.cost import input_shape as model_input  # torch: kept off --help

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
    return x, (y if classes > 0 else None)


def _phase_result(times: list[float], batch: int, iters: int, macs: int, peak: float,
                  training: bool, mem: PeakMemory) -> dict[str, Any]:
    ips = images_per_s(times, batch, iters)
    return dict(
        images_per_s=ips, ms_per_batch=1000 * statistics.median(times) / iters,
        mfu=mfu(ips, macs, peak, training),
        peak_mem_bytes=mem.bytes, peak_mem_kind=mem.kind,
        repeat_s=[round(x, 6) for x in times],
    )


def measure_throughput(model: nn.Module, *, batch: int, device: Device, precision: str,
                       macs: int, peak: float,
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
    import torch  # heavy: kept off caitlab-bench --help

    x, y = _random_batch(model, batch, device, input_shape)
    forward = torch.compile(model) if compile else model
    if compile:
        warmup = max(warmup, 1)  # the first call compiles; never time it
    timing = dict(warmup=warmup, repeats=repeats, iters=iters)

    results: dict[str, dict[str, Any]] = {}
    model.eval()
    with PeakMemory(device) as mem:
        times = time_repeats(inference_step(forward, x, device, precision), device, **timing)
    results["inference"] = _phase_result(times, batch, iters, macs, peak, False, mem)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4,
                            fused=True if torch.device(device).type == "cuda" else None)
    step = training_step(forward, model.parameters(), x, y, device, precision, opt)
    with PeakMemory(device) as mem:
        times = time_repeats(step, device, **timing)
    results["training"] = _phase_result(times, batch, iters, macs, peak, True, mem)
    return results
