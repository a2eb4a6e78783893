"""Where a swarm's CPU goes: a seed and N trainers on 127.0.0.1, CPU per process kind over a window.

    python -m benchmarks.peer_cpu --trainers 3 --seconds 40 --json cpu.json

Once the first trainer has made 2 global steps, every process the run started is sampled at the start and the
end of ``--seconds``: each trainer's main process (training), its hivemind helpers (the DHT and the two averager
processes: "helpers"), its p2pd, and the seed's. Reported per kind: the share of one core (mean over trainers),
the whole run's share of the machine's cores, and the global steps the first trainer made in the window. On a
machine this run saturates, less CPU in the helpers shows up as more steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.soak import ROOT, STEP_RE, Swarm

logger = logging.getLogger("benchmarks.peer_cpu")


def kind(process: psutil.Process, main_pid: int) -> str:
    if process.pid == main_pid:
        return "main"
    name = process.name()
    return "p2pd" if "p2pd" in name else "helpers" if "python" in name else "other"


def processes(swarm: Swarm) -> dict[tuple[str, str], list[psutil.Process]]:
    """(peer, kind) -> its processes, for the seed and every trainer."""
    roots = {"seed": swarm.seed_proc.pid, **{name: peer.proc.pid for name, peer in swarm.peers.items()}}
    found: dict[tuple[str, str], list[psutil.Process]] = {}
    for peer, pid in roots.items():
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            found.setdefault((peer, kind(process, pid)), []).append(process)
    return found


def cpu_seconds(groups: dict[tuple[str, str], list[psutil.Process]]) -> dict[tuple[str, str], float]:
    totals = {}
    for key, members in groups.items():
        total = 0.0
        for process in members:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        totals[key] = total
    return totals


def last_step(log: Path) -> int:
    return max(map(int, STEP_RE.findall(log.read_text(errors="replace"))), default=-1)


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="swarm-cpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logger.info("Logs in %s", workdir)
    swarm = Swarm(workdir, args.config)
    try:
        swarm.start_seed()
        for _ in range(args.trainers):
            swarm.join(wait_for=args.trainers)
        first = swarm.peers["trainer-0"]
        deadline = time.monotonic() + 300
        while last_step(first.log) < 2:
            if time.monotonic() > deadline or first.proc.poll() is not None:
                raise SystemExit(f"error: trainer-0 made no 2 global steps within 300 s; see the logs in {workdir}")
            time.sleep(1)
        groups = processes(swarm)
        step_before, before = last_step(first.log), cpu_seconds(groups)
        time.sleep(args.seconds)
        step_after, after = last_step(first.log), cpu_seconds(groups)
    finally:
        swarm.close()
    share = {key: 100 * (after[key] - before[key]) / args.seconds for key in after}
    trainers = list(swarm.peers)
    per_kind = {k: round(sum(share.get((t, k), 0.0) for t in trainers) / len(trainers), 1)
                for k in ("main", "helpers", "p2pd")}
    rounds = re.findall(r"Step \d+: (averaged|averaging \w+)", first.log.read_text(errors="replace"))
    return dict(trainers=args.trainers, seconds=args.seconds, cores=os.cpu_count(),
                trainer_core_percent=per_kind,
                seed_core_percent=round(sum(v for (peer, _), v in share.items() if peer == "seed"), 1),
                total_core_percent=round(sum(share.values()), 1),
                steps_in_window=step_after - step_before,
                trainer0_rounds={outcome: rounds.count(outcome) for outcome in sorted(set(rounds))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--trainers", type=int, default=3, help="trainers besides the seed (default 3)")
    parser.add_argument("--seconds", type=float, default=40.0, help="the measured window (default 40)")
    parser.add_argument("--workdir", help="where logs go (default: a new temporary directory)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.trainers < 1 or args.seconds <= 0:
        parser.error("--trainers must be at least 1 and --seconds positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
