"""``swarm status ADDR``: the swarm's state in the terminal, for people without Grafana.

    swarm status /ip4/203.0.113.5/tcp/31337/p2p/QmSeed... [--token alice.token]

Joins the DHT as a client for a moment, reads the trainers' progress records and prints step, ETA, loss,
each peer's throughput and device, and averaging outcomes. Exits non-zero when the swarm cannot be reached.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from monitor.collector import peer_label
from swarm import discovery
from swarm.access import load_access
from swarm.progress import read_trainer_records
from swarm.records import TrainerRecord


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    dht, _, published = discovery.connect(args.addresses, client_mode=True, run_id=args.run_id,
                                          timeout=args.timeout, access=load_access(args.token))
    try:
        trainers = read_trainer_records(dht, published.record.run_id)
    finally:
        dht.shutdown()
    print(render(published.record.run_id, published.shared, trainers))
    return 0


def render(run_id: str, shared: dict, trainers: dict[bytes, TrainerRecord]) -> str:
    model = shared.get("model", {})
    lines = [f"swarm {run_id!r}: {model.get('architecture', '?')} {model.get('n_layer', '?')}x{model.get('d_model', '?')}, "
             f"gradients as {shared.get('averaging', {}).get('compression', '?')}"]
    if not trainers:
        lines.append("no live trainers (records expire a few seconds after a trainer leaves)")
        return "\n".join(lines)
    records = list(trainers.values())
    step = max(r.step for r in records)
    samples_per_second = sum(r.samples_per_second for r in records)
    target = shared.get("averaging", {}).get("target_batch_size", 0)
    eta = f"{target / samples_per_second:.0f} s per step" if samples_per_second > 0 else "unknown"
    losses = [r.loss for r in records if r.loss > 0]
    loss = f"{statistics.median(losses):.3f} (median of {len(losses)})" if losses else "not yet"
    lines += [
        f"global step {step}   trainers {len(records)}   {samples_per_second:.1f} samples/s   ETA {eta}",
        f"loss {loss}",
        f"averaging rounds: {sum(r.rounds_averaged for r in records)} averaged, "
        f"{sum(r.rounds_partial for r in records)} partial, {sum(r.rounds_skipped for r in records)} skipped, "
        f"{sum(r.rounds_failed for r in records)} failed",
        "",
        f"{'peer':<12} {'step':>5} {'loss':>7} {'samples/s':>10} {'tokens/s':>10} {'sent MB':>9} {'device':<10} {'age s':>6}",
    ]
    now = time.time()
    for subkey, r in sorted(trainers.items(), key=lambda item: -item[1].samples_per_second):
        lines.append(f"{peer_label(subkey):<12} {r.step:>5} {r.loss:>7.3f} {r.samples_per_second:>10.1f} "
                     f"{r.tokens_per_second:>10.0f} {r.bytes_sent / 1e6:>9.1f} {r.device:<10} {max(0, now - r.time):>6.0f}")
    return "\n".join(lines)
