"""caitlab.compat, one test per use of a library's internals: each asserts the behaviour its
caller relies on, so that a release that changes one fails here, by name."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from caitlab import compat


class _Tiny(L.LightningModule):
    """A linear model; ``seen`` records (batch_idx, compat.logs_this_step) at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.seen: list[tuple[int, bool]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch_idx, compat.logs_this_step(self.trainer)))
        self.log("batch", float(batch_idx), on_step=True, on_epoch=False)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,))),
                      batch_size=2)


class _Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []
        self.saved: list[Any] = []

    name, version = "recorder", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.saved.append(checkpoint_callback)


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    args = dict(max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                default_root_dir=str(tmp_path))
    return L.Trainer(**{**args, **kwargs})


def test_attached_trainer_is_the_modules_trainer_or_none(tmp_path):
    module = _Tiny()
    assert compat.attached_trainer(module) is None
    trainer = _trainer(tmp_path)
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logs_this_step_is_true_exactly_at_the_steps_the_loggers_write(tmp_path, accumulate):
    module, logger = _Tiny(), _Recorder()
    # 12 batches; every 2nd optimizer step is logged
    _trainer(tmp_path, logger=logger, log_every_n_steps=2,
             accumulate_grad_batches=accumulate).fit(module, _data())
    written = {int(r["batch"]) for r in logger.rows if "batch" in r}
    assert 0 < len(written) < len(module.seen) / accumulate
    # true for every batch of a logged optimizer step (the loggers get its last value), and
    # for no other
    steps = {w // accumulate for w in written}
    assert {i for i, flag in module.seen if flag} == \
        {i for i, _ in module.seen if i // accumulate in steps}
    assert all((w + 1) % accumulate == 0 for w in written)


def test_request_stop_stops_at_the_next_batch_as_a_sigterm_does(tmp_path):
    class StopAfterTwo(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                compat.request_stop(trainer)
                assert trainer.received_sigterm

    module = _Tiny()
    trainer = _trainer(tmp_path, callbacks=[StopAfterTwo()])
    assert not trainer.received_sigterm
    with pytest.raises(SIGTERMException):
        trainer.fit(module, _data())
    assert [i for i, _ in module.seen] == [0, 1]


@compat.routes_saves
class _Routed(ModelCheckpoint):
    """Saves through Lightning, or (``own=True``) writes the file itself and records it."""

    def __init__(self, *args: Any, own: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.own, self.calls = own, []

    def save(self, trainer, filepath: str) -> None:
        self.calls.append((trainer.global_step, Path(filepath).name))
        if self.own:
            Path(filepath).write_bytes(b"own")
            compat.record_save(self, trainer, filepath)
        else:
            compat.lightning_save(self, trainer, filepath)


def test_routed_saves_go_through_save_and_last_save_says_when(tmp_path):
    cb = _Routed(dirpath=tmp_path, filename="e{epoch}", auto_insert_metric_name=False,
                 monitor=None, save_top_k=-1)
    assert compat.last_save(cb) == (0, "")
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[cb], enable_checkpointing=True)
    trainer.fit(_Tiny(), _data())
    assert cb.calls == [(12, "e0.ckpt"), (24, "e1.ckpt")]
    assert torch.load(tmp_path / "e1.ckpt", weights_only=True)["global_step"] == 24
    assert compat.last_save(cb) == (24, str(tmp_path / "e1.ckpt"))


def test_a_recorded_save_counts_as_lightnings_own(tmp_path):
    logger = _Recorder()
    cb = _Routed(dirpath=tmp_path, filename="best", monitor=None, save_last=True, own=True)
    _trainer(tmp_path, callbacks=[cb], logger=logger, enable_checkpointing=True,
             log_every_n_steps=1).fit(
        _Tiny(), _data())
    assert (tmp_path / "best.ckpt").read_bytes() == b"own"
    assert compat.last_save(cb)[0] == 12
    # Lightning writes last.ckpt only after a save of the same step, and tells the loggers
    assert cb.calls[0] == (12, "best.ckpt") and (tmp_path / "last.ckpt").is_file()
    assert logger.saved and all(s == cb for s in logger.saved)


def test_unset_wandb_anonymous_leaves_it_out_of_wandb_init(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or object())
    monkeypatch.setattr(wandb, "run", None)
    logger = WandbLogger(save_dir=str(tmp_path), project="p")
    compat.unset_wandb_anonymous(logger)
    logger.experiment  # noqa: B018 (starts the run)
    assert len(calls) == 1 and "anonymous" not in calls[0] and calls[0]["project"] == "p"


def test_config_node_tells_a_container_from_an_interpolation_to_one():
    @dataclass
    class Typed:
        b: dict[str, int] = field(default_factory=lambda: {"x": 1})
        a: dict[str, int] = "${b}"  # type: ignore[assignment]

    untyped = OmegaConf.create({"b": {"x": "${c}"}, "a": "${b}", "c": 2})
    assert not OmegaConf.is_config(compat.config_node(untyped, "a"))
    node = compat.config_node(untyped, "b")
    # a container node resolves against the whole config, not only itself
    assert OmegaConf.is_config(node) and OmegaConf.to_container(node, resolve=True) == {"x": 2}
    typed = OmegaConf.structured(Typed)
    assert OmegaConf.is_config(compat.config_node(typed, "a"))
    assert OmegaConf.to_container(compat.config_node(typed, "a"), resolve=True) == {"x": 1}


def test_basic_sweeper_validates_each_batch_before_launching_it(tmp_path):
    events = []

    class Launcher:
        def launch(self, batch, initial_job_idx):
            events.append(("launch", [list(o) for o in batch], initial_job_idx))
            return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED) for o in batch]

    class Sweeper(compat.BasicSweeper):
        def validate_batch_is_legal(self, batch) -> None:
            events.append(("validate", [list(o) for o in batch]))

    assert {"max_batch_size", "params"} <= set(OmegaConf.structured(compat.BasicSweeperConf))
    sweeper = Sweeper(max_batch_size=2, params=None)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweeper.launcher = Launcher()
    sweeper.hydra_context = HydraContext(config_loader=None, callbacks=None)
    sweeper.sweep(["a=1,2,3"])
    assert events == [("validate", [["a=1"], ["a=2"]]), ("launch", [["a=1"], ["a=2"]], 0),
                      ("validate", [["a=3"]]), ("launch", [["a=3"]], 2)]


def test_apply_value_overrides_changes_adds_and_deletes_in_place():
    from hydra.errors import ConfigCompositionException

    cfg: DictConfig = OmegaConf.create({"seed": 0, "model": {"depth": 2, "ema": True}})
    OmegaConf.set_struct(cfg, True)  # as Hydra composes it
    parser = OverridesParser.create()
    overrides = parser.parse_overrides(["seed=3", "+model.note=abc", "~model.ema"])
    compat.apply_value_overrides(overrides, cfg)
    assert OmegaConf.to_container(cfg) == {"seed": 3, "model": {"depth": 2, "note": "abc"}}
    for bad in (["model.nope=1"], ["+seed=4"], ["~absent"]):
        with pytest.raises(ConfigCompositionException):
            compat.apply_value_overrides(parser.parse_overrides(bad), cfg)


def test_take_indices_reads_forward_intermediates_indices_as_timm_does():
    # an int: the last n blocks; a list: those blocks, negative from the end; None: all
    assert compat.take_indices(12, 2) == ([10, 11], 11)
    assert compat.take_indices(12, [0, -1]) == ([0, 11], 11)
    assert compat.take_indices(12, [3, 5]) == ([3, 5], 5)
    assert compat.take_indices(4, None) == ([0, 1, 2, 3], 3)
    with pytest.raises(AssertionError):  # timm refuses a block the model does not have
        compat.take_indices(4, [7])


def test_async_io_jobs_run_after_the_saves_before_them_and_wait_raises_their_error(tmp_path):
    import threading

    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from caitlab.training.preemption import AtomicCheckpointIO

    io = AsyncCheckpointIO(AtomicCheckpointIO())
    weights = torch.zeros(3)
    gate, seen = threading.Event(), []
    compat.async_io_submit(io, gate.wait)  # holds the writer thread until the checks below
    io.save_checkpoint({"w": weights}, tmp_path / "a.ckpt")
    weights += 1  # training goes on: the queued write holds the weights of its call
    compat.async_io_submit(io, lambda: seen.append((tmp_path / "a.ckpt").is_file()))
    assert not (tmp_path / "a.ckpt").exists() and seen == []  # nothing ran yet
    gate.set()
    compat.async_io_wait(io)
    assert seen == [True]  # the job saw the write queued before it done
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], torch.zeros(3))

    def fail() -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "b.ckpt"))

    compat.async_io_submit(io, fail)
    compat.async_io_submit(io, lambda: seen.append("after"))
    with pytest.raises(OSError, match="No space left on device: .*b.ckpt"):
        compat.async_io_wait(io)
    assert seen == [True, "after"]  # a failed job stops nothing queued after it
    io.teardown()  # the error was raised once: teardown does not raise it again


def test_retired_lightning_observer_kills_nothing_when_a_child_fails():
    import subprocess
    import sys

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    # the "main process" it would kill is a stand-in, never this test's own
    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    failed.wait()
    try:
        observer = _ChildProcessObserver(main.pid, [failed], sleep_period=0.2)
        observer.start()
        assert compat.retire_lightning_observer()
        observer.join(timeout=5)
        assert not observer.is_alive()
        assert main.poll() is None  # not killed: the failed child went unreported
    finally:
        main.kill()
        main.wait()


def test_lightning_observer_kills_the_main_process_when_not_retired():
    import subprocess
    import sys

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    failed.wait()
    _ChildProcessObserver(main.pid, [failed], sleep_period=0.2).start()
    assert main.wait(timeout=5) == -9  # what retire_lightning_observer prevents


@pytest.mark.parametrize(("kwargs", "shards"), [
    ({}, False),
    ({"strategy": "ddp", "devices": 1}, True),  # a distributed strategy shards even alone
    ({"strategy": "ddp", "devices": 1, "use_distributed_sampler": False}, False),
])
def test_shards_training_data_says_when_lightning_puts_in_a_distributed_sampler(kwargs, shards):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **kwargs)
    assert compat.shards_training_data(trainer) is shards
    assert compat.shards_training_data(object()) is None


def test_with_transform_reads_the_same_files_with_another_transform(tmp_path):
    from caitlab.data.images import checked_image_folder
    from conftest import make_image_folder

    folder = checked_image_folder(str(make_image_folder(tmp_path) / "train"),
                                  lambda image: ("train", image.size), "stop")
    other = compat.with_transform(folder, lambda image: ("eval", image.size))
    assert other.samples is folder.samples  # listed once
    assert other[0][0][0] == "eval" and folder[0][0][0] == "train"
    assert other[0][1] == folder[0][1]


def _cli():
    import argparse

    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("folder", help="where")
    parser.add_argument("--tail", type=int, default=20, help="lines")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("status", help="states").add_argument("--json", action="store_true")
    return parser


def test_parser_arguments_lists_every_argument_in_order():
    names = [a.option_strings or [a.dest] for a in compat.parser_arguments(_cli())]
    assert names[:3] == [["-h", "--help"], ["folder"], ["--tail"]]


def test_parser_subcommands_gives_each_subcommands_parser():
    subs = compat.parser_subcommands(_cli())
    assert list(subs) == ["status"]
    assert subs["status"].parse_args(["--json"]).json is True
    assert compat.parser_subcommands(subs["status"]) == {}


def test_config_root_walks_up_from_a_nested_node():
    cfg = OmegaConf.create({"a": {"b": {"c": 1}}})
    assert compat.config_root(cfg.a.b) is cfg


@pytest.mark.parametrize(("value", "plain"), [({"x": 1}, True), ("???", False), (None, False),
                                              ("${other}", False), (3, False)])
def test_is_plain_mapping_is_true_only_for_a_concrete_dict(value, plain):
    cfg = OmegaConf.create({"node": value, "other": {"y": 2}})
    assert compat.is_plain_mapping(compat.config_node(cfg, "node")) is plain


def test_sweeper_params_are_the_overrides_its_sweep_starts_from():
    sweeper = compat.BasicSweeper(max_batch_size=None, params={"model": "a,b", "seed": "0,1"})
    assert compat.sweeper_params(sweeper) == ["model=a,b", "seed=0,1"]


def test_the_suites_worker_groups_keep_their_tests_on_one_worker(tmp_path):
    """make test's two workers keep the tests that take both cores on one of them
    (tests/conftest.py marks them); pytest-xdist's loadgroup loses the marks on pytest 9.2
    (pytest-xdist#1386), which pyproject bounds."""
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_collection_modifyitems(config, items):\n"
        "    for item in items:\n"
        "        item.add_marker(pytest.mark.xdist_group('both-cores'))\n")
    (tmp_path / "test_a.py").write_text("".join(f"def test_{i}():\n    pass\n\n\n"
                                                for i in range(6)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", "-v", "-c", "/dev/null", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    workers = {line.split("]")[0] for line in out.stdout.splitlines() if "PASSED" in line}
    assert out.returncode == 0 and len(workers) == 1, out.stdout[-2000:]
