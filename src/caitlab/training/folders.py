"""The folders a run's path needed that this process made, and the tidying of them when Hydra
made a run folder for a config caitlab then refused: only what this process made is removed.
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


def remove_unstarted_run_folder(run_dir: Path, created: list[Path]) -> None:
    """Hydra makes the run folder (``.hydra/``, ``train.log``) before caitlab checks the
    config: a rejected config leaves nothing behind. Only the folders in ``created`` (those
    this process made) are removed, each only when nothing but Hydra's files is in it: a
    folder holding anything else (a run's files, another process's lock) is left as it is."""
    made = {p.absolute() for p in created}
    run_dir = run_dir.absolute()
    if run_dir not in made:
        return
    hydra_dir = run_dir / ".hydra"
    try:
        if {p.name for p in run_dir.iterdir()} - {".hydra", "train.log"}:
            return
        hydra_files = list(hydra_dir.iterdir()) if hydra_dir.is_dir() else []
        if {p.name for p in hydra_files} - {"config.yaml", "hydra.yaml", "overrides.yaml"}:
            return
        for path in hydra_files:
            path.unlink()
        if hydra_dir.is_dir():
            hydra_dir.rmdir()
        (run_dir / "train.log").unlink(missing_ok=True)
        folder = run_dir
        while folder in made:  # <output_dir>/<name>/, when this run made it
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass  # only ever tidying: whatever could not go stays
