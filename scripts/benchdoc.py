"""The data files of the documentation's Performance page, written by the benchmark scripts.

Every ``scripts/bench_*.py`` and ``scripts/gpu_check.py`` ends by calling
:func:`write_doc_table` with the table it printed, as markdown: it writes
``docs/performance/<name>.md`` (``docs/performance.md`` includes it with pymdownx.snippets)
with the exact command, the date, the commit and the machine above the table, so that every
figure on the page says where it came from. ``--doc-out DIR`` writes it elsewhere,
``--no-doc`` not at all (:func:`add_doc_args`); the tests pass one or the other, so that no
test writes into ``docs/``.

The load average is read when this module is imported, i.e. at the start of the benchmark
that imports it, not after its own work has loaded the machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_DIR = ROOT / "docs" / "performance"
START_LOAD = os.getloadavg() if hasattr(os, "getloadavg") else None


def add_doc_args(parser: argparse.ArgumentParser) -> None:
    """``--doc-out DIR`` (default: this repository's docs/performance) and ``--no-doc``."""
    parser.add_argument("--doc-out", type=Path, default=DOC_DIR, metavar="DIR",
                        help="folder of the documentation's data file (default: "
                        "docs/performance of this repository)")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not write the documentation's data file")


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran ``script`` (its ``__file__``) with ``argv`` (None: this
    process's own arguments), paths under the repository written relative to it, as they are
    typed from its root: ``.venv/bin/python scripts/bench_model.py --repeats 5``."""
    args = list(sys.argv[1:] if argv is None else argv)

    def rel(path: str) -> str:
        p = Path(path)
        if not p.is_absolute():
            p = Path.cwd() / p
        try:
            return str(p.relative_to(ROOT))
        except ValueError:
            return path

    return shlex.join([rel(sys.executable), rel(str(Path(script).resolve())), *args])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]],
                   right: Sequence[int] = ()) -> str:
    """A markdown table; the columns numbered in ``right`` aligned right (numbers)."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores (the machine's and this process's affinity), the load average at the
    start and at the end, the GPU if torch sees one, torch's version."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    parts = [f"{cpu}, {cores} cores" + (f" ({usable} usable)" if usable != cores else "")]
    if START_LOAD is not None:  # and at the end: other work may have come meanwhile
        parts.append("load average " + " / ".join(f"{x:.2f}" for x in START_LOAD)
                     + " (1 / 5 / 15 min) at the start, "
                     + f"{os.getloadavg()[0]:.2f} (1 min) at the end")
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}"
                         + (f" x{torch.cuda.device_count()}"
                            if torch.cuda.device_count() > 1 else ""))
        else:
            parts.append("no GPU")
        parts.append(f"torch {torch.__version__}")
    except Exception:  # no torch, or a broken CUDA set-up: the rest still says what it had
        pass
    parts.append(f"Python {platform.python_version()}, {platform.system()} "
                 f"{platform.release()}")
    return "; ".join(parts)


def commit() -> str:
    """The checkout's commit, ``<sha>+dirty.<hash of the diff>`` for uncommitted edits."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    try:
        from caitlab.provenance import current_commit

        return current_commit() or "unknown (not a git checkout)"
    except Exception:
        return "unknown"


def write_doc_table(name: str, title: str, markdown: str, command: str | None = None,
                    out_dir: Path | str | None = None) -> Path:
    """Writes ``<out_dir>/<name>.md``: ``title`` as a bold line, the command that produced it
    (``command``, default this process's own), the date (UTC), the commit and the machine,
    then ``markdown`` (the table or tables). Returns the file's path."""
    out = Path(out_dir) if out_dir is not None else DOC_DIR
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = command_line(sys.argv[0])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    text = (f"**{title}**\n\n"
            f"- command: `{command}`\n"
            f"- date: {date} (UTC)\n"
            f"- commit: `{commit()}`\n"
            f"- machine: {machine()}\n\n"
            f"{markdown.strip()}\n")
    path = out / f"{name}.md"
    path.write_text(text)
    print(f"written to {path}", file=sys.stderr)
    return path


def write_not_measured(name: str, title: str, command: str, what: str,
                       out_dir: Path | str | None = None) -> Path:
    """The data file of a benchmark not run yet, in :func:`write_doc_table`'s format: the
    command that writes it, and ``what`` its table will hold."""
    out = Path(out_dir) if out_dir is not None else DOC_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(f"**{title}**\n\n"
                    f"- command: `{command}`\n"
                    f"- date: not measured yet\n"
                    f"- commit: not measured yet\n"
                    f"- machine: not measured yet\n\n"
                    f"!!! note \"Not measured yet\"\n"
                    + textwrap.fill(f"Run `{command}` from the repository's root; it writes "
                                    f"this file. {what.strip()}", width=96,
                                    initial_indent="    ", subsequent_indent="    ",
                                    break_on_hyphens=False, break_long_words=False)
                    + "\n")
    return path
