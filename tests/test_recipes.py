"""The papers' recipes, exactly: every run and stage of every paper experiment, and
recipe=deit|cait, resolve to the hyperparameters of tests/fixtures/paper_recipes.yaml (each
with its source), so an edit that moves a recipe away from the paper fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from test_experiments import _chain, _compose, _grid

REFERENCE = yaml.safe_load((Path(__file__).parent / "fixtures" / "paper_recipes.yaml")
                           .read_text())
GRID_EXPERIMENTS = ("residual_vs_depth", "class_token_placement", "vit_vs_cait",
                    "deit_distilled")


def _expected(model: str, extra: dict | None = None) -> dict:
    """key -> (value, source): DeiT's recipe, CaiT's on top for a CaiT model, then ``extra``."""
    out = dict(REFERENCE["deit"])
    if model.startswith("cait"):
        out.update(REFERENCE["cait"])
    out.update(extra or {})
    return out


def _mismatches(cfg, expected: dict) -> list[str]:
    return [f"{key}={OmegaConf.select(cfg, key)!r}, the paper's {value!r} ({source})"
            for key, (value, source) in expected.items()
            if OmegaConf.select(cfg, key) != value]


@pytest.mark.parametrize("experiment", GRID_EXPERIMENTS)
def test_every_row_of_a_paper_grid_trains_with_the_papers_recipe(experiment):
    extra = REFERENCE.get(experiment, {})
    for overrides in _grid(experiment):
        cfg = _compose(f"experiment={experiment}", "data.root=/x", *overrides)
        assert not _mismatches(cfg, _expected(cfg.model.name, extra)), overrides


def test_every_stage_of_the_384_chain_trains_with_the_papers_recipe():
    for stage, jobs in _chain("cait_finetune_384"):
        for overrides in jobs:
            cfg = _compose("experiment=cait_finetune_384", "data.root=/x", *overrides)
            extra = REFERENCE["cait_finetune_384"].get(stage, {})
            assert not _mismatches(cfg, _expected(cfg.model.name, extra)), (stage, overrides)


@pytest.mark.parametrize("recipe,model", [("deit", "deit_small_patch16_224"),
                                          ("cait", "cait_s24_224")])
def test_a_recipe_is_its_papers(recipe, model):
    cfg = _compose(f"recipe={recipe}", "data=imagefolder", "data.root=/x", f"model={model}")
    assert not _mismatches(cfg, _expected(model))


def test_the_global_batch_differs_from_the_papers_as_the_fixture_says():
    cfg = _compose("experiment=vit_vs_cait", "data.root=/x")
    differs = REFERENCE["differs"]["global_batch"]
    assert cfg.trainer.devices * cfg.data.batch_size == differs["caitlab"] != differs["paper"][0]


def test_the_docs_recipe_table_is_the_fixtures():
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    import docs_reference
    import recipe_table

    page = (root / "docs" / "reference" / "experiments.md").read_text()
    assert recipe_table.table() in docs_reference.fill_tables(page)
