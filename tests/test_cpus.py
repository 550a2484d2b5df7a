"""torch threads follow the CPUs a run was given (caitlab.cpus)."""

from __future__ import annotations

import json
import shutil

import pytest

from caitlab.config import ConfigError
from caitlab.cpus import torch_threads
from conftest import caitlab_train, clean_env


def test_threads_are_the_runs_share_of_its_cpus_or_as_given():
    assert torch_threads("auto", 8) == 8
    assert torch_threads(None, 8, ranks_here=2) == 4  # DDP ranks on one machine share them
    assert torch_threads("auto", 1, ranks_here=4) == 1
    assert torch_threads(3, 2) == 3  # a number is the user's to choose
    for bad in (0, -1, "many", True, 1.5):
        with pytest.raises(ConfigError, match="threads=.* is not allowed: must be auto or"):
            torch_threads(bad, 4)


@pytest.mark.slow
def test_a_run_takes_as_many_threads_as_cpus_it_was_given(tmp_path):
    tiny = ("logger=csv", "trainer=debug", "model.embed_dim=16", "model.depth=1")
    # SLURM_CPUS_PER_TASK=1 (as in a job given one CPU) and a mask of one core (taskset)
    caitlab_train(tmp_path, *tiny, env=clean_env(SLURM_CPUS_PER_TASK="1"), fresh=True)
    (summary,) = [json.loads(p.read_text()) for p in tmp_path.glob("default/*/summary.json")]
    assert summary["threads"] == 1
    if shutil.which("taskset"):
        import subprocess
        import sys

        out = tmp_path / "bound"
        out.mkdir()
        proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "caitlab.train",
                               *tiny, "seed=1", f"paths.output_dir={out}",
                               "trainer.enable_progress_bar=false"], cwd=out,
                              env=clean_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (bound,) = [json.loads(p.read_text()) for p in out.glob("default/*/summary.json")]
        assert bound["threads"] == 1
    proc = caitlab_train(tmp_path, *tiny, "seed=2", "threads=0", check=False)
    assert proc.returncode == 2 and "threads=0 is not allowed" in proc.stderr
