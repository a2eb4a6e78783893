"""One peer of the averaging benchmark: a hivemind DHT and DecentralizedAverager inside one network namespace.

    python -m benchmarks.averaging_peer --index 1 --peers 4 --address 10.77.0.3 --iface swb123p1 \\
        --workdir DIR --values 25000000 --codec blockwise8 --initial-peer /ip4/10.77.0.2/tcp/.../p2p/...

Started by ``benchmarks.averaging`` (not by hand). It talks to the orchestrator through files in ``--workdir``:
it writes ``addr-I`` (its multiaddrs) and ``ready-I`` (averager up), waits for ``go-R`` (the wall-clock time to
begin round R), runs the round and writes ``round-R-I.json``: matchmaking and all-reduce seconds, its
interface's tx/rx bytes during each phase (from sysfs, inside its namespace), the codec's own serialized byte
count, and the relative error of the average it got against the exact one.

Peer i holds ``base + i`` (``base`` the same random values on every peer), so the exact average is
``base + (N-1)/2`` and every peer can check its result without seeing the others' tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

CHUNK = 2**22  # values per tensor: the parameter set is split like a model's weights


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.averaging_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--address", required=True, help="this namespace's IPv4 address")
    parser.add_argument("--iface", required=True, help="this namespace's interface (its counters are read)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--values", type=int, required=True)
    parser.add_argument("--codec", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--initial-peer", action="append", default=[])
    parser.add_argument("--initial-peer-file", help="wait for this file and use its multiaddrs as initial peers")
    parser.add_argument("--matchmaking-time", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=3.0)
    parser.add_argument("--part-size-bytes", type=int, default=2**19)
    parser.add_argument("--next-chunk-timeout", type=float, default=60.0)
    parser.add_argument("--round-timeout", type=float, default=900.0)
    return parser.parse_args(argv)


def counters(iface: str) -> tuple[int, int]:
    stats = Path("/sys/class/net") / iface / "statistics"
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


def make_tensors(values: int, index: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    sizes = [CHUNK] * (values // CHUNK) + ([values % CHUNK] if values % CHUNK else [])
    return [torch.randn(size, generator=generator).add_(index) for size in sizes]


def reset_tensors(averager, index: int) -> None:
    generator = torch.Generator().manual_seed(1234)
    with averager.get_tensors() as tensors:
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.numel(), generator=generator).add_(index))


def relative_error(tensors: list[torch.Tensor], peers: int) -> float:
    generator = torch.Generator().manual_seed(1234)
    num = den = 0.0
    for tensor in tensors:
        expected = torch.randn(tensor.numel(), generator=generator).add_((peers - 1) / 2)
        num += float((tensor - expected).square().sum())
        den += float(expected.square().sum())
    return (num / den) ** 0.5


def write_atomic(path: Path, text: str) -> None:
    """The orchestrator polls for these files: it must never read one half-written."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.rename(path)


def wait_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear within {timeout:.0f} s")
        time.sleep(0.05)
    return path.read_text()


def settle(iface: str, codec_counters, quiet: float = 0.5, timeout: float = 60.0):
    """Counters once this peer's outgoing parts have drained. Its own result comes before the deltas it owes
    the others have left (they sit in the socket and the tbf queue), so wait until tx stays still."""
    last, still_since, deadline = counters(iface), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - still_since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = counters(iface)
        if now[0] - last[0] > 4096:  # a few DHT packets do not count as traffic
            last, still_since = now, time.monotonic()
    return counters(iface), codec_counters.snapshot()["grad"]


def run_round(averager, args: argparse.Namespace, start_at: float, codec_counters) -> dict:
    from hivemind.averaging.control import AveragingStage

    time.sleep(max(0.0, start_at - time.time()))
    wire0, (tx0, rx0), t0 = codec_counters.snapshot()["grad"], counters(args.iface), time.monotonic()
    control = averager.step(scheduled_time=start_at + args.matchmaking_time, timeout=args.round_timeout,
                            require_trigger=True, wait=False)
    while control.stage.value < AveragingStage.AWAITING_TRIGGER.value and not control.done():
        time.sleep(0.002)
    (tx1, rx1), t1 = counters(args.iface), time.monotonic()
    control.allow_allreduce()
    group = control.result(args.round_timeout)
    t2 = time.monotonic()
    (tx2, rx2), wire = settle(args.iface, codec_counters)
    return dict(index=args.index, group_size=len(group) if group else 0, matchmaking_s=t1 - t0,
                allreduce_s=t2 - t1, round_s=t2 - t0, mm_tx_bytes=tx1 - tx0, mm_rx_bytes=rx1 - rx0,
                ar_tx_bytes=tx2 - tx1, ar_rx_bytes=rx2 - rx1,
                codec_sent_bytes=wire["sent_bytes"] - wire0["sent_bytes"],
                codec_sent_values=wire["sent_values"] - wire0["sent_values"])


def run(args: argparse.Namespace) -> int:
    import hivemind
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import CompressionInfo

    from swarm.compression import WireCounters, build_compression, counting_averager, install_wire_counters

    workdir = Path(args.workdir)
    tensors = make_tensors(args.values, args.index)
    codec = build_compression(args.codec, size_threshold=2**16)
    warm_up = torch.randn(2**17)  # load bitsandbytes before the averager forks: not in the first round's time
    codec.extract(codec.compress(warm_up, CompressionInfo.from_tensor(warm_up)))
    codec_counters = WireCounters()
    install_wire_counters(codec_counters)
    if args.initial_peer_file:  # started together with peer 0, so the imports above ran in parallel
        args.initial_peer += wait_file(Path(args.initial_peer_file), args.round_timeout).split()
    dht = hivemind.DHT(initial_peers=args.initial_peer, host_maddrs=[f"/ip4/{args.address}/tcp/0"],
                       client_mode=False, start=True)
    averager = None
    try:
        write_atomic(workdir / f"addr-{args.index}", "\n".join(str(a) for a in dht.get_visible_maddrs()))
        averager = counting_averager(DecentralizedAverager, "grad")(
            averaged_tensors=tensors, dht=dht, prefix="bench", target_group_size=args.peers,
            min_group_size=args.peers, min_matchmaking_time=args.matchmaking_time,
            request_timeout=args.request_timeout, part_size_bytes=args.part_size_bytes,
            next_chunk_timeout=args.next_chunk_timeout, allreduce_timeout=args.round_timeout,
            compression=codec, client_mode=False, start=True)
        (workdir / f"ready-{args.index}").write_text("1")
        for r in range(args.rounds):
            start_at = float(wait_file(workdir / f"go-{r}", args.round_timeout))
            if r:
                reset_tensors(averager, args.index)
            row = run_round(averager, args, start_at, codec_counters)
            with averager.get_tensors() as averaged:
                row["relative_error"] = relative_error(list(averaged), args.peers)
            row["round"] = r
            write_atomic(workdir / f"round-{r}-{args.index}.json", json.dumps(row))
        return 0
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s peer{args.index} %(levelname)s %(name)s: %(message)s")
    from benchmarks.wan import raise_on_sigterm

    raise_on_sigterm()
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        logger.error("peer %d failed: %s: %s", args.index, type(error).__name__, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
