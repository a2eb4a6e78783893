"""Averaging benchmark: seconds per round and bytes on the wire per codec, N hivemind peers on emulated links.

    sudo .venv/bin/python -m benchmarks.averaging --peers 4 --rate-mbit 50 --rate-mbit 200 \\
        --values 25M --values 125M --json benchmarks/results/averaging.json
    sudo .venv/bin/python -m benchmarks.averaging --toy          # 2 peers, 100k values, blockwise8, 1 round

For every link rate, parameter-set size and codec it starts N fresh peers (``benchmarks.averaging_peer``), each a
real process with its own p2pd inside its own namespace (``benchmarks.wan``), waits until all have joined the DHT,
then gives them a common start time for each round. Per round it reports the slowest peer's matchmaking and
all-reduce seconds, the bytes its interface sent, and the physical limit 2(N-1)/N x S / B (S the compressed size
from the codec's own byte count, B the nominal link rate).

Wire bytes per parameter are normalised per *serialized value*: a peer's tx bytes during the all-reduce divided by
2(N-1)/N x P (P parameters), so fp32 costs 4 and 8-bit about 1 whatever N is. The counters are the veth's, which
count a GSO super-packet's headers once: a physical 1500-byte-MTU link would carry about 4.5% more.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Sequence

from benchmarks.wan import EXIT_SKIPPED, NotRoot, Wan, raise_on_sigterm, require_root

logger = logging.getLogger(__name__)

CODECS = ("none", "fp16", "uniform8", "blockwise8")


def parse_count(text: str) -> int:
    """'125M', '100k', '1e6' or '2500000' -> an int (> 0)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 25M, 100k, 1000000)")
    try:
        value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"count must be >= 1, not {text!r}")
    return int(value)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.averaging", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="peers per round (default 4)")
    parser.add_argument("--rate-mbit", type=float, action="append", help="link rate, Mbit/s (repeatable; default 50)")
    parser.add_argument("--values", type=parse_count, action="append", help="parameters averaged, e.g. 25M (repeatable)")
    parser.add_argument("--codec", action="append", choices=CODECS, help="codec (repeatable; default: all four)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per configuration (default 2; the first warms up)")
    parser.add_argument("--matchmaking-time", type=float, default=5.0, help="min_matchmaking_time, s (default 5)")
    parser.add_argument("--request-timeout", type=float, default=3.0, help="request_timeout, s (default 3)")
    parser.add_argument("--part-size-bytes", type=parse_count, default=2**19, help="part_size_bytes (default 524288)")
    parser.add_argument("--next-chunk-timeout", type=float, default=60.0, help="next_chunk_timeout, s (default 60)")
    parser.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for peers to start")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--toy", action="store_true", help="smoke-test size: 2 peers, 100k values, blockwise8, 1 round")
    parser.add_argument("--keep-logs", help="copy the peers' logs into this directory")
    args = parser.parse_args(argv)
    if args.toy:
        args.peers, args.values, args.codec, args.rounds = 2, [100_000], args.codec or ["blockwise8"], 1
        args.matchmaking_time, args.request_timeout = 1.0, 1.0
    if (not 2 <= args.peers <= 16 or args.rounds < 1 or args.matchmaking_time <= 0 or args.request_timeout <= 0
            or args.next_chunk_timeout <= 0):
        parser.error("--peers must be 2..16, --rounds >= 1, timeouts positive")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its directory does not exist")
    if any(rate <= 0 for rate in args.rate_mbit or []):
        parser.error("--rate-mbit must be positive")
    args.rate_mbit, args.values = args.rate_mbit or [50.0], args.values or [25_000_000]
    args.codec = args.codec or list(CODECS)
    return args


def start_peers(wan: Wan, args: argparse.Namespace, values: int, codec: str, workdir: Path) -> None:
    """All at once (their imports take seconds); peers 1.. wait for peer 0's address file to join its DHT."""
    common = ["--peers", str(args.peers), "--workdir", str(workdir), "--values", str(values), "--codec", codec,
              "--rounds", str(args.rounds), "--matchmaking-time", str(args.matchmaking_time),
              "--request-timeout", str(args.request_timeout), "--part-size-bytes", str(args.part_size_bytes),
              "--next-chunk-timeout", str(args.next_chunk_timeout)]
    for i in range(args.peers):
        join = ["--initial-peer-file", str(workdir / "addr-0")] if i else []
        argv = [sys.executable, "-m", "benchmarks.averaging_peer", "--index", str(i), "--address", wan.address(i),
                "--iface", wan.iface(i), *common, *join]
        wan.popen(i, argv, log=workdir / f"peer-{i}.log")


def wait_for(workdir: Path, names: list[str], wan: Wan, timeout: float) -> list[str]:
    """Contents of the files ``names`` once all exist; fails early if a peer exited."""
    deadline = time.monotonic() + timeout
    while not all((workdir / name).exists() for name in names):
        failed = [i for i, proc in enumerate(wan.procs) if proc.poll() not in (None, 0)]
        if failed:
            log = (workdir / f"peer-{failed[0]}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"peer {failed[0]} exited with status {wan.procs[failed[0]].returncode}:\n{log}")
        if time.monotonic() > deadline:
            missing = [n for n in names if not (workdir / n).exists()]
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {', '.join(missing)}")
        time.sleep(0.1)
    return [(workdir / name).read_text() for name in names]


def hivemind_warnings(workdir: Path, peers: int) -> list[str]:
    """hivemind's warnings and errors in the peers' logs so far (a partial all-reduce is only logged)."""
    found = []
    for i in range(peers):
        for line in (workdir / f"peer-{i}.log").read_text(errors="replace").splitlines():
            if ("[WARN]" in line or "[ERROR]" in line) and "request_timeout smaller than" not in line:
                found.append(f"peer {i}: {line.split('] ', 2)[-1][:200]}")
    return found


def summarize(peer_rows: list[dict], *, peers: int, values: int, rate_mbit: float) -> dict:
    """One row from the peers' rows of one round: slowest peer's times, mean bytes, ratios to the limit."""
    share = 2 * (peers - 1) / peers
    codec_bytes_per_value = mean(r["codec_sent_bytes"] / r["codec_sent_values"] for r in peer_rows)
    limit_s = share * values * codec_bytes_per_value * 8 / (rate_mbit * 1e6)
    ar_tx = mean(r["ar_tx_bytes"] for r in peer_rows)
    allreduce_s = max(r["allreduce_s"] for r in peer_rows)
    round_s = max(r["round_s"] for r in peer_rows)
    return dict(
        group_size=min(r["group_size"] for r in peer_rows), matchmaking_s=round(max(r["matchmaking_s"] for r in peer_rows), 3),
        allreduce_s=round(allreduce_s, 3), round_s=round(round_s, 3), limit_s=round(limit_s, 3),
        allreduce_over_limit=round(allreduce_s / limit_s, 3), round_over_limit=round(round_s / limit_s, 3),
        wire_bytes_per_value=round(ar_tx / (share * values), 4), tx_bytes_per_param=round(ar_tx / values, 4),
        codec_bytes_per_value=round(codec_bytes_per_value, 4), ar_tx_bytes=int(ar_tx),
        ar_rx_bytes=int(mean(r["ar_rx_bytes"] for r in peer_rows)),
        mm_tx_bytes=int(mean(r["mm_tx_bytes"] for r in peer_rows)),
        relative_error=max(r["relative_error"] for r in peer_rows),
    )


def run_config(args: argparse.Namespace, rate: float, values: int, codec: str) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix="swbench-avg-"))
    rows = []
    try:
        with Wan(args.peers, rate_mbit=rate) as wan:
            start_peers(wan, args, values, codec, workdir)
            wait_for(workdir, [f"ready-{i}" for i in range(args.peers)], wan, args.join_timeout)
            for r in range(args.rounds):
                go = workdir / f".go-{r}"
                go.write_text(repr(time.time() + 1.0))
                go.rename(workdir / f"go-{r}")
                texts = wait_for(workdir, [f"round-{r}-{i}.json" for i in range(args.peers)], wan,
                                 args.join_timeout + 60 + values * 40 / (rate * 1e6 / 8))
                row = dict(rate_mbit=rate, values=values, codec=codec, peers=args.peers, round=r,
                           process_groups=[proc.pid for proc in wan.procs],
                           part_size_bytes=args.part_size_bytes, next_chunk_timeout=args.next_chunk_timeout,
                           matchmaking_time=args.matchmaking_time,
                           request_timeout=args.request_timeout)
                row.update(summarize([json.loads(t) for t in texts], peers=args.peers, values=values, rate_mbit=rate))
                row["hivemind_warnings"] = hivemind_warnings(workdir, args.peers)
                rows.append(row)
                logger.info("%s Mbit/s, %d values, %s, round %d: %.1f s (matchmaking %.1f, all-reduce %.1f, "
                            "limit %.1f), %.3f B/value on the wire", rate, values, codec, r, row["round_s"],
                            row["matchmaking_s"], row["allreduce_s"], row["limit_s"], row["wire_bytes_per_value"])
            for proc in wan.procs:  # they shut down by themselves; Wan.down stops what is left
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    logger.warning("a peer did not exit within 30 s of its last round")
    finally:
        if args.keep_logs:
            target = Path(args.keep_logs) / f"{int(rate)}mbit-{values}-{codec}"
            shutil.copytree(workdir, target, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    head = ("Mbit/s", "values", "codec", "rnd", "mm s", "ar s", "round s", "limit s", "ar/lim", "rnd/lim", "B/val", "err")
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        cells = (r["rate_mbit"], r["values"], r["codec"], r["round"], r["matchmaking_s"], r["allreduce_s"], r["round_s"],
                 r["limit_s"], r["allreduce_over_limit"], r["round_over_limit"], r["wire_bytes_per_value"],
                 f"{r['relative_error']:.2g}")
        print(" ".join(f"{c:>9}" for c in cells))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        require_root()
    except NotRoot as error:
        print(f"skipped: {error}", file=sys.stderr)
        return EXIT_SKIPPED
    raise_on_sigterm()
    rows: list[dict] = []
    configs = [(rate, values, codec) for rate in args.rate_mbit for values in args.values for codec in args.codec]
    try:
        for k, (rate, values, codec) in enumerate(configs, 1):
            logger.info("[%d/%d] %s Mbit/s, %d values, codec %s", k, len(configs), rate, values, codec)
            try:
                rows += run_config(args, rate, values, codec)
            except Exception as error:  # one failed configuration must not lose the others' rows
                logger.error("%s Mbit/s, %d values, %s failed: %s", rate, values, codec, error)
                rows.append(dict(rate_mbit=rate, values=values, codec=codec, peers=args.peers, error=str(error)[:500]))
            if args.json:  # after every configuration, so an interrupted run keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=1))
    except KeyboardInterrupt:
        logger.error("interrupted; namespaces and peers were removed")
        return 130
    print_table([r for r in rows if "error" not in r])
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
