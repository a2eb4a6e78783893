"""The monitor's Prometheus exporter: DHT polling, monotonic counters, the scrape-time collector, HTTP serving.

A ``SnapshotPoller`` thread reads the trainers' progress records (``swarm.progress.read_trainer_records``)
every few seconds with a time bound, folds them into a ``CounterLedger`` and a ``StepClock``, and keeps the
latest immutable ``SwarmSnapshot``. ``SwarmCollector`` turns that snapshot into metric families when Prometheus
scrapes; it never touches the DHT, so a slow or broken DHT shows as ``swarm_up 0`` and a growing
``swarm_snapshot_age_seconds``, never as a slow scrape. Metric names live in ``monitor.metrics``.

Usage (the CLI wires it up)::

    poller = SnapshotPoller(lambda: read_trainer_records(dht, run_id), period=5, timeout=10); poller.start()
    server = serve(SwarmCollector(run_info=..., snapshot_source=poller.latest), "0.0.0.0", 9090,
                   health=poller.healthy)
    ...; server.close(); poller.stop()
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional, Union
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from monitor import metrics as m
from swarm.errors import SwarmError

if TYPE_CHECKING:  # swarm.records imports hivemind; the exporter only needs the attribute names
    from swarm.records import TrainerRecord

logger = logging.getLogger(__name__)

# Upper bounds as in swarm.records.TrainerRecord; anything outside (or NaN/inf, which fail every comparison)
# marks a record that bypassed the DHT schema, and it is ignored everywhere.
_BOUNDS = dict(step=1e9, loss=1e4, samples_per_second=1e15, tokens_per_second=1e15, samples_done=1e15,
               bytes_sent=1e18, bytes_received=1e18, rounds_averaged=1e9, rounds_partial=1e9, rounds_skipped=1e9,
               rounds_failed=1e9, time=1e11)
_COUNTED = tuple(f"rounds_{outcome}" for outcome in m.ROUND_OUTCOMES) + ("bytes_sent", "bytes_received")


def usable(record: object) -> bool:
    """True when every numeric field of a progress record is a finite number within the schema's bounds."""
    for name, upper in _BOUNDS.items():
        value = getattr(record, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
            return False
    return True


def peer_label(subkey: object) -> str:
    """A short, stable, bounded-length label for a trainer's DHT subkey."""
    raw = subkey if isinstance(subkey, bytes) else repr(subkey).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True)
class SwarmSnapshot:
    """What the collector serves: the last successfully read records and what the poller derived from them.

    ``taken_at`` is when those records were read (time.time()); ``ok`` is False when the latest read failed,
    in which case the records are the previous ones. ``next_step_at`` is the predicted wall time of the next
    global step, None when unknown.
    """

    records: Mapping[bytes, "TrainerRecord"]
    taken_at: float
    ok: bool
    totals: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTED, 0))
    next_step_at: Optional[float] = None


class CounterLedger:
    """Swarm-wide counter totals that never decrease while trainers come, go and restart.

    Per trainer it remembers the last cumulative values; each update adds the growth since then. A trainer
    with any value lower than before has restarted, so its whole new record counts as growth. A trainer that
    leaves keeps what it contributed. At most ``max_peers`` trainers are remembered (least recently seen
    forgotten first); a forgotten trainer that comes back is counted afresh, which can only over-count.
    """

    def __init__(self, max_peers: int = 10_000):
        if max_peers < 1:
            raise ValueError(f"max_peers must be at least 1, got {max_peers}")
        self.max_peers = max_peers
        self._last: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self._totals = dict.fromkeys(_COUNTED, 0)

    def update(self, records: Mapping[bytes, "TrainerRecord"]) -> None:
        for subkey, record in records.items():
            if not usable(record):
                continue
            values = tuple(int(getattr(record, name)) for name in _COUNTED)
            previous = self._last.pop(subkey, None)
            restarted = previous is None or any(new < old for new, old in zip(values, previous))
            for name, new, old in zip(_COUNTED, values, previous or values):
                self._totals[name] += new if restarted else new - old
            self._last[subkey] = values
        while len(self._last) > self.max_peers:
            self._last.popitem(last=False)

    def totals(self) -> dict[str, int]:
        return dict(self._totals)

    def __len__(self) -> int:
        return len(self._last)


class StepClock:
    """Predicts the next global step from the monitor's own times of the last few step advances.

    Uses the monitor's clock, not the trainers' (which may be skewed), so its precision is the poll period.
    Needs two observed advances; a step that goes down (a new run) starts over.
    """

    def __init__(self, window: int = 8):
        self._advances: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._step: Optional[int] = None

    def observe(self, step: Optional[int], now: float) -> None:
        if step is None:
            return
        if self._step is None or step < self._step:
            self._advances.clear()
        elif step > self._step:
            self._advances.append((now, step))
        self._step = step

    def next_step_at(self) -> Optional[float]:
        if len(self._advances) < 2:
            return None
        (t0, s0), (t1, s1) = self._advances[0], self._advances[-1]
        return t1 + (t1 - t0) / (s1 - s0) if t1 > t0 else None


class SwarmCollector(Collector):
    """Builds the ``swarm_*`` families from the latest snapshot at scrape time.

    Rules for empty data: sums and counts are 0 without live trainers; ``swarm_step`` and ``swarm_loss``
    have no sample then (a 0 would read as a real step or loss). No NaN or inf is ever emitted.
    """

    def __init__(self, *, run_info: Mapping[str, str], snapshot_source: Callable[[], SwarmSnapshot],
                 per_peer: bool = False):
        unknown, missing = set(run_info) - set(m.RUN_INFO_LABELS), set(m.RUN_INFO_LABELS) - set(run_info)
        if unknown or missing:
            raise ValueError(f"run_info needs exactly the keys {m.RUN_INFO_LABELS}; "
                             f"unknown: {sorted(unknown)}, missing: {sorted(missing)}")
        self.run_info = tuple(str(run_info[key])[:128] for key in m.RUN_INFO_LABELS)
        self.snapshot_source, self.per_peer = snapshot_source, per_peer

    def describe(self) -> list[Metric]:
        return []  # names are fixed in monitor.metrics; no need to collect at registration

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        snapshot, now = self.snapshot_source(), time.time()
        live = {subkey: record for subkey, record in snapshot.records.items() if usable(record)}
        yield _gauge(m.UP, 1.0 if snapshot.ok else 0.0)
        yield _gauge(m.RUN_INFO, 1.0, self.run_info)
        yield _gauge(m.PEERS, len(live))
        yield _gauge(m.STEP, max((r.step for r in live.values()), default=None))
        yield _gauge(m.SAMPLES_PER_SECOND, sum(r.samples_per_second for r in live.values()))
        yield _gauge(m.TOKENS_PER_SECOND, sum(r.tokens_per_second for r in live.values()))
        loss = m.LOSS.family()
        losses = [r.loss for r in live.values()]
        if losses:
            stats = dict(min=min(losses), median=statistics.median(losses), max=max(losses),
                         mean=statistics.fmean(losses))
            for stat in m.LOSS_STATS:
                loss.add_metric([stat], stats[stat])
        yield loss
        eta = 0.0 if snapshot.next_step_at is None else max(0.0, snapshot.next_step_at - now)
        yield _gauge(m.ETA_NEXT_STEP, eta)
        rounds = m.AVERAGING_ROUNDS.family()
        for outcome in m.ROUND_OUTCOMES:
            rounds.add_metric([outcome], snapshot.totals[f"rounds_{outcome}"])
        yield rounds
        yield _gauge(m.AVERAGING_SENT, snapshot.totals["bytes_sent"])
        yield _gauge(m.AVERAGING_RECEIVED, snapshot.totals["bytes_received"])
        yield _gauge(m.SNAPSHOT_AGE, max(0.0, now - snapshot.taken_at))
        if self.per_peer:
            yield from _per_peer(live, now)
        yield _gauge(m.SCRAPE_DURATION, time.perf_counter() - started)


def _gauge(spec: m.MetricSpec, value: Optional[float], labels: tuple[str, ...] = ()) -> Metric:
    """A one-sample family (counters too, despite the name); no sample when value is None."""
    family = spec.family()
    if value is not None:
        family.add_metric(list(labels), float(value))
    return family


def _per_peer(live: Mapping[bytes, "TrainerRecord"], now: float) -> Iterator[Metric]:
    families = {spec: spec.family() for spec in m.PER_PEER}
    for subkey, record in live.items():
        peer = [peer_label(subkey)]
        families[m.PEER_STEP].add_metric(peer, record.step)
        families[m.PEER_LOSS].add_metric(peer, record.loss)
        families[m.PEER_SAMPLES_PER_SECOND].add_metric(peer, record.samples_per_second)
        families[m.PEER_TOKENS_PER_SECOND].add_metric(peer, record.tokens_per_second)
        families[m.PEER_RECORD_AGE].add_metric(peer, max(0.0, now - record.time))
    yield from families.values()
