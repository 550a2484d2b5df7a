"""The verdict lines of caitlab-report: runs that diverged or failed counted in the line and
compared as an outcome of their own, questions the runs cannot answer listed with why, a
baseline that stays put across re-launches, and the correction stated and chosen."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from caitlab.analysis.report import main
from caitlab.analysis.report_answers import answers
from test_report_answers import _variants, _write_run

DEMO_ORDER = ("hydra:\n  overrides:\n    task:\n    - seed=0,1,2\n  sweeper:\n    params:\n"
              "      model: {model}\n      model/residual: {residual}\n")


def _depth_sweep(sweep: Path, none_diverged: int, seeds: int = 5) -> None:
    """layerscale vs none at one depth: ``none_diverged`` of the none arm's runs diverged."""
    for seed in range(seeds):
        _write_run(sweep, "vit_tiny", "layerscale", seed, 90.0 + seed / 10)
        extra = {"status": "diverged", "diverged_epoch": 2} if seed < none_diverged else {}
        _write_run(sweep, "vit_tiny", "none", seed, 89.0 + seed / 10, **extra)
    (sweep / "multirun.yaml").write_text(DEMO_ORDER.format(model="vit_tiny",
                                                           residual="layerscale,none"))


def _lines(sweep: Path, **kw) -> list[str]:
    return [v.line() for v in answers(_variants(sweep), sweep, **kw).verdicts]


def test_diverged_runs_are_counted_in_the_line(tmp_path):
    _depth_sweep(tmp_path / "s", none_diverged=2)
    lines = _lines(tmp_path / "s")
    (line,) = [x for x in lines if "divergence" not in x]
    assert line.startswith("none vs layerscale (digits): -1.0 pts")
    assert line.endswith("3 paired (of 3 and 5 seeds), none: 2 of 5 diverged -> too few seeds "
                         "for a verdict at α=0.05: need 7 paired"), line


def test_divergence_is_compared_as_an_outcome_of_its_own(tmp_path):
    _depth_sweep(tmp_path / "s", none_diverged=5)
    lines = _lines(tmp_path / "s")
    assert ("none vs layerscale (digits): not answered: every none run diverged (5 of 5)"
            in lines), lines
    (divergence,) = [x for x in lines if "divergence" in x]
    # Fisher: 5 of 5 against 0 of 5, p = 2/C(10, 5); the only p of the report: Holm's own
    assert divergence == ("none vs layerscale (digits), divergence: 5 of 5 vs 0 of 5 runs "
                          "diverged, p=0.0079 (Fisher; Holm: 0.0079) -> diverges more often")


def test_a_question_whose_baseline_runs_all_failed_is_listed_with_why(tmp_path):
    sweep = tmp_path / "s"
    for seed in range(3):
        _write_run(sweep, "vit_tiny", "none", seed, 90.0, status="failed")
        _write_run(sweep, "cait_tiny", "none", seed, 91.0)
    (sweep / "multirun.yaml").write_text(DEMO_ORDER.format(model="vit_tiny,cait_tiny",
                                                           residual="none"))
    assert _lines(sweep) == ["cait_tiny vs vit_tiny (digits): not answered: every vit_tiny run "
                             "failed (3 of 3)"]


def _grid_sweep(sweep: Path) -> None:
    for model in ("vit_tiny", "cait_tiny"):
        for residual in ("none", "layerscale"):
            for seed in range(3):
                _write_run(sweep, model, residual, seed, 90.0 + seed)


def test_the_order_recorded_at_the_first_launch_beats_a_relaunchs(tmp_path):
    sweep = tmp_path / "s"
    _grid_sweep(sweep)
    (sweep / "sweep_order.yaml").write_text(yaml.safe_dump(
        {"model": ["vit_tiny", "cait_tiny"], "model/residual": ["none", "layerscale"]}))
    # a re-launch listed both keys the other way round
    (sweep / "multirun.yaml").write_text(DEMO_ORDER.format(model="cait_tiny,vit_tiny",
                                                           residual="layerscale,none"))
    assert answers(_variants(sweep), sweep).baseline == {"model": "vit_tiny",
                                                         "model/residual": "none"}


def test_a_partial_relaunch_does_not_make_a_mixed_baseline(tmp_path):
    sweep = tmp_path / "s"
    _grid_sweep(sweep)
    # no record (a sweep from before it), and a re-launch of cait_tiny's layerscale runs only
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - model/residual=layerscale\n"
        "  sweeper:\n    params:\n      model: vit_tiny,cait_tiny\n")
    table_first = answers(_variants(sweep)).baseline  # the table's order, no sweep folder
    assert table_first == {"model": "cait_tiny", "model/residual": "layerscale"}
    # not vit_tiny (the re-launch's first) with layerscale (the table's): no launch's baseline
    assert answers(_variants(sweep), sweep).baseline == table_first


def test_the_callback_records_the_first_launchs_order_and_only_extends_it(tmp_path):
    from hydra import compose, initialize_config_dir

    from caitlab.resolvers import register_resolvers
    from caitlab.sweeps.order import RecordOrder
    from caitlab.train import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=residual_vs_depth_tiny", "name=s",
                                f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    assert "sweep_order" in cfg.hydra.callbacks
    RecordOrder().on_multirun_start(config=cfg)
    # a re-launch: the values in another order, one of them new
    params = cfg.hydra.sweeper.params
    params["model.depth"], params["model/residual"] = "16,2", "layerscale,none"
    RecordOrder().on_multirun_start(config=cfg)
    saved = yaml.safe_load((tmp_path / "s" / "sweep_order.yaml").read_text())
    assert saved == {"model.depth": ["2", "4", "8", "12", "16"],
                     "model/residual": ["none", "rezero", "rezero_norm", "layerscale"]}


def test_the_correction_is_chosen_and_stated_in_text_and_html(tmp_path, capsys):
    _depth_sweep(tmp_path / "s", none_diverged=0, seeds=8)
    assert main([str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "Verdicts (test top-1; Holm over 1 verdicts" in out
    html = (tmp_path / "s" / "report.html").read_text()
    assert "Holm over 1 verdicts: the chance of any wrong better/worse line" in html
    assert main([str(tmp_path / "s"), "--correction", "none"]) == 0
    out = capsys.readouterr().out
    assert "no correction: each verdict at α=0.05 on its own" in out and "(Holm" not in out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s"), "--correction", "bonferroni"])


def test_a_report_whose_verdicts_all_need_more_seeds_corrects_nothing(tmp_path, capsys):
    _depth_sweep(tmp_path / "s", none_diverged=0, seeds=1)
    assert main([str(tmp_path / "s")]) == 0
    heading = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Verdicts (")]
    assert heading == ["Verdicts (test top-1; none could be tested yet, so none is held to a "
                       "threshold):"]
