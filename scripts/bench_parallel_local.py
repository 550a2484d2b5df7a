"""A local sweep with and without slots (caitlab.slots): its wall time, and its runs'.

    .venv/bin/python scripts/bench_parallel_local.py               # 3 runs, 1 core each
    .venv/bin/python scripts/bench_parallel_local.py --runs 8 --epochs 5 --cpus-per-task 2

Each case is one ``caitlab-train -m hydra/launcher=local`` sweep of ``--runs`` ``vit_tiny``
digits runs (seeds), measured in one invocation of this script:

- ``cluster.slots=false``: what the local launcher does without slots, every run at once,
  each taking a torch thread per core of the machine;
- ``cluster.slots=true``: at most ``cores // cpus_per_task`` runs at once, each pinned to
  its own cores (on a GPU machine, with ``--gpu``: one run per GPU).

Printed per case: the sweep's wall time (from the command's start to its end, start-up and
waiting included), the runs' mean training time (``wall_s`` of their ``summary.json``) and
the most runs seen training at once (their summaries, read every 0.1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / ".venv" / "bin" / "caitlab-train"


def sweep(out: Path, slots: bool, args: argparse.Namespace) -> dict[str, float]:
    """Runs one sweep; its wall time, its runs' mean wall_s and the most running at once."""
    trainer = ["trainer=gpu"] if args.gpu else []
    cmd = [str(TRAIN), "-m", "hydra/launcher=local", "hydra.launcher.snapshot=false",
           "model=vit_tiny", *trainer, f"trainer.max_epochs={args.epochs}", "logger=csv",
           "trainer.enable_progress_bar=false", f"++cluster.slots={str(slots).lower()}",
           f"cluster.cpus_per_task={args.cpus_per_task}", f"name=slots_{slots}",
           f"seed={','.join(str(s) for s in range(args.runs))}", f"paths.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    folder, most = out / f"slots_{slots}", 0
    while proc.poll() is None:
        most = max(most, sum(_status(p) == "running" for p in folder.glob("*/summary.json")))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed: {proc.stderr.read().strip().splitlines()[-1:]}")
    runs = [json.loads(p.read_text()) for p in folder.glob("*/summary.json")]
    return {"sweep_s": wall, "run_s": statistics.mean(float(r["wall_s"]) for r in runs),
            "most": most}


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):  # being rewritten
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="trainer=gpu: one run per GPU")
    add_doc_args(p)
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    print(f"{args.runs} vit_tiny digits runs of {args.epochs} epochs, {cores} cores, "
          f"cpus_per_task={args.cpus_per_task}{', trainer=gpu' if args.gpu else ''}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for slots in (False, True):
            r = sweep(Path(tmp), slots, args)
            print(f"  cluster.slots={str(slots).lower():5}  sweep {r['sweep_s']:6.1f} s  "
                  f"training {r['run_s']:6.1f} s per run  at most {r['most']} at once")
            rows.append([f"`cluster.slots={str(slots).lower()}`", f"**{r['sweep_s']:.1f} s**",
                         f"{r['run_s']:.1f} s", r["most"]])
    if not args.no_doc:
        table = markdown_table(["case", "sweep wall time", "training per run (mean)",
                                "most runs training at once"], rows, right=(1, 2, 3))
        write_doc_table(
            "bench_parallel_local", "A local sweep with and without slots",
            f"One `hydra/launcher=local` sweep of {args.runs} `vit_tiny` digits runs of "
            f"{args.epochs} epochs per case, {cores} cores, "
            f"`cluster.cpus_per_task={args.cpus_per_task}`"
            f"{', `trainer=gpu`' if args.gpu else ''}.\n\n{table}",
            command_line(__file__, argv), args.doc_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
