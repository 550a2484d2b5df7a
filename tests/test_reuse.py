"""A run folder is reused (skipped or resumed) only for the run it holds, and a skip says when
the code differs from the code that trained it (caitlab.training.reuse)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from caitlab import identity
from caitlab.errors import UserError
from caitlab.identity import first_difference
from caitlab.training.reuse import check_reuse, data_fingerprint
from conftest import clean_env, make_image_folder

TINY = ("model=vit_tiny", "model.embed_dim=32", "model.depth=1", "trainer.max_epochs=1",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "logger=csv")
PATTERNS = ("paths.*", "logger.*", "name")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, forkserver) -> Path:
    out = tmp_path_factory.mktemp("trained")
    forkserver.run(out, *TINY)
    return out


@pytest.fixture
def outputs(trained, tmp_path) -> tuple[Path, Path]:
    """A copy of the trained outputs, and its one run folder."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    (run,) = [p.parent for p in out.glob("*/*/summary.json")]
    return out, run


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}


def test_a_folder_holding_another_config_is_refused_and_kept(outputs, forkserver):
    out, run = outputs
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    recorded["optim"]["lr"] = 0.5  # as if another config had got this signature
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    before = _files(run)
    again = forkserver.run(out, *TINY, check=False)
    assert again.returncode == 2
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith("caitlab-train:")]
    # 0.002: recipe/digits.yaml's lr
    assert errors == [f"caitlab-train: error: default/{run.name} holds a run of optim.lr=0.5, "
                      "not optim.lr=0.002 as asked: two configs got one "
                      "signature; move that folder away to train this one"], again.stderr
    assert "already completed" not in again.stdout
    assert _files(run) == before


def test_a_skip_says_when_the_code_differs_from_the_runs(outputs, forkserver):
    out, run = outputs
    summary = json.loads((run / "summary.json").read_text())
    summary["provenance"]["git"].update(commit="0" * 40, dirty=True, diff_sha="abcdef12")
    (run / "summary.json").write_text(json.dumps(summary))
    again = forkserver.run(out, *TINY, env=clean_env())
    (line,) = [ln for ln in again.stdout.splitlines() if ln.startswith("already completed")]
    assert " (trained by code 0000000000+dirty.abcdef12; this is " in line


def test_a_skip_with_the_same_code_says_nothing_of_it(outputs, forkserver):
    out, run = outputs
    again = forkserver.run(out, *TINY)
    (line,) = [ln for ln in again.stdout.splitlines() if ln.startswith("already completed")]
    assert "trained by code" not in line


def test_keys_added_since_the_run_are_no_difference():
    recorded = {"model": {"depth": 4}, "optim": {"lr": 0.1}}
    requested = {"model": {"depth": 4, "new_knob": 1}, "optim": {"lr": 0.1}}
    assert first_difference(recorded, requested, PATTERNS) is None


def test_a_key_the_request_deletes_is_a_difference():
    recorded = {"ema": {"enabled": True}, "callbacks": {"stop": {"patience": 3}}}
    assert first_difference(recorded, {"callbacks": {"stop": {"patience": 3}}},
                                     PATTERNS) == ("ema.enabled", True, identity.DELETED)
    assert first_difference(recorded, {"ema": {"enabled": True}},
                                     PATTERNS) == ("callbacks.stop.patience", 3, identity.DELETED)


def test_the_first_differing_key_is_named_with_both_values():
    recorded = {"model": {"depth": 4, "embed_dim": 32}, "seed": 0}
    requested = {"model": {"depth": 12, "embed_dim": 64}, "seed": 0}
    assert first_difference(recorded, requested, PATTERNS) == ("model.depth", 4, 12)


def test_places_display_and_numbers_written_otherwise_are_no_difference():
    recorded = {"data": {"root": "/a/digits"}, "paths": {"output_dir": "/a"}, "name": "x",
                "model": {"mlp_ratio": 4.0},
                "finetune_from": "/a/outputs/pre/5d41402abc/checkpoints/best.ckpt"}
    requested = {"data": {"root": "/b/digits"}, "paths": {"output_dir": "/b"}, "name": "y",
                 "model": {"mlp_ratio": 4},
                 "finetune_from": "/b/moved/pre/5d41402abc/checkpoints/best.ckpt"}
    assert first_difference(recorded, requested, PATTERNS) is None


def test_weights_of_another_run_are_a_difference():
    recorded = {"finetune_from": "/a/pre/5d41402abc/checkpoints/best.ckpt"}
    requested = {"finetune_from": "/a/pre/7d793037a0/checkpoints/best.ckpt"}
    assert first_difference(recorded, requested, PATTERNS)[0] == "finetune_from"


def _run_on(tmp_path: Path, root: Path) -> tuple[Path, dict]:
    """A run folder that trained on the images at ``root``, and its summary."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": str(root)}, "seed": 0}))
    return run, {"status": "completed", "data_fingerprint": data_fingerprint(root)}


def test_the_same_images_moved_elsewhere_are_the_runs_data(tmp_path):
    old = make_image_folder(tmp_path / "a")
    run, summary = _run_on(tmp_path, old)
    moved = shutil.copytree(old, tmp_path / "b")
    check_reuse(run, summary, OmegaConf.create({"data": {"root": str(moved)}, "seed": 0}))


def test_other_images_at_another_place_are_refused_naming_data_root(tmp_path):
    run, summary = _run_on(tmp_path, make_image_folder(tmp_path / "a"))
    other = make_image_folder(tmp_path / "b", per_class=5)
    with pytest.raises(UserError, match=r"was trained on the data at .*/a; .*/b holds other "
                                        r"files \(data.root\)"):
        check_reuse(run, summary, OmegaConf.create({"data": {"root": str(other)}, "seed": 0}))


def test_a_fingerprint_changes_with_a_file_renamed_or_resized(tmp_path):
    root = make_image_folder(tmp_path / "a")
    before = data_fingerprint(root)
    first = sorted(root.rglob("*.png"))[0]
    first.rename(first.with_name("renamed.png"))
    renamed = data_fingerprint(root)
    with open(sorted(root.rglob("*.png"))[0], "ab") as f:
        f.write(b"\0")
    assert len({before, renamed, data_fingerprint(root)}) == 3


def test_a_run_from_before_a_key_existed_had_its_implicit_value():
    # data.remode came later; runs without it erased with timm's const fill
    recorded = {"data": {"reprob": 0.25}}
    assert first_difference(recorded, {"data": {"reprob": 0.25, "remode": "const"}},
                                     PATTERNS) is None
    assert first_difference(recorded, {"data": {"reprob": 0.25, "remode": "pixel"}},
                                     PATTERNS) == ("data.remode", "const", "pixel")
