"""The benchmark scripts compare like with like: the same weights, the same work.

Their speed targets are checked by running them (README, Performance), never here; these
tests keep the comparisons honest: timm's reference computes our logits, the ratio and MFU
printed follow from the throughputs measured and the FLOPs torch counts in the model, and the
hand-written loop ends with the exact weights of caitlab's training path.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from caitlab.analysis.timing import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_distillation  # noqa: E402
import bench_model  # noqa: E402
import bench_overhead  # noqa: E402


@pytest.fixture
def restore_threads():
    """bench_model's --threads holds for the rest of its process: give the count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def counted_flops_per_image(model, training: bool) -> float:
    """FLOPs torch's counter sees in one step of ``model`` on two images, per image: the
    forward alone, or forward and backward (every gradient really computed)."""
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    model.train(training)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if training:
            F.cross_entropy(out, torch.tensor([1, 2])).backward()
    return counter.get_total_flops() / len(x)


def bench_model_rows(capsys, monkeypatch, case: str,
                     batch: int) -> tuple[list[float], float, list[list[str]]]:
    """One case of the script: the wall-clock seconds of each of its timing calls (read from
    the clock around them), its matmul peak in FLOP/s and its table's rows."""
    walls = []

    def clocked(*args, **kwargs):
        t0 = time.perf_counter()
        times = time_interleaved(*args, **kwargs)
        walls.append(time.perf_counter() - t0)
        return times

    monkeypatch.setattr(bench_model, "time_interleaved", clocked)
    assert bench_model.main(["--cases", case, "--device", "cpu", "--batch", str(batch),
                             "--warmup", "0", "--repeats", "1", "--iters", "1",
                             "--threads", "1", "--no-doc"]) == 0
    out = capsys.readouterr().out
    peak = float(next(ln for ln in out.splitlines()
                      if ln.startswith("matmul peak")).split()[2]) * 1e9
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(case + " ")]
    return walls, peak, rows


@pytest.mark.parametrize("case,name", [("cait", "cait_xxs24_224"),
                                       ("cait-noth", "cait_xxs24_224"),
                                       ("deit", "deit_tiny_patch16_224")])
def test_bench_model_times_timm_reference_with_our_weights(case, name, capsys, monkeypatch,
                                                           restore_threads):
    batch = 2
    walls, peak, rows = bench_model_rows(capsys, monkeypatch, case, batch)
    assert [(r[1], r[2]) for r in rows] == [(name, "forward"), (name, "forward+backward")]
    ref = bench_model.timm_reference(case, name, torch.device("cpu"))
    for wall, (_, _, mode, ours, timm, ratio, ours_mfu, timm_mfu, diff) in zip(
            walls, rows, strict=True):
        ours, timm = float(ours), float(timm)
        assert float(diff) < 1e-4  # the same function, so a fair race
        assert ours > 0 and timm > 0
        # ours/timm is the ratio of the two throughputs measured, not timm's over ours;
        # the tolerance is what printing img/s to 0.01 and the ratio to 0.001 can shift,
        # the two added (pytest.approx would take the larger of them only)
        rounding = (0.005 / ours + 0.005 / timm) * ours / timm + 0.0005
        assert abs(float(ratio) - ours / timm) <= rounding + 1e-9
        # MFU: the FLOPs torch counts in timm's model (its backward run for real, not
        # 3 x forward) at the measured img/s, over the measured peak; the counted backward
        # differs from 2 x forward by up to 2% (no input gradient for the patch embedding,
        # SDPA's backward), the printed MFU is rounded to 0.1%
        flops = counted_flops_per_image(ref, training=mode != "forward")
        for img_s, printed in ((ours, ours_mfu), (timm, timm_mfu)):
            assert float(printed.rstrip("%")) == pytest.approx(
                100 * flops * img_s / peak, rel=0.03 + 0.005 / img_s, abs=0.06)
        # one batch each, none untimed (--warmup 0 --repeats 1 --iters 1): the seconds the
        # two img/s imply are those of the clock around the timing call, less its syncs
        assert batch / ours + batch / timm == pytest.approx(wall, rel=0.1)


def test_bench_overhead_reference_loop_does_the_same_training_interleaved(monkeypatch,
                                                                         tmp_path):
    """The reference's epochs run inside ours' run, and neither changes the other's numbers:
    both end with the exact weights a run of ours alone ends with."""
    from caitlab.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys.modules["__main__"], "EpochClock", bench_overhead.EpochClock,
                        raising=False)
    extra = ["model.depth=2", "data.batch_size=256", "logger=csv",
             "trainer.enable_progress_bar=false"]
    cfg = bench_overhead.compose("digits", tmp_path / "a", epochs=3, extra=extra)
    ours_t, ref_t, diff = bench_overhead.run_round(cfg)
    assert len(ours_t) == len(ref_t) == 2  # the first of 3 epochs is not timed
    assert all(t > 0 for t in ours_t + ref_t)
    assert diff == 0.0
    # each epoch split into its phases, which add up to it: steps and validation measured
    for times, phases in ((ours_t, bench_overhead.EpochClock.ours_phases[1:]),
                          (ref_t, bench_overhead.EpochClock.refs_phases[1:])):
        assert [sum(p.values()) for p in phases] == pytest.approx(times, rel=1e-9)
        assert all(p["steps"] > 0 and p["validation"] > 0 for p in phases)
        assert all(p["steps"] > p["validation"] for p in phases)  # backward: steps cost more
    interleaved = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt",
                             weights_only=True)["state_dict"]
    alone = bench_overhead.compose("digits", tmp_path / "b", epochs=3, extra=[
        *extra, "~callbacks.epoch_clock"])
    train(alone)
    alone_w = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt",
                         weights_only=True)["state_dict"]
    assert alone_w.keys() == interleaved.keys()
    for key, value in alone_w.items():
        assert torch.equal(interleaved[key], value), key


def test_bench_overhead_floor_is_lightning_doing_the_references_work(monkeypatch, tmp_path):
    """--floor: a minimal module under a bare trainer, interleaved with the reference, trains
    to the reference's exact weights (the same work, so its overhead is Lightning's loop) and
    saves them at every epoch end as the reference does."""
    monkeypatch.setattr(sys.modules["__main__"], "EpochClock", bench_overhead.EpochClock,
                        raising=False)
    cfg = bench_overhead.compose("digits", tmp_path, epochs=3, extra=[
        "model.depth=2", "data.batch_size=256"])
    floor_t, ref_t, diff = bench_overhead.run_floor_round(cfg)
    assert len(floor_t) == len(ref_t) == 2 and all(t > 0 for t in floor_t + ref_t)
    assert diff == 0.0
    for times, phases in ((floor_t, bench_overhead.EpochClock.ours_phases[1:]),
                          (ref_t, bench_overhead.EpochClock.refs_phases[1:])):
        assert [sum(p.values()) for p in phases] == pytest.approx(times, rel=1e-9)
        assert all(p["steps"] > p["validation"] > 0 for p in phases)
    saved = torch.load(tmp_path / "run" / "floor.pt", weights_only=True)
    ref = bench_overhead.EpochClock.reference.weights()
    assert saved["epoch"] == 2 and saved["model"].keys() == ref.keys()
    assert all(torch.equal(saved["model"][k], v) for k, v in ref.items())
    assert not (tmp_path / "run" / "checkpoints").exists()  # no caitlab, no checkpoint callback


def test_bench_data_feeds_both_pipelines_the_same_photographs(tmp_path):
    """The folder is real JPEG photographs at ImageNet's median size, and both pipelines
    deliver normalised 224 px batches of every image of it."""
    from PIL import Image

    import bench_data

    root = bench_data.make_folder(tmp_path, images=64)
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 64 and len({f.parent.name for f in files}) == 4
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and sorted(img.size) == [375, 500]
    for make in (bench_data.ours_pass, bench_data.timm_pass):
        n, seconds = make(root, workers=0)()
        assert n == 64 and seconds > 0


def test_a_script_writes_its_table_for_the_docs_with_command_date_commit_machine(tmp_path):
    """--doc-out DIR: the Performance page's data file, the command as run (here main's
    argv), the date, the commit and the machine above a markdown table of the figures."""
    import re

    argv = ["--student", "cait_tiny", "--teacher", "cait_tiny", "--batch", "4",
            "--repeats", "1", "--iters", "1", "--doc-out", str(tmp_path)]
    assert bench_distillation.main(argv) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["bench_distillation.md"]
    text = (tmp_path / "bench_distillation.md").read_text()
    assert "- command: `" in text and "scripts/bench_distillation.py --student cait_tiny" in text
    assert f"--doc-out {tmp_path}`" in text
    assert re.search(r"^- date: \d{4}-\d{2}-\d{2} \(UTC\)$", text, re.M)
    assert re.search(r"^- commit: `[0-9a-f]{10}(\+dirty(\.[0-9a-f]{8})?)?`$", text, re.M), text
    machine = re.search(r"^- machine: (.*)$", text, re.M).group(1)
    assert f"{os.cpu_count()} cores" in machine and "load average" in machine
    assert f"torch {torch.__version__}" in machine
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(table) == 3 and set(table[1]) <= set("|-: ")  # header, rule, one row
    assert table[0].count("|") == table[2].count("|") and "ms" in table[2]
