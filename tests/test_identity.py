"""Run identity: signatures from what was asked (caitlab.identity), pinned for every shipped
experiment, unchanged by keys added with their defaults, distinct for configs that train
differently, and folders written under the previous rule still found."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from caitlab import identity
from caitlab.errors import UserError
from caitlab.identity import signature, variant_signature
from caitlab.resolvers import register_resolvers
from caitlab.stages import Chain
from caitlab.train import CONF_DIR
from conftest import FAULTS_OUTSIDE_SIGNATURE, caitlab_train, clean_env
from hydra_plugins.caitlab_launcher import launcher as plugin
from test_experiments import CHAINS, GRIDS, _grid

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "signatures.json"


def _root(experiment: str) -> list[str]:
    return [] if experiment.endswith("_tiny") or experiment == "demo" else ["data.root=/x"]


def _experiment_signatures(conf_dir: str) -> dict[str, str]:
    """Every run of every shipped experiment: its overrides -> its folder's name, as the
    sweep launcher plans it; a chain's runs as the sweeper expands it (caitlab.stages), so a
    downstream run's key holds its upstream's signature."""
    register_resolvers()
    out = {}
    grids = {experiment: _grid(experiment) for experiment in sorted(GRIDS)}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for experiment in sorted({*GRIDS, *CHAINS}):
            task = [f"experiment={experiment}", *_root(experiment),
                    "paths.output_dir=/nonexistent/outputs"]
            master = loader.load_configuration("train", task, run_mode=RunMode.MULTIRUN)
            plan = plugin.SweepPlan(loader, master)
            if experiment in CHAINS:  # the sweep's own jobs: the task's overrides included
                chain = Chain(OmegaConf.to_container(master.stages, resolve=False))
                jobs = [job for _, batch in plugin.chain_batches(chain, task, loader, plan)
                        for job in batch]
            else:
                jobs = [task + job for job in grids[experiment]]
            for job in jobs:
                out[" ".join(o for o in job if o != task[-1])] = plan.run_dir(job).name
    return out


def test_signatures_of_every_shipped_experiment_are_pinned():
    """An accidental change of the rule, or of an experiment, moves runs to new folders:
    after a deliberate one, regenerate with ``python tests/test_identity.py``."""
    assert _experiment_signatures(CONF_DIR) == json.loads(GOLDEN.read_text())


def test_keys_added_with_their_defaults_change_no_signature(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    for pattern in ("model/*.yaml", "data/*.yaml", "trainer/default.yaml"):
        for path in conf.glob(pattern):
            path.write_text(path.read_text() + "\nnew_knob_with_a_default: 1\n")
    train = conf / "train.yaml"
    train.write_text(train.read_text() + "\nnew_section:\n  flag: true\n")
    golden = json.loads(GOLDEN.read_text())
    assert _experiment_signatures(str(conf)) == golden
    # the key is really there, and setting it to another value is a new run
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", ["model=vit_tiny"], return_hydra_config=True)
        assert cfg.model.new_knob_with_a_default == 1 and cfg.trainer.new_knob_with_a_default
        other = compose("train", ["model=vit_tiny", "model.new_knob_with_a_default=2"],
                        return_hydra_config=True)
        assert signature(other) != signature(cfg)


def _signatures(*runs: list[str]) -> list[str]:
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return [signature(compose("train", r, return_hydra_config=True)) for r in runs]


def test_configs_that_train_differently_never_share_a_signature():
    runs = [
        [], ["seed=1"], ["optim.lr=1e-3"], ["model=vit_tiny"],
        ["model=vit_tiny", "model/residual=layerscale"],   # a nested group default changed
        ["model/residual=none"], ["model.depth=8"], ["trainer.max_epochs=3"],
        ["model.img_size=16"],                               # data.img_size follows it
        ["data.batch_size=32"], ["recipe=deit"], ["sched=constant"], ["~ema"],
        ["+model.keep_rate=0.5"], ["model/token_reorg=evit", "model=vit_tiny"],
        ["experiment=demo", "model=vit_tiny", "model/residual=none"],
        ["experiment=demo", "model=cait_tiny", "model/residual=layerscale"],
        ["data=synthetic"], ["data=synthetic", "data.num_classes=10"],
        ["trainer=debug"], ["trainer.precision=bf16-mixed"], ["trainer.devices=2"],
        # a deleted group trains with what is left
        ["~recipe"], ["model=vit_tiny", "~model/residual"], ["~model/class_token"],
        # callbacks that may change training
        ["callbacks=early_stopping"], ["+callbacks.x._target_=a.B"],
    ]
    sigs = _signatures(*runs)
    assert len(set(sigs)) == len(runs), [(r, s) for r, s in zip(runs, sigs, strict=True)
                                         if sigs.count(s) > 1]


def test_the_same_training_asked_two_ways_is_one_run():
    bare, *same = _signatures(
        [], ["model=cait_tiny"], ["model/residual=layerscale"], ["optim.lr=2e-3"],
        ["logger=csv"], ["name=other"], ["trainer.enable_progress_bar=false"],
        ["paths.output_dir=/elsewhere"], ["data.num_workers=3"],
        ["+callbacks.bar._target_=lightning.pytorch.callbacks.RichProgressBar"],
        ["hydra/launcher=slurm"], ["cluster.partition=gpu"], ["retry_failed=true"])
    assert same == [bare] * len(same)


def test_numbers_compare_by_value_and_unordered_lists_by_their_members():
    evit = ["model/token_reorg=evit", "model.depth=4"]
    a, b, c, d, e, f = _signatures(
        ["model.mlp_ratio=2"], ["model.mlp_ratio=2.0"],
        ["sched.warmup_epochs=3"], ["sched.warmup_epochs=3.0"],
        [*evit, "model.reorg_layers=[2,1]"], [*evit, "model.reorg_layers=[1,2]"])
    assert (a, c, e) == (b, d, f)


def _user_conf(tmp_path: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = tmp_path / "conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_an_excluded_groups_option_counts_by_the_values_it_sets(tmp_path):
    search = _user_conf(tmp_path, {
        "local/bigbatch.yaml": "# @package _global_\ndata:\n  batch_size: 256\n"
                               "optim:\n  lr: 0.01\n",
        "paths/scratch.yaml": "output_dir: /scratch/out\ndata_dir: /scratch/data\n"
                              "run_dir: ${hydra:runtime.output_dir}\n"})
    bare, local, asked, scratch = _signatures(
        [search], [search, "local=bigbatch"], [search, "data.batch_size=256", "optim.lr=0.01"],
        [search, "paths=scratch"])
    assert local == asked != bare
    assert scratch == bare  # where the data lies is no part of what it trains


def test_a_local_default_that_changes_the_result_is_refused(tmp_path):
    search = _user_conf(tmp_path, {
        "local/default.yaml": "# @package _global_\ncluster:\n  partition: gpu\n"
                              "data:\n  batch_size: 256\n"})
    with pytest.raises(UserError, match=r"local/default.yaml sets data.batch_size=256"):
        _signatures([search])


def test_a_local_default_with_cluster_settings_only_keeps_the_signature(tmp_path):
    search = _user_conf(tmp_path, {
        "local/default.yaml": "# @package _global_\ncluster:\n  partition: gpu\n"
                              "data:\n  num_workers: 2\n"})
    assert _signatures([search]) == _signatures([])


def test_variants_group_seeds_and_the_delta_says_what_differs():
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        def cfg(*o):
            return compose("train", list(o), return_hydra_config=True)

        assert variant_signature(cfg("seed=3")) == variant_signature(cfg())
        assert variant_signature(cfg("optim.lr=1e-3")) != variant_signature(cfg())
        delta = identity.run_delta(cfg("model=vit_tiny", "seed=3", "model.depth=8"))
    assert delta["choices"] == {"model": "vit_tiny", "model/class_token": "input",
                                "model/residual": "none"}
    assert delta["values"] == {"data.seed": 3, "model.depth": 8, "seed": 3}
    assert identity.describe(delta) == ("model=vit_tiny model/class_token=input "
                                        "model/residual=none data.seed=3 model.depth=8 seed=3")


# the fixture's interrupted run was stopped by a test callback, no part of what it trains
COMMON = ["logger=csv", "trainer=debug", "model.embed_dim=16", "model.depth=1",
          FAULTS_OUTSIDE_SIGNATURE]


@pytest.mark.slow
def test_runs_written_under_the_previous_rule_are_still_found(tmp_path):
    """tests/fixtures/runs_v1: written by caitlab before this rule (see its README)."""
    out = tmp_path / "outputs"
    shutil.copytree(FIXTURES / "runs_v1" / "outputs", out)
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_dir())
    env = clean_env(PYTHONPATH=str(Path(__file__).parent))
    done = caitlab_train(out, *COMMON, env=env)
    assert "already completed" in done.stdout + done.stderr
    resumed = caitlab_train(out, *COMMON, "seed=1", "trainer.max_epochs=3", env=env)
    summary = json.loads((out / "default" / "319db1eeec" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attempts"] == 2
    assert summary["resumed_from"].endswith("last.ckpt") and summary["epochs"] == 3
    assert "319db1eeec" in resumed.stdout + resumed.stderr
    sweep = caitlab_train(out, "-m", *COMMON, "name=sweep", "seed=2,3", env=env)
    assert (sweep.stdout + sweep.stderr).count("already completed") == 2
    # nothing trained twice: no new folder anywhere
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_dir()
                  and "checkpoints" not in p.parts) == \
        [p for p in before if "checkpoints" not in p.parts]
    report = subprocess.run([sys.executable, "-m", "caitlab.analysis.report", str(out / "sweep")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr
    assert report.stdout.count("completed") >= 1


if __name__ == "__main__":  # regenerate the golden signatures after a deliberate change
    GOLDEN.write_text(json.dumps(_experiment_signatures(CONF_DIR), indent=1, sort_keys=True)
                      + "\n")
    print(f"wrote {GOLDEN}")
