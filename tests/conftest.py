"""Shared fixtures: real peer processes on 127.0.0.1, each stopped (with all its children) after the test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import psutil
import pytest

from forked import ForkedPeer, start_peer

# Every test runs several peers on a 2-core machine: one compute thread each. With torch's default (a thread per
# core) the peers' threads contend for the 2 cores: test_swarm.py took 157 s and 241 s of CPU, 135 s and 197 s
# with one thread. Set before torch is imported here, and inherited by every process a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


class PeerProcesses:
    """Starts ``swarm`` subcommands as real processes; remembers every descendant so nothing outlives a test."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen | ForkedPeer] = {}
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, *args: str, new_session: bool = False) -> ForkedPeer:
        """Start ``swarm ARGS`` as process ``name`` (its output goes to NAME.log), forked with the stack already
        imported (tests/forked.py); ``new_session``: in a process group of its own (so a test can kill the group)."""
        return self.start_forked(name, args, new_session=new_session)

    def start_script(self, name: str, script: Path, *args: str) -> ForkedPeer:
        """Start ``python SCRIPT ARGS`` (a test's own peer program), forked like ``start``."""
        return self.start_forked(name, args, script=script)

    def start_forked(self, name: str, args: Sequence[str], **options) -> ForkedPeer:
        """``forked.start_peer`` with NAME.log, remembered as process ``name``."""
        proc = start_peer(list(args), self.workdir / f"{name}.log", **options)
        self.procs[name] = proc
        return proc

    def start_program(self, name: str, argv: list[str], new_session: bool = False) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session,
                                stdin=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def remember_children(self) -> None:
        for proc in self.procs.values():
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def wait(self, name: str, timeout: float) -> int:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            self.remember_children()
            time.sleep(0.5)
        if proc.poll() is None:
            raise AssertionError(f"{name} still running after {timeout:.0f} s; log tail:\n{self.log(name)[-3000:]}")
        return proc.returncode

    def wait_file(self, path: Path, name: str, timeout: float = 120) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember_children()
            if path.exists():
                return [line for line in path.read_text().splitlines() if line.strip()]
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited early:\n{self.log(name)[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"{path} did not appear within {timeout} s:\n{self.log(name)[-3000:]}")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs[name]
        self.remember_children()
        if proc.poll() is None:
            proc.send_signal(sig)

    def close(self) -> None:
        self.remember_children()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=10)
        for child in alive:  # only descendants of processes this fixture started
            child.kill()

    def leftovers(self) -> list[psutil.Process]:
        return [p for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module", autouse=True)
def fresh_mpfuture_locks():
    """Give each test module fresh copies of hivemind's cross-process MPFuture locks.

    A DHT or averager started inside this pytest process is forked from it and shares those locks (module-level
    ``mp.Lock``s) with every later one. A child terminated while it holds one (``DecentralizedAverager.shutdown``
    sends SIGTERM after its grace period) leaves it held for good: every DHT or averager started after that hangs
    in ``wait_until_ready``, and one module's bad exit made every later module time out. Peers forked from
    tests/forked.py are not affected (the forkserver imported hivemind itself). Reset between modules, when no
    child forked from here is meant to be running any more; a module's own children keep the locks they had."""
    mpfuture = sys.modules.get("hivemind.utils.mpfuture")
    if mpfuture is not None:
        mpfuture.MPFuture.reset_backend()
    yield


@pytest.fixture
def peers(tmp_path):
    procs = PeerProcesses(tmp_path)
    yield procs
    procs.close()


def scrape(url: str) -> str:
    """A /metrics page (or any HTTP 200 answer) as text."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def metric(url: str, name: str) -> float:
    """The value of the unlabelled series ``name`` on a /metrics page."""
    return float(next(line for line in scrape(url).splitlines() if line.startswith(f"{name} ")).split()[1])


def swarm_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``swarm ARGS`` to completion (for commands expected to exit by themselves), in a fresh interpreter as a
    user runs it: most such commands answer before the stack is imported, which a fork would hide."""
    return swarm_cli_finish(swarm_cli_start(*args), timeout=timeout)


def swarm_cli_start(*args: str) -> subprocess.Popen:
    """``swarm_cli`` in the background, for a command that must not hold the test up; ``swarm_cli_finish``
    collects it."""
    return subprocess.Popen([sys.executable, "-m", "peers.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, stdin=subprocess.DEVNULL)


def swarm_cli_finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """What ``subprocess.run`` returns for ``proc``; past ``timeout`` it is killed and TimeoutExpired raised."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for_step(procs: PeerProcesses, name: str, step: int, timeout: float = 240) -> None:
    """Until ``name`` logs a global step >= ``step`` (a trainer that catches up by download skips numbers)."""
    deadline = time.monotonic() + timeout
    while max(map(int, re.findall(r"Global step (\d+) done", procs.log(name))), default=-1) < step:
        assert time.monotonic() < deadline, f"{name} did not reach step {step}:\n{procs.log(name)[-3000:]}"
        assert procs.procs[name].poll() is None, procs.log(name)[-3000:]
        procs.remember_children()
        time.sleep(0.5)


def report(work: Path, name: str) -> dict:
    """The JSON that ``swarm join --report-json WORK/NAME.json`` wrote."""
    return json.loads((work / f"{name}.json").read_text())
