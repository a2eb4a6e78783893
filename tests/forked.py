"""Peer processes forked from a server that has imported the stack once.

A trainer spends ~5.5 s of CPU importing torch, hivemind and transformers before it does anything else; a swarm
fixture starts four to six peers at once on 2 cores, so every swarm waited ~10 s for imports. The tests' peers are
instead forked from a ``multiprocessing`` forkserver that preloaded those modules. Each is still a process of its
own, in a session of its own when asked, with its own DHT, averagers and p2pd, running ``peers.cli.main`` on the
arguments ``swarm ARGS`` would get, with its output in its log. The tests' own peer programs (tests/adversary.py, the
intruder of tests/test_private.py) are forked the same way. Commands run to completion (``conftest.swarm_cli``: exit
codes, one-line errors, what is imported before the stack) and ``swarm demo`` with the peers it starts are exec'd,
as a user runs them.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ["forked_preload"]  # in tests/
CLONE_NEWNET = 0x40000000

_context = None
_pythonpath = os.environ.get("PYTHONPATH")  # the peers' own, restored in each


def _forkserver():
    """The forkserver, started on first use with the stack imported. It imports PRELOAD before it serves, and says
    nothing when that fails (ImportError is swallowed); Python 3.11 also ignores the sys.path it is given, so tests/
    reaches it through PYTHONPATH, and a peer finding the stack not imported fails the test (``_run``)."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), _pythonpath]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            _restore_pythonpath()
        _context = context
    return _context


def _restore_pythonpath() -> None:
    if _pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = _pythonpath


class ForkedPeer:
    """What the tests use of ``subprocess.Popen``, for a peer forked from the server."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self.pid = process.pid
        self.args = process.name

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # negative: killed by that signal, as with Popen

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_peer(args: list[str], log: Path, *, new_session: bool = False, netns: str | None = None,
               script: Path | None = None) -> ForkedPeer:
    """Fork ``swarm ARGS`` (or ``python SCRIPT ARGS``, a test's own peer program) from the server; stdout and stderr
    go to ``log``; ``netns``: run inside that network namespace (one ``ip netns add`` made), as ``ip netns exec``
    would."""
    log.write_bytes(b"")  # here, not in the child: a test may read the log as soon as this returns
    process = _forkserver().Process(target=_run, args=(list(args), str(log), new_session, netns,
                                                      str(script) if script else None),
                                    name=f"{script or 'swarm'} {' '.join(args)}")
    process.start()
    return ForkedPeer(process)


def _run(args: list[str], log: str, new_session: bool, netns: str | None, script: str | None) -> None:
    """In the forked child: become what ``python -m peers.cli ARGS`` (or ``python SCRIPT ARGS``) would be, then
    run it."""
    multiprocessing.set_start_method(None, force=True)  # unset, as in a new interpreter (the server forced its own)
    _restore_pythonpath()
    if new_session:
        os.setsid()
    if netns:
        _enter_netns(netns)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)  # as PYTHONUNBUFFERED=1 makes them
    if "forked_preload" not in sys.modules:
        raise RuntimeError("the forkserver did not import tests/forked_preload.py: peers would import the stack again")
    os.environ["PYTHONUNBUFFERED"] = "1"  # for the processes it starts in turn
    os.chdir(ROOT)
    sys.argv = [script or str(ROOT / "peers" / "cli.py"), *args]
    import numpy

    numpy.random.seed()  # each forked child would otherwise share the server's numpy state (torch's is fixed anyway)
    try:
        if script:
            sys.path.insert(0, os.path.dirname(script))  # as for a script run by path
            runpy.run_path(script, run_name="__main__")  # exits through SystemExit, as the script would
            code = 0
        else:
            from peers.cli import main

            code = main(args)
    finally:  # what the interpreter does at exit; multiprocessing ends a child with os._exit, which would skip it
        threading._shutdown()  # waits for the threads that are not daemons (a second call returns at once)
        atexit._run_exitfuncs()
    sys.exit(code)


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name} failed")
    finally:
        os.close(fd)
