"""scripts/gpu_check.py, the prepared GPU check, in its reduced CPU version: every check runs
(tiny models, Dynamo's eager backend, DDP on 2 CPU processes), so that the script a GPU
machine's few minutes go to cannot rot unseen; and a check that breaks is a FAILED row and a
non-zero exit, never a silent gap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_reduced_check_runs_every_check_and_writes_its_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--reduced", "--json", str(out), "--no-doc"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["failed"] == 0 and result["reduced"] is True
    assert [(r["check"], r["model"], r["variant"]) for r in rows] == [
        ("step", "deit_small_patch16_224", "eager"), ("step", "cait_s24_224", "eager"),
        ("step", "deit_small_patch16_224", "compile"), ("step", "cait_s24_224", "compile"),
        ("variant", "deit_small_patch16_224", "static_key"),
        ("variant", "deit_small_patch16_224", "evit_0.7"),
        ("train", "deit_small_patch16_224", "caitlab-train"),
        ("ddp", "deit_small_patch16_224", "2 devices")]
    assert all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        assert r["ours_img_s"] > 0, r
    steps = {(r["model"], r["compiled"]): r for r in rows if r["check"] == "step"}
    for r in steps.values():
        # the same weights: timm's model computes our logits
        assert r["max_abs_logit_diff"] < 1e-4 and r["timm_img_s"] > 0
        assert 0 < r["ours_mfu"] < 1 and 0 < r["timm_mfu"] < 1
    train, ddp = rows[-2], rows[-1]
    # the whole path is compared with the model-only step of the same model and compilation
    assert train["timm_img_s"] == steps[("deit_small_patch16_224", False)]["ours_img_s"]
    assert ddp["timm_img_s"] == train["ours_img_s"]  # efficiency against one device's run
    assert 0 < ddp["ratio"] < 2
    # the table printed is the JSON's: one line per row, with its status
    table = printed[printed.rindex("check "):]
    assert sum(line.endswith("  ok") for line in table.splitlines()) == len(rows)


def test_a_broken_check_is_a_failed_row_and_exit_1_and_the_others_still_run(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(gpu_check.VARIANTS, "evit_2.0", {"keep_rate": 2.0})
    out = tmp_path / "check.json"
    assert gpu_check.main(["--reduced", "--only", "variant", "--json", str(out),
                           "--no-doc"]) == 1
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["static_key"]["status"] == "ok" and rows["evit_0.7"]["status"] == "ok"
    assert rows["evit_2.0"]["status"].startswith("FAILED: ")
    assert "keep_rate" in rows["evit_2.0"]["status"]
    assert "FAILED: " in capsys.readouterr().out


def test_checks_past_the_budget_are_skipped_rows(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--reduced", "--only", "step", "--budget-s", "0",
                           "--json", str(out), "--doc-out", str(tmp_path / "doc")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"skipped: time budget"}
    # the docs' data file holds the same rows (--doc-out: never docs/ from a test)
    doc = (tmp_path / "doc" / "gpu_check.md").read_text()
    assert doc.count("| skipped: time budget |") == 4
