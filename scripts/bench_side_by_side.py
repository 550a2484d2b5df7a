"""Runs side by side on one machine: each as fast as alone when each keeps to its CPUs.

    .venv/bin/python scripts/bench_side_by_side.py               # 2 runs, 1 CPU each
    .venv/bin/python scripts/bench_side_by_side.py --epochs 10 --repeats 3

Each figure is a run's training time (``wall_s`` of its ``summary.json``: from the start of
training to its test, imports and start-up left out) of a ``vit_tiny`` digits run of the
README's kind, measured in one invocation of this script:

- alone, given one CPU (``taskset -c 0``: its affinity mask);
- N at once, each given its own CPU (``taskset -c i``): caitlab starts one torch thread per
  CPU a run was given (``threads=auto``, ``caitlab.cpus``);
- N at once, not bound, with ``threads=<all cores>``: what every run did before, each
  starting a thread per core of the machine.

Target: N runs at once, each on its own CPUs, take at most 1.2x their time alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / ".venv" / "bin" / "caitlab-train"
TARGET = 1.2


def _cmd(out: Path, seed: int, epochs: int, cpus: str | None, threads: str) -> list[str]:
    bind = ["taskset", "-c", cpus] if cpus is not None else []
    return [*bind, str(TRAIN), "model=vit_tiny", f"trainer.max_epochs={epochs}", "logger=csv",
            "trainer.enable_progress_bar=false", f"seed={seed}", f"threads={threads}",
            f"paths.output_dir={out}", "name=bench"]


def _wall(out: Path, seeds: list[int]) -> list[float]:
    walls = []
    for p in (out / "bench").glob("*/summary.json"):
        s = json.loads(p.read_text())
        if s.get("status") != "completed":
            raise SystemExit(f"a run did not complete: {p} ({s.get('error')})")
        if s["seed"] in seeds:
            walls.append(float(s["wall_s"]))
    return walls


def batch(out: Path, runs: list[tuple[int, str | None, str]], epochs: int) -> list[float]:
    """Starts every ``(seed, cpus, threads)`` run at once, waits for all; their wall_s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    procs = [subprocess.Popen(_cmd(out, seed, epochs, cpus, threads), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed, cpus, threads in runs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"caitlab-train failed: {err.strip().splitlines()[-1:]}")
    return _wall(out, [seed for seed, _, _ in runs])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=0, help="runs at once (default: one per core)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="rounds of each case (median)")
    add_doc_args(p)
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    n = args.runs or len(cores)
    if n > len(cores):
        raise SystemExit(f"--runs {n}: this machine lets us use {len(cores)} cores")
    seed = iter(range(10_000))
    alone, bound, unbound = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for _ in range(args.repeats):  # interleaved, so that a slow moment hits every case
            alone += batch(out, [(next(seed), str(cores[0]), "auto")], args.epochs)
            bound += batch(out, [(next(seed), str(cores[i]), "auto") for i in range(n)],
                           args.epochs)
            unbound += batch(out, [(next(seed), None, str(len(cores))) for _ in range(n)],
                             args.epochs)
    med = statistics.median
    print(f"{n} vit_tiny digits runs of {args.epochs} epochs, {len(cores)} cores, median of "
          f"{args.repeats} rounds; training seconds per run")
    print(f"  alone, 1 CPU:                       {med(alone):7.2f} s")
    print(f"  {n} at once, 1 CPU each (threads=auto): {med(bound):7.2f} s  "
          f"{med(bound) / med(alone):5.2f}x alone")
    print(f"  {n} at once, unbound, threads={len(cores)}:     {med(unbound):7.2f} s  "
          f"{med(unbound) / med(alone):5.2f}x alone")
    ratio = med(bound) / med(alone)
    ok = ratio <= TARGET
    verdict = (f"{'PASS' if ok else 'MISS'}: {n} runs side by side take {ratio:.2f}x their "
               f"time alone (target <= {TARGET}x)")
    print(verdict)
    if not args.no_doc:
        table = markdown_table(["case", "s per run", "x alone"], [
            ["alone, one CPU (`taskset -c 0`)", f"{med(alone):.2f}", "1.00"],
            [f"{n} at once, each on its own CPU (`taskset -c i`, `threads=auto`)",
             f"{med(bound):.2f}", f"**{med(bound) / med(alone):.2f}**"],
            [f"{n} at once, unbound, `threads={len(cores)}` each", f"{med(unbound):.2f}",
             f"{med(unbound) / med(alone):.2f}"]], right=(1, 2))
        write_doc_table(
            "bench_side_by_side", "Runs side by side",
            f"Training seconds (`wall_s`) of a `vit_tiny` digits run of {args.epochs} epochs, "
            f"{len(cores)} cores, median of {args.repeats} interleaved rounds.\n\n{table}\n\n"
            f"{verdict}.", command_line(__file__, argv), args.doc_out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
