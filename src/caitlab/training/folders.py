"""The folders a run's path needed that this process made: the only ones a config refused after
Hydra made the run folder may remove (``caitlab.record.tidy_unstarted``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# The folders this process's run folder needed that did not exist before Hydra made them
# (NewFolders notes them): the only ones a rejected config may remove.
_new_folders: list[Path] = []


class NewFolders(Callback):
    """Hydra callback: before Hydra makes a run's folder, notes which folders of its path do
    not exist yet, so that a config refused afterwards removes only what this process made
    (never a folder the user had, such as an empty one given as ``hydra.run.dir``'s parent)."""

    def on_run_start(self, config: DictConfig, **_: Any) -> None:
        _new_folders.clear()
        try:
            folder = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        except Exception:  # noqa: BLE001 - Hydra's own resolution reports it, in one line
            return
        while not folder.exists() and folder != folder.parent:
            _new_folders.append(folder)
            folder = folder.parent


def new_folders() -> list[Path]:
    """The folders :class:`NewFolders` noted for this process's run, deepest first."""
    return list(_new_folders)
