"""Seconds to submit a sweep to SLURM, for sweeps of 8, 64 and 256 runs.

    .venv/bin/python scripts/bench_sweep.py                    # 8, 64, 256 runs, 3 repeats
    .venv/bin/python scripts/bench_sweep.py --sizes 8,256 --repeats 5
    .venv/bin/python scripts/bench_sweep.py --profile 256      # + cProfile of one submission

Needs the local cluster (``scripts/slurm/start.sh``, as root). Each figure is the median
over fresh processes of the real console script, timed from just before it is spawned to its
exit, of

    caitlab-train -m hydra/launcher=slurm hydra.launcher.wait=false seed=range(N) ...

a sweep of N runs of a tiny config (``vit_tiny``, 2 blocks of width 32, ``trainer=debug``,
``logger=csv``, one CPU per task) into a fresh temporary output folder: Hydra composes the
sweep, caitlab's launcher resolves every run's folder, pickles the jobs, submits them as one
job array and writes every run's ``summary.json`` (``pending`` + its job id). Then the script
checks with ``squeue`` that the array has N tasks and cancels it.

The jobs are submitted held (``+cluster.additional_parameters.hold=true``, i.e.
``#SBATCH --hold``): submission costs the same, and no job starts training on the machine's
CPUs between the submission and the cancel (``--no-hold`` submits them runnable).

Targets: submission time grows sub-linearly with the number of runs (one array),
and 256 runs submit in under 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / ".venv" / "bin" / "caitlab-train"
PYTHON = ROOT / ".venv" / "bin" / "python"
TINY = ("model=vit_tiny", "model.embed_dim=32", "model.depth=2", "trainer=debug",
        "logger=csv", "cluster.cpus_per_task=1", "cluster.timeout_min=10")
TARGET_256_S = 10.0
ARRAY_LINE = re.compile(r"submitted (\d+) runs as job array (\d+)")


def cluster_up() -> bool:
    """The local cluster's own health check: daemons alive, node usable, sacct answering."""
    try:
        return subprocess.run([str(ROOT / "scripts" / "slurm" / "status.sh"), "-q"],
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def sweep_cmd(n: int, out: Path, hold: bool, extra: tuple[str, ...] = (),
              python_flags: tuple[str, ...] = ()) -> list[str]:
    exe = [str(PYTHON), *python_flags, str(TRAIN)] if python_flags else [str(TRAIN)]
    held = ("+cluster.additional_parameters.hold=true",) if hold else ()
    return [*exe, "-m", "hydra/launcher=slurm", "hydra.launcher.wait=false", *TINY, *held,
            *extra, f"seed=range({n})", "name=bench", f"paths.output_dir={out}"]


def _env() -> dict[str, str]:
    # a benchmark never reaches wandb; SLURM_* of an enclosing job would confuse submitit
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.setdefault("WANDB_MODE", "offline")
    return env


def array_tasks(array_id: str) -> int:
    """How many tasks SLURM holds for the array (``-r``: one line per task, even pending)."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i"],
                         capture_output=True, text=True, timeout=60).stdout
    return sum(1 for line in out.splitlines() if line.strip().startswith(f"{array_id}_"))


def cancel(array_id: str) -> None:
    subprocess.run(["scancel", array_id], capture_output=True, timeout=60)


def submit(n: int, work: Path, hold: bool, timeout: float, extra: tuple[str, ...] = (),
           python_flags: tuple[str, ...] = ()) -> tuple[float, str]:
    """Submits one sweep of ``n`` runs; returns (seconds, array id) once checked."""
    out = Path(tempfile.mkdtemp(prefix=f"sweep{n}-", dir=work))
    cmd = sweep_cmd(n, out, hold, extra, python_flags)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - t0
    found = ARRAY_LINE.search(proc.stdout + proc.stderr)
    array_id = found.group(2) if found else None
    try:
        if proc.returncode != 0 or array_id is None:
            raise SystemExit(f"exit {proc.returncode}, no array submitted: {' '.join(cmd)}\n"
                             f"{(proc.stdout + proc.stderr)[-3000:]}")
        if int(found.group(1)) != n:
            raise SystemExit(f"the launcher submitted {found.group(1)} runs, not {n}")
        tasks = array_tasks(array_id)
        if tasks != n:
            raise SystemExit(f"squeue shows {tasks} tasks for array {array_id}, not {n}")
        pending = [json.loads(p.read_text()).get("status")
                   for p in (out / "bench").glob("*/summary.json")]
        if len(pending) != n or set(pending) != {"pending"}:
            raise SystemExit(f"expected {n} pending summary.json, found {len(pending)}")
    finally:
        if array_id is not None:
            cancel(array_id)
        shutil.rmtree(out, ignore_errors=True)
    return seconds, array_id


def profile(n: int, work: Path, hold: bool, timeout: float, top: int,
            extra: tuple[str, ...]) -> None:
    """One submission under cProfile: where the launcher process spends its time."""
    import pstats

    prof = work / "sweep.prof"
    seconds, array_id = submit(n, work, hold, timeout, extra,
                               ("-m", "cProfile", "-o", str(prof)))
    print(f"\ncProfile of one {n}-run submission ({seconds:.2f} s under the profiler, "
          f"array {array_id}), top {top} by cumulative time:")
    stats = pstats.Stats(str(prof))
    stats.sort_stats("cumulative").print_stats(
        r"caitlab|hydra_plugins|submitit|hydra/_internal/(hydra|config_loader)|"
        r"cloudpickle|subprocess|omegaconf/omegaconf", top)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8,64,256", help="runs per sweep, comma-separated; "
                   "the first is the reference of the ratios")
    p.add_argument("--repeats", type=int, default=3, help="submissions per size (median)")
    p.add_argument("--no-hold", dest="hold", action="store_false",
                   help="submit the jobs runnable instead of held (they are cancelled anyway)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one submission of N runs with cProfile")
    p.add_argument("--top", type=int, default=30, help="functions listed by --profile")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="OVERRIDE",
                   help="one more override for every sweep (repeatable), e.g. "
                        "hydra/sweeper=basic for Hydra's own sweeper")
    p.add_argument("--timeout", type=float, default=600, help="seconds per submission")
    add_doc_args(p)
    return p


def report(times: dict[int, list[float]], repeats: int, loads: tuple[float, float]) -> str:
    """Prints the table of median submission times per size, then the verdict on each
    target; returns the same as markdown."""
    sizes = list(times)
    ref_n = sizes[0]
    ref = statistics.median(times[ref_n])
    print(f"\nSweep submission to SLURM (hydra.launcher.wait=false), median of {repeats}; "
          f"{os.cpu_count()} CPUs, load average {loads[0]:.2f} before, "
          f"{loads[1]:.2f} after")
    print(f"{'runs':>6}{'seconds':>10}{'s/run':>9}{f'x vs {ref_n}':>10}{'runs x':>9}"
          f"{'min':>8}{'max':>8}")
    rows = []
    for n in sizes:
        med = statistics.median(times[n])
        print(f"{n:>6}{med:>10.2f}{med / n:>9.3f}{med / ref:>10.2f}{n / ref_n:>9.0f}"
              f"{min(times[n]):>8.2f}{max(times[n]):>8.2f}")
        rows.append([n, f"**{med:.2f}**", f"{med / n:.3f}", f"{med / ref:.2f}",
                     f"{n / ref_n:.0f}", f"{min(times[n]):.2f} .. {max(times[n]):.2f}"])

    print()
    verdicts = []
    largest = max(sizes)
    if largest > ref_n:
        grow = statistics.median(times[largest]) / ref
        runs_x = largest / ref_n
        verdicts.append(f"{'PASS' if grow < runs_x else 'MISS'}: sub-linear growth, {largest} "
                        f"runs take {grow:.2f}x the time of {ref_n} for {runs_x:.0f}x the runs")
    if 256 in times:
        t256 = statistics.median(times[256])
        verdicts.append(f"{'PASS' if t256 < TARGET_256_S else 'MISS'}: 256 runs submitted in "
                        f"{t256:.2f} s (median), target < {TARGET_256_S:.0f} s")
    for line in verdicts:
        print(line)
    table = markdown_table(["runs", "seconds (median)", "s/run", f"x vs {ref_n} runs",
                            "runs x", "min .. max"], rows, right=range(6))
    return (f"Median of {repeats} submissions per size, taking turns; load average "
            f"{loads[0]:.2f} before, {loads[1]:.2f} after.\n\n{table}\n\n"
            + "".join(f"- {line}\n" for line in verdicts))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extra = tuple(args.extra)
    sizes = [int(s) for s in args.sizes.split(",")]
    if not TRAIN.exists():
        raise SystemExit(f"{TRAIN} not found: run `make setup` first")
    if not cluster_up():
        raise SystemExit("the local SLURM cluster is not running or not healthy "
                         "(scripts/slurm/status.sh): scripts/slurm/start.sh, as root")

    load_before = os.getloadavg()
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="caitlab-sweep-bench-") as tmp:
        work = Path(tmp)
        # interleaved, so that a change in the machine's load hits every size alike
        for i in range(args.repeats):
            for n in sizes:
                seconds, array_id = submit(n, work, args.hold, args.timeout, extra)
                times[n].append(seconds)
                print(f"  repeat {i + 1}/{args.repeats}: {n:>4} runs in {seconds:6.2f} s "
                      f"(array {array_id}: {n} tasks, cancelled)", flush=True)
        load_after = os.getloadavg()
        if args.profile:
            profile(args.profile, work, args.hold, args.timeout, args.top, extra)

    text = report(times, args.repeats, (load_before[0], load_after[0]))
    if not args.no_doc:
        write_doc_table("bench_sweep", "Sweep submission to SLURM", text,
                        command_line(__file__, argv), args.doc_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
