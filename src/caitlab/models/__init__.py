"""The CaiT/ViT model family: ``create_model(name, **overrides)`` and its helpers."""

from caitlab.models import transformer as _transformer  # noqa: F401  (registers the variants)
from caitlab.models._registry import UnknownModelError, create_model, list_models
from caitlab.models.checkpoint import CheckpointError, load_checkpoint
from caitlab.models.cost import count_macs, count_params
from caitlab.models.transformer import (
    ImageTransformer,
    ModelConfigError,
    layerscale_eps_for_depth,
)

__all__ = [
    "CheckpointError",
    "ImageTransformer",
    "ModelConfigError",
    "UnknownModelError",
    "count_macs",
    "count_params",
    "create_model",
    "layerscale_eps_for_depth",
    "list_models",
    "load_checkpoint",
]
