"""caitlab-report: rows, seed statistics, states, plots, and the wandb paths."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from caitlab.analysis.report import collect_runs, group_variants, main, runs_from_wandb, table_rows
from conftest import clean_env

PNG = b"\x89PNG\r\n\x1a\n"


def _run(sweep: Path, sig: str, *, model="vit_tiny", token="input", residual="none", depth=4,
         seed=0, status="completed", top1=0.9, variant=None, **extra) -> dict:
    axes = {"model": model, "class_token": token, "ca_depth": 2 if token == "class_attention"
            else 0, "insert_layer": 0, "residual": residual, "depth": depth, "embed_dim": 64,
            "layerscale_init": 0.1 if residual == "layerscale" else None}
    summary = {"status": status, "signature": sig, "seed": seed,
               "variant": variant or f"{model}-{token}-{residual}-{depth}", "axes": axes,
               "model": {"name": model, "params": 140_000 if model == "vit_tiny" else 200_000,
                         "macs": 2_000_000 * depth}, "epochs": 3, "wall_s": 20.0,
               "images_per_s": 2000.0 / depth, **extra}
    if status == "completed":
        summary.update({"test/top1": top1, "test/top5": 0.99, "val/top1_best": top1 - 0.01})
    folder = sweep / sig
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss_step", "val/top1"])
        w.writeheader()
        for epoch in range(3):
            w.writerow({"epoch": epoch, "step": epoch * 10 + 5, "train/loss_step": 1.0})
            w.writerow({"epoch": epoch, "step": epoch * 10 + 9, "val/top1": top1 * (epoch + 1) / 3})
    return summary


@pytest.fixture
def sweep(tmp_path) -> Path:
    s = tmp_path / "sweep"
    _run(s, "a0", seed=0, top1=0.90)
    _run(s, "a1", seed=1, top1=0.92)
    _run(s, "b0", model="cait_tiny", token="class_attention", residual="layerscale", top1=0.95)
    _run(s, "c0", residual="layerscale", depth=8, top1=0.93)
    _run(s, "c1", residual="none", depth=8, status="diverged", diverged_epoch=3)
    _run(s, "d0", residual="rezero", status="failed", error="RuntimeError: boom")
    _run(s, "e0", residual="rezero_norm", status="running")
    return s


def test_rows_group_seeds_and_keep_every_state(sweep):
    rows = table_rows(group_variants(collect_runs(sweep)))
    assert len(rows) == 6  # a0+a1 are one variant
    by = {(r["model"], r["residual"], r["depth"]): r for r in rows}
    seeds = by[("vit_tiny", "none", "4")]
    assert seeds["test top-1"] == "91.00 ± 1.41 (n=2)" and seeds["runs"] == "2"
    assert seeds["state"] == "2 completed"
    assert by[("vit_tiny", "none", "8")]["state"] == "diverged at epoch 3"
    assert by[("vit_tiny", "none", "8")]["test top-1"] == ""
    assert by[("vit_tiny", "rezero", "4")]["state"] == "failed"
    assert by[("vit_tiny", "rezero_norm", "4")]["state"] == "running"
    cait = by[("cait_tiny", "layerscale", "4")]
    assert cait["class token"] == "class_attention" and cait["CA layers"] == "2"
    assert cait["eps"] == "0.1" and cait["test top-1"] == "95.00"
    assert cait["params (M)"] == "0.20" and cait["GMACs"] == "0.008"


def test_cli_writes_table_csv_and_valid_plots(sweep, capsys):
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "91.00 ± 1.41 (n=2)" in out and "diverged at epoch 3" in out
    assert (sweep / "report.md").read_text().startswith("| model | class token |")
    with open(sweep / "report.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    for name in ("top1_vs_depth", "top1_vs_macs", "top1_vs_throughput", "val_curves"):
        data = (sweep / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name


def test_missing_or_empty_sweep_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs" in capsys.readouterr().err


class _FakeWandbRun:
    def __init__(self, name, summary, state="finished", history=()):
        self.name, self.id, self.state = name, name, state
        self.summary, self.config = summary, {"seed": summary.get("seed", 0), "lr": 1e-3}
        self._history = list(history)

    def scan_history(self, keys=None):
        # as wandb's: only the rows that have every key asked for
        return iter([r for r in self._history if all(k in r for k in keys or ())])


class _FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_report_from_wandb_runs_matches_the_folder_path(sweep):
    folder_runs = collect_runs(sweep)
    fake = _FakeApi([
        _FakeWandbRun(r.name, {**r.summary, "_runtime": 12},
                      history=[{"epoch": e, "val/top1": t} for e, t in r.curve])
        for r in folder_runs
    ] + [_FakeWandbRun("crashed-one", {"axes": {"model": "vit_tiny"}, "variant": "x"},
                       state="crashed")])
    runs = runs_from_wandb(fake, "me/caitlab", group="sweep", tags=["residual=none"])
    assert fake.calls == [("me/caitlab", {"group": "sweep", "tags": {"$in": ["residual=none"]}})]
    rows = table_rows(group_variants(runs))
    # the same table as from the folder, plus the crashed run with its wandb state
    assert [r for r in rows if r["state"] != "failed" or r["residual"]] == table_rows(
        group_variants(folder_runs))
    crashed = [r for r in rows if r["state"] == "failed" and not r["residual"]]
    assert len(crashed) == 1 and crashed[0]["model"] == "vit_tiny"
    assert all(r.curve for r in runs if r.name != "crashed-one")


def test_wandb_summary_run_gets_the_table_and_plots(sweep):
    _run(sweep, "f0", residual="layerscale", top1=0.91)  # vit_tiny d4: layerscale vs none
    # as a user runs it, in a process of its own: wandb's service and settings are
    # per-process state that the other tests of this process leave behind
    proc = subprocess.run([sys.executable, "-m", "caitlab.analysis.report", str(sweep), "--wandb"],
                          capture_output=True, text=True, timeout=300,
                          env=clean_env(WANDB_MODE="offline", WANDB_SILENT="true"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "table, verdicts and plots logged to run" in proc.stdout
    (record,) = list((sweep / "wandb").glob("offline-run-*/run-*.wandb"))
    data = record.read_bytes()
    assert b"comparison" in data and b"table-file" in data and b"image-file" in data
    # the verdicts and numbers the report printed, in the summary run's tables
    tables = {p.name.split("_")[0]: json.loads(p.read_text())
              for p in (sweep / "wandb").glob("offline-run-*/files/media/table/*.table.json")}
    assert set(tables) == {"comparison", "verdicts"}
    columns = tables["comparison"]["columns"]
    assert {"test_top1_mean", "test_top1_ci_low", "delta", "p"} <= set(columns)
    means = sorted(r[columns.index("test_top1_mean")] for r in tables["comparison"]["data"]
                   if r[columns.index("test_top1_mean")] is not None)
    assert means == pytest.approx([91.0, 91.0, 93.0, 95.0])  # a0+a1 (90, 92), f0, c0, b0
    lines = [r[0] for r in tables["verdicts"]["data"]]
    assert lines and all(line in proc.stdout for line in lines)


# --- axes from the config, whatever the model ------------------------------------------------

VIT_AXES = {"model": "vit_tiny", "img_size": [8, 8], "patch_size": [2, 2], "depth": 4,
            "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2.0, "talking_heads": False,
            "in_chans": 1, "num_classes": 10, "class_token": "input", "insert_layer": 0,
            "ca_depth": 0, "residual": "none", "layerscale_init": None, "attention": "standard",
            "keep_rate": None, "reorg_layers": None, "drop_path_rate": 0.0}


def _summary(sweep: Path, sig: str, axes: dict, target: str, top1: float = 0.9,
             seed: int = 0) -> None:
    """A completed run's summary.json as caitlab-train writes it (axes: every scalar of the
    model's config; model.target: its ``_target_``)."""
    variant = json.dumps(axes, sort_keys=True)
    summary = {"status": "completed", "signature": sig, "seed": seed, "variant": variant,
               "axes": axes, "model": {"name": axes["model"], "target": target,
                                       "params": 5000, "macs": 80_000},
               "test/top1": top1, "test/top5": 0.99, "val/top1_best": top1, "epochs": 2}
    (sweep / sig).mkdir(parents=True)
    (sweep / sig / "summary.json").write_text(json.dumps(summary))


def _own(channels: int, kernel_size: int = 3, **extra) -> dict:
    return {"model": "MyNet", "in_chans": 1, "num_classes": 10, "img_size": 8,
            "channels": channels, "kernel_size": kernel_size, **extra}


def test_a_projects_own_model_shows_its_arguments_beside_caitlabs(tmp_path, capsys):
    sweep = tmp_path / "mynet_vs_vit"
    _summary(sweep, "m0", _own(16), "mynet.MyNet", 0.80, seed=0)
    _summary(sweep, "m1", _own(16), "mynet.MyNet", 0.84, seed=1)
    _summary(sweep, "v0", VIT_AXES, "caitlab.models.create_model", 0.70)
    assert main([str(sweep)]) == 0
    rows = {r["model"]: r for r in table_rows(group_variants(collect_runs(sweep)))}
    mynet, vit = rows["MyNet"], rows["vit_tiny"]
    # its own constructor arguments are columns; the data's input ones and what only tells
    # caitlab's models apart (talking heads, heads...) are not
    assert list(mynet)[:9] == ["model", "class token", "CA layers", "residual", "eps", "depth",
                               "width", "channels", "kernel_size"]
    assert (mynet["channels"], mynet["kernel_size"], mynet["test top-1"]) == (
        "16", "3", "82.00 ± 2.83 (n=2)")
    assert (vit["channels"], vit["class token"], vit["residual"], vit["width"]) == (
        "", "input", "none", "64")
    for hidden in ("in_chans", "num_classes", "img_size", "talking_heads", "num_heads",
                   "patch_size", "mlp_ratio", "drop_path_rate"):
        assert hidden not in mynet
    assert mynet["GMACs"] == "8.0e-05"  # not 0.000
    assert "| MyNet |  |  |  |  |  |  | 16 | 3 |" in capsys.readouterr().out


def test_a_sweep_of_only_a_projects_model_drops_caitlabs_columns(tmp_path):
    sweep = tmp_path / "widths"
    # its own "width" is not caitlab's width (embed_dim): it keeps its name
    _summary(sweep, "a", _own(8, width=2), "mynet.MyNet", 0.7)
    _summary(sweep, "b", _own(32, width=2), "mynet.MyNet", 0.9)
    rows = table_rows(group_variants(collect_runs(sweep)))
    assert [list(r)[:4] for r in rows] == [["model", "channels", "kernel_size", "width"]] * 2
    assert [(r["channels"], r["width"], r["test top-1"]) for r in rows] == [
        ("8", "2", "70.00"), ("32", "2", "90.00")]
    # beside caitlab's width column it is named as the config key
    _summary(sweep, "v", VIT_AXES, "caitlab.models.create_model", 0.6)
    rows = {r["model"]: r for r in table_rows(group_variants(collect_runs(sweep)))}
    assert rows["vit_tiny"]["width"] == "64" and rows["vit_tiny"]["model.width"] == ""
    assert rows["MyNet"]["width"] == "" and rows["MyNet"]["model.width"] == "2"


def test_a_caitlab_axis_the_sweep_varies_is_a_column(tmp_path):
    """vit_tiny and cait_tiny differ in talking heads by design (the model column says so);
    mlp_ratio=2,4 within one model is what the sweep varied."""
    sweep = tmp_path / "mlp"
    cait = {**VIT_AXES, "model": "cait_tiny", "talking_heads": True,
            "class_token": "class_attention", "ca_depth": 2}
    for sig, axes in (("v2", VIT_AXES), ("v4", {**VIT_AXES, "mlp_ratio": 4.0}),
                      ("c2", cait), ("c4", {**cait, "mlp_ratio": 4.0})):
        _summary(sweep, sig, axes, "caitlab.models.create_model")
    rows = table_rows(group_variants(collect_runs(sweep)))
    assert [(r["model"], r["mlp_ratio"]) for r in rows] == [
        ("cait_tiny", "2"), ("cait_tiny", "4"), ("vit_tiny", "2"), ("vit_tiny", "4")]
    assert "talking_heads" not in rows[0] and "num_heads" not in rows[0]
    # and a sweep that varies none keeps caitlab's columns as they were
    plain = table_rows(group_variants(collect_runs(sweep))[:1])
    assert list(plain[0])[:8] == ["model", "class token", "CA layers", "residual", "eps",
                                  "depth", "width", "params (M)"]


def test_a_declared_axis_is_a_column_a_label_and_a_sort_order(tmp_path, monkeypatch):
    """The report reads its architecture columns from caitlab.models.axes: declaring an axis
    there is all it takes."""
    from caitlab.analysis.report import variant_label
    from caitlab.models import axes

    heads = axes.Axis("heads", ("num_heads",), label=lambda a: f"h{a['num_heads']}")
    monkeypatch.setattr(axes, "ARCHITECTURE", (*axes.ARCHITECTURE, heads))
    monkeypatch.setattr(axes, "ARCHITECTURE_KEYS", axes.ARCHITECTURE_KEYS | {"num_heads"})
    sweep = tmp_path / "heads"
    for sig, n in (("a", 8), ("b", 4)):
        _summary(sweep, sig, {**VIT_AXES, "num_heads": n}, "caitlab.models.create_model")
    variants = group_variants(collect_runs(sweep))
    rows = table_rows(variants)
    assert list(rows[0])[:8] == ["model", "class token", "CA layers", "residual", "eps",
                                 "depth", "width", "heads"]
    assert [r["heads"] for r in rows] == ["4", "8"] and "num_heads" not in rows[0]
    assert sorted(variant_label(v) for v in variants) == ["vit_tiny input none d4 h4",
                                                          "vit_tiny input none d4 h8"]


def test_device_hours_add_up_per_variant_and_for_the_sweep(tmp_path, capsys):
    s = tmp_path / "sweep"
    _run(s, "a0", seed=0, device_hours=0.5)
    _run(s, "a1", seed=1, device_hours=0.25)  # a0 and a1: one variant, two seeds
    _run(s, "b0", depth=8, device_hours=2.0)
    _run(s, "c0", depth=12)  # written before runs recorded device-hours
    by = {r["depth"]: r for r in table_rows(group_variants(collect_runs(s)))}
    assert by["4"]["device-h"] == "0.75" and by["8"]["device-h"] == "2"
    assert by["12"]["device-h"] == ""
    assert main([str(s)]) == 0
    assert "4 runs, 3 variants, 2.75 device-hours" in capsys.readouterr().out


def test_run_folders_inside_a_code_snapshot_are_not_the_sweeps(tmp_path):
    # a submission's code snapshot (.submitit/code-*) holds the checkout's test fixtures
    s = tmp_path / "sweep"
    _run(s, "a0")
    _run(s / ".submitit" / "code-1" / "code" / "tests" / "fixtures", "zz")
    assert [r.folder.name for r in collect_runs(s)] == ["a0"]


def test_an_unreadable_run_is_named_and_left_out_of_every_statistic(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run(sweep, "a0", top1=0.90)
    _run(sweep, "b0", residual="layerscale", top1=0.95)
    _run(sweep, "c0", residual="rezero", top1=0.99)
    cut = sweep / "c0" / "summary.json"
    cut.write_text(cut.read_text()[:40])  # a crash or a full disk cut it short
    assert main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert f"caitlab-report: warning: {cut}: " in err
    assert "left out of every table and verdict" in err
    rows = json.loads((sweep / "report.json").read_text())["rows"]
    assert sorted(r["residual"] for r in rows) == ["layerscale", "none"]
    assert "| unreadable |" not in out and "\n2 runs, 2 variants" in out


def test_a_completed_run_with_a_nan_top1_is_left_out_of_its_variants_statistics(tmp_path,
                                                                                capsys):
    sweep = tmp_path / "sweep"
    for seed, top1 in enumerate((0.90, 0.91, 0.92)):
        _run(sweep, f"a{seed}", seed=seed, top1=top1)
    for seed, top1 in enumerate((float("nan"), 0.95, 0.96)):
        _run(sweep, f"b{seed}", seed=seed, residual="layerscale", top1=top1)
    assert main([str(sweep)]) == 0
    rows = {r["residual"]: r for r in json.loads((sweep / "report.json").read_text())["rows"]}
    assert rows["layerscale"]["test_top1_n"] == 2
    assert rows["layerscale"]["test_top1_mean"] == pytest.approx(95.5)
