"""Start-up cost of ``caitlab-train``: seconds from the command to the first optimizer step.

    .venv/bin/python scripts/bench_startup.py               # 5 repeats of each, then the profile
    .venv/bin/python scripts/bench_startup.py --repeats 9 --top 20
    .venv/bin/python scripts/bench_startup.py --no-importtime

Each figure is the median over fresh processes of the real console script
(``.venv/bin/caitlab-train``), timed from just before the process is spawned:

* ``--cfg job``: composing and printing the config and nothing else (target: under 3 s);
* first step: one run of the demo sweep, ``experiment=demo hydra.mode=RUN model=cait_tiny
  model/residual=layerscale`` (the demo's CaiT run, every setting as ``make demo`` trains it:
  digits, CPU trainer, wandb offline, progress bar), into a fresh temporary output folder, up
  to the end of its first training batch, i.e. after the first AdamW step (target: under 6 s
  on CPU). ``hydra.mode=RUN`` turns the demo's 4-run sweep into one run of the same config.

The first step is detected by a callback that exists only in this script, added with
``+callbacks.first_step._target_=bench_startup.first_step_probe`` (``conf/callbacks`` takes
extra callbacks), so normal runs carry none of it. It writes the time of a few milestones to
a file and ends the process right after the first step (``os._exit``: nothing afterwards
matters here; the process group is killed so wandb's service process goes too). The
milestones split the time into phases; an import-only process gives the share of imports; one
more run under ``python -X importtime`` says which packages the time goes to and who pulls
them in (that run is slower: importtime adds its own overhead, compare its figures with each
other only).

The machine's load average is printed with the figures: on a shared machine they vary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / ".venv" / "bin" / "caitlab-train"
PYTHON = ROOT / ".venv" / "bin" / "python"
# One run of conf/experiment/demo.yaml: its sweep is model x model/residual; this is its CaiT.
DEMO_RUN = ("experiment=demo", "hydra.mode=RUN", "model=cait_tiny", "model/residual=layerscale")
MILESTONE_LINE = "bench_startup milestone: "
TARGET_CFG_JOB_S = 3.0
TARGET_FIRST_STEP_S = 6.0
# What train() imports before the first step (caitlab.train's own function-level imports).
TRAINING_IMPORTS = ("caitlab.train", "lightning", "torch", "caitlab.models",
                    "caitlab.training.module", "caitlab.data", "caitlab.training.tracking",
                    "caitlab.training.callbacks", "caitlab.training.preemption", "wandb",
                    "sklearn.datasets")
# (milestone, what happened between the previous milestone and it)
PHASES = (
    ("built", "imports, config composition, data + model built, MACs, run folder, loggers"),
    ("setup", "Trainer built, wandb.init (logger.experiment), datamodule.setup"),
    ("train_start", "optimizers, sanity check, fit-start hooks"),
    ("first_batch", "first batch fetched"),
    ("first_step", "forward, backward, AdamW step of batch 0"),
)


def first_step_probe(stamp_file: str):
    """Hydra ``_target_`` of the benchmark's callback (built in the child process).

    Lightning is imported here, not at module level, so that this script's own process stays
    light and the child pays nothing it would not pay anyway.
    """
    from lightning.pytorch.callbacks import Callback

    class FirstStepProbe(Callback):
        def __init__(self) -> None:
            self.stamps: dict[str, float] = {}
            self._mark("built")

        def _mark(self, milestone: str) -> None:
            if milestone not in self.stamps:
                self.stamps[milestone] = time.time()
                # splits `-X importtime`'s lines (also on stderr) by phase
                print(f"{MILESTONE_LINE}{milestone}", file=sys.stderr, flush=True)

        def setup(self, trainer, pl_module, stage) -> None:
            self._mark("setup")

        def on_train_start(self, trainer, pl_module) -> None:
            self._mark("train_start")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._mark("first_batch")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # Lightning calls this after the optimizer step of the batch (automatic optimization)
            self._mark("first_step")
            Path(stamp_file).write_text(json.dumps(self.stamps))
            os._exit(0)

    return FirstStepProbe()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")  # never reach the network from a benchmark
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                      env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[float, float, str]:
    """Runs ``cmd`` in its own session; returns (start time, end time, its stderr)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SystemExit(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    t1 = time.time()
    try:  # what the child left behind (wandb's service process after os._exit)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode}: {' '.join(cmd)}\n{err[-3000:]}")
    return t0, t1, err


def first_step_cmd(out: Path, stamp: Path, python_flags: tuple[str, ...] = ()) -> list[str]:
    probe = ("+callbacks.first_step._target_=bench_startup.first_step_probe",
             f"+callbacks.first_step.stamp_file={stamp}")
    exe = [str(PYTHON), *python_flags, str(TRAIN)] if python_flags else [str(TRAIN)]
    return [*exe, *DEMO_RUN, f"paths.output_dir={out}", *probe]


def time_first_step(work: Path, i: int, timeout: float) -> dict[str, float]:
    """One fresh run up to its first step: seconds from spawn to each milestone."""
    out, stamp = work / f"run{i}", work / f"stamp{i}.json"
    out.mkdir()
    t0, _, _ = _run(first_step_cmd(out, stamp), cwd=out, timeout=timeout)
    if not stamp.exists():
        raise SystemExit("the run ended before its first optimizer step")
    return {k: v - t0 for k, v in json.loads(stamp.read_text()).items()}


def time_cfg_job(work: Path, timeout: float) -> float:
    t0, t1, _ = _run([str(TRAIN), "--cfg", "job"], cwd=work, timeout=timeout)
    return t1 - t0


def time_imports(work: Path, timeout: float) -> float:
    code = "import " + ", ".join(TRAINING_IMPORTS)
    t0, t1, _ = _run([str(PYTHON), "-c", code], cwd=work, timeout=timeout)
    return t1 - t0


# --------------------------------------------------------------------------------------------
# -X importtime: where the import time goes, and who pulls each package in


@dataclass
class Node:
    name: str
    self_us: int
    cum_us: int
    level: int
    phase: str
    children: list[Node] = field(default_factory=list)


def parse_importtime(stderr: str) -> list[Node]:
    """The import tree from ``-X importtime`` lines (children are printed before their parent,
    one indentation step deeper); returns the roots, i.e. imports made at run time, each
    labelled with the phase (the milestone that ends it) it happened in."""
    milestones = [key for key, _ in PHASES]
    phase = milestones[0]
    stack: list[Node] = []
    for line in stderr.splitlines():
        if line.startswith(MILESTONE_LINE):
            done = line[len(MILESTONE_LINE):].strip()
            if done in milestones[:-1]:
                phase = milestones[milestones.index(done) + 1]
            continue
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, cum_us, name = line.split(":", 1)[1].split("|", 2)
        name = name[1:]  # one space after the bar, then two per nesting level
        level = (len(name) - len(name.lstrip())) // 2
        node = Node(name.strip(), int(self_us), int(cum_us), level, phase)
        while stack and stack[-1].level > level:
            node.children.insert(0, stack.pop())
        stack.append(node)
    return stack


def group(name: str) -> str:
    """The package a module is accounted to. torch's compiler stack (dynamo, inductor) is its
    own group: an eager CPU run never uses it, so who pulls it in is worth seeing."""
    parts = name.split(".")
    if parts[0] == "torch" and len(parts) > 1 and parts[1] in ("_dynamo", "_inductor"):
        return f"torch.{parts[1]}"
    return parts[0]


def self_time_by_group(roots: list[Node]) -> dict[str, tuple[float, int]]:
    totals: dict[str, list[float]] = {}
    todo = list(roots)
    while todo:
        node = todo.pop()
        entry = totals.setdefault(group(node.name), [0.0, 0])
        entry[0] += node.self_us / 1e6
        entry[1] += 1
        todo.extend(node.children)
    return {g: (s, int(n)) for g, (s, n) in totals.items()}


def pulled_in(roots: list[Node], min_s: float) -> list[tuple[int, str, float, str]]:
    """Where one package imports another (or code imports a package at run time) and that
    costs at least ``min_s`` cumulative: (depth, package's first module, seconds, importer)."""
    rows: list[tuple[int, str, float, str]] = []

    def walk(node: Node, parent: Node | None, depth: int) -> None:
        crosses = parent is None or group(node.name) != group(parent.name)
        if crosses and node.cum_us / 1e6 >= min_s:
            rows.append((depth, node.name, node.cum_us / 1e6,
                         parent.name if parent else "(imported at run time)"))
            depth += 1
        for child in node.children:
            walk(child, node, depth)

    for root in roots:
        walk(root, None, 0)
    return rows


def importtime_report(work: Path, top: int, min_s: float,
                      timeout: float) -> tuple[list[tuple[str, float, int]], float, int,
                                               list[tuple[int, str, float, str]]]:
    """Prints the breakdown; returns the ``top`` packages by self time (package, seconds,
    modules), the total seconds, the number of modules and :func:`pulled_in`'s rows."""
    out, stamp = work / "importtime", work / "importtime.json"
    out.mkdir()
    _, _, err = _run(first_step_cmd(out, stamp, ("-X", "importtime")), cwd=out,
                     timeout=timeout)
    roots = parse_importtime(err)
    groups = self_time_by_group(roots)
    total = sum(s for s, _ in groups.values())
    n_modules = sum(n for _, n in groups.values())
    print(f"\nImports before the first step (python -X importtime, one run; importtime "
          f"inflates): {n_modules} modules, {total:.2f} s")
    print(f"\n{'package':<24}{'self s':>8}{'share':>8}{'modules':>9}")
    for name, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{name:<24}{s:>8.2f}{s / total:>8.0%}{n:>9}")
    print("\nImports by phase (cumulative seconds; the largest imports of each):")
    for key, _ in PHASES:
        mine = sorted((r for r in roots if r.phase == key), key=lambda r: -r.cum_us)
        heaviest = ", ".join(f"{r.name} {r.cum_us / 1e6:.2f}" for r in mine[:4])
        print(f"  {key:<12}{sum(r.cum_us for r in mine) / 1e6:6.2f} s  {heaviest}")
    print(f"\nWho pulls what in (cumulative >= {min_s} s; indented = imported by the line "
          "above's package):")
    pulled = pulled_in(roots, min_s)
    for depth, name, s, importer in pulled:
        print(f"{'  ' * depth}{name:<{48 - 2 * depth}} {s:>6.2f} s  <- {importer}")
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [(name, s, n) for name, (s, n) in ranked], total, n_modules, pulled


# --------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"min {min(values):.2f}, max {max(values):.2f}"


def verdict(name: str, seconds: float, target: float) -> str:
    ok = "PASS" if seconds < target else "MISS"
    return f"{ok}: {name} {seconds:.2f} s (median), target < {target:.0f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per figure")
    p.add_argument("--top", type=int, default=15, help="packages listed by self import time")
    p.add_argument("--min-pull", type=float, default=0.15,
                   help="seconds of cumulative import time from which an import is listed")
    p.add_argument("--no-importtime", action="store_true",
                   help="skip the -X importtime breakdown")
    p.add_argument("--timeout", type=float, default=300, help="seconds per process")
    # imported here, not at the top: the runs import this module for their probe
    from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table

    add_doc_args(p)
    args = p.parse_args(argv)
    if not TRAIN.exists():
        raise SystemExit(f"{TRAIN} not found: run `make setup` first")

    load_before = os.getloadavg()
    cfg_job: list[float] = []
    imports: list[float] = []
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="caitlab-startup-") as tmp:
        work = Path(tmp)
        # interleaved, so that a change in the machine's load hits all three alike
        for i in range(args.repeats):
            cfg_job.append(time_cfg_job(work, args.timeout))
            imports.append(time_imports(work, args.timeout))
            runs.append(time_first_step(work, i, args.timeout))
            print(f"  repeat {i + 1}/{args.repeats}: --cfg job {cfg_job[-1]:.2f} s, "
                  f"imports {imports[-1]:.2f} s, first step {runs[-1]['first_step']:.2f} s",
                  flush=True)
        load_after = os.getloadavg()

        first = [r["first_step"] for r in runs]
        print(f"\ncaitlab-train start-up, {args.repeats} fresh processes each, median "
              f"({os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, "
              f"{load_after[0]:.2f} after)")
        print(f"  --cfg job                          {statistics.median(cfg_job):6.2f} s  "
              f"({_spread(cfg_job)})")
        print(f"  first optimizer step (demo run)    {statistics.median(first):6.2f} s  "
              f"({_spread(first)})")
        print(f"    of which the training imports    {statistics.median(imports):6.2f} s  "
              f"(`python -c 'import {', '.join(TRAINING_IMPORTS[:3])}, ...'`)")
        print("\n  phases of the first step (median seconds; cumulative from the command):")
        previous = 0.0
        phase_rows = []
        for key, what in PHASES:
            at = statistics.median([r[key] for r in runs])
            print(f"    {key:<12}{at:6.2f}  +{at - previous:5.2f}  {what}")
            phase_rows.append([f"`{key}`", f"{at:.2f}", f"+{at - previous:.2f}", what])
            previous = at

        packages = None
        if not args.no_importtime:
            packages = importtime_report(work, args.top, args.min_pull, args.timeout)

    print()
    verdicts = [verdict("caitlab-train --cfg job", statistics.median(cfg_job), TARGET_CFG_JOB_S),
                verdict("first optimizer step of the demo run on CPU", statistics.median(first),
                        TARGET_FIRST_STEP_S)]
    print("\n".join(verdicts))
    if args.no_doc:
        return 0

    def met(seconds: float, target: float) -> str:
        return f"< {target:.0f} s ({'met' if seconds < target else 'missed'})"

    summary = markdown_table(["", "median", "min .. max", "target"], [
        ["`caitlab-train --cfg job`", f"**{statistics.median(cfg_job):.2f} s**",
         f"{min(cfg_job):.2f} .. {max(cfg_job):.2f}",
         met(statistics.median(cfg_job), TARGET_CFG_JOB_S)],
        ["first optimizer step, demo run", f"**{statistics.median(first):.2f} s**",
         f"{min(first):.2f} .. {max(first):.2f}",
         met(statistics.median(first), TARGET_FIRST_STEP_S)],
        ["the training imports alone", f"{statistics.median(imports):.2f} s",
         f"{min(imports):.2f} .. {max(imports):.2f}", ""]], right=(1, 2))
    phases = markdown_table(["milestone", "s from the command", "phase s", "what the phase does"],
                            phase_rows, right=(1, 2))
    text = (f"{args.repeats} fresh processes each, median; load average {load_before[0]:.2f} "
            f"before, {load_after[0]:.2f} after.\n\n{summary}\n\n"
            f"Phases of the first step (median seconds):\n\n{phases}")
    if packages is not None:
        rows, total, n_modules, pulled = packages
        text += (f"\n\nImports before the first step by package (`python -X importtime`, one "
                 f"run, which importtime slows: {n_modules} modules, {total:.2f} s; compare "
                 f"these figures with each other only):\n\n"
                 + markdown_table(["package", "self s", "share", "modules"],
                                  [[f"`{name}`", f"{s:.2f}", f"{s / total:.0%}", n]
                                   for name, s, n in rows], right=(1, 2, 3)))
        text += (f"\n\nWho pulls what in (cumulative seconds >= {args.min_pull}; a level "
                 "deeper is imported by the row above's package):\n\n"
                 + markdown_table(["import", "cumulative s", "imported by"],
                                  [[f"{'&nbsp;' * 3 * depth}`{name}`", f"{s:.2f}",
                                    importer if importer.startswith("(") else f"`{importer}`"]
                                   for depth, name, s, importer in pulled], right=(1,)))
    write_doc_table("bench_startup", "Start-up", text, command_line(__file__, argv),
                    args.doc_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
