"""Every use of a library's internals, each where no public API serves, and why.

Written for lightning 2.6, hydra-core 1.3, omegaconf 2.3, timm 1.0, torchvision 0.29 and
Python's argparse (pyproject.toml bounds each library to the versions tested).
``tests/test_compat.py`` has one test per function here, asserting the behaviour its caller
relies on, so that a release that changes an internal fails there, by name, instead of
silently changing training or submission. Everything else in caitlab uses
the libraries' public contracts only.
"""

from __future__ import annotations

import argparse
import copy
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast
from weakref import proxy

if TYPE_CHECKING:  # the libraries are imported where used: importing this stays cheap
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from omegaconf import DictConfig

_Checkpoint = TypeVar("_Checkpoint", bound="ModelCheckpoint")

# --- Lightning -----------------------------------------------------------------------------

def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer ``module`` is attached to; None before ``fit`` (or a test) attaches one.

    Lightning's ``module.trainer`` raises when there is none, and has no public way to ask;
    a module that also runs detached (built in a test, counted before ``fit``) must ask."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers write the values ``self.log(on_step=True)`` gets at this step.

    Lightning's rule (``log_every_n_steps`` counted in optimizer steps, every step once the
    run is stopping) is public only through its effect: its own callbacks (LearningRateMonitor,
    ThroughputMonitor) read the same internal flag."""
    return trainer._logger_connector.should_update_logs


def request_stop(trainer: L.Trainer) -> None:
    """Raises the flag behind ``trainer.received_sigterm``: at the next batch boundary the
    loops stop with ``SIGTERMException``, and under DDP Lightning broadcasts rank 0's flag.

    ``received_sigterm`` is a read-only property, and ``trainer.should_stop`` is no substitute:
    it waits for the end of the epoch and is not broadcast."""
    trainer._signal_connector.received_sigterm = True


def launched_ranks(trainer: L.Trainer) -> list[Any]:
    """The processes Lightning started for this machine's other ranks (``subprocess.Popen``,
    local ranks 1, 2, ... in order); none where SLURM or another launcher starts them."""
    return list(getattr(trainer.strategy.launcher, "procs", None) or [])


def retire_lightning_observer() -> bool:
    """Ends Lightning's child-process observer without it killing anything: on a rank's death
    it SIGKILLs rank 0 too, leaving no word of which rank died or why. caitlab's
    ``RankWatch`` does the same job, the cause recorded first. True when one was found."""
    from lightning.fabric.strategies.launchers.subprocess_script import (  # kept off caitlab-sweep
        _ChildProcessObserver,
    )

    found = False
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._child_processes = []  # its next look finds every child ended well
            found = True
    return found


def shards_training_data(trainer: Any) -> bool | None:
    """Whether Lightning shards the training data across ranks for this trainer (a
    distributed strategy, even on one device, with ``use_distributed_sampler``); None where
    the trainer does not say."""
    connector = getattr(trainer, "_accelerator_connector", None)
    if connector is None:
        return None
    return bool(connector.use_distributed_sampler and connector.is_distributed)


def routes_saves(cls: type[_Checkpoint]) -> type[_Checkpoint]:
    """Class decorator for a ``ModelCheckpoint`` subclass with a ``save(trainer, filepath)``
    method: every save the callback decides on goes through it, to write the file another way
    (``lightning_save`` is Lightning's own; ``record_save`` records any other as Lightning's).

    ModelCheckpoint has no public hook between deciding to save and saving: its top-k and
    resume logic (which a subclass must not write again) all end in ``_save_checkpoint``."""

    def _save_checkpoint(self: Any, trainer: L.Trainer, filepath: str) -> None:
        self.save(trainer, filepath)

    # setattr: replacing a method is the point here, which mypy refuses as an assignment
    setattr(cls, "_save_checkpoint", _save_checkpoint)  # noqa: B010
    return cls


def lightning_save(callback: ModelCheckpoint, trainer: L.Trainer, filepath: str) -> None:
    """``callback``'s save as Lightning makes it: ``trainer.save_checkpoint``, then its record."""
    from lightning.pytorch.callbacks import ModelCheckpoint  # heavy: kept off caitlab-sweep

    ModelCheckpoint._save_checkpoint(callback, trainer, filepath)


def record_save(callback: ModelCheckpoint, trainer: L.Trainer, filepath: str) -> None:
    """Records a save of ``callback`` made without ``trainer.save_checkpoint`` as Lightning's
    own: no second save at the same step, ``last_save``, the loggers' ``after_save_checkpoint``."""
    callback._last_global_step_saved = trainer.global_step
    callback._last_checkpoint_saved = filepath
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.after_save_checkpoint(proxy(callback))


def last_save(callback: ModelCheckpoint) -> tuple[int, str]:
    """(global step, file) of ``callback``'s last save in this process; (0, "") before one.

    ModelCheckpoint's public paths (``best_model_path``, ``last_model_path``) say where, never
    when, and a file of an earlier step may have the same name."""
    return callback._last_global_step_saved, callback._last_checkpoint_saved


def async_io_submit(io: Any, fn: Any) -> None:
    """Queues ``fn()`` in an ``AsyncCheckpointIO``'s writer thread, after the saves queued
    before it; an error it raises is kept and raised where the saves' errors are (the next
    save, teardown).

    The plugin's thread and its error slot (``_executor``, ``_error``) are not public, and
    a file derived from a checkpoint (a link to it) must be made after that write."""
    io._ensure_setup()

    def run() -> None:
        try:
            fn()
        except BaseException as err:
            io._error = io._error or err

    io._executor.submit(run)


def async_io_wait(io: Any) -> None:
    """Waits for everything queued in an ``AsyncCheckpointIO``'s writer thread, then raises
    the first error of it (once: teardown does not raise it a second time).

    Lightning's plugin waits only at teardown; its single worker runs jobs in order, so a
    no-op queued now returns after all of them."""
    if io._executor is not None:
        io._executor.submit(lambda: None).result()
    err, io._error = io._error, None
    if err is not None:
        raise err


def unset_wandb_anonymous(logger: Any) -> None:
    """Leaves ``anonymous`` out of what a ``WandbLogger`` passes to ``wandb.init``, where
    Lightning would pass ``anonymous=None``: wandb >= 0.19 warns about the argument whatever
    its value (and ``WANDB_SILENT`` does not cover it), and unset means the same.

    Lightning's ``anonymous`` parameter has no value that leaves it out; its arguments to
    ``wandb.init`` are kept in ``WandbLogger._wandb_init`` until the run starts."""
    if logger._wandb_init.get("anonymous", "unset") is None:
        del logger._wandb_init["anonymous"]


# --- OmegaConf -----------------------------------------------------------------------------

def config_node(cfg: DictConfig, key: str) -> Any:
    """The node under ``key``, unresolved: a DictConfig or ListConfig where the config has a
    container there (typed containers included, even one set by interpolation), otherwise a
    value node (an interpolation to a container included).

    ``cfg[key]``, ``cfg.get`` and ``OmegaConf.select`` all resolve, so they cannot tell the two
    apart; run signatures (caitlab.identity) have always depended on the difference."""
    return cfg._get_node(key)


def config_root(node: Any) -> Any:
    """The root config ``node`` belongs to (itself for a root).

    OmegaConf keeps a node's parent and offers no public way to walk up to the root; a
    mistyped key's suggestions search the whole config it was typed into."""
    return node._get_root()


def is_plain_mapping(node: Any) -> bool:
    """Whether ``node`` is a DictConfig whose keys can be walked without resolving anything:
    not missing (``???``), not None, not an interpolation.

    OmegaConf answers these only through its nodes' private ``_is_*`` methods; the public
    ``OmegaConf.is_missing``/``is_interpolation`` ask about a key of a parent instead."""
    from omegaconf import DictConfig  # kept off caitlab-sweep

    return (isinstance(node, DictConfig) and not node._is_missing() and not node._is_none()
            and not node._is_interpolation())


# --- Hydra ---------------------------------------------------------------------------------

# --- torchvision ---------------------------------------------------------------------------

def with_transform(dataset: Any, transform: Any) -> Any:
    """A shallow copy of a torchvision ``VisionDataset`` (an ``ImageFolder``: its file list
    shared, not read again) that applies ``transform`` to its images instead.

    ``VisionDataset`` applies ``self.transforms`` (a ``StandardTransform`` built from
    ``transform`` in its constructor), not ``self.transform``: both are set."""
    copied = copy.copy(dataset)
    copied.transform = transform
    copied.transforms = type(dataset.transforms)(transform, dataset.target_transform)
    return copied


# --- timm ----------------------------------------------------------------------------------

def take_indices(num_blocks: int, indices: int | Sequence[int] | None
                 ) -> tuple[list[int], int]:
    """timm's reading of ``forward_intermediates(indices=...)``: an int n takes the last n
    blocks, a list takes those blocks (negative from the end), None takes every block; also
    returns the last block needed.

    timm's own models share it from ``timm.models._features``, which ``timm.models`` does not
    export; reading it the same way keeps caitlab's ``forward_intermediates`` timm's contract."""
    from timm.models._features import feature_take_indices  # heavy: kept off caitlab-sweep

    # timm types indices as a list; any sequence serves (it iterates them)
    return feature_take_indices(num_blocks, cast("int | list[int] | None", indices))


def __getattr__(name: str) -> Any:
    """``BasicSweeper`` and ``BasicSweeperConf``: Hydra's default sweeper, to be extended.

    Hydra keeps its core plugins in ``hydra._internal``; a sweeper with the same ``params``
    and batches would otherwise be written again from scratch. Imported on first use: it
    costs a third of a second, which most users of this module do not need."""
    if name in ("BasicSweeper", "BasicSweeperConf"):
        from hydra._internal.core_plugins import basic_sweeper  # heavy: kept off caitlab-sweep

        return getattr(basic_sweeper, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sweeper_params(sweeper: Any) -> list[str]:
    """A basic sweeper's ``params`` (``hydra.sweeper.params``) as override strings
    (``model=a,b``), which its ``sweep`` puts before the command line's arguments.

    ``BasicSweeper`` builds them in its private ``_parse_config``; a sweeper that sweeps a
    chain of stages itself reads them the same way."""
    return sweeper._parse_config()


def apply_value_overrides(overrides: list[Any], cfg: DictConfig) -> None:
    """Applies parsed value overrides (``seed=3``, ``+a=1``, ``~b``) to a composed ``cfg`` in
    place, as Hydra's composition does after it has interpreted the config-group overrides:
    the same result and the same errors.

    Hydra composes only from scratch (``load_sweep_config``); applying value overrides to an
    existing composition is its ``ConfigLoaderImpl._apply_overrides_to_config``."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl  # heavy: kept off caitlab-sweep

    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


# --- argparse ------------------------------------------------------------------------------

def parser_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments ``parser`` declares (``--help`` included), in order, for the generated CLI
    reference. argparse keeps them in ``_actions`` and offers no public way to list them."""
    return list(parser._actions)


def parser_subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``parser``'s subcommands by name (``caitlab-sweep status``...), empty if it has none:
    the ``choices`` of its subparsers action, which argparse does not expose otherwise."""
    for action in parser_arguments(parser):
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}
