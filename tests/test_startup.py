"""Each console script's quick paths (--help, a composition) start without the heavy
libraries they do not use: torch and Lightning cost seconds of start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "lightning")
QUICK = [
    ("caitlab.train", ["caitlab-train", "--cfg", "job"]),
    ("caitlab.train", ["caitlab-train", "--help"]),
    ("caitlab.analysis.report", ["caitlab-report", "--help"]),
    ("caitlab.sweeps.cli", ["caitlab-sweep", "status", "--help"]),
    ("caitlab.analysis.bench", ["caitlab-bench", "--help"]),
    ("caitlab.analysis.attention_cli", ["caitlab-attention", "--help"]),
]


@pytest.mark.parametrize(("module", "argv"), QUICK, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_a_quick_path_imports_no_heavy_library(module, argv):
    code = (f"import sys\nfrom {module} import main\nsys.argv = {argv!r}\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]
