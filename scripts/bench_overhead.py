"""What caitlab's training path costs over a minimal hand-written PyTorch loop.

    .venv/bin/python scripts/bench_overhead.py                 # both cases below
    .venv/bin/python scripts/bench_overhead.py --case digits --rounds 2

Ours is ``caitlab.train.train`` itself, the function behind ``caitlab-train``: Lightning's
trainer, torchmetrics, the CSV + wandb (offline) loggers, the progress bar, validation,
``last.ckpt`` and ``best.ckpt`` written atomically at every epoch end, ``summary.json``. The
reference is the loop anyone would write: the same model (same init), optimizer and lr
schedule (timm's), loss, in-memory batches, precision, the same validation pass and a
``torch.save`` of model + optimizer at every epoch end.

The two take turns epoch by epoch in one process: at each of ours' epoch boundaries a
callback runs one epoch of the reference (its own model, optimizer, data and RNG state, so
neither changes the other's numbers), so each pair of epochs is measured seconds apart and a
machine whose speed drifts (a shared VM's moves by 10-20% over a minute) moves both alike.
Ours' epoch is timed from boundary to boundary, so it holds everything that happens once per
epoch (validation, checkpoints, logging). What ours' checkpoint leaves to its writer thread
(caitlab's BackgroundCheckpointIO: on a CPU with a torch thread per core, the fsyncs and the
rename; otherwise the whole write, from the next training batch) runs after the reference's
epoch, so its cost lands in ours' next epoch as in a real run; the last epoch's is waited for
and counted as ours.
The first epoch (warm-up, set-up) is not counted. Both
do the same steps on the same data from the same weights, so they end with the same weights:
the script checks.

The overhead is the median over epochs of ours/reference, pairs of the same epoch; a round is
one run of each, and rounds add epochs.

``--floor`` splits the overhead into Lightning's and caitlab's: each round also trains the
reference's work as a minimal LightningModule under a bare ``Trainer`` (no loggers, callbacks
but the clock, checkpoint callbacks or progress bar; the same model, data, optimizer, schedule,
loss, validation pass and ``torch.save`` at every epoch end), interleaved with the reference
the same way. Its overhead is what Lightning's loop itself costs; ours' over it is caitlab's.

Cases, with their targets: ``digits``, the demo's configuration (``experiment=demo``,
cait_tiny, batch 64): at most 3% slower; ``xxs24``, ``cait_xxs24_224`` on synthetic 224 px
images at batch 32: at most 1% slower.
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

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table

CONF_DIR = str(Path(__file__).resolve().parents[1] / "src" / "caitlab" / "conf")

CASES = {
    # the demo's own config (one of its four runs), as make demo trains it
    "digits": dict(overrides=["experiment=demo", "model=cait_tiny"], epochs=12, target=0.03),
    # 3 training batches of 32 and one validation batch per epoch keep this to minutes on CPU
    "xxs24": dict(overrides=["model=cait_xxs24_224", "data=synthetic", "data.batch_size=32",
                             "data.num_train=96", "data.num_val=32", "data.num_test=1",
                             "trainer.limit_test_batches=1"], epochs=3, target=0.01),
}


PHASES = ("steps", "validation", "rest")  # where an epoch's time goes; rest: the epoch end


class EpochClock(Callback):
    """Ours' epoch boundaries, and the reference's epoch run at each (see the module doc);
    within each epoch, the time in training steps (batch start to batch end: forward,
    backward, optimizer) and in validation, the rest being the epoch end (checkpoint, logs)."""

    reference: Reference | None = None
    ours: list[float] = []  # ours' epoch times, boundary to boundary (reference excluded)
    refs: list[float] = []
    ours_phases: list[dict[str, float]] = []
    refs_phases: list[dict[str, float]] = []

    def _boundary(self, trainer, last: bool = False) -> None:
        now = time.perf_counter()
        wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
        if wait is not None and last:
            wait()  # the last epoch's write, counted as ours
            now = time.perf_counter()
        if self._since is not None:
            EpochClock.ours.append(now - self._since)
            steps, val = self._in["steps"], self._in["validation"]
            EpochClock.ours_phases.append({"steps": steps, "validation": val,
                                           "rest": now - self._since - steps - val})

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._boundary(trainer)
        seconds, phases = EpochClock.reference.epoch()
        EpochClock.refs.append(seconds)
        EpochClock.refs_phases.append(phases)
        self._in = dict.fromkeys(PHASES[:2], 0.0)
        self._since = time.perf_counter()

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _end(self, phase: str) -> None:
        self._in[phase] += time.perf_counter() - self._t0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end("steps")

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._start()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._end("validation")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._boundary(trainer, last=True)


def compose(case: str, out: Path, epochs: int, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [*CASES[case]["overrides"], f"trainer.max_epochs={epochs}",
                 f"paths.output_dir={out}", f"paths.run_dir={out}/run",
                 "+callbacks.epoch_clock._target_=__main__.EpochClock", "hydra.mode=RUN",
                 *extra]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


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


class Reference:
    """The hand-written loop: same model, data, optimizer, schedule, loss, steps; one epoch per
    :meth:`epoch` call, its random numbers its own (the caller's are put back after)."""

    def __init__(self, cfg) -> None:
        import lightning as L
        import torch
        from hydra.utils import instantiate

        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            L.seed_everything(cfg.seed, workers=True, verbose=False)  # as train() does
            data = instantiate(cfg.data)
            self.model = instantiate(cfg.model)
            self.rng = torch.get_rng_state()
        data.setup("fit")
        # the trainer's device and precision (trainer=gpu: CUDA, bf16-mixed autocast)
        self.device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda")
                                   else "cpu")
        self.bf16 = str(cfg.trainer.precision).startswith("bf16")
        self.model.to(self.device)
        self.train_x, self.train_y = (t.to(self.device) for t in data.tensors["train"])
        self.val_x, self.val_y = (t.to(self.device) for t in data.tensors["val"])
        self.bs = cfg.data.batch_size
        self.steps_per_epoch = -(-len(self.train_x) // self.bs)
        self.opt, self.sched = _reference_optimizer(cfg, self.model, self.steps_per_epoch)
        self.ckpt = Path(cfg.paths.run_dir) / "reference.pt"
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        self.step = self.epochs = 0

    def _now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def epoch(self) -> tuple[float, dict[str, float]]:
        """Trains and validates one epoch and saves model + optimizer; returns its seconds,
        and theirs in each phase (PHASES)."""
        import torch
        import torch.nn.functional as F

        theirs = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        t0 = self._now()
        model, bs, device = self.model, self.bs, self.device
        model.train()
        order = torch.randperm(len(self.train_x), generator=torch.Generator().manual_seed(
            self.cfg.seed + self.epochs)).to(device)  # the same order TensorBatches draws
        smoothing = self.cfg.recipe.label_smoothing
        for b in range(self.steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = model(self.train_x[idx])
            loss = F.cross_entropy(logits.float(), self.train_y[idx], label_smoothing=smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            self.sched.step_update(num_updates=self.step)
        t_val = self._now()
        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=self.bf16):
            for b in range(0, len(self.val_x), bs):
                correct += int((model(self.val_x[b:b + bs]).argmax(1)
                                == self.val_y[b:b + bs]).sum())
        t_rest = self._now()
        torch.save({"model": model.state_dict(), "optimizer": self.opt.state_dict(),
                    "epoch": self.epochs, "val_top1": correct / len(self.val_x)}, self.ckpt)
        t1 = self._now()
        self.epochs += 1
        self.rng = torch.get_rng_state()
        torch.set_rng_state(theirs)
        return t1 - t0, {"steps": t_val - t0, "validation": t_rest - t_val, "rest": t1 - t_rest}

    def weights(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


def _floor_module(cfg, model, data):
    """The reference's work as the smallest LightningModule that does it (``--floor``)."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    class Floor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.correct = model, 0
            self.ckpt = Path(cfg.paths.run_dir) / "floor.pt"

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x).float(), y,
                                   label_smoothing=cfg.recipe.label_smoothing)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.correct += int((self.model(x).argmax(1) == y).sum())

        def on_train_epoch_end(self) -> None:  # after validation, as the reference saves
            torch.save({"model": self.model.state_dict(),
                        "optimizer": self.optimizers().optimizer.state_dict(),
                        "epoch": self.current_epoch, "correct": self.correct}, self.ckpt)
            self.correct = 0

        def configure_optimizers(self):
            steps = len(data.train_dataloader())
            opt, sched = _reference_optimizer(cfg, self.model, steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def lr_scheduler_step(self, scheduler, metric) -> None:
            scheduler.step_update(num_updates=self.global_step)

    return Floor()


def _round(cfg, fit) -> tuple[list[float], list[float], float]:
    """One run of a loop with the reference interleaved: (the loop's epoch times, the
    reference's, the largest difference of their final weights); the first epoch of each left
    out. ``fit(cfg)`` trains the loop, its EpochClock among its callbacks, and returns its
    final weights."""
    EpochClock.reference = Reference(cfg)
    EpochClock.ours, EpochClock.refs = [], []
    EpochClock.ours_phases, EpochClock.refs_phases = [], []
    ours = fit(cfg)
    ref = EpochClock.reference.weights()
    diff = max(float((ours[k] - v).abs().max()) for k, v in ref.items())
    return EpochClock.ours[1:], EpochClock.refs[1:], diff


def _fit_floor(cfg) -> dict:
    """Lightning's floor (``_floor_module`` under a bare trainer); its final weights."""
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as train() does
    data, model = instantiate(cfg.data), instantiate(cfg.model)
    t = cfg.trainer
    trainer = L.Trainer(accelerator=t.accelerator, devices=1, precision=t.precision,
                        max_epochs=t.max_epochs, limit_train_batches=t.limit_train_batches,
                        limit_val_batches=t.limit_val_batches, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[EpochClock()],
                        default_root_dir=cfg.paths.run_dir)
    trainer.fit(_floor_module(cfg, model, data), datamodule=data)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _fit_ours(cfg) -> dict:
    """``caitlab.train.train`` itself; the weights of its ``last.ckpt``."""
    import torch

    from caitlab.train import train

    train(cfg)
    ckpt = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=True)
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}


def run_round(cfg) -> tuple[list[float], list[float], float]:
    """:func:`_round` of ours."""
    return _round(cfg, _fit_ours)


def run_floor_round(cfg) -> tuple[list[float], list[float], float]:
    """:func:`_round` of Lightning's floor."""
    return _round(cfg, _fit_floor)


LOOPS = {"ours": run_round, "lightning": run_floor_round}


def bench_case(case: str, rounds: int, epochs: int | None, extra: list[str],
               loop: str = "ours") -> dict:
    """``rounds`` runs of ``loop`` (ours, or Lightning's floor) with the reference
    interleaved; the median overhead over their epoch pairs and where it goes."""
    import torch

    epochs = epochs or CASES[case]["epochs"]
    ours_t: list[float] = []
    ref_t: list[float] = []
    max_diff = 0.0
    phases: list[tuple[dict[str, float], dict[str, float]]] = []  # (loop, reference) by epoch
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="caitlab-bench-") as tmp:
            ours, ref, diff = LOOPS[loop](compose(case, Path(tmp), epochs, extra))
        assert len(ours) == len(ref) == epochs - 1, (len(ours), len(ref))
        ours_t += ours
        ref_t += ref
        phases += list(zip(EpochClock.ours_phases[1:], EpochClock.refs_phases[1:], strict=True))
        max_diff = max(max_diff, diff)
        ratios = [a / b for a, b in zip(ours, ref, strict=True)]
        print(f"  round {r + 1}: {loop} {statistics.median(ours):.3f} s/epoch, reference "
              f"{statistics.median(ref):.3f} s/epoch, epoch pairs "
              f"{100 * (statistics.median(ratios) - 1):+.1f}%", flush=True)
    # each phase's share of the difference: median over epochs of loop - reference
    print(f"  {'phase':<12}{loop + ' s':>12}{'ref s':>9}{'diff s':>10}  (medians over epochs)")
    by_phase = {}
    for phase in PHASES:
        a = [o[phase] for o, _ in phases]
        b = [f[phase] for _, f in phases]
        by_phase[phase] = (statistics.median(a), statistics.median(b),
                           statistics.median(x - y for x, y in zip(a, b, strict=True)))
        print(f"  {phase:<12}{by_phase[phase][0]:>12.4f}{by_phase[phase][1]:>9.4f}"
              f"{by_phase[phase][2]:>+10.4f}")
    ratios = sorted(a / b for a, b in zip(ours_t, ref_t, strict=True))
    q1, q3 = statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]
    return dict(case=case, loop=loop, ours_s=statistics.median(ours_t),
                reference_s=statistics.median(ref_t),
                overhead=statistics.median(ratios) - 1, iqr=(q1 - 1, q3 - 1),
                target=CASES[case]["target"], epochs=len(ours_t), max_weight_diff=max_diff,
                threads=torch.get_num_threads(), phases=by_phase, rounds=rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of ours, each with the reference interleaved (default 2)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run, the first one not timed (default: per case)")
    p.add_argument("--floor", action="store_true",
                   help="also measure Lightning's own loop (a minimal module, a bare trainer) "
                   "against the reference, round for round")
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs "
                   "(e.g. trainer.precision=bf16-mixed trainer=gpu)")
    add_doc_args(p)
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    results = []
    for case in (list(CASES) if args.case == "all" else [args.case]):
        print(f"{case}: {' '.join(CASES[case]['overrides'])}", flush=True)
        results.append(bench_case(case, args.rounds, args.epochs, args.overrides))
        if args.floor:
            results.append(bench_case(case, args.rounds, args.epochs, args.overrides,
                                      loop="lightning"))

    print(f"\n{'case':<8}{'loop':<11}{'s/epoch':>9}{'ref s/epoch':>13}{'overhead':>10}"
          f"{'IQR':>15}{'target':>8}{'epochs':>8}{'max|dw|':>10}")
    for r in results:
        ours = r["loop"] == "ours"
        ok = ("ok" if r["overhead"] <= r["target"] else "MISSED") if ours else ""
        iqr = f"{100 * r['iqr'][0]:+.1f}..{100 * r['iqr'][1]:+.1f}%"
        target = "<=" + format(100 * r["target"], ".0f") + "%" if ours else ""
        print(f"{r['case']:<8}{r['loop']:<11}{r['ours_s']:>9.4f}{r['reference_s']:>13.4f}"
              f"{100 * r['overhead']:>9.1f}%{iqr:>15}{target:>8}"
              f"{r['epochs']:>8}{r['max_weight_diff']:>10.1e}  {ok}")
    print(f"\n(overhead: median over epoch pairs of the loop's time / the reference's, IQR its "
          f"quartiles; {results[0]['threads']} torch threads; max|dw|: largest difference of "
          "the final weights, the loop's vs the reference's; lightning: Lightning's own loop "
          "doing the reference's work, so ours' overhead less its is caitlab's)")
    if not args.no_doc:
        write_doc(results, args, argv)
    return 0


def write_doc(results: list[dict], args, argv) -> None:
    """The summary table and each loop's split by phase, as the Performance page's data."""
    rows, phases = [], []
    for r in results:
        ours = r["loop"] == "ours"
        met = "met" if r["overhead"] <= r["target"] else "missed"
        rows.append([r["case"], "caitlab" if ours else "Lightning alone", f"{r['ours_s']:.4f}",
                     f"{r['reference_s']:.4f}", f"**{100 * r['overhead']:+.1f}%**",
                     f"{100 * r['iqr'][0]:+.1f}..{100 * r['iqr'][1]:+.1f}%",
                     f"<= {100 * r['target']:.0f}% ({met})" if ours else "", r["epochs"],
                     f"{r['max_weight_diff']:.1e}"])
        for phase, (a, b, d) in r["phases"].items():
            phases.append([r["case"], "caitlab" if ours else "Lightning alone", phase,
                           f"{a:.4f}", f"{b:.4f}", f"{d:+.4f}"])
    table = markdown_table(["case", "loop", "s/epoch", "hand-written s/epoch",
                            "overhead (median of epoch pairs)", "IQR", "target",
                            "epoch pairs", "max abs weight diff"], rows, right=(2, 3, 4, 5, 7))
    split = markdown_table(["case", "loop", "phase", "loop s", "hand-written s", "difference s"],
                           phases, right=(3, 4, 5))
    cases = "; ".join(f"{c}: `{' '.join(CASES[c]['overrides'])}`"
                      for c in dict.fromkeys(r["case"] for r in results))
    write_doc_table(
        "bench_overhead", "Training-path overhead",
        f"{results[0]['rounds']} round(s) per case, the first epoch of each not counted; "
        f"{results[0]['threads']} torch threads. Cases: {cases}.\n\n{table}\n\n"
        f"Where an epoch's time goes (medians over epochs; steps: batch start to batch end, "
        f"rest: the epoch end and what happens between batches):\n\n{split}",
        command_line(__file__, argv), args.doc_out)


if __name__ == "__main__":
    sys.exit(main())
