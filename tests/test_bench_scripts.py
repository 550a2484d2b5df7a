"""The benchmark scripts compare like with like: the same weights, the same work.

Their speed targets are checked by running them (README, Performance), never here; these
tests keep the comparisons honest: timm's reference computes our logits, and the hand-written
loop ends with the exact weights of caitlab's training path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from caitlab.analysis.timing import mfu
from caitlab.models import count_macs, create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_model  # noqa: E402
import bench_overhead  # noqa: E402


@pytest.mark.parametrize("case,name", [("cait", "cait_xxs24_224"),
                                       ("cait-noth", "cait_xxs24_224"),
                                       ("deit", "deit_tiny_patch16_224")])
def test_bench_model_times_timm_reference_with_our_weights(case, name):
    args = argparse.Namespace(batch=1, precision="32", compile=False, warmup=0, repeats=1,
                              iters=1)
    # a nominal peak: MFU against it is a fixed multiple of img/s (a real peak is timed in
    # the script's own run; a fake one can be beaten by a fast machine)
    peak = 1e11
    rows = bench_model.run_case(case, name, args, torch.device("cpu"), peak=peak)
    macs = count_macs(create_model(name, **({"talking_heads": False}
                                            if case == "cait-noth" else {})))
    assert [r["mode"] for r in rows] == ["forward", "forward+backward"]
    for r in rows:
        assert r["max_abs_diff"] < 1e-4  # the same function, so a fair race
        assert r["ours_img_s"] > 0 and r["timm_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_img_s"] / r["timm_img_s"])
        training = r["mode"] != "forward"
        assert r["ours_mfu"] == pytest.approx(mfu(r["ours_img_s"], macs, peak, training))
        assert r["timm_mfu"] == pytest.approx(mfu(r["timm_img_s"], macs, peak, training))


def test_bench_overhead_reference_loop_does_the_same_training(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys.modules["__main__"], "EpochClock", bench_overhead.EpochClock,
                        raising=False)
    extra = ["model.depth=2", "data.batch_size=256", "logger=csv",
             "trainer.enable_progress_bar=false"]
    cfg = bench_overhead.compose("digits", tmp_path / "a", epochs=3, extra=extra)
    ours_t, ours_w = bench_overhead.run_ours(cfg)
    cfg = bench_overhead.compose("digits", tmp_path / "b", epochs=3, extra=extra)
    ref_t, ref_w = bench_overhead.run_reference(cfg)
    assert len(ours_t) == len(ref_t) == 2  # the first of 3 epochs is not timed
    assert all(t > 0 for t in ours_t + ref_t)
    assert ours_w.keys() == ref_w.keys()
    for key, value in ref_w.items():
        assert torch.equal(ours_w[key], value), key
