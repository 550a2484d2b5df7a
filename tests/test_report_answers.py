"""The report's answers: intervals and p-values against hand computations, the baseline,
the verdicts, the table as data, throughput, plots that stay legible, and the HTML page in a
real browser."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from caitlab.analysis.report import build_report, collect_runs, main
from caitlab.analysis.report_answers import answers, choose_baseline, grid
from caitlab.analysis.report_runs import group_variants
from caitlab.analysis.stats import difference, estimate, pareto_front
from caitlab.errors import UserError
from caitlab.record.sweep import throughput

# Student's t quantiles and CDFs in closed form, for 2 and 4 degrees of freedom:
#   df=2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
#   df=4: F(t) = 1/2 + 3x/4 - x^3/4, x = t / sqrt(4 + t^2)
T975_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # F(t) = 0.975 solved: 4.302653
T975_DF4 = 2.776445  # tables


def _p_df2(t: float) -> float:
    return 1 - abs(t) / math.sqrt(2 + t * t)


def _p_df4(t: float) -> float:
    x = abs(t) / math.sqrt(4 + t * t)
    return 2 * (1 - (0.5 + 0.75 * x - 0.25 * x**3))


# --- statistics ------------------------------------------------------------------------------


def test_paired_exact_p_value_and_interval_by_hand():
    # differences 1, 2, 3: of the 8 sign flips only +++ and --- reach |sum| 6: p = 2/8; the
    # 7 subset means are 1, 1.5, 2, 2, 2, 2.5, 3, and at alpha 0.5 (k = floor(0.5 * 4) = 2)
    # the interval runs from the 2nd smallest to the 2nd largest
    d = difference({0: 91.0, 1: 92.0, 2: 93.0}, {0: 90.0, 1: 90.0, 2: 90.0})
    assert d.test == "paired" and d.n == 3 and d.method == "exact sign-flip"
    assert d.delta == pytest.approx(2.0) and d.p == 0.25
    assert (d.low, d.high) == (None, None)  # 3 pairs are too few for any 95% interval
    half = difference({0: 91.0, 1: 92.0, 2: 93.0}, {0: 90.0, 1: 90.0, 2: 90.0}, alpha=0.5)
    assert (half.low, half.high) == (pytest.approx(1.5), pytest.approx(2.5))
    assert d.outcome == "too few seeds for a verdict at α=0.05: need 6 paired"


def test_unpaired_welch_interval_and_p_value_by_hand():
    # different seeds: Welch's test; equal variances (1) and sizes (3): df = 2(n-1) = 4
    d = difference({0: 1.0, 1: 2.0, 2: 3.0}, {5: 3.0, 6: 4.0, 7: 5.0})
    se = math.sqrt(1 / 3 + 1 / 3)
    assert d.test == "unpaired" and d.delta == pytest.approx(-2.0)
    assert d.low == pytest.approx(-2 - T975_DF4 * se, abs=1e-5)
    assert d.high == pytest.approx(-2 + T975_DF4 * se, abs=1e-5)
    assert d.p == pytest.approx(_p_df4(-2 / se))  # 0.0705
    assert d.seeds() == "3 seeds each, unpaired"


def test_shared_seeds_pair_and_the_rest_fall_back_to_welch():
    a = {0: 93.0, 1: 94.5, 2: 93.2, 3: 95.0}
    b = {0: 92.0, 1: 92.5, 2: 92.9}
    paired = difference(a, b)  # seeds 0-2 shared: paired on those, the delta theirs too
    assert paired.test == "paired" and paired.n == 3 and paired.n_variant == 4
    diffs = [1.0, 2.0, 0.3]
    assert paired.delta == pytest.approx(sum(diffs) / 3) and paired.p == 0.25
    # the table's means differ by more (seed 3 counts there): the line says which is which
    assert paired.means_delta == pytest.approx((93 + 94.5 + 93.2 + 95) / 4
                                               - (92 + 92.5 + 92.9) / 3)
    assert paired.seeds() == "3 paired (of 4 and 3 seeds)"
    unpaired = difference(a, {7: 92.0, 8: 92.5, 9: 92.9})
    assert unpaired.test == "unpaired" and unpaired.seeds() == "4 and 3 seeds, unpaired"


def test_fewer_than_three_seeds_give_no_interval_and_say_so():
    d = difference({0: 95.0, 1: 96.0}, {0: 94.0, 1: 94.5})
    assert d.test == "too few seeds" and d.low is None and d.p is None
    assert d.delta == pytest.approx(1.25)
    assert d.outcome == "too few seeds for a verdict (need 3)"
    assert estimate([95.0, 96.0]).low is None and estimate([95.0]).std is None
    e = estimate([1.0, 2.0, 3.0])
    assert (e.low, e.high) == (pytest.approx(2 - T975_DF2 / math.sqrt(3)),
                               pytest.approx(2 + T975_DF2 / math.sqrt(3)))


def test_identical_differences_are_not_certain():
    # every seed +1: the sign flips still give 2 of 8 as extreme, and no zero-width interval
    d = difference({0: 91.0, 1: 92.0, 2: 93.0}, {0: 90.0, 1: 91.0, 2: 92.0})
    assert (d.low, d.high, d.p, d.same) == (None, None, 0.25, True)
    assert d.outcome == "too few seeds for a verdict at α=0.05: need 6 paired"


def test_one_image_on_each_of_three_float32_seeds_is_no_certain_better():
    # the case: a 360-image test set, +1 image on each seed, float32 top-1
    import numpy as np

    base = np.array([300, 310, 320], dtype=np.float32) / np.float32(360)
    plus = (np.array([301, 311, 321], dtype=np.float32) / np.float32(360))
    d = difference({s: 100 * float(x) for s, x in enumerate(plus)},
                   {s: 100 * float(x) for s, x in enumerate(base)})
    assert d.p == 0.25 and d.low is None and d.outcome.startswith("too few seeds")


def test_throughput_is_the_median_after_the_first_epoch():
    # the demo's ViT: 45 img/s in its first epoch (warm-up), then 2,000-2,900
    assert throughput({0: 45.0, 1: 2044.0, 2: 2936.0, 3: 1990.0}) == 2044.0
    assert throughput({3: 45.0, 4: 2000.0, 5: 2200.0}) == 2100.0  # resumed at epoch 3
    assert throughput({0: 45.0}) == 45.0


def test_pareto_front():
    points = {"a": (1.0, 90.0), "b": (2.0, 92.0), "c": (2.0, 91.0), "d": (3.0, 91.5)}
    assert pareto_front(points) == {"a", "b"}
    # images/s: more is better
    assert pareto_front(points, cheaper="higher") == {"b", "d"}


# --- a sweep as caitlab-train writes it --------------------------------------------------------


def _write_run(sweep: Path, model: str, residual: str, seed: int, top1: float,
               macs: int = 1_000_000, ips: tuple[float, ...] = (45.0, 2000.0, 2100.0),
               more: tuple[str, ...] = (), **extra) -> None:
    """A completed run's folder; ``more``: overrides beyond model and residual, ``extra``:
    summary fields."""
    sig = "-".join((model, residual, *more, str(seed))).replace("=", "_")
    cait = model == "cait_tiny"
    axes = {"model": model, "class_token": "class_attention" if cait else "input",
            "ca_depth": 2 if cait else 0, "insert_layer": 0, "residual": residual,
            "layerscale_init": 0.1 if residual == "layerscale" else None, "depth": 4,
            "embed_dim": 64, "talking_heads": cait}
    summary = {"status": "completed", "signature": sig, "seed": seed, "data": "digits",
               "variant": "-".join((model, residual, *more)), "axes": axes,
               "overrides": ["experiment=demo", f"model={model}",
                             f"model/residual={residual}", *more, f"seed={seed}",
                             "trainer.enable_progress_bar=false"],
               "model": {"name": model, "params": 100_000, "macs": macs},
               "test/top1": top1 / 100, "test/top5": 0.99, "val/top1_best": top1 / 100,
               "epochs": len(ips), "images_per_s": ips[-1], **extra}
    (sweep / sig).mkdir(parents=True)
    (sweep / sig / "summary.json").write_text(json.dumps(summary))
    with open(sweep / sig / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", "perf/images_per_s", "val/top1"])
        w.writeheader()
        for epoch, value in enumerate(ips):
            w.writerow({"epoch": epoch, "step": epoch, "perf/images_per_s": value})
            w.writerow({"epoch": epoch, "step": epoch, "val/top1": top1 / 100})


# test top-1 per seed; layerscale - none, paired: cait +1, +2, +3; vit +0.1, -0.1, +0.0
DEMO = {("vit_tiny", "none"): [90.0, 90.5, 91.0], ("vit_tiny", "layerscale"): [90.1, 90.4, 91.0],
        ("cait_tiny", "none"): [92.0, 92.0, 92.0],
        ("cait_tiny", "layerscale"): [93.0, 94.0, 95.0]}


@pytest.fixture
def demo(tmp_path) -> Path:
    sweep = tmp_path / "demo"
    for (model, residual), values in DEMO.items():
        for seed, top1 in enumerate(values):
            _write_run(sweep, model, residual, seed, top1,
                       macs=1_320_000 if model == "cait_tiny" else 1_000_000)
    # the grid's order, as the demo experiment lists it
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - experiment=demo\n    - seed=0,1,2\n"
        "  sweeper:\n    params:\n      model: vit_tiny,cait_tiny\n"
        "      model/residual: none,layerscale\n")
    return sweep


def _variants(sweep: Path):
    return group_variants(collect_runs(sweep))


def test_the_grid_is_what_the_overrides_varied_in_the_sweeps_order(demo):
    g = grid(_variants(demo), demo)
    assert g.keys == ["model", "model/residual"]  # not seed, not excluded keys
    assert g.values == {"model": ["vit_tiny", "cait_tiny"],
                        "model/residual": ["none", "layerscale"]}
    assert choose_baseline(g) == {"model": "vit_tiny", "model/residual": "none"}
    # a key by its last part, and a mistyped one named with a suggestion
    assert choose_baseline(g, ["residual=layerscale"])["model/residual"] == "layerscale"
    with pytest.raises(UserError, match="residul: not a key the sweep varies .*did you mean "
                                        "residual"):
        choose_baseline(g, ["residul=none"])
    with pytest.raises(UserError, match="model=cait_tin: .*did you mean cait_tiny"):
        choose_baseline(g, ["model=cait_tin"])


def test_verdicts_per_question_with_cost(demo):
    a = answers(_variants(demo), demo)
    lines = [v.line() for v in a.verdicts]
    # 3 pairs: the exact test's p is at least 2/8, and Holm over 4 verdicts holds the first
    # to 0.05/4: 2/2^n <= 0.0125 from n = 8
    too_few = "too few seeds for a verdict at α=0.05: need 8 paired"
    assert ("layerscale vs none (cait_tiny, digits): +2.0 pts, p=0.25 (Holm: 1), 3 paired "
            f"seeds -> {too_few}") in lines
    assert ("cait_tiny vs vit_tiny (none, digits): +1.5 pts, p=0.25 (Holm: 1), 3 paired seeds "
            f"-> {too_few}, at 1.32x the MACs") in lines
    assert len(lines) == 4
    # the table's differences are to the baseline, vit_tiny + none
    assert a.baseline_variant.key == "vit_tiny-none"
    assert a.differences["cait_tiny-layerscale"].delta == pytest.approx(94.0 - 90.5)


def test_a_verdict_with_enough_pairs_shows_the_interval_its_holm_threshold_gives(tmp_path):
    # cait - vit: +1 on 8 seeds but one (+0.5): every sign flip but +...+ and -...- has a
    # smaller |sum|, p = 2/256; Holm over 1 verdict: the nominal 0.05, k = floor(0.05 * 128)
    # = 6: of the 255 subset means the 6th smallest is 0.75 (the 0.5 with one 1; 0.5 alone
    # is the smallest), the 6th largest 1.0 (127 subsets without the 0.5)
    sweep = tmp_path / "eight"
    for seed in range(8):
        _write_run(sweep, "vit_tiny", "none", seed, 90.0 + seed / 10)
        _write_run(sweep, "cait_tiny", "none", seed, 91.0 + seed / 10 - 0.5 * (seed == 0))
    (v,) = answers(_variants(sweep), sweep, ["model=vit_tiny"]).verdicts
    assert (v.difference.low, v.difference.high) == (pytest.approx(0.75), pytest.approx(1.0))
    assert v.line() == ("cait_tiny vs vit_tiny (digits): +0.9 pts [0.8, 1.0], p=0.0078 "
                    "(Holm: 0.0078), 8 paired seeds -> better"), v.line()


def test_a_chosen_baseline_and_the_cli(demo, capsys):
    assert main([str(demo), "--baseline", "model=cait_tiny", "residual=layerscale"]) == 0
    out = capsys.readouterr().out
    assert "(model=cait_tiny model/residual=layerscale)" in out
    assert "none vs layerscale (cait_tiny, digits): -2.0 pts" in out
    assert main([str(demo), "--baseline", "residual=rezero"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("caitlab-report: error: --baseline model/residual=rezero: not a "
                          "value of the sweep (none, layerscale)")


def test_csv_and_json_hold_numbers_in_their_own_columns(demo):
    report = build_report(collect_runs(demo), demo, sweep_dir=demo)
    with open(demo / "report.csv", newline="") as f:
        rows = {(r["model"], r["residual"]): r for r in csv.DictReader(f)}
    row = rows[("cait_tiny", "layerscale")]
    assert float(row["test_top1_mean"]) == pytest.approx(94.0)
    assert float(row["test_top1_std"]) == pytest.approx(1.0)
    assert int(row["test_top1_n"]) == 3
    assert float(row["test_top1_ci_low"]) == pytest.approx(94 - T975_DF2 / math.sqrt(3))
    assert float(row["test_top1_ci_high"]) == pytest.approx(94 + T975_DF2 / math.sqrt(3))
    assert float(row["delta"]) == pytest.approx(3.5)
    assert row["delta_ci_low"] == row["delta_ci_high"] == ""  # 3 pairs: no exact 95% CI
    assert float(row["p"]) == 0.25 and row["comparison"] == "paired"
    assert float(row["images_per_s"]) == pytest.approx(2050.0)  # median of 2000, 2100
    assert rows[("vit_tiny", "none")]["comparison"] == "baseline"
    assert rows[("vit_tiny", "none")]["delta"] == ""
    data = json.loads((demo / "report.json").read_text())
    assert data["baseline"] == {"model": "vit_tiny", "model/residual": "none"}
    assert data["metric"] == "test/top1" and len(data["verdicts"]) == 4
    v = next(v for v in data["verdicts"] if v["question"].startswith("layerscale vs none "
                                                                   "(cait_tiny"))
    assert v["delta"] == pytest.approx(2.0) and v["test"] == "paired" and v["n"] == 3
    assert [r["test_top1_mean"] for r in data["rows"]] == [
        pytest.approx(float(r["test_top1_mean"])) for r in report.data]
    # the markdown stays readable: one cell per result
    md = (demo / "report.md").read_text()
    assert "| 94.00 ± 1.00 (n=3) |" in md and "| baseline |" in md


def test_two_seeds_are_shown_without_an_interval(tmp_path, capsys):
    sweep = tmp_path / "two"
    for (model, residual), values in DEMO.items():
        for seed, top1 in enumerate(values[:2]):
            _write_run(sweep, model, residual, seed, top1)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    # no multirun.yaml: the baseline is the table's first row (cait_tiny + layerscale)
    assert "(model=cait_tiny model/residual=layerscale)" in out
    assert "none vs layerscale (cait_tiny, digits): -1.5 pts, 2 seeds -> too few seeds for " \
           "a verdict (need 3)" in out
    assert "| -3.25 (n<3) |" in out and "intervals and p-values need 3 seeds" in out


# --- plots -------------------------------------------------------------------------------------


def _texts(fig):
    """Every piece of text the drawn figure shows, with its box in pixels: its titles, axis
    labels and legends, and the labels of the ticks inside the view (matplotlib keeps, but
    does not draw, those of ticks beyond it)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks, shown = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                labels = (tick.label1, tick.label2)
                ticks.update(map(id, labels))
                if low <= tick.get_loc() <= high:
                    shown += [t for t in labels if t.get_visible()]
    shown += [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in shown
            if t.get_text().strip()]


def test_plots_have_intervals_a_front_and_text_that_never_collides(demo, tmp_path):
    from matplotlib.container import ErrorbarContainer

    from caitlab.analysis.report_plots import figures

    # two more variants at the same cost as others: their points must not hide each other
    for seed, top1 in enumerate((91.0, 91.2, 91.4)):
        _write_run(demo, "vit_tiny", "rezero", seed, top1)
    variants = _variants(demo)
    figs = figures(variants, answers(variants, demo))
    assert set(figs) == {"top1_vs_macs", "top1_vs_throughput", "val_curves"}
    for name, fig in figs.items():
        _assert_legible(name, fig)
    ax = figs["top1_vs_macs"].axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 5 and all(c.has_yerr for c in bars)
    xs = sorted(round(c.lines[0].get_xdata()[0], 4) for c in bars)
    assert len(set(xs)) == 5  # three variants at 1.0 MMACs, dodged apart
    legend = [t.get_text() for t in figs["top1_vs_macs"].legends[0].get_texts()]
    assert "Pareto front" in legend and "cait_tiny class_attention layerscale d4" in legend
    curves = [t.get_text() for t in figs["val_curves"].legends[0].get_texts()]
    assert "vit_tiny input none d4 (n=3)" in curves  # named by variant, not by hash
    ticks = figs["val_curves"].axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


def _assert_legible(name, fig):
    texts = _texts(fig)
    bounds = fig.bbox
    for text, box in texts:
        assert bounds.x0 - 1 <= box.x0 and box.x1 <= bounds.x1 + 1, (name, text)
        assert bounds.y0 - 1 <= box.y0 and box.y1 <= bounds.y1 + 1, (name, text)
    for i, (a, box_a) in enumerate(texts):
        for b, box_b in texts[i + 1:]:
            assert not box_a.overlaps(box_b), (name, a, b)
    return texts


def test_costs_spanning_decades_get_a_log_axis_with_plain_ticks(tmp_path):
    from caitlab.analysis.report_plots import figures

    sweep = tmp_path / "wide"
    for (model, residual), macs in zip(DEMO, (6e5, 2.4e6, 9e6, 3.1e7), strict=True):
        for seed, top1 in enumerate(DEMO[(model, residual)]):
            _write_run(sweep, model, residual, seed, top1, macs=int(macs))
    variants = _variants(sweep)
    fig = figures(variants, answers(variants, sweep))["top1_vs_macs"]
    texts = _assert_legible("top1_vs_macs", fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "MMACs per image"
    low, high = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert shown == ["0.5", "1", "2", "5", "10", "20"]
    assert all(any(t == s for t, _ in texts) for s in shown)


# --- the page, in a real browser ---------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                             "(make browser installs it)")
def test_report_html_renders_in_chromium_with_its_table_and_plots(demo, tmp_path):
    build_report(collect_runs(demo), demo, sweep_dir=demo)
    page = (demo / "report.html").resolve()
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing from the network
    # the page alone, moved away from its plots folder, is the whole report
    alone = tmp_path / "shared" / "report.html"
    alone.parent.mkdir()
    shutil.copy(page, alone)
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}",
                          "--dump-dom", alone.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<tr>") == 1 + len(DEMO)  # header + one row per variant
    assert "layerscale vs none (cait_tiny, digits)" in dom.stdout
    assert dom.stdout.count('src="data:image/png;base64,') == 3
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}",
                    f"--screenshot={shot}", "--window-size=1280,2600", alone.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    # matplotlib's first colour (tab:blue) only comes from the plots: they decoded and drew
    blue = ((abs(pixels[..., 0] - 0x1F / 255) < 0.05) & (abs(pixels[..., 1] - 0x77 / 255) < 0.05)
            & (abs(pixels[..., 2] - 0xB4 / 255) < 0.05)).sum()
    assert blue > 500


def test_a_baseline_for_a_sweep_that_varies_only_the_seed_is_refused(tmp_path, capsys):
    sweep = tmp_path / "seeds"
    for seed, top1 in enumerate((90.0, 91.0, 92.0)):
        _write_run(sweep, "vit_tiny", "none", seed, top1)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 91.00 ± 1.00 (n=3) |" in out and "Verdicts" not in out and "Δ" not in out
    assert main([str(sweep), "--baseline", "model=vit_tiny"]) == 2
    assert "differ in nothing but the seed" in capsys.readouterr().err


def test_distilled_runs_show_their_distillation_and_teacher(tmp_path, capsys):
    sweep = tmp_path / "distil"
    teacher = {"source": "outputs/teacher/6db055c9e0", "name": "cait_tiny@6db055c9e0",
               "alpha": 0.5, "tau": 1.0, "params": 7362}
    for kind, values in (("none", (90.0, 90.5, 91.0)), ("hard", (91.0, 92.0, 92.5)),
                         ("soft", (90.5, 91.5, 91.0))):
        facts = {} if kind == "none" else {"teacher": {
            **teacher, "type": kind, **({"tau": 2.0} if kind == "soft" else {})}}
        for seed, top1 in enumerate(values):
            _write_run(sweep, "vit_tiny", "none", seed, top1, more=(f"distillation={kind}",),
                       **facts)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| vit_tiny")]
    assert len(rows) == 3
    assert any("| hard | cait_tiny@6db055c9e0 |" in r for r in rows)
    assert any("| soft τ=2 | cait_tiny@6db055c9e0 |" in r for r in rows)
    assert any("| none |  |" in r for r in rows)
    # rows in distillation order (none, soft, hard): the first, no teacher, is the baseline
    assert [r.split("|")[8].strip() for r in rows] == ["none", "soft τ=2", "hard"]
    assert "hard vs none (digits): +1.3 pts" in out
