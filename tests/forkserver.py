"""``caitlab-train`` runs forked from one process that has already done the imports.

``python -m caitlab.train`` spends ~10 s importing lightning, torch and timm on the test machine
before it reads its config. Tests that launch a run many times (SIGKILL fault injection, disk
full, the CLI error paths) start one server that imports all of it once and forks a child per
run. Each child is a fresh process for everything a run does -- its own pid, signal handlers,
Hydra state, working folder, environment, files and exit status -- and it calls the same
``caitlab.train.main`` the console script calls. The server has run no torch op when it forks,
so no OpenMP thread pool is copied into a child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT, clean_env

_SERVER = r"""
import json, os, sys, traceback

import caitlab.data, caitlab.models, caitlab.train, helpers
import caitlab.training.callbacks, caitlab.training.module, caitlab.training.preemption
import caitlab.training.tracking, hydra_plugins.caitlab_launcher.launcher
import lightning.pytorch

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = ["caitlab-train", *req["args"]]
            try:
                caitlab.train.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Result:
    returncode: int  # negative: killed by that signal, as subprocess reports it
    stdout: str
    stderr: str


class ForkServer:
    """Runs ``caitlab-train`` with the overrides the tests give, one run at a time."""

    def __init__(self) -> None:
        # One intra-op thread: these runs are tiny, and on a shared 2-core machine torch's
        # spinning OpenMP threads made each one 4-5x slower (12-16 s instead of 3 s). Fixed
        # when torch is imported, so it holds for every child.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER], cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"),
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"fork server did not start (exit {self.proc.wait()})")
        # the runs' output goes here, not into the folders (or full disks) the tests inspect
        self._logs_dir = Path(tempfile.mkdtemp(prefix="caitlab-forkserver-"))
        self._n = 0

    def run(self, out: Path, *overrides: str, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 600) -> Result:
        """Runs caitlab-train in ``out`` as ``conftest.caitlab_train`` would, in a fork."""
        flags = [o for o in overrides if o.startswith("-")]
        args = [*flags, f"paths.output_dir={out}", "trainer.enable_progress_bar=false",
                *(o for o in overrides if o not in flags)]
        self._n += 1
        logs = (self._logs_dir / f"{self._n}.stdout", self._logs_dir / f"{self._n}.stderr")
        req = {"cwd": str(out), "args": args, "env": env or clean_env(),
               "stdout": str(logs[0]), "stderr": str(logs[1])}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]

        timed_out = threading.Event()

        def kill() -> None:  # a hung run must fail its test, not hang the whole session
            timed_out.set()
            os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            code = json.loads(self.proc.stdout.readline())["returncode"]
        finally:
            timer.cancel()
        result = Result(code, *(p.read_text() for p in logs))
        for p in logs:
            p.unlink()
        if timed_out.is_set():
            raise AssertionError(f"caitlab-train ran over {timeout} s and was killed\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        if check and result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-5000:]}")
        return result

    def close(self) -> None:
        # between runs the server holds nothing worth a clean exit, and torch's takes seconds
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        self._logs_dir.rmdir()
