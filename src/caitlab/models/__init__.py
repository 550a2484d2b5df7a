"""The CaiT/ViT model family: ``create_model(name, **overrides)`` and its helpers.

``layers`` holds the building blocks, ``cait`` the ``ImageTransformer`` family and its
argument checks, ``variants`` the named variants, ``checkpoint`` the loading of timm, official
and caitlab checkpoints, ``cost`` parameters and MACs.
"""

from caitlab.models import variants as _variants  # noqa: F401  (registers the variants)
from caitlab.models._registry import UnknownModelError, create_model, list_models
from caitlab.models.cait import (
    ATTENTIONS,
    CLASS_TOKEN_PLACEMENTS,
    DROP_PATH_SCHEDULES,
    RESIDUAL_SCALINGS,
    ImageTransformer,
    ModelConfigError,
    layerscale_eps_for_depth,
)
from caitlab.models.checkpoint import CheckpointError, load_checkpoint
from caitlab.models.cost import count_macs, count_params

__all__ = [
    "ATTENTIONS",
    "CLASS_TOKEN_PLACEMENTS",
    "DROP_PATH_SCHEDULES",
    "RESIDUAL_SCALINGS",
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
