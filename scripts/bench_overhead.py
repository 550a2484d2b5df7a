"""What caitlab's training path costs over a minimal hand-written PyTorch loop.

    .venv/bin/python scripts/bench_overhead.py                 # both cases below
    .venv/bin/python scripts/bench_overhead.py --case digits --rounds 5

Ours is ``caitlab.train.train`` itself, the function behind ``caitlab-train``: Lightning's
trainer, torchmetrics, the CSV + wandb (offline) loggers, the progress bar, validation,
``last.ckpt`` and ``best.ckpt`` written atomically at every epoch end, ``summary.json``. The
reference is the loop anyone would write: the same model (same init), optimizer and lr
schedule (timm's), loss, in-memory batches, precision, the same validation pass and a
``torch.save`` of model + optimizer at every epoch end. The two take turns, round by round.

An epoch is timed from the start of one training epoch to the start of the next, so each
figure holds everything that happens once per epoch (validation, checkpoints, logging); the
first epoch (warm-up, one-time set-up) is not counted. Both runs do the same steps on the same
data from the same initial weights, so they also end with the same weights: the script checks.

Cases (targets from issue 6): ``digits``, the demo's configuration (``experiment=demo``,
cait_tiny, batch 64): at most 5% slower; ``xxs24``, ``cait_xxs24_224`` on synthetic 224 px
images at batch 32: at most 2% slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

CONF_DIR = str(Path(__file__).resolve().parents[1] / "src" / "caitlab" / "conf")

CASES = {
    # the demo's own config (one of its four runs), as make demo trains it
    "digits": dict(overrides=["experiment=demo", "model=cait_tiny"], epochs=12, target=0.05),
    # 3 training batches of 32 and one validation batch per epoch keep this to minutes on CPU
    "xxs24": dict(overrides=["model=cait_xxs24_224", "data=synthetic", "data.batch_size=32",
                             "data.num_train=96", "data.num_val=32", "data.num_test=1",
                             "trainer.limit_test_batches=1"], epochs=3, target=0.02),
}


class EpochClock(Callback):
    """Notes each training epoch's start (and fit's end); ``train`` builds it from the config."""

    starts: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        EpochClock.starts.append(time.perf_counter())

    def on_fit_end(self, trainer, pl_module) -> None:
        EpochClock.starts.append(time.perf_counter())


def compose(case: str, out: Path, epochs: int, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [*CASES[case]["overrides"], f"trainer.max_epochs={epochs}",
                 f"paths.output_dir={out}", f"paths.run_dir={out}/run",
                 "+callbacks.epoch_clock._target_=__main__.EpochClock", "hydra.mode=RUN",
                 *extra]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def run_ours(cfg) -> tuple[list[float], dict]:
    """Epoch times of ``caitlab.train.train`` and its final weights."""
    import torch

    from caitlab.train import train

    EpochClock.starts = []
    train(cfg)
    starts = EpochClock.starts
    # the last start is fit's end; the first epoch is warm-up
    epochs = [b - a for a, b in zip(starts[1:-1], starts[2:], strict=True)]
    ckpt = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=True)
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return epochs, weights


def _reference_optimizer(cfg, model, steps_per_epoch: int):
    """timm's AdamW and cosine schedule with caitlab's lr scaling and capped warm-up."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    opt_cfg, sched_cfg = cfg.optim, cfg.sched
    lr = opt_cfg.lr * cfg.data.batch_size / 512 if opt_cfg.scale_lr else opt_cfg.lr
    cuda = next(model.parameters()).device.type == "cuda"
    fused = {"fused": True} if cuda else {}  # as ClassificationModule does
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=opt_cfg.weight_decay,
                              betas=tuple(opt_cfg.betas), eps=opt_cfg.eps, **fused)
    epochs = cfg.trainer.max_epochs
    total = steps_per_epoch * epochs
    # caitlab caps a warm-up at half the run (README, "Recipes")
    warmup_epochs = min(sched_cfg.warmup_epochs, epochs / 2)
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
    sched = CosineLRScheduler(opt, t_initial=total - warmup, lr_min=sched_cfg.min_lr * lr /
                              opt_cfg.lr, warmup_t=warmup, warmup_lr_init=sched_cfg.warmup_lr,
                              warmup_prefix=True, t_in_epochs=False)
    return opt, sched


def run_reference(cfg) -> tuple[list[float], dict]:
    """The hand-written loop: same model, data, optimizer, schedule, loss, steps."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as train() does
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    data.setup("fit")
    # the trainer's device and precision (trainer=gpu: CUDA, bf16-mixed autocast)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    model.to(device)
    train_x, train_y = (t.to(device) for t in data.tensors["train"])
    val_x, val_y = (t.to(device) for t in data.tensors["val"])
    bs = cfg.data.batch_size
    steps_per_epoch = -(-len(train_x) // bs)
    opt, sched = _reference_optimizer(cfg, model, steps_per_epoch)
    smoothing = cfg.recipe.label_smoothing
    ckpt = Path(cfg.paths.run_dir) / "reference.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)

    step, starts = 0, []
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for epoch in range(cfg.trainer.max_epochs):
        starts.append(now())
        model.train()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(
            cfg.seed + epoch)).to(device)  # the same order TensorBatches draws
        for b in range(steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(train_x[idx])
            loss = F.cross_entropy(logits.float(), train_y[idx], label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(num_updates=step)
        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for b in range(0, len(val_x), bs):
                correct += int((model(val_x[b:b + bs]).argmax(1) == val_y[b:b + bs]).sum())
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch, "val_top1": correct / len(val_x)}, ckpt)
    starts.append(now())
    times = [b - a for a, b in zip(starts[1:-1], starts[2:], strict=True)]
    return times, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def bench_case(case: str, rounds: int, epochs: int | None, extra: list[str]) -> dict:
    import torch

    epochs = epochs or CASES[case]["epochs"]
    ours_t: list[float] = []
    ref_t: list[float] = []
    max_diff = 0.0
    for r in range(rounds):
        # alternate who goes first, so drift in the machine's speed hits both alike
        order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
        weights = {}
        for who in order:
            with tempfile.TemporaryDirectory(prefix="caitlab-bench-") as tmp:
                cfg = compose(case, Path(tmp), epochs, extra)
                times, weights[who] = (run_ours if who == "ours" else run_reference)(cfg)
            (ours_t if who == "ours" else ref_t).extend(times)
        max_diff = max(max_diff, max(float((weights["ours"][k] - v).abs().max())
                                     for k, v in weights["reference"].items()))
        print(f"  round {r + 1}: ours {statistics.median(ours_t):.3f} s/epoch, "
              f"reference {statistics.median(ref_t):.3f} s/epoch", flush=True)
    ours, ref = statistics.median(ours_t), statistics.median(ref_t)
    return dict(case=case, ours_s=ours, reference_s=ref, overhead=ours / ref - 1,
                target=CASES[case]["target"], epochs=len(ours_t), max_weight_diff=max_diff,
                threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--rounds", type=int, default=3, help="ours/reference pairs (default 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run, the first one not timed (default: per case)")
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs "
                   "(e.g. trainer.precision=bf16-mixed trainer=gpu)")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    results = []
    for case in (list(CASES) if args.case == "all" else [args.case]):
        print(f"{case}: {' '.join(CASES[case]['overrides'])}", flush=True)
        results.append(bench_case(case, args.rounds, args.epochs, args.overrides))

    print(f"\n{'case':<8}{'ours s/epoch':>14}{'ref s/epoch':>13}{'overhead':>10}{'target':>8}"
          f"{'epochs':>8}{'max|dw|':>10}")
    for r in results:
        ok = "ok" if r["overhead"] <= r["target"] else "MISSED"
        print(f"{r['case']:<8}{r['ours_s']:>14.4f}{r['reference_s']:>13.4f}"
              f"{100 * r['overhead']:>9.1f}%{'<=' + format(100 * r['target'], '.0f') + '%':>8}"
              f"{r['epochs']:>8}{r['max_weight_diff']:>10.1e}  {ok}")
    print(f"\n(median epoch times over all timed epochs; {results[0]['threads']} torch threads; "
          "max|dw|: largest difference of the final weights, ours vs reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
