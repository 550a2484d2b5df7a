"""The paper's ablation grids: every run of every experiment composes and builds."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import caitlab_train
from test_config import CONF, _compose

GRIDS = {  # experiment: number of runs
    "residual_vs_depth": 16, "residual_vs_depth_tiny": 16,
    "class_token_placement": 7, "class_token_placement_tiny": 6,
    "vit_vs_cait": 7, "vit_vs_cait_tiny": 6, "demo": 4,
    "static_key_tiny": 4, "evit_keep_rate_tiny": 3, "deit_distilled": 3,
}
CHAINS = {  # experiments with stages (caitlab.stages): stage -> number of runs
    "distill_tiny": {"teacher": 1, "student": 6},
    "finetune_tiny": {"pretrain": 1, "finetune": 1, "scratch": 1},
    "cait_finetune_384": {"pretrain": 3, "finetune": 3},
}


def _grid(experiment: str) -> list[list[str]]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    axes = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(c) for c in itertools.product(*axes)]


def test_every_experiment_file_is_listed():
    assert {p.stem for p in (CONF / "experiment").glob("*.yaml")} == set(GRIDS) | set(CHAINS)


def _chain(experiment: str) -> list[tuple[str, list[list[str]]]]:
    from caitlab.stages import Chain

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"],
                      return_hydra_config=True)
    from omegaconf import OmegaConf

    def expand(lines):
        axes = [[f"{line.split('=', 1)[0]}={v}" for v in line.split("=", 1)[1].split(",")]
                for line in lines]
        return [list(c) for c in itertools.product(*axes)]

    chain = Chain(OmegaConf.to_container(cfg.stages, resolve=False))
    return chain.jobs([[]], expand, lambda job: "0123456789")


@pytest.mark.parametrize("experiment", sorted(CHAINS))
def test_every_run_of_every_stage_builds(experiment):
    from caitlab.models.checkpoint import model_from_config

    stages = _chain(experiment)
    assert {name: len(jobs) for name, jobs in stages} == CHAINS[experiment]
    seen = set()
    for name, jobs in stages:
        for overrides in jobs:
            root = [] if experiment.endswith("_tiny") else ["data.root=/x"]
            cfg = _compose(f"experiment={experiment}", *root, *overrides)
            assert cfg.name == experiment and cfg.stage == name
            with torch.device("meta"):
                model = instantiate(cfg.model).config
                model_from_config(model)  # what a downstream stage rebuilds it from
            seen.add(json.dumps([model, cfg.distillation.type, str(cfg.finetune_from), name],
                                sort_keys=True))
    assert len(seen) == sum(CHAINS[experiment].values())  # no two runs of a chain alike
    if experiment == "cait_finetune_384":
        (_, pre), (_, fine) = stages
        # each pretrain has its fine-tune, of the same model, at 384 px
        assert [[o for o in job if o.startswith("model=")] for job in fine] == \
            [[o for o in job if o.startswith("model=")] for job in pre]
        assert all("model.img_size=384" in job for job in fine)


@pytest.mark.parametrize("experiment", sorted(GRIDS))
def test_every_run_of_the_grid_builds(experiment):
    grid = _grid(experiment)
    assert len(grid) == GRIDS[experiment]
    models = []
    for overrides in grid:
        root = [] if experiment.endswith("_tiny") or experiment == "demo" else ["data.root=/x"]
        cfg = _compose(f"experiment={experiment}", *root, *overrides)
        assert cfg.name == experiment
        with torch.device("meta"):
            models.append(instantiate(cfg.model).config)
    # every run differs in its architecture: the grid really sweeps the axes
    assert len({json.dumps(m, sort_keys=True) for m in models}) == len(grid)
    if experiment == "residual_vs_depth":
        by_axes = {(m["depth"], m["residual"]): m for m in models}
        assert by_axes[(36, "layerscale")]["layerscale_init"] == 1e-6
        assert by_axes[(12, "layerscale")]["layerscale_init"] == 0.1
        assert all(m["embed_dim"] == 384 for m in models)  # DeiT-S throughout
    if experiment == "class_token_placement":
        assert {(m["class_token"], m["insert_layer"], m["ca_depth"]) for m in models} == {
            ("input", 0, 0), ("insert", 6, 0), ("insert", 8, 0), ("insert", 10, 0),
            ("insert", 11, 0), ("class_attention", 0, 1), ("class_attention", 0, 2)}
        assert {m["residual"] for m in models} == {"none"}
    if experiment == "static_key_tiny":
        assert {(m["class_token"], m["attention"]) for m in models} == {
            ("input", "standard"), ("input", "static_key"),
            ("class_attention", "standard"), ("class_attention", "static_key")}
    if experiment == "evit_keep_rate_tiny":
        assert {(m["keep_rate"], tuple(m["reorg_layers"])) for m in models} == {
            (1.0, ()), (0.7, (1, 2)), (0.5, (1, 2))}


@pytest.mark.slow
def test_a_tiny_experiment_runs_end_to_end(tmp_path):
    caitlab_train(tmp_path, "experiment=class_token_placement_tiny", "trainer=debug",
                  "logger=csv")
    summaries = [json.loads(p.read_text())
                 for p in (tmp_path / "class_token_placement_tiny").glob("*/summary.json")]
    assert len(summaries) == 6
    assert {s["status"] for s in summaries} == {"completed"}
    placements = {(s["axes"]["class_token"], s["axes"]["insert_layer"], s["axes"]["ca_depth"])
                  for s in summaries}
    assert len(placements) == 6
