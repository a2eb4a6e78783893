"""Churn soak: a swarm on 127.0.0.1 where one trainer leaves and another joins every ~30 s (issue 4, item 12).

    python -m benchmarks.soak --minutes 10 --stable 2 --churning 2 --period 30 --json soak.json

``--stable`` trainers run from start to end (their memory is watched); ``--churning`` slots each hold a trainer
that is replaced in turn: every ``--period`` seconds the oldest churning trainer is stopped (SIGTERM to its
process group, as a service manager stops it; SIGKILL with ``--kill``, or when it is still running 30 s later)
and a new one joins through a random live peer. The minutes count from the swarm's first global step. Reported: global steps made, the swarm's
longest stall (the longest time without any trainer finishing a global step, after the first step), rounds
averaged / partial / skipped / failed over all trainers, and each stable trainer's RSS growth (the trainer and
its helper processes, first sample after its first step to the last sample), and how many leavers needed
SIGKILL. Goals (issue 4): no stall longer
than ``timeouts.averaging``; RSS growth under 10%.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from swarm.config import load_config

logger = logging.getLogger("benchmarks.soak")
ROOT = Path(__file__).resolve().parent.parent
STEP_RE = re.compile(r"Global step (\d+) done")
LEAVE_GRACE = 30.0  # seconds a leaver has to exit by itself after SIGTERM


@dataclass
class Peer:
    name: str
    proc: subprocess.Popen
    log: Path
    report: Path
    rss: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes) once it has made a step


class Swarm:
    def __init__(self, workdir: Path, config: str):
        self.workdir, self.config, self.peers, self.count = workdir, config, {}, 0
        self.seed_proc: subprocess.Popen | None = None
        self.addresses: list[str] = []
        self.leaving: dict[str, float] = {}  # name -> when it gets SIGKILL if still running
        self.forced: list[str] = []  # leavers that needed SIGKILL

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "peers.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return proc, log

    def start_seed(self) -> None:
        addr_file = self.workdir / "seed.addr"
        self.seed_proc, _ = self._spawn("seed", ["seed", "--config", self.config, "--addr-file", str(addr_file)])
        self.addresses = wait_lines(addr_file, self.seed_proc)

    def join(self, wait_for: int = 1) -> Peer:
        name = f"trainer-{self.count}"
        self.count += 1
        addr_file, report = self.workdir / f"{name}.addr", self.workdir / f"{name}.json"
        live = [p for p in self.peers.values() if p.proc.poll() is None and p.name not in self.leaving
                and (self.workdir / f"{p.name}.addr").exists()]
        through = random.choice(live).name if live else None
        addresses = wait_lines(self.workdir / f"{through}.addr", None) if through else self.addresses
        proc, log = self._spawn(name, ["join", *addresses, "--addr-file", str(addr_file), "--report-json",
                                       str(report), "--wait-for-peers", str(wait_for)])
        self.peers[name] = Peer(name, proc, log, report)
        logger.info("%s joins through %s", name, through or "the seed")
        return self.peers[name]

    def leave(self, peer: Peer, kill: bool) -> None:
        """Signal the peer's whole group (as a service manager's stop does) and go on; ``reap`` finishes it."""
        logger.info("%s leaves (%s)", peer.name, "SIGKILL" if kill else "SIGTERM")
        try:
            os.killpg(peer.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            return
        self.leaving[peer.name] = time.monotonic() + LEAVE_GRACE

    def reap(self) -> None:
        """SIGKILL leavers still running LEAVE_GRACE seconds after their signal (counted in the summary)."""
        for name, deadline in list(self.leaving.items()):
            proc = self.peers[name].proc
            if proc.poll() is not None:
                del self.leaving[name]
            elif time.monotonic() > deadline:
                logger.warning("%s still running %.0f s after SIGTERM: SIGKILL", name, LEAVE_GRACE)
                self.forced.append(name)
                stop_group(proc, signal.SIGKILL)
                del self.leaving[name]

    def sample_rss(self) -> None:
        now = time.monotonic()
        for peer in self.peers.values():
            if peer.proc.poll() is None and STEP_RE.search(peer.log.read_text(errors="replace")):
                peer.rss.append((now, tree_rss(peer.proc.pid)))

    def close(self) -> None:
        for peer in self.peers.values():
            stop_group(peer.proc, signal.SIGTERM)
        if self.seed_proc is not None:
            stop_group(self.seed_proc, signal.SIGTERM)


def stop_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process and its session (it was started in one of its own), then wait; SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def wait_lines(path: Path, proc: subprocess.Popen | None, timeout: float = 180) -> list[str]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: {path.stem} exited early; see {path.with_suffix('.log')}")
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.3)
    return [line for line in path.read_text().splitlines() if line.strip()]


def step_times(swarm: Swarm) -> list[float]:
    """File modification times are too coarse: the times come from the HH:MM:SS stamps of each 'step done' line."""
    stamps = []
    for peer in swarm.peers.values():
        for line in peer.log.read_text(errors="replace").splitlines():
            match = STEP_RE.search(line)
            if match and re.match(r"\d\d:\d\d:\d\d", line):
                h, m, s = map(int, line[:8].split(":"))
                stamps.append((int(match.group(1)), h * 3600 + m * 60 + s))
    firsts: dict[int, int] = {}
    for step, stamp in stamps:
        firsts[step] = min(stamp, firsts.get(step, stamp))
    return [firsts[step] for step in sorted(firsts)]


def summarize(swarm: Swarm, args: argparse.Namespace, averaging_timeout: float) -> dict:
    times = step_times(swarm)
    gaps = [b - a for a, b in zip(times, times[1:])]
    rounds = dict.fromkeys(("averaged", "partial", "skipped", "failed"), 0)
    for peer in swarm.peers.values():
        if peer.report.exists():
            for r in json.loads(peer.report.read_text())["rounds"]:
                rounds[r["outcome"]] += 1
    growth = {}
    for peer in list(swarm.peers.values())[: args.stable]:
        if len(peer.rss) >= 2:
            growth[peer.name] = peer.rss[-1][1] / peer.rss[0][1] - 1.0
    return dict(minutes=args.minutes, stable=args.stable, churning=args.churning, period_s=args.period,
                kill=args.kill, trainers_started=swarm.count, global_steps=len(times),
                longest_stall_s=max(gaps, default=None), averaging_timeout_s=averaging_timeout,
                rounds=rounds, leavers_needing_sigkill=len(swarm.forced), rss_growth=growth,
                rss_mb={p: [round(r / 2**20) for _, r in swarm.peers[p].rss[:: max(1, len(swarm.peers[p].rss) // 5)]]
                        for p in growth})


def run(args: argparse.Namespace) -> dict:
    config = load_config(args.config)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logger.info("Logs in %s", workdir)
    swarm = Swarm(workdir, args.config)
    try:
        swarm.start_seed()
        everyone = args.stable + args.churning
        for _ in range(everyone):
            swarm.join(wait_for=everyone)
        churning = [f"trainer-{i}" for i in range(args.stable, everyone)]
        started = time.monotonic()  # the clock starts at the first global step: start-up is not churn
        while not step_times(swarm):
            if time.monotonic() - started > 300:
                raise SystemExit(f"error: no global step within 300 s of start; see the logs in {workdir}")
            time.sleep(2)
        logger.info("First global step after %.0f s; churning for %.0f minutes", time.monotonic() - started,
                    args.minutes)
        end = time.monotonic() + args.minutes * 60
        next_churn = time.monotonic() + args.period
        while time.monotonic() < end:
            swarm.sample_rss()
            swarm.reap()
            if time.monotonic() >= next_churn and churning:
                swarm.leave(swarm.peers[churning.pop(0)], args.kill)
                churning.append(swarm.join().name)
                next_churn = time.monotonic() + args.period
            logger.info("%.0f s left; global steps so far: %d", end - time.monotonic(), len(step_times(swarm)))
            time.sleep(5)
    finally:
        swarm.close()
    return summarize(swarm, args, config.timeouts.averaging)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--stable", type=int, default=2, help="trainers that stay the whole run (default 2)")
    parser.add_argument("--churning", type=int, default=2, help="trainer slots replaced in turn (default 2)")
    parser.add_argument("--period", type=float, default=30.0, help="seconds between a leave+join (default 30)")
    parser.add_argument("--kill", action="store_true", help="leavers get SIGKILL instead of SIGTERM")
    parser.add_argument("--workdir", help="where logs and reports go (default: a new temporary directory)")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.period <= 0 or args.stable < 1 or args.churning < 0:
        parser.error("--minutes and --period must be positive, --stable at least 1, --churning at least 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    summary = run(args)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
