"""The prepared GPU check: what caitlab does on a GPU, measured in one command.

    bash scripts/gpu_check.sh                    # set-up, then this script (about 5-8 min)
    python scripts/gpu_check.py --json out.json  # with an environment that has caitlab's needs
    python scripts/gpu_check.py --reduced        # the CPU version the test suite runs (minutes)

It prints one table and writes it as JSON (``--json``, default ``gpu_check.json``):

1. ``step``: our model against timm's of the same configuration and weights (the logits are
   compared first), one training step each (bf16 autocast forward, fp32 cross-entropy,
   backward, fused AdamW step), eager and under ``torch.compile``, for
   ``deit_small_patch16_224`` and ``cait_s24_224`` at a batch that fills the GPU. The two take
   turns repeat by repeat; img/s, ours/timm, MFU against the bf16 matmul peak measured at the
   start, and the first call's seconds (compilation).
2. ``variant``: static-key attention and EViT token reorganisation (keep rate 0.7) on
   ``deit_small_patch16_224`` under ``torch.compile``: they compile, run, and their img/s.
3. ``train``: ``caitlab-train`` itself with the defaults users run (wandb, offline without a
   key, and EMA) and ``trainer=gpu compile=true``, synthetic 224 px images
   in memory, DeiT-S, the same batch, for 3 epochs: the whole training path's img/s
   (``summary.json``'s median after the first epoch) against the compiled model-only figure
   of (1): the framework's overhead.
4. ``ddp``: where the machine has 2 GPUs or more, the same run on 2 GPUs with DDP (NCCL),
   as two tasks under ``srun`` inside a SLURM job that holds 2 GPUs: stopped with SIGTERM
   after its first epoch and resumed (it must end ``completed`` in 2 attempts); img/s and
   the scaling efficiency, img/s(2) / (2 x img/s(1)).

A check that fails is a row ``FAILED: <one line>`` and the script exits 1: nothing fails
silently. ``--budget-s`` (default 450) bounds the whole: a check that would start past it is
a row ``skipped: time budget``. ``--reduced`` runs every check on the CPU with 2-layer, 32 px
models, a few steps, Dynamo's ``eager`` backend for the step checks (tracing, no code
generation) and DDP on 2 CPU processes (gloo), so that the code paths cannot rot unseen.

The table is also written, with the command, date, commit and machine, as
``docs/performance/gpu_check.md``, the Performance page's (``--doc-out DIR`` elsewhere,
``--no-doc`` not at all); ``--reduced`` writes it only where ``--doc-out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchdoc import DOC_DIR, add_doc_args, command_line, markdown_table, write_doc_table

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Plan:
    """What one invocation measures: the GPU plan, or ``reduced()`` for the CPU."""

    device: str = "cuda"
    models: dict[str, int] = field(default_factory=lambda: {
        "deit_small_patch16_224": 256, "cait_s24_224": 128})  # name -> batch
    geometry: dict[str, Any] = field(default_factory=dict)  # constructor overrides for both
    precision: str = "bf16"
    backend: str = "inductor"
    warmup: int = 3
    repeats: int = 10
    iters: int = 5
    train_model: str = "deit_small_patch16_224"
    train_batches: int = 20
    train_epochs: int = 3
    ddp_epochs: int = 3  # the DDP run is stopped after its first and resumed
    train_overrides: list[str] = field(default_factory=lambda: ["trainer=gpu"])
    train_compile: bool = True
    ddp_devices: int = 2
    ddp_overrides: list[str] = field(default_factory=lambda: ["trainer=ddp"])
    reduced: bool = False

    @classmethod
    def reduced_plan(cls) -> Plan:
        geometry = {"img_size": 32, "depth": 2}
        # fp32 steps: a CPU's bf16 matmul is emulated, no peak to measure MFU against
        return cls(device="cpu", models={"deit_small_patch16_224": 4, "cait_s24_224": 4},
                   geometry=geometry, precision="32", backend="eager", warmup=1, repeats=3,
                   iters=1,
                   train_batches=3, train_epochs=2, train_compile=False,
                   # tiny CPU epochs: enough left after the first for the stop to land in
                   ddp_epochs=8,
                   train_overrides=["trainer=cpu", "trainer.precision=bf16-mixed",
                                    *(f"model.{k}={v}" for k, v in geometry.items())],
                   ddp_overrides=["trainer=ddp", "trainer.accelerator=cpu",
                                  "trainer.precision=bf16-mixed",
                                  *(f"model.{k}={v}" for k, v in geometry.items())],
                   reduced=True)


@dataclass
class Row:
    check: str
    model: str
    variant: str = ""
    compiled: bool = False
    batch: int | None = None
    ours_img_s: float | None = None
    timm_img_s: float | None = None
    ratio: float | None = None  # ours / timm; train: path / model-only; ddp: efficiency
    ours_mfu: float | None = None
    timm_mfu: float | None = None
    first_call_s: float | None = None  # the first step: compilation, warm-up
    max_abs_logit_diff: float | None = None
    status: str = "ok"


# --- 1 and 2: one training step, ours and timm's ---------------------------------------------

def build_pair(name: str, geometry: dict[str, Any], device):
    """timm's model and ours with its weights copied in (timm's own names, locally built)."""
    import timm
    import torch

    from caitlab.models import create_model
    from caitlab.models.checkpoint import remap_state_dict

    torch.manual_seed(0)
    with torch.device(device):
        ref = timm.create_model(name, pretrained=False, **geometry)
        ours = create_model(name, **geometry)
    ours.load_state_dict(remap_state_dict(ref.state_dict(), ours), strict=True)
    return ours, ref


def train_step(model, batch: int, size: tuple[int, int], plan: Plan):
    """One training step of ``model`` on ``size`` images: forward under autocast, fp32 loss,
    backward, AdamW (fused on CUDA)."""
    import torch

    from caitlab.analysis.timing import training_step

    device = plan.device
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, *size, device=device, generator=gen)
    y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    cuda = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    model.train()
    return training_step(model, model.parameters(), x, y, device, plan.precision,
                         optimizer=opt)


def timed_first_call(step, device) -> float:
    from caitlab.analysis.timing import sync

    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def compiled(model, plan: Plan):
    import torch

    return torch.compile(model, backend=plan.backend)


def check_step(name: str, batch: int, compile: bool, plan: Plan, peak: float) -> Row:
    import torch

    from caitlab.analysis.timing import images_per_s, median_ratio, mfu, time_interleaved

    row = Row("step", name, "compile" if compile else "eager", compile, batch)
    from caitlab.models import count_macs

    ours, ref = build_pair(name, plan.geometry, plan.device)
    size, macs = tuple(ours.config["img_size"]), count_macs(ours)
    ours.eval(), ref.eval()
    with torch.inference_mode():
        probe = torch.randn(2, 3, *size, device=plan.device)
        row.max_abs_logit_diff = float((ours(probe) - ref(probe)).abs().max())
    if row.max_abs_logit_diff > 1e-3:
        raise RuntimeError(f"ours and timm's {name} differ by {row.max_abs_logit_diff:.2e} "
                           "in logits with the same weights")
    models = {"ours": compiled(ours, plan) if compile else ours,
              "timm": compiled(ref, plan) if compile else ref}
    steps = {who: train_step(model, batch, size, plan) for who, model in models.items()}
    first = {who: timed_first_call(step, plan.device) for who, step in steps.items()}
    times = time_interleaved(steps, plan.device, plan.warmup, plan.repeats, plan.iters)
    row.ours_img_s = images_per_s(times["ours"], batch, plan.iters)
    row.timm_img_s = images_per_s(times["timm"], batch, plan.iters)
    row.ratio = median_ratio(times["ours"], times["timm"])
    row.ours_mfu = mfu(row.ours_img_s, macs, peak, training=True)
    row.timm_mfu = mfu(row.timm_img_s, macs, peak, training=True)
    row.first_call_s = first["ours"]
    return row


VARIANTS = {"static_key": {"attention": "static_key"},
            "evit_0.7": {"keep_rate": 0.7, "reorg_layers": "auto"}}


def check_variant(variant: str, name: str, batch: int, plan: Plan, peak: float) -> Row:
    import torch

    from caitlab.analysis.timing import images_per_s, mfu, time_repeats
    from caitlab.models import count_macs, create_model

    row = Row("variant", name, variant, True, batch)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = create_model(name, **plan.geometry, **VARIANTS[variant])
    macs = count_macs(model)  # EViT's: fewer tokens after each reorganising layer
    step = train_step(compiled(model, plan), batch, tuple(model.config["img_size"]), plan)
    row.first_call_s = timed_first_call(step, plan.device)
    times = time_repeats(step, plan.device, plan.warmup, plan.repeats, plan.iters)
    row.ours_img_s = images_per_s(times, batch, plan.iters)
    row.ours_mfu = mfu(row.ours_img_s, macs, peak, training=True)
    return row


# --- 3 and 4: caitlab-train itself -----------------------------------------------------------

def train_command(plan: Plan, out: Path, name: str, extra: list[str],
                  epochs: int | None = None) -> list[str]:
    batch = plan.models[plan.train_model]
    return [sys.executable, "-m", "caitlab.train", f"model={plan.train_model}",
            "data=synthetic", f"data.batch_size={batch}",
            f"data.num_train={batch * plan.train_batches}", f"data.num_val={batch}",
            f"data.num_test={batch}", "data.drop_last=true", "ema.enabled=true",
            "trainer.limit_test_batches=1",
            f"compile={str(plan.train_compile).lower()}", f"paths.output_dir={out}",
            f"trainer.max_epochs={epochs or plan.train_epochs}",
            f"name={name}", *extra]


def _env() -> dict[str, str]:
    # the default logger as users have it: wandb, offline where no API key is configured
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}


def srun_prefix(devices: int) -> list[str]:
    """Inside a SLURM job that holds ``devices`` GPUs, the run's ranks as the job's tasks
    (what ``hydra/launcher=slurm`` submits); elsewhere Lightning starts them itself."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_GPUS") or "0"
    if not os.environ.get("SLURM_JOB_ID") or not gpus.isdigit() or int(gpus) < devices:
        return []
    return ["srun", f"--ntasks={devices}", f"--ntasks-per-node={devices}",
            "--kill-on-bad-exit=1"]


def interrupt_after_first_epoch(cmd: list[str], out: Path, name: str, timeout: float) -> None:
    """Starts ``cmd``, sends it SIGTERM once its first epoch is in ``summary.json`` (as a
    preemption would), and checks that it stopped as ``interrupted`` with a checkpoint."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=out)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((out / name).glob("*/summary.json"))
            if found and (json.loads(found[0].read_text()).get("epochs") or 0) >= 1:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.1)
        _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(next((out / name).glob("*/summary.json")).read_text())
    if summary.get("status") != "interrupted":
        lines = [ln for ln in err.splitlines() if ln.startswith("caitlab-train:")]
        raise RuntimeError(f"SIGTERM after the first epoch left the run "
                           f"{summary.get('status')!r}: {lines[-1] if lines else ''}")


def run_train(plan: Plan, out: Path, name: str, extra: list[str], timeout: float,
              resume: bool = False, prefix: list[str] | None = None,
              epochs: int | None = None) -> dict:
    """Runs caitlab-train (``resume``: interrupted after its first epoch, then the same
    command again, which resumes); its summary.json, or an error naming its last line."""
    cmd = [*(prefix or []), *train_command(plan, out, name, extra, epochs)]
    if resume:
        interrupt_after_first_epoch(cmd, out, name, timeout)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout,
                          cwd=out)
    summaries = list((out / name).glob("*/summary.json"))
    if proc.returncode != 0 or len(summaries) != 1:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        said = [ln for ln in lines if ln.startswith("caitlab-train:")] or lines[-1:]
        raise RuntimeError(f"caitlab-train exited {proc.returncode}: "
                           f"{said[-1] if said else 'no output'}")
    summary = json.loads(summaries[0].read_text())
    if summary.get("status") != "completed" or not summary.get("images_per_s"):
        raise RuntimeError(f"caitlab-train's run is {summary.get('status')!r} without a "
                           f"throughput ({summaries[0]})")
    if resume and summary.get("attempts") != 2:
        raise RuntimeError(f"the resumed run counts {summary.get('attempts')} attempts, not 2 "
                           f"({summaries[0]})")
    return summary


def check_train(plan: Plan, model_only: float | None, out: Path, timeout: float) -> Row:
    batch = plan.models[plan.train_model]
    row = Row("train", plan.train_model, "caitlab-train", plan.train_compile, batch)
    t0 = time.perf_counter()
    summary = run_train(plan, out, "train", plan.train_overrides, timeout)
    row.first_call_s = time.perf_counter() - t0
    row.ours_img_s = float(summary["images_per_s"])
    row.timm_img_s = model_only  # the step check's compiled (or eager) figure, same model
    row.ratio = row.ours_img_s / model_only if model_only else None
    return row


def check_ddp(plan: Plan, single: float | None, out: Path, timeout: float) -> Row:
    batch = plan.models[plan.train_model]
    row = Row("ddp", plan.train_model, f"{plan.ddp_devices} devices", plan.train_compile,
              batch)
    extra = [*plan.ddp_overrides, f"trainer.devices={plan.ddp_devices}"]
    t0 = time.perf_counter()
    summary = run_train(plan, out, "ddp", extra, timeout, resume=True,
                        prefix=srun_prefix(plan.ddp_devices), epochs=plan.ddp_epochs)
    row.first_call_s = time.perf_counter() - t0
    row.ours_img_s = float(summary["images_per_s"])  # all ranks together
    row.timm_img_s = single
    row.ratio = row.ours_img_s / (plan.ddp_devices * single) if single else None
    return row


# --- the table -------------------------------------------------------------------------------

def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    header = (f"{'check':<8}{'model':<24}{'variant':<15}{'batch':>6}{'ours img/s':>11}"
              f"{'ref img/s':>11}{'ratio':>7}{'MFU ours':>9}{'MFU timm':>9}{'first s':>8}"
              f"  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.check:<8}{r.model:<24}{r.variant:<15}{_num(r.batch, 'd'):>6}"
            f"{_num(r.ours_img_s, '.1f'):>11}{_num(r.timm_img_s, '.1f'):>11}"
            f"{_num(r.ratio, '.3f'):>7}"
            f"{_num(None if r.ours_mfu is None else 100 * r.ours_mfu, '.1f'):>8}%"
            f"{_num(None if r.timm_mfu is None else 100 * r.timm_mfu, '.1f'):>8}%"
            f"{_num(r.first_call_s, '.1f'):>8}  {r.status}")
    return "\n".join(lines)


LEGEND = ("ratio: step = ours/timm img/s; train = caitlab-train's img/s over the model-only "
          "figure (ref img/s: the step check's, same model, batch and compilation); ddp = "
          "scaling efficiency, img/s / (devices x one device's, ref img/s). MFU against the "
          "matmul peak above; first s: the first step (compilation), or the whole run.")


def environment(plan: Plan, peak: float, matmul: int) -> dict[str, Any]:
    import lightning
    import timm
    import torch

    from caitlab.analysis.timing import device_name

    return {"device": device_name(torch.device(plan.device)),
            "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "lightning": lightning.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "precision": plan.precision,
            "compile_backend": plan.backend, "matmul_peak_tflops": peak / 1e12,
            "matmul_size": matmul, "reduced": plan.reduced}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true",
                   help="the CPU version: tiny models, a few steps (the test suite's)")
    p.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="checks that would start past this many seconds are skipped")
    p.add_argument("--only", default="step,variant,train,ddp",
                   help="comma-separated checks to run (default: all)")
    add_doc_args(p)
    args = p.parse_args(argv)
    start = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.path.insert(0, str(ROOT / "src"))

    import torch

    from caitlab.analysis.timing import prepare_device
    from caitlab.data.errors import error_reason

    plan = Plan.reduced_plan() if args.reduced else Plan()
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device is visible to torch "
              f"{torch.__version__} (run with --reduced for the CPU version)", file=sys.stderr)
        return 2
    device, peak, matmul = prepare_device(plan.device, plan.precision)
    env = environment(plan, peak, matmul)
    print(f"{env['device']} x{max(env['devices'], 1)}, torch {env['torch']} (CUDA "
          f"{env['cuda']}), lightning {env['lightning']}, timm {env['timm']}; {plan.precision} "
          f"matmul peak {peak / 1e12:.1f} TFLOP/s ({matmul}^3); compile backend "
          f"{plan.backend}", flush=True)

    rows: list[Row] = []
    wanted = set(args.only.split(","))

    def attempt(check: str, model: str, variant: str, fn) -> Row | None:
        if check not in wanted:
            return None
        if time.perf_counter() - start > args.budget_s:
            row = Row(check, model, variant, status="skipped: time budget")
        else:
            try:
                row = fn()
            except Exception as err:  # every failure is a row and a non-zero exit
                row = Row(check, model, variant, status=f"FAILED: {error_reason(err)[:300]}")
                traceback.print_exc(file=sys.stderr)
            finally:
                torch._dynamo.reset()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        return row

    print(format_table([]).splitlines()[0], flush=True)
    model_only: dict[tuple[str, bool], float] = {}
    for compile in (False, True):
        for name, batch in plan.models.items():
            row = attempt("step", name, "compile" if compile else "eager",
                          lambda n=name, b=batch, c=compile: check_step(n, b, c, plan, peak))
            if row is not None and row.ours_img_s:
                model_only[(name, compile)] = row.ours_img_s
    name = plan.train_model
    for variant in VARIANTS:
        attempt("variant", name, variant,
                lambda v=variant: check_variant(v, name, plan.models[name], plan, peak))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        left = lambda: max(60.0, args.budget_s - (time.perf_counter() - start) + 120)
        train = attempt("train", name, "caitlab-train", lambda: check_train(
            plan, model_only.get((name, plan.train_compile)), Path(tmp), left()))
        single = train.ours_img_s if train is not None else None
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if plan.reduced or gpus >= plan.ddp_devices:
            attempt("ddp", name, f"{plan.ddp_devices} devices",
                    lambda: check_ddp(plan, single, Path(tmp), left()))
        elif "ddp" in wanted:
            rows.append(Row("ddp", name, f"{plan.ddp_devices} devices",
                            status=f"skipped: {gpus} GPU(s)"))

    print("\n" + format_table(rows))
    print("\n" + LEGEND)
    failed = [r for r in rows if r.status.startswith("FAILED")]
    result = {**env, "seconds": time.perf_counter() - start, "rows": [asdict(r) for r in rows],
              "failed": len(failed)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(rows)} checks, {len(failed)} failed, {result['seconds']:.0f} s; "
          f"written to {args.json}")
    # the CPU version writes the docs' file only where asked to (--doc-out): the page's
    # figures are a GPU's
    if not args.no_doc and not (args.reduced and args.doc_out == DOC_DIR):
        write_doc_table("gpu_check", "The GPU check", markdown(rows, env, result),
                        command_line(__file__, argv), args.doc_out)
    return 1 if failed else 0


def markdown(rows: list[Row], env: dict[str, Any], result: dict[str, Any]) -> str:
    """The table printed, as the Performance page's data."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    table = markdown_table(
        ["check", "model", "variant", "batch", "ours img/s", "ref img/s", "ratio", "MFU ours",
         "MFU timm", "first s", "status"],
        [[r.check, f"`{r.model}`", r.variant, _num(r.batch, "d"), _num(r.ours_img_s, ".1f"),
          _num(r.timm_img_s, ".1f"), _num(r.ratio, ".3f"), pct(r.ours_mfu), pct(r.timm_mfu),
          _num(r.first_call_s, ".1f"), r.status] for r in rows], right=range(3, 10))
    return (f"{env['device']} x{max(env['devices'], 1)}, torch {env['torch']} (CUDA "
            f"{env['cuda']}), lightning {env['lightning']}, timm {env['timm']}; "
            f"{env['precision']} matmul peak {env['matmul_peak_tflops']:.1f} TFLOP/s "
            f"({env['matmul_size']}^3); compile backend {env['compile_backend']}"
            f"{'; reduced (CPU) version' if env['reduced'] else ''}.\n\n{table}\n\n"
            f"{LEGEND}\n\n{len(rows)} checks, {result['failed']} failed, "
            f"{result['seconds']:.0f} s.")


if __name__ == "__main__":
    sys.exit(main())
