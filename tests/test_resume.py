"""An interrupted run resumes to exactly the weights of a run that never stopped."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAULTS_OUTSIDE_SIGNATURE, assert_same_weights, caitlab_train, last_weights

# deterministic CPU training, small but several batches per epoch (digits: 1258 / 64 = 20)
RUN = ("model=cait_tiny", "model.embed_dim=32", "model.depth=2", "trainer.max_epochs=3",
       "trainer.deterministic=true", "logger=csv", "model.drop_path_rate=0.1",
       FAULTS_OUTSIDE_SIGNATURE)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_then_resume_gives_identical_weights(tmp_path, sig):
    ref_out, out = tmp_path / "ref", tmp_path / "int"
    ref_out.mkdir(), out.mkdir()
    caitlab_train(ref_out, *RUN)
    (ref_run,) = [p.parent for p in ref_out.glob("*/*/summary.json")]

    stop = ("+callbacks.sig._target_=helpers.SignalAtStep", "+callbacks.sig.step=27",
            f"+callbacks.sig.sig={sig}")
    first = caitlab_train(out, *RUN, *stop, check=False)
    assert first.returncode == 130, first.stderr[-3000:]
    (run,) = [p.parent for p in out.glob("*/*/summary.json")]
    assert run.name == ref_run.name  # same signature: the fault is no part of it
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == sig
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # the signal came while step 27 started; the run stopped at the next batch boundary
    assert ckpt["global_step"] == 28 and ckpt["epoch"] == 1

    caitlab_train(out, *RUN)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attempts"] == 2

    ref_weights, ref_step = last_weights(ref_run)
    weights, step = last_weights(run)
    assert step == ref_step == 60
    assert_same_weights(ref_weights, weights)
