"""The resolvers caitlab's configs use, registered once per process: ``${signature:}`` (a
run's folder), ``${stage:}`` (an upstream stage's checkpoint), ``${netrc:}`` (a secret kept
out of files), ``${eval_crop_pct:}``, ``${paper_epochs:}`` and ``${gpus_if_gpu:}``.

Above the run record and the stages in the layers (pyproject.toml's contracts): it names what
each of them resolves, and neither needs the other.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from caitlab import identity
from caitlab.config import eval_crop_pct, paper_epochs
from caitlab.record import find_folder
from caitlab.secrets import register_netrc_resolver
from caitlab.stages import resolver as stage_resolver


def _signature_resolver(parent: str | None = None, *, _root_: DictConfig) -> str:
    # Hydra resolves hydra.run.dir / hydra.sweep.subdir with the job's whole config as root;
    # ``parent`` (the folder the run lands in) finds a folder named by the previous rule.
    return find_folder(parent, identity.signature(_root_), _root_)


def _gpus_if_gpu(accelerator: str, devices: Any) -> Any:
    return devices if str(accelerator) in ("gpu", "cuda") else None


def register_resolvers() -> None:
    """Registers each resolver OmegaConf does not have yet (idempotent)."""
    register_netrc_resolver()  # secrets typed on the command line become ${netrc:...}
    if not OmegaConf.has_resolver("signature"):
        OmegaConf.register_new_resolver("signature", _signature_resolver, use_cache=False)
    if not OmegaConf.has_resolver("stage"):
        OmegaConf.register_new_resolver("stage", stage_resolver)
    for name, fn in (("eval_crop_pct", eval_crop_pct), ("paper_epochs", paper_epochs)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("gpus_if_gpu"):
        OmegaConf.register_new_resolver("gpus_if_gpu", _gpus_if_gpu)
