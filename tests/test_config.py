"""Every config file composes; signatures; typed config errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from caitlab.config import ConfigError, train_config
from caitlab.identity import signature
from caitlab.resolvers import register_resolvers
from caitlab.train import CONF_DIR

register_resolvers()
CONF = Path(CONF_DIR)
MODEL_PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _resolved(cfg) -> dict:
    # paths.run_dir needs Hydra's runtime, which only exists in a real run
    cfg.paths.run_dir = "/run/dir"
    return OmegaConf.to_container(cfg, resolve=True)


GROUP_OVERRIDES = (
    [f"model={m}" for m in MODEL_PRESETS]
    + [f"model/{g}={o}" for g in ("class_token", "residual", "depth", "dist_token")
       for o in _options(f"model/{g}")]
    + ["distillation=none", "distillation=hard distillation.teacher=/a/run/folder"]
    + [f"data={d}" for d in _options("data") if d != "imagefolder"]
    + ["data=imagefolder data.root=/nowhere"]
    + [f"{g}={o}" for g in ("optim", "sched", "trainer", "logger", "callbacks")
       for o in _options(g)]
    + [f"experiment={e}" for e in _options("experiment")]
)


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_takes_a_training_step(preset):
    """Each preset's wiring (class token, residual, talking heads, drop path, heads) through
    a real forward and backward, shrunk to 32 px and one layer; test_train fits a few."""
    cfg = _compose(f"model={preset}", "data=synthetic", "model.img_size=32", "model.depth=1")
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    logits = model(torch.randn(2, cfg.data.in_chans, 32, 32))
    logits.logsumexp(dim=1).mean().backward()
    assert logits.shape == (2, cfg.data.num_classes)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("override", GROUP_OVERRIDES)
def test_every_config_file_composes_and_builds(override):
    cfg = _compose(*override.split())
    resolved = _resolved(cfg)
    assert resolved["model"]["_target_"] == "caitlab.models.create_model"
    train_config(cfg)  # typed sections validate
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.config["num_classes"] == resolved["data"]["num_classes"]
    assert model.config["img_size"][0] == resolved["data"]["img_size"]


def test_axis_groups_set_the_model_arguments():
    cfg = _compose("model=deit_small_patch16_224", "model/class_token=class_attention",
                   "model/residual=layerscale", "model/depth=d36")
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.config["class_token"] == "class_attention" and len(model.ca_blocks) == 2
    assert model.config["residual"] == "layerscale"
    assert model.config["depth"] == 36 and model.config["layerscale_init"] == 1e-6
    cfg = _compose("model=cait_tiny", "model/class_token=insert", "model.insert_layer=3")
    assert instantiate(cfg.model).config["insert_layer"] == 3


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=0", "optim.lr=0.0 is not allowed: must be > 0"),
        ("optim.lr=-1", "optim.lr=-1.0 is not allowed: must be > 0"),
        ("optim.lr=fast", "optim.lr='fast' must be a number"),
        ("+optim.momentum=0.9", "optim.momentum is not a known key"),
        ("sched.name=linear", "sched.name='linear' is not allowed"),
        ("recipe.label_smoothing=1.5", "recipe.label_smoothing=1.5 is not allowed"),
        ("ema.decay=2", "ema.decay=2.0 is not allowed"),
        ("optim.scale_lr=maybe", "optim.scale_lr='maybe' must be true or false"),
    ],
)
def test_typed_config_errors_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        train_config(_compose(override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_signature_resolves_keys_that_point_outside_the_kept_ones():
    # data.root interpolates paths.data_dir, and paths is not part of the signature
    from caitlab import identity

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["data=cifar10", "paths.data_dir=/datasets"],
                      return_hydra_config=True)
        assert identity.run_delta(cfg)["values"]["data.root"].startswith("/datasets")
        other = compose("train", ["data=cifar10", "paths.data_dir=/elsewhere"],
                        return_hydra_config=True)
        assert signature(cfg) != signature(other)


def test_every_declared_axis_is_a_constructor_argument_and_its_group_switches_it():
    """caitlab.models.axes declares each axis once: its keys are the model's arguments, its
    group's options are the values the model takes, and every preset has the group, so that
    ``model/<group>=<option>`` works whatever the model."""
    import inspect

    from caitlab.models import ATTENTIONS, CLASS_TOKEN_PLACEMENTS, RESIDUAL_SCALINGS
    from caitlab.models import ImageTransformer as model
    from caitlab.models.axes import ARCHITECTURE

    arguments = set(inspect.signature(model).parameters) | {"model"}
    groups = [a.group for a in ARCHITECTURE if a.group and a.group != "model"]
    for axis in ARCHITECTURE:
        assert set(axis.keys) <= arguments, axis
    values = {"model/class_token": CLASS_TOKEN_PLACEMENTS, "model/residual": RESIDUAL_SCALINGS,
              "model/attention": ATTENTIONS}
    for group, expected in values.items():
        assert set(_options(group)) == set(expected), group
    for axis in (a for a in ARCHITECTURE if a.group in groups):
        for option in _options(axis.group):  # each option sets the axis
            body = OmegaConf.load(CONF / axis.group / f"{option}.yaml")
            assert set(axis.keys) & set(body), (axis.group, option)
    for preset in MODEL_PRESETS:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            choices = compose("train", [f"model={preset}"], return_hydra_config=True
                              ).hydra.runtime.choices
        assert set(groups) <= set(choices), preset


def test_a_slurm_task_bound_to_one_gpu_of_several_is_taken_as_bound_not_refused():
    from caitlab.config import ConfigError, check_trainer, gpus_bound_per_task

    trainer = {"max_epochs": 1, "devices": 4, "accelerator": "gpu"}
    assert gpus_bound_per_task(trainer, under_slurm=True, gpus_visible=1)
    check_trainer(trainer, multirun=False, under_slurm=True, gpus_visible=1, cpus=8)
    assert not gpus_bound_per_task(trainer, under_slurm=True, gpus_visible=4)  # not bound
    assert not gpus_bound_per_task(trainer, under_slurm=False, gpus_visible=1)
    with pytest.raises(ConfigError, match="at most the 1 GPU"):  # no SLURM: too few GPUs
        check_trainer(trainer, multirun=False, under_slurm=False, gpus_visible=1, cpus=8)


def test_only_a_projects_options_named_like_caitlabs_are_shadowed(tmp_path):
    from caitlab.config import CONF_DIR, shadowed_options

    mine = tmp_path / "conf"
    for name in ("model/cait_tiny.yaml", "model/my_net.yaml", "model/residual/none.yaml",
                 "train.yaml"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text("{}\n")
    snapshot = tmp_path / "snapshot" / "src" / "caitlab" / "conf"  # a sweep's code snapshot
    shutil.copytree(CONF_DIR, snapshot)
    sources = [{"schema": "file", "path": CONF_DIR, "provider": "main"},
               {"schema": "file", "path": str(snapshot), "provider": "main"},
               {"schema": "file", "path": str(mine), "provider": "main"},
               {"schema": "pkg", "path": "hydra.conf", "provider": "hydra"}]
    assert shadowed_options(sources) == [
        (mine / "model/cait_tiny.yaml", Path(CONF_DIR) / "model/cait_tiny.yaml"),
        (mine / "model/residual/none.yaml", Path(CONF_DIR) / "model/residual/none.yaml")]
