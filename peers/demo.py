"""``swarm demo``: a seed and N trainers on 127.0.0.1 in one command, with live progress and a summary.

    swarm demo --peers 3 --steps 10 --summary-json summary.json

Each peer is a real process (logs under --workdir); the demo watches their progress records in the DHT.
Its monitor peer serves Prometheus metrics and saves checkpoints (evaluated on held-out text) under
WORKDIR/checkpoints, halfway and at the end when it gets there before the trainers leave.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from swarm.config import load_config
from swarm.errors import SwarmError
from swarm.summary import summarize

logger = logging.getLogger("swarm.demo")



class Peers:
    """Child processes of the demo; every one is stopped (TERM, then KILL) when the demo ends. ``computing``: how
    many of them compute at once (the trainers and the monitor): each gets its share of the cores as torch threads,
    unless OMP_NUM_THREADS says otherwise (with a thread per core each, they contend for the cores)."""

    def __init__(self, workdir: Path, computing: int = 1):
        self.workdir, self.procs = workdir, {}
        self.env = dict(os.environ)
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, computing))))

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "peers.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent, env=self.env)
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        text = (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])

    def stop_all(self, grace: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float, what: str = "the seed") -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return [line for line in path.read_text().splitlines() if line.strip()]
        if proc.poll() is not None:
            raise SwarmError(f"{what} exited with code {proc.returncode} before it was ready")
        time.sleep(0.2)
    raise SwarmError(f"{what} was not ready after {timeout:.0f} s")


def start_monitor(peers: Peers, addresses: list[str], port: int, workdir: Path, steps: int) -> None:
    """The monitor peer is a convenience here: if it cannot start, the demo goes on without it."""
    monitor = peers.start("monitor", ["monitor", *addresses, "--metrics-port", str(port), "--poll-period", "2",
                                      "--addr-file", str(workdir / "monitor.url"),
                                      "--checkpoint-dir", str(workdir / "checkpoints"),
                                      "--checkpoint-every", str(max(1, steps // 2)), "--keep", "2",
                                      "--eval-batches", "4"])
    try:
        url = wait_for_file(workdir / "monitor.url", monitor, timeout=60, what="the monitor")[0]
        print(f"Monitor serving Prometheus metrics at {url}", flush=True)
    except SwarmError as error:
        print(f"warning: {error}; continuing without it:\n{peers.log_tail('monitor', 3)}", file=sys.stderr)


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    if args.peers < 1 or args.steps < 1:
        raise SwarmError("--peers and --steps must be at least 1")
    config = load_config(args.config, args.set)  # fail fast, before any process starts
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"Demo swarm {config.run_id!r}: 1 seed + {args.peers} trainers, {args.steps} global steps; "
          f"logs in {workdir}", flush=True)
    peers = Peers(workdir, computing=args.peers + 1)
    try:
        sets = [item for pair in args.set for item in ("--set", pair)]
        seed = peers.start("seed", ["seed", "--config", args.config, "--addr-file", str(workdir / "seed.addr"),
                                    *sets])
        try:
            addresses = wait_for_file(workdir / "seed.addr", seed, timeout=60)
        except SwarmError:
            print(peers.log_tail("seed"), file=sys.stderr)
            raise
        print(f"Seed ready at {addresses[0]}", flush=True)
        start_monitor(peers, addresses, args.metrics_port, workdir, args.steps)
        for index in range(args.peers):
            peers.start(f"trainer-{index}", ["join", *addresses, "--max-steps", str(args.steps),
                                             "--wait-for-peers", str(args.peers),
                                             "--report-json", str(workdir / f"trainer-{index}.json")])
        failed = watch(peers, args.peers, args.steps, stop, workdir)
        if stop.is_set():
            return 130
        if failed:
            for name in failed:
                print(f"{name} failed; last lines of its log:\n{peers.log_tail(name)}", file=sys.stderr)
            raise SwarmError(f"{len(failed)} trainer(s) failed: see the logs in {workdir}")
        reports = [json.loads((workdir / f"trainer-{i}.json").read_text()) for i in range(args.peers)]
        summary = summarize(reports)
        summary["checkpoint"] = latest_checkpoint(workdir / "checkpoints")
        print_summary(summary)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary, indent=1))
        return 0
    finally:
        peers.stop_all()


def watch(peers: Peers, count: int, steps: int, stop: threading.Event, workdir: Path) -> list[str]:
    """Print progress until every trainer exits; returns the names of those that failed."""
    trainers = [f"trainer-{i}" for i in range(count)]
    last_line = ""
    while not stop.is_set():
        codes = {name: peers.procs[name].poll() for name in trainers}
        line = progress_line(workdir, trainers, steps)
        if line != last_line:
            print(line, flush=True)
            last_line = line
        if all(code is not None for code in codes.values()):
            return [name for name, code in codes.items() if code != 0]
        stop.wait(2.0)
    return []


def progress_line(workdir: Path, trainers: list[str], steps: int) -> str:
    """Read the trainers' latest log lines (cheap, and works before the DHT records exist)."""
    latest = {}
    for name in trainers:
        log = workdir / f"{name}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        done = [line for line in text.splitlines() if "Global step" in line and "done" in line]
        latest[name] = done[-1].split("Global step", 1)[1].strip() if done else "starting"
    return "  " + " | ".join(f"{name}: {state}" for name, state in latest.items()) + f"   (target {steps} steps)"


def latest_checkpoint(root: Path) -> dict | None:
    """The monitor's newest checkpoint and its held-out evaluation, if it saved one."""
    try:
        state = json.loads((root / "latest" / "swarm_state.json").read_text())
        evaluation = json.loads((root / "latest" / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return dict(path=str(root / "latest"), step=state.get("step"), eval_loss=evaluation.get("loss"),
                eval_perplexity=evaluation.get("perplexity"))


def print_summary(summary: dict) -> None:
    print("\nSummary", flush=True)
    print(f"  global steps made:            {summary['steps']}")
    print(f"  fewest peers in any round:    {summary['min_peers_averaged']}")
    print(f"  rounds averaged/partial/skipped/failed: {summary['rounds']}")
    print(f"  training loss:                {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}")
    print(f"  gradient wire bytes/param:    {summary['wire_bytes_per_param']:.3f} (fp32 would be 4.0); "
          f"{summary['grad_bytes_per_param_per_round']:.3f} sent per peer per round")
    print(f"  bytes sent by all peers:      {summary['bytes_sent'] / 1e6:.1f} MB "
          f"(fp32 would be {summary['bytes_sent_fp32'] / 1e6:.1f} MB; saved {summary['bytes_saved'] / 1e6:.1f} MB)")
    checkpoint = summary.get("checkpoint")
    if checkpoint:
        print(f"  latest checkpoint:            step {checkpoint['step']}, held-out loss {checkpoint['eval_loss']:.3f} "
              f"(perplexity {checkpoint['eval_perplexity']:.1f})\n    {checkpoint['path']}")
    print(flush=True)

