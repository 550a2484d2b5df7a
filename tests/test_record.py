"""A run's record (caitlab.record): its state changes, the reader that brings older summaries
to today's form, and the folders named by the previous signature rule."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from caitlab import identity
from caitlab.record import (
    SUMMARY_VERSION,
    RunRecord,
    find_folder,
    read_summary,
    upgrade,
)
from caitlab.resolvers import register_resolvers
from caitlab.status import Status
from caitlab.train import CONF_DIR
from conftest import write_summary

# each state change: (the call, the status it writes, the fields it writes with it)
CHANGES = {
    "start": (lambda r: r.start(resumed_from=None), Status.RUNNING, {"attempts": 1}),
    "complete": (lambda r: r.complete(**{"test/top1": 0.9}), Status.COMPLETED,
                 {"test/top1": 0.9}),
    "fail": (lambda r: r.fail("boom"), Status.FAILED, {"error": "boom"}),
    "diverge": (lambda r: r.diverge(3, 40, "loss is nan"), Status.DIVERGED,
                {"diverged_epoch": 3, "diverged_step": 40, "error": "loss is nan"}),
    "interrupt": (lambda r: r.interrupt("SIGTERM", requeued=True), Status.INTERRUPTED,
                  {"interrupted_by": "SIGTERM", "requeued": True}),
    "block": (lambda r: r.block("0a1b2c3d4e", "blocked: pretrain failed"), Status.BLOCKED,
              {"blocked_by": "0a1b2c3d4e", "error": "blocked: pretrain failed"}),
    "cancel": (lambda r: r.cancel(), Status.CANCELLED, {}),
    "pending": (lambda r: r.pending("7_0"), Status.PENDING, {"slurm_job_id": "7_0"}),
}


@pytest.mark.parametrize("change", CHANGES)
def test_each_state_change_writes_its_status_and_facts(tmp_path, change):
    call, status, fields = CHANGES[change]
    call(RunRecord(tmp_path, {"signature": "abc"}))
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["status"] == status and written["signature"] == "abc"
    assert {k: written[k] for k in fields} == fields
    assert written["summary_version"] == SUMMARY_VERSION


def test_a_status_is_written_only_by_a_state_change(tmp_path):
    with pytest.raises(TypeError, match="state methods"):
        RunRecord(tmp_path).update(status="completed")
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("newer", [Status.RUNNING, Status.COMPLETED])
def test_pending_leaves_the_newer_state_of_a_job_that_has_started(tmp_path, newer):
    write_summary(tmp_path, status=newer, slurm_job_id="6_0")
    assert RunRecord(tmp_path).pending("7_0") is False
    assert (read_summary(tmp_path)["status"], read_summary(tmp_path)["slurm_job_id"]) == (
        newer, "6_0")


def test_a_record_on_another_rank_writes_nothing(tmp_path):
    RunRecord(tmp_path, writable=False).start()
    assert not (tmp_path / "summary.json").exists()


def _old_run(folder, data_target: str, **summary):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"_target_": data_target}}))
    (folder / "summary.json").write_text(json.dumps({"status": "completed", **summary}))


def test_a_summary_from_before_data_was_recorded_names_it_by_its_datamodule(tmp_path):
    _old_run(tmp_path / "run", "caitlab.data.Cifar10DataModule")
    assert read_summary(tmp_path / "run")["data"] == "cifar10"


def test_an_older_summary_of_data_validated_on_its_test_images_says_so(tmp_path):
    _old_run(tmp_path / "run", "caitlab.data.ImageFolderDataModule")
    assert read_summary(tmp_path / "run")["selection"] == {"test_is_selection": True}


def test_an_older_summary_of_data_with_a_validation_split_claims_no_selection(tmp_path):
    _old_run(tmp_path / "run", "caitlab.data.DigitsDataModule")
    assert read_summary(tmp_path / "run").get("selection") is None


def test_a_current_summary_reads_as_it_was_written():
    current = {"summary_version": SUMMARY_VERSION, "data": "imagefolder", "status": "completed"}
    assert upgrade(current) == current


# configs whose data files changed their defaults since the previous rule named their folders
# (data.num_workers was 8, now `auto`; keys added since, such as data.repeated_aug)
OLD_DATA = ["data=imagefolder", "data.root=/x", "data.crop_pct=0.875"]
ADDED_SINCE = ("repeated_aug", "normalize_on_device", "val_fraction", "remode")


@pytest.fixture(scope="module")
def composed():
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield lambda overrides: compose("train", overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()


def _previous_rule_folder(parent, name: str, cfg, **changes) -> None:
    """A run folder as caitlab wrote it under the previous rule: no ``delta`` in its summary,
    and a config.yaml without the keys added since."""
    # (paths and the other keys the signature leaves out are compared by no rule)
    patterns = identity.exclusions(cfg)
    config = {k: identity.resolved(cfg, str(k)) for k in cfg
              if not identity.excluded(str(k), patterns)}
    config["data"] = {k: v for k, v in config["data"].items() if k not in ADDED_SINCE}
    config["data"]["num_workers"] = 8
    node = OmegaConf.create(config)
    for key, value in changes.items():
        OmegaConf.update(node, key, value)
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(node))
    (folder / "summary.json").write_text(json.dumps({"status": "completed",
                                                     "signature": name}))


def test_a_folder_named_by_the_previous_rule_is_found_by_the_config_it_holds(tmp_path,
                                                                              composed):
    cfg = composed(OLD_DATA)
    _previous_rule_folder(tmp_path, "ac24a26cab", cfg)
    assert find_folder(tmp_path, identity.signature(cfg), cfg) == "ac24a26cab"


def test_a_previous_rule_folder_of_another_config_is_not_taken(tmp_path, composed):
    cfg = composed(OLD_DATA)
    _previous_rule_folder(tmp_path, "ac24a26cab", cfg, **{"optim.lr": 0.5})
    sig = identity.signature(cfg)
    assert find_folder(tmp_path, sig, cfg) == sig


def test_a_previous_rule_folder_resumed_since_is_still_found(tmp_path, composed):
    # a resumed attempt writes today's delta into the old folder's summary
    cfg = composed(OLD_DATA)
    _previous_rule_folder(tmp_path, "ac24a26cab", cfg)
    summary = tmp_path / "ac24a26cab" / "summary.json"
    delta = identity.run_delta(cfg)
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "delta": delta,
                                   "summary_version": SUMMARY_VERSION}))
    assert find_folder(tmp_path, identity.signature(cfg), cfg) == "ac24a26cab"


def test_a_folder_of_todays_rule_is_never_taken_for_another_run(tmp_path, composed):
    # even one whose config.yaml would compare equal: its name is its own run's signature
    cfg, other = composed(OLD_DATA), composed([*OLD_DATA, "seed=7"])
    _previous_rule_folder(tmp_path, identity.signature(other), cfg)
    write_summary(tmp_path / identity.signature(other), delta=identity.run_delta(other))
    sig = identity.signature(cfg)
    assert find_folder(tmp_path, sig, cfg) == sig
