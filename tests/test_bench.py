"""caitlab-bench: real measurements of cait_tiny on the CPU, MFU arithmetic, the paper table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from caitlab.analysis import bench, paper
from caitlab.analysis.bench import main
from caitlab.analysis.paper import PAPER_GMACS, PAPER_PARAMS_M
from caitlab.analysis.timing import matmul_peak_flops, mfu
from caitlab.models import count_macs, count_params, create_model, list_models

# Small and steady: one thread times far more reliably than two on a busy 2-core machine.
TINY = ["cait_tiny", "--batch", "8", "--warmup", "1", "--repeats", "2", "--iters", "2",
        "--device", "cpu", "--threads", "1"]
PHASE_KEYS = {"images_per_s", "ms_per_batch", "mfu", "peak_mem_bytes"}


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_run():
    """One real CPU benchmark of cait_tiny (img 8, batch 8) on 1 thread, shared by the tests
    below, and the thread count it left behind: the caller's 2 threads before it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the bench's --threads 1, so a restore shows
    try:
        result = bench.bench("cait_tiny", batch=8, device="cpu", warmup=1, repeats=2,
                             iters=2, threads=1)
        return result, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_result(tiny_run):
    return tiny_run[0]


@pytest.fixture(scope="module")
def paper_rows():
    return paper.compare_paper()


def test_tiny_cpu_numbers_are_real(tiny_run):
    r, threads_after = tiny_run
    model = create_model("cait_tiny")
    assert r["params"] == count_params(model)
    assert r["macs"] == count_macs(model) > 0
    assert r["img_size"] == [8, 8] and r["batch"] == 8 and r["device"] == "cpu"
    assert r["matmul_peak_flops"] > 1e8
    for phase in ("inference", "training"):
        p = r[phase]
        assert PHASE_KEYS <= set(p)
        assert p["images_per_s"] > 0 and p["ms_per_batch"] > 0
        assert 0 < p["mfu"] < 1, (phase, p["mfu"])
        # img/s and ms/batch describe the same median
        assert p["images_per_s"] == pytest.approx(8 * 1000 / p["ms_per_batch"])
        assert p["mfu"] == pytest.approx(
            mfu(p["images_per_s"], r["macs"], r["matmul_peak_flops"], phase == "training"))
        assert p["peak_mem_kind"] == "process_peak_rss_growth" and p["peak_mem_bytes"] >= 0
        assert len(p["repeat_s"]) == 2
    assert r["threads"] == 1  # timed on the --threads asked for
    assert threads_after == 2  # and the caller's thread count restored afterwards


def test_table_has_one_row_per_phase(tiny_result):
    table = bench.format_table(tiny_result)
    for column in ("params (M)", "GMACs", "img/s", "ms/batch", "MFU %", "peak memory"):
        assert column in table
    rows = {ln.split()[0]: ln.split() for ln in table.splitlines() if ln.strip()}
    assert f"{tiny_result['params'] / 1e6:.2f}" == rows["inference"][1] == rows["training"][1]
    assert float(rows["training"][3]) == pytest.approx(
        tiny_result["training"]["images_per_s"], abs=0.06)
    assert "RSS" in table and "matmul peak" in table


def test_cli_json_keys_and_precision_bf16(capsys):
    r = run_json(capsys, *TINY, "--precision", "bf16")
    assert {"model", "params", "macs", "device", "precision", "batch", "inference", "training",
            "matmul_peak_flops"} <= set(r)
    assert r["model"] == "cait_tiny" and r["precision"] == "bf16" and r["batch"] == 8
    for phase in ("inference", "training"):
        assert PHASE_KEYS <= set(r[phase])
        assert r[phase]["images_per_s"] > 0 and r[phase]["mfu"] > 0
        # CPUs without bf16 matmul units emulate the peak's bf16 matmul, which can then run
        # slower than the tiny model's mostly non-matmul step: a figure not to trust, and the
        # result says so rather than printing it silently
        if r[phase]["mfu"] >= 1:
            assert any("MFU above 100%" in w for w in r["warnings"])


def test_cli_text_output(capsys):
    assert main(["cait_tiny", "--no-throughput"]) == 0
    out = capsys.readouterr().out
    model_row = next(ln for ln in out.splitlines() if ln.startswith("model"))
    assert model_row.split()[1] == f"{count_params(create_model('cait_tiny')) / 1e6:.2f}"


def test_matmul_peak_on_cpu():
    assert matmul_peak_flops("cpu", torch.float32, size=512, repeats=3) > 1e8


def test_mfu_arithmetic():
    # 1000 img/s x 2 GMACs = 4 TFLOP/s forward, 12 TFLOP/s training, against a 100 TFLOP/s peak
    assert mfu(1000, 2e9, 100e12, training=False) == pytest.approx(0.04)
    assert mfu(1000, 2e9, 100e12, training=True) == pytest.approx(0.12)
    assert mfu(0, 2e9, 1e12, training=True) == 0


def test_set_overrides_change_the_model(capsys):
    r = run_json(capsys, "cait_tiny", "--set", "depth=2", "--set", "talking_heads=false",
                 "--set", "layerscale_init=1e-5", "--no-throughput")
    expected = create_model("cait_tiny", depth=2, talking_heads=False, layerscale_init=1e-5)
    assert r["params"] == count_params(expected) < count_params(create_model("cait_tiny"))
    assert r["macs"] == count_macs(expected)
    assert r["overrides"] == {"depth": 2, "talking_heads": False, "layerscale_init": 1e-5}
    assert r["inference"] is None and r["training"] is None


def test_img_size_rebuilds_the_model(capsys):
    r = run_json(capsys, "cait_tiny", "--img-size", "16", "--no-throughput")
    assert r["img_size"] == [16, 16]
    assert r["macs"] == count_macs(create_model("cait_tiny", img_size=16))


def test_big_model_costs_nothing_without_throughput(capsys):
    r = run_json(capsys, "cait_m48_448", "--no-throughput")
    assert round(r["params"] / 1e6, 1) == 356.5  # 448 px: the position embedding grows
    assert round(r["macs"] / 1e9, 1) == 329.1


def test_compare_paper_lists_every_variant(paper_rows, capsys):
    names = [r["model"] for r in paper_rows]
    expected = {n for n in list_models()
                if n.startswith(("cait_", "deit_")) and not n.endswith("_tiny")}
    assert set(names) == expected and len(names) == len(set(names))
    assert "cait_m48_448" in names and set(PAPER_PARAMS_M) <= set(names)
    for r in paper_rows:
        assert round(r["params"] / 1e6, 1) == PAPER_PARAMS_M[r["model"]], r
        paper = PAPER_GMACS[r["model"]]
        if paper is not None:  # within 2%, or the paper's rounding (DeiT-Ti: 1.25 vs 1.3)
            assert r["gmacs"] == pytest.approx(paper, rel=0.02, abs=0.06), r
    text = bench.format_compare(paper_rows)
    for name in names:
        assert name in text
    assert "224 px" in text and "-" in text.split("cait_xs36_224")[1].splitlines()[0]


def test_compare_paper_cli(monkeypatch, paper_rows, capsys):
    monkeypatch.setattr(bench, "compare_paper", lambda: paper_rows)  # computed once above
    r = run_json(capsys, "--compare-paper", "--no-throughput")
    assert [row["model"] for row in r["compare_paper"]] == [row["model"] for row in paper_rows]
    assert main(["--compare-paper", "--no-throughput"]) == 0
    assert "cait_m48_448" in capsys.readouterr().out


def test_params_at_size_matches_a_rebuild():
    with torch.device("meta"):
        native = create_model("cait_xxs24_384")
        at_224 = create_model("cait_xxs24_384", img_size=224)
    assert paper.params_at_size(native, 224) == count_params(at_224)


@pytest.mark.parametrize("argv,needle", [
    (["cait_tinyy"], "unknown model name 'cait_tinyy'"),
    (["cait_tiny", "--set", "embed_dim=30"], "embed_dim"),
    (["cait_tiny", "--set", "no_such_arg=1"], "no_such_arg"),
    (["cait_tiny", "--set", "depth"], "KEY=VALUE"),
    (["cait_tiny", "--img-size", "9"], "img_size=9"),
    ([], "MODEL"),
])
def test_bad_requests_exit_2_with_one_line(argv, needle, capsys):
    assert main([*argv, "--no-throughput"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caitlab-bench: error: ")
    assert needle in lines[0]


def test_help_is_quick_from_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "caitlab.analysis.bench", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "--compare-paper" in proc.stdout and "--precision" in proc.stdout
    # --help must not pay for torch
    check = subprocess.run(
        [sys.executable, "-c", "import sys, caitlab.analysis.bench; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "False"


def test_overrides_are_yaml_scalars():
    assert bench.parse_overrides(
        ["depth=12", "talking_heads=false", "layerscale_init=1e-5", "residual=layerscale",
         "img_size=[16, 24]", "class_token=none"]
    ) == {"depth": 12, "talking_heads": False, "layerscale_init": 1e-5,
          "residual": "layerscale", "img_size": [16, 24], "class_token": "none"}


def test_impossible_mfu_is_flagged(tiny_result):
    assert isinstance(tiny_result["warnings"], list) and tiny_result["threads"] == 1
    fake = {"inference": {"mfu": 0.5}, "training": {"mfu": 2.0}}
    notes = bench._warnings(fake, torch.device("cuda"))  # cuda: no load-average note
    assert len(notes) == 1 and "MFU above 100% (training)" in notes[0]


def test_compare_prints_macs_saved_per_value(capsys):
    out = run_json(capsys, "vit_tiny", "--compare", "keep_rate=1.0,0.7,0.5", "--no-throughput")
    assert out["compare"]["key"] == "keep_rate"
    results = out["compare"]["results"]
    assert [r["overrides"]["keep_rate"] for r in results] == [1.0, 0.7, 0.5]
    macs = [r["macs"] for r in results]
    assert macs[0] > macs[1] > macs[2]  # EViT drops tokens, so MACs fall
    assert len({r["params"] for r in results}) == 1  # and no parameter changes
    assert main(["vit_tiny", "--compare", "keep_rate=1.0,0.7", "--no-throughput"]) == 0
    table = capsys.readouterr().out
    assert "0.7" in table and f"{macs[1] / macs[0]:.2f}" in table


@pytest.mark.parametrize("argv,message", [
    (["vit_tiny", "--compare", "keep_rate"], "--compare expects KEY=V1,V2"),
    (["vit_tiny", "--compare", "keep_rate=0.7"], "give at least two values"),
    (["--compare", "keep_rate=1,0.5"], "--compare needs a MODEL"),
])
def test_compare_bad_requests_are_one_line_errors(capsys, argv, message):
    assert main([*argv, "--no-throughput"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("caitlab-bench: error:") and message in err and "\n" not in err


# --- a project's own model: by its dotted path, or a run folder of it -------------------------


@pytest.fixture
def own_project(tmp_path, monkeypatch):
    """caitlab-bench run in a copy of examples/own_project: its ``mynet`` package importable
    as a researcher's would be, and forgotten afterwards."""
    import shutil
    from pathlib import Path

    project = tmp_path / "own_project"
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "own_project", project)
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    yield project
    for name in [m for m in sys.modules if m == "mynet" or m.startswith("mynet.")]:
        del sys.modules[name]


def _mynet(**kwargs):
    from mynet import MyNet

    return MyNet(**kwargs)


def test_a_projects_own_class_by_its_dotted_path(own_project, capsys):
    r = run_json(capsys, "mynet.MyNet", "--set", "channels=32", "--batch", "4", "--warmup",
                 "0", "--repeats", "1", "--iters", "1", "--device", "cpu", "--threads", "1",
                 "--matmul-size", "64")
    net = _mynet(channels=32)
    # its input from the constructor's defaults (in_chans=1, img_size=8)
    assert (r["built"], r["in_chans"], r["img_size"]) == ("mynet.MyNet", 1, [8, 8])
    assert r["params"] == count_params(net) and r["macs"] == count_macs(net, 8, 1) > 0
    assert r["training"]["images_per_s"] > 0 and r["inference"]["images_per_s"] > 0
    r = run_json(capsys, "mynet.MyNet", "--set", "in_chans=3", "--img-size", "16",
                 "--no-throughput")
    assert (r["in_chans"], r["img_size"]) == (3, [16, 16])
    assert r["macs"] == count_macs(_mynet(in_chans=3, img_size=16), 16, 3)
    assert main(["mynet.MyNet", "--compare", "channels=8,16", "--no-throughput"]) == 0
    assert "mynet.MyNet: channels compared" in capsys.readouterr().out


def test_a_run_folder_benches_the_model_it_trained(own_project, capsys):
    """The model section of the run's config.yaml (resolved, as caitlab-train writes it)."""
    run = own_project / "outputs" / "mynet_vs_vit" / "0123456789"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "model:\n  _target_: mynet.MyNet\n  in_chans: 1\n  num_classes: 10\n  img_size: 8\n"
        "  channels: 12\n  kernel_size: 5\ndata:\n  _target_: caitlab.data.DigitsDataModule\n"
        "  in_chans: 1\n  img_size: 8\n")
    r = run_json(capsys, str(run.relative_to(own_project)), "--no-throughput")
    net = _mynet(channels=12, kernel_size=5)
    assert r["built"] == "mynet.MyNet" and r["params"] == count_params(net)
    assert r["macs"] == count_macs(net, 8, 1)
    assert main([str(run), "--no-throughput"]) == 0
    assert capsys.readouterr().out.startswith(f"{run} (mynet.MyNet)  img 8x8")
    # a run of one of caitlab's models: its registered name, and its arguments as trained
    caitlab_run = own_project / "outputs" / "x" / "vit"
    caitlab_run.mkdir(parents=True)
    (caitlab_run / "config.yaml").write_text(
        "model:\n  _target_: caitlab.models.create_model\n  name: vit_tiny\n  depth: 2\n"
        "  embed_dim: 32\n  in_chans: 1\n  num_classes: 10\n")
    r = run_json(capsys, str(caitlab_run), "--no-throughput")
    expected = create_model("vit_tiny", depth=2, embed_dim=32)
    assert r["built"] == "vit_tiny" and r["params"] == count_params(expected)
    assert r["macs"] == count_macs(expected)
    # the project's model config: ${data...} values left to the constructor's defaults
    r = run_json(capsys, "conf/model/mynet.yaml", "--set", "channels=4", "--no-throughput")
    assert r["built"] == "mynet.MyNet" and r["params"] == count_params(_mynet(channels=4))


@pytest.mark.parametrize("argv,message", [
    (["mynet.MyNett"], "cannot import mynet.MyNett: mynet has no 'MyNett' "
                       "(did you mean mynet.MyNet?)"),
    (["mynett.MyNet"], "cannot import mynett.MyNet: No module named 'mynett'"),
    (["mynet.MyNet", "--set", "kernel_size=4"], "kernel_size=4 must be odd"),
    (["mynet.MyNet", "--set", "kernal=5"], "unexpected keyword argument 'kernal'"),
    (["mynet.MyNet", "--set", "in_chans=2", "--set", "img_size=0"], "img_size=0 must be >= 2"),
    (["outputs/nope"], "outputs/nope: no such run folder or file"),
    (["conf"], "conf: no config.yaml there (a caitlab-train run folder holds one)"),
    (["conf/data/digits_small.yaml"], "no model._target_ (neither a caitlab-train run's "
                                      "config.yaml nor a model config)"),
    (["vit_tinyy"], "unknown model name 'vit_tinyy' (did you mean vit_tiny"),
])
def test_a_projects_model_mistakes_are_one_line(own_project, capsys, argv, message):
    assert main([*argv, "--no-throughput"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "\n" not in captured.err.strip()
    assert captured.err.startswith("caitlab-bench: error: ") and message in captured.err
