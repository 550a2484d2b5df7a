"""One run per slot of the machine in a local sweep (caitlab.slots): the slots cut from
simulated device lists, the locks, the pinning, and a real local sweep on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from caitlab import slots
from caitlab.slots import Slot, gpu_devices, layout
from conftest import clean_env

GPUS8 = [str(i) for i in range(8)]


def _disjoint(groups) -> bool:
    flat = [x for g in groups for x in g]
    return len(flat) == len(set(flat))


def test_a_gpu_machine_has_one_slot_per_devices_gpus_with_an_even_share_of_the_cores():
    one = layout(GPUS8, range(16), devices=1, cpus_per_task=None)
    assert [s.gpus for s in one] == [(g,) for g in GPUS8]
    assert [len(s.cores) for s in one] == [2] * 8 and _disjoint(s.cores for s in one)
    two = layout(GPUS8, range(16), devices=2, cpus_per_task=8)  # cpus_per_task: CPU runs only
    assert [s.gpus for s in two] == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert [s.cores for s in two] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11),
                                      (12, 13, 14, 15)]
    # 3 GPUs for runs of 2: one slot of 2 GPUs (the third idles), every core
    assert layout(["0", "1", "2"], range(6), devices=2, cpus_per_task=None) == \
        [Slot(0, ("0", "1"), tuple(range(6)))]
    # the GPUs as CUDA_VISIBLE_DEVICES names them, the cores as the affinity mask has them
    assert layout(["GPU-a", "GPU-b"], [3, 5, 8, 9], devices=1, cpus_per_task=None) == \
        [Slot(0, ("GPU-a",), (3, 5)), Slot(1, ("GPU-b",), (8, 9))]


def test_too_few_gpus_or_cores_still_make_a_slot_and_fewer_cores_than_slots_go_round():
    assert layout(["0"], range(4), devices=2, cpus_per_task=None) == \
        [Slot(0, ("0",), (0, 1, 2, 3))]  # the trainer's check then says 1 GPU is visible
    shared = layout(GPUS8, range(3), devices=1, cpus_per_task=None)
    assert len(shared) == 8 and [s.cores for s in shared] == [(i % 3,) for i in range(8)]
    assert layout([], [0, 1], devices=None, cpus_per_task=8) == [Slot(0, (), (0, 1))]


def test_a_cpu_machine_has_one_slot_per_cpus_per_task_cores():
    four = layout([], range(16), devices=None, cpus_per_task=4)
    assert [s.cores for s in four] == [tuple(range(i, i + 4)) for i in range(0, 16, 4)]
    assert all(s.gpus == () for s in four)
    assert [s.cores for s in layout([], range(7), None, 3)] == [(0, 1, 2), (3, 4, 5)]
    assert len(layout([], range(2), None, None)) == 2  # unset: one core each
    # a CPU run on a GPU machine: cut by cores, no GPU
    assert layout(GPUS8, range(4), devices=None, cpus_per_task=2) == \
        [Slot(0, (), (0, 1)), Slot(1, (), (2, 3))]


def test_gpus_per_run_follow_the_trainer():
    assert gpu_devices({"accelerator": "cpu", "devices": 1}, GPUS8) is None
    assert gpu_devices({"accelerator": "gpu", "devices": 2}, GPUS8) == 2
    assert gpu_devices({"accelerator": "cuda"}, GPUS8) == 1
    assert gpu_devices({"accelerator": "auto", "devices": 1}, []) is None
    assert gpu_devices({"accelerator": "auto", "devices": 1}, GPUS8) == 1
    assert gpu_devices({"accelerator": "gpu", "devices": [0, 1]}, GPUS8) == 2
    for every in ("auto", -1):  # Lightning takes every visible GPU: one slot
        assert gpu_devices({"accelerator": "gpu", "devices": every}, GPUS8) == 8


def test_the_machines_gpus_are_cuda_visible_devices_or_every_gpu_nvml_counts(monkeypatch):
    monkeypatch.setattr(slots, "nvml_gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert slots.machine_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # submitit's local job: says nothing
    assert slots.machine_gpus() == ["0", "1", "2", "3"]
    monkeypatch.undo()
    assert slots.nvml_gpu_count() >= 0  # this machine's own count, 0 without a driver


def test_slots_are_only_for_local_sweep_jobs_that_ask(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"cluster": {"slots": True}, "trainer": {"accelerator": "cpu"}})
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert slots.claim(cfg, tmp_path / "run") is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert slots.claim(OmegaConf.create({"cluster": {"slots": False}}), tmp_path) is None
    assert not (tmp_path / ".slots").exists()


def test_a_job_takes_a_free_slot_and_waits_while_none_is(tmp_path, capsys):
    two = [Slot(0, (), (0,)), Slot(1, (), (1,))]
    (a, fa), (b, fb) = slots.acquire(tmp_path, two), slots.acquire(tmp_path, two)
    assert (a.index, b.index) == (0, 1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire(tmp_path, two, 0.05)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not got  # both taken: it waits
    os.close(fb)
    waiter.join(timeout=10)
    assert got and got[0][0].index == 1
    assert capsys.readouterr().out.count("waiting for a free slot (2 busy)") == 1
    os.close(fa)
    os.close(got[0][1])


def test_a_killed_job_gives_its_slot_back(tmp_path):
    one = [Slot(0, (), (0,))]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from caitlab import slots; "
         f"slots.acquire(Path({str(tmp_path)!r}), [slots.Slot(0, (), (0,))]); "
         "print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True,
        env=clean_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        got = []
        waiter = threading.Thread(target=lambda: got.append(slots.acquire(tmp_path, one, 0.05)))
        waiter.start()
        time.sleep(0.3)
        assert not got
        holder.kill()  # no clean-up runs: the kernel drops the lock
        waiter.join(timeout=10)
        assert got and got[0][0].index == 0
        os.close(got[0][1])
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
def test_pinning_keeps_the_process_to_its_cores_and_gpus(tmp_path, monkeypatch):
    code = ("import os; from caitlab import slots; from caitlab.cpus import "
            "available_cpus; slots.pin(slots.Slot(0, ('3',), (0,))); "
            "print(sorted(os.sched_getaffinity(0)), available_cpus(), "
            "os.environ['CUDA_VISIBLE_DEVICES'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=clean_env(), check=True).stdout.split()
    assert out == ["[0]", "1", "3"]
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA started before the run's slot"):
        slots.pin(Slot(0, ("0",), (0,)))


def _watch(proc: subprocess.Popen, sweep) -> list[dict[str, dict]]:
    """What the sweep's summaries say is running, every 0.1 s until the sweep ends."""
    seen = []
    while proc.poll() is None:
        running = {}
        for path in sweep.glob("*/summary.json"):
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if summary.get("status") == "running":
                running[path.parent.name] = summary.get("slot")
        seen.append(running)
        time.sleep(0.1)
    return seen


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity")
                    else True, reason="needs 2 cores and affinity masks")
def test_a_local_sweep_runs_one_run_per_core_each_on_its_own(tmp_path):
    cores = len(os.sched_getaffinity(0))
    cmd = [sys.executable, "-m", "caitlab.train", "-m", "hydra/launcher=local",
           "hydra.launcher.snapshot=false", "model=vit_tiny", "model.embed_dim=16",
           "model.depth=1", "trainer=debug", "logger=csv", "trainer.enable_progress_bar=false",
           "++cluster.slots=true", "cluster.cpus_per_task=1", "name=slots",
           f"seed={','.join(str(s) for s in range(cores + 1))}", f"paths.output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = _watch(proc, tmp_path / "slots")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "slots").glob("*/summary.json")]
    assert len(summaries) == cores + 1 and {s["status"] for s in summaries} == {"completed"}
    assert max(len(r) for r in seen) <= cores  # never more runs than slots at once
    for running in seen:  # runs at once have cores of their own
        assert _disjoint(slot["cores"] for slot in running.values())
    for s in summaries:
        assert len(s["slot"]["cores"]) == 1 and s["slot"]["gpus"] == [] and s["threads"] == 1
        assert s["slot"]["of"] == cores
    # Side by side: a run waited, so every slot was held at once, by runs on cores of their
    # own. (Whether the 0.1 s poll above catches two of them "running" is luck: a debug run
    # trains for 0.1 s, and CI once saw one at a time.)
    assert max(s["slot"]["waited_s"] for s in summaries) > 0
    first = [s["slot"] for s in summaries if s["slot"]["waited_s"] == 0]
    assert sorted(slot["index"] for slot in first) == list(range(cores))
    assert _disjoint(slot["cores"] for slot in first)
    logs = "".join(p.read_text() for p in (tmp_path / "slots" / ".submitit").rglob("*.out"))
    assert "waiting for a free slot" in logs



@pytest.mark.parametrize(("asked", "visible", "machine", "params"), [
    (1, None, 8, {"gpus_per_node": 8}),  # every GPU, so 8 slots, not 8 runs on GPU 0
    (2, "", 4, {"gpus_per_node": 4}),
    (1, "2,3", 8, {"gpus_per_node": 2, "visible_gpus": [2, 3]}),  # the launcher's own GPUs
    (1, "GPU-a1,GPU-b2", 8, {"gpus_per_node": 2}),
    (None, None, 8, {}),  # CPU runs ask for none
    (1, None, 0, {}),
])
def test_a_local_sweep_with_slots_shows_each_job_every_gpu_of_the_launcher(asked, visible,
                                                                            machine, params):
    assert slots.local_gpu_request(asked, visible, machine) == params


@pytest.mark.parametrize(("slots_on", "gpus"), [(True, 4), (False, 1)])
def test_the_local_launcher_asks_for_every_gpu_only_with_slots(monkeypatch, tmp_path, slots_on,
                                                               gpus):
    from omegaconf import OmegaConf

    from hydra_plugins.caitlab_launcher.launcher import LocalLauncher

    monkeypatch.setattr(slots, "nvml_gpu_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    launcher = LocalLauncher(submitit_folder=str(tmp_path / "%j"), timeout_min=1,
                             cpus_per_task=1, gpus_per_node=1, tasks_per_node=1, nodes=1,
                             mem_gb=None, name="x", stderr_to_stdout=False)
    launcher.config = OmegaConf.create({"cluster": {"slots": slots_on}})
    executor, _ = launcher._executor()
    assert executor._executor.parameters["gpus_per_node"] == gpus
