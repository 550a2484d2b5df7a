"""A run's status values and their sets (caitlab.status): what each set's users rely on, and
that a summary written with a member holds the plain string."""

from __future__ import annotations

import json

from caitlab.record import RunRecord, read_summary
from caitlab.status import (
    ACTIVE,
    DISPLAY_ORDER,
    FINAL,
    LIVE,
    RETRY_ONLY,
    SUBMITTED_OVER,
    Status,
    diverged_label,
)
from caitlab.sweeps import snapshot
from conftest import write_summary

# the values caitlab writes into summary.json; LOST and UNREADABLE are display only
WRITTEN = set(Status) - {Status.LOST, Status.UNREADABLE}


def test_a_summary_the_record_writes_holds_the_plain_string(tmp_path):
    RunRecord(tmp_path, {"signature": "abc"}).fail("boom")
    assert b'"status": "failed"' in (tmp_path / "summary.json").read_bytes()
    assert type(read_summary(tmp_path)["status"]) is str


def test_the_record_in_memory_holds_the_string_wandb_is_handed(tmp_path):
    # wandb writes an Enum member by its name (FAILED): the record's copy must be the string
    record = RunRecord(tmp_path)
    record.fail("boom")
    assert type(record["status"]) is str and record["status"] == "failed"


def test_members_compare_hash_and_format_as_their_strings():
    assert Status.RUNNING == "running" and "running" in LIVE and Status.RUNNING in {"running"}
    assert {"running": 1}[Status.RUNNING] == 1
    assert f"{Status.CANCELLED}" == str(Status.CANCELLED) == "cancelled"
    assert json.dumps({Status.DIVERGED: Status.DIVERGED}) == '{"diverged": "diverged"}'


def test_a_relaunch_reruns_only_failed_and_diverged_on_request():
    assert set(RETRY_ONLY) == {"failed", "diverged"}


def test_only_pending_and_running_summaries_can_be_lost():
    assert set(ACTIVE) == {"pending", "running"}


def test_a_job_may_still_be_alive_for_active_and_interrupted_runs():
    assert set(LIVE) == {"pending", "running", "interrupted"}


def test_every_written_status_is_either_live_or_final():
    # a run no job may still serve is final: its submission's code snapshot can go
    assert set(LIVE) | set(FINAL) == WRITTEN and not set(LIVE) & set(FINAL)
    assert Status.BLOCKED in FINAL


def test_a_submitted_run_says_pending_over_every_state_but_running_and_completed():
    assert set(SUBMITTED_OVER) == {None} | WRITTEN - {Status.RUNNING, Status.COMPLETED}


def test_the_counts_line_orders_every_status():
    assert set(DISPLAY_ORDER) == set(Status) and len(DISPLAY_ORDER) == len(Status)


def test_a_tuple_set_answers_for_any_json_value():
    # a hand-edited summary may hold a list: looked up, it is simply not in the set
    assert ["failed"] not in FINAL and {} not in LIVE


def test_a_diverged_run_is_shown_with_its_epoch():
    assert diverged_label({"diverged_epoch": 3}) == "diverged at epoch 3"
    assert diverged_label({}) == "diverged at epoch ?"


def test_a_snapshot_goes_once_its_runs_are_completed_or_blocked(tmp_path):
    sweep = tmp_path / "sweep"
    runs = {sweep / "teacher": Status.COMPLETED, sweep / "student": Status.BLOCKED}
    for folder, status in runs.items():
        write_summary(folder, status=status)
    snap = sweep / ".submitit" / f"{snapshot.PREFIX}abc"
    (snap / "code").mkdir(parents=True)
    (snap / snapshot.RUNS_FILE).write_text(json.dumps([str(p) for p in runs]))
    assert snapshot.clean(sweep) == [snap] and not snap.exists()
