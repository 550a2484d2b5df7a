"""The model presets of ``conf/model/``, their architecture written from the variants.

A preset (``model=cait_s24_224``) names a registered variant (``caitlab.models.variants``)
and holds the architecture keys a run may override (``model.depth=36``): Hydra can only
override a key the config holds, and a preset's keys override its variant's arguments. So
that the variant stays the one place an architecture is written, the lines between
:data:`BEGIN` and :data:`END` of every preset are written from it, by
``python scripts/model_presets.py``; tests/test_models.py fails for a preset whose lines
differ. What a preset holds outside them is its own: the comment on top, the data's
channels and classes, and training settings (the stochastic depth a paper trained with).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from caitlab.models import variants  # noqa: F401 - registers the named variants
from caitlab.models._registry import create_model
from caitlab.models.spec import ModelSpec

BEGIN = "# >>> the variant's architecture (caitlab.models.variants): scripts/model_presets.py"
END = "# <<<"

# What each key is, as its preset line says: one comment per key, whatever the preset.
COMMENTS = {
    "img_size": "input image side, px; data.img_size follows it",
    "patch_size": "patch side, px; must divide img_size",
    "depth": "self-attention layers (class-attention layers not counted)",
    "embed_dim": "token width (channels); num_heads must divide it",
    "num_heads": "attention heads per layer",
    "mlp_ratio": "MLP hidden width, as a multiple of embed_dim",
    "talking_heads": "talking-heads attention (heads mixed before and after the softmax) in SA",
    "layerscale_init": "LayerScale's initial scale, with model/residual=layerscale; auto: "
                       "the paper's rule by depth",
    "drop_path_schedule": "uniform: the rate in every SA layer (CaiT); linear: 0 rising to it "
                          "(DeiT)",
}
# The config groups a preset chooses by its variant's values (``model/class_token=...``).
GROUPS = ("class_token", "residual")

_KEY_LINE = re.compile(r"^(\w+):")
_GROUP_LINE = re.compile(r"^  - (\w+): \S+")


def variant_spec(name: str) -> ModelSpec:
    """The spec of the registered variant ``name``, built on the meta device (no weights)."""
    with torch.device("meta"):
        spec = create_model(name).spec
    assert isinstance(spec, ModelSpec)
    return spec


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(name: str, text: str) -> str:
    """``text``, a preset of the variant ``name``, with the lines between :data:`BEGIN` and
    :data:`END` written from the variant: each group choice and key those lines hold, with
    the variant's value and the key's comment. The keys a preset holds stay its own choice.

    Raises:
        ValueError: ``text`` has no such lines, or one names a key the spec lacks.
    """
    lines = text.splitlines()
    try:
        first, last = lines.index(BEGIN), lines.index(END)
    except ValueError:
        raise ValueError(f"model preset {name}: no {BEGIN!r} ... {END!r} lines") from None
    spec = variant_spec(name)
    out = []
    for line in lines[first + 1:last]:
        group, key = _GROUP_LINE.match(line), _KEY_LINE.match(line)
        if group and group[1] in GROUPS:
            out.append(f"  - {group[1]}: {getattr(spec, group[1])}")
        elif key and key[1] in COMMENTS:
            if not hasattr(spec, key[1]):
                raise ValueError(f"model preset {name}: {key[1]} is no model argument")
            out.append(f"{key[1]}: {_value(getattr(spec, key[1]))}  # {COMMENTS[key[1]]}")
        else:
            out.append(line)
    return "\n".join([*lines[:first + 1], *out, *lines[last:]]) + "\n"


def preset_files(conf_model: Path) -> list[Path]:
    """The presets of a ``conf/model`` folder: those naming a registered variant."""
    return sorted(p for p in Path(conf_model).glob("*.yaml") if BEGIN in p.read_text())
