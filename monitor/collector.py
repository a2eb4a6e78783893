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
import math
import socket
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Mapping, Optional, Union
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from monitor import metrics as m
from swarm.errors import SwarmError
from swarm.records import RECORD_LIMITS, TrainerRecord


logger = logging.getLogger(__name__)

_TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
_COUNTED = (tuple(f"rounds_{outcome}" for outcome in m.ROUND_OUTCOMES) + ("bytes_sent", "bytes_received")
            + tuple(f"rejected_{reason}" for reason in m.REJECT_REASONS))


def usable(record: object) -> bool:
    """True when every numeric field of a progress record is a finite number within the schema's bounds
    (swarm.records.RECORD_LIMITS). A record outside them bypassed the DHT schema and is ignored everywhere."""
    for name, upper in RECORD_LIMITS.items():
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

    records: Mapping[bytes, TrainerRecord]
    taken_at: float
    ok: bool
    totals: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTED, 0))
    next_step_at: Optional[float] = None


@dataclass(frozen=True)
class CheckpointStatus:
    """What the monitor's checkpointer last did: the latest checkpoint's step and eval, and failures so far."""

    step: Optional[int] = None
    eval_loss: Optional[float] = None
    eval_perplexity: Optional[float] = None
    failures: int = 0


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

    def update(self, records: Mapping[bytes, TrainerRecord]) -> None:
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

    def __contains__(self, subkey: object) -> bool:
        return subkey in self._last


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
                 per_peer: bool = False, checkpoint_source: Optional[Callable[[], CheckpointStatus]] = None):
        unknown, missing = set(run_info) - set(m.RUN_INFO_LABELS), set(m.RUN_INFO_LABELS) - set(run_info)
        if unknown or missing:
            raise ValueError(f"run_info needs exactly the keys {m.RUN_INFO_LABELS}; "
                             f"unknown: {sorted(unknown)}, missing: {sorted(missing)}")
        self.run_info = tuple(str(run_info[key])[:128] for key in m.RUN_INFO_LABELS)
        self.snapshot_source, self.per_peer = snapshot_source, per_peer
        self.checkpoint_source = checkpoint_source

    def describe(self) -> list[Metric]:
        return []  # names are fixed in monitor.metrics; no need to collect at registration

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        snapshot, now = self.snapshot_source(), time.time()
        live = {subkey: record for subkey, record in snapshot.records.items() if usable(record)}
        yield _single(m.UP, 1.0 if snapshot.ok else 0.0)
        yield _single(m.RUN_INFO, 1.0, self.run_info)
        yield _single(m.PEERS, len(live))
        yield _single(m.STEP, max((r.step for r in live.values()), default=None))
        yield _single(m.SAMPLES_PER_SECOND, sum(r.samples_per_second for r in live.values()))
        yield _single(m.TOKENS_PER_SECOND, sum(r.tokens_per_second for r in live.values()))
        loss = m.LOSS.family()
        losses = [r.loss for r in live.values()]
        if losses:
            stats = dict(min=min(losses), median=statistics.median(losses), max=max(losses),
                         mean=statistics.fmean(losses))
            for stat in m.LOSS_STATS:
                loss.add_metric([stat], stats[stat])
        yield loss
        eta = 0.0 if snapshot.next_step_at is None else max(0.0, snapshot.next_step_at - now)
        yield _single(m.ETA_NEXT_STEP, eta)
        rounds = m.AVERAGING_ROUNDS.family()
        for outcome in m.ROUND_OUTCOMES:
            rounds.add_metric([outcome], snapshot.totals[f"rounds_{outcome}"])
        yield rounds
        rejected = m.REJECTED_CONTRIBUTIONS.family()
        for reason in m.REJECT_REASONS:  # every reason, 0 included, so the series exist from the start
            rejected.add_metric([reason], snapshot.totals[f"rejected_{reason}"])
        yield rejected
        yield _single(m.AVERAGING_SENT, snapshot.totals["bytes_sent"])
        yield _single(m.AVERAGING_RECEIVED, snapshot.totals["bytes_received"])
        yield _single(m.SNAPSHOT_AGE, max(0.0, now - snapshot.taken_at))
        if self.per_peer:
            yield from _per_peer(live, now)
        if self.checkpoint_source is not None:
            yield from _checkpoint(self.checkpoint_source())
        yield _single(m.SCRAPE_DURATION, time.perf_counter() - started)


def _single(spec: m.MetricSpec, value: Optional[float], labels: tuple[str, ...] = ()) -> Metric:
    """The family of ``spec`` with one sample, or none when value is None."""
    family = spec.family()
    if value is not None:
        family.add_metric(list(labels), float(value))
    return family


def _checkpoint(status: CheckpointStatus) -> Iterator[Metric]:
    def finite(value: Optional[float]) -> Optional[float]:
        return value if value is not None and math.isfinite(value) else None

    yield _single(m.CHECKPOINT_STEP, status.step)
    yield _single(m.EVAL_LOSS, finite(status.eval_loss))
    yield _single(m.EVAL_PERPLEXITY, finite(status.eval_perplexity))
    yield _single(m.CHECKPOINT_FAILURES, status.failures)


def _per_peer(live: Mapping[bytes, TrainerRecord], now: float) -> Iterator[Metric]:
    families = {spec: spec.family() for spec in m.PER_PEER}
    for subkey, record in live.items():
        peer = [peer_label(subkey)]
        families[m.PEER_STEP].add_metric(peer, record.step)
        families[m.PEER_LOSS].add_metric(peer, record.loss)
        families[m.PEER_SAMPLES_PER_SECOND].add_metric(peer, record.samples_per_second)
        families[m.PEER_TOKENS_PER_SECOND].add_metric(peer, record.tokens_per_second)
        families[m.PEER_RECORD_AGE].add_metric(peer, max(0.0, now - record.time))
    yield from families.values()


class _Call:
    """One fetch on a daemon thread, so a hung DHT read can be abandoned and never blocks interpreter exit."""

    def __init__(self, fetch: Callable[[], Mapping[bytes, TrainerRecord]]):
        self.done = threading.Event()
        self.result: Optional[Mapping[bytes, TrainerRecord]] = None
        self.error: Optional[Exception] = None
        threading.Thread(target=self._run, args=(fetch,), name="swarm-dht-read", daemon=True).start()

    def _run(self, fetch: Callable[[], Mapping[bytes, TrainerRecord]]) -> None:
        try:
            self.result = fetch()
        except Exception as error:
            self.error = error
        finally:
            self.done.set()


class SnapshotPoller(threading.Thread):
    """Calls ``fetch`` every ``period`` s (each call bounded by ``timeout`` s) and keeps the latest snapshot.

    A failed or timed-out read keeps the previous records with ``ok=False``; while a timed-out read is still
    running no new one starts. ``healthy()`` is True while the thread runs and the last successful read is
    at most ``stale_after`` s old (default: three periods plus the timeout).
    """

    def __init__(self, fetch: Callable[[], Mapping[bytes, TrainerRecord]], *, period: float = 5.0,
                 timeout: float = 10.0, stale_after: Optional[float] = None, ledger: Optional[CounterLedger] = None):
        super().__init__(name="swarm-snapshot-poller", daemon=True)
        if period <= 0 or timeout <= 0:
            raise ValueError(f"period and timeout must be positive, got {period} and {timeout}")
        self.fetch, self.period, self.timeout = fetch, period, timeout
        self.stale_after = 3 * period + timeout if stale_after is None else stale_after
        self.ledger, self.clock = ledger or CounterLedger(), StepClock()
        self._snapshot = SwarmSnapshot(records={}, taken_at=time.time(), ok=False)
        self._last_success: Optional[float] = None
        self._pending: Optional[_Call] = None
        self._stopped = threading.Event()
        self._last_warning, self._failing = -float("inf"), False

    def latest(self) -> SwarmSnapshot:
        return self._snapshot

    def healthy(self) -> bool:
        last = self._last_success
        return self.is_alive() and last is not None and time.time() - last <= self.stale_after

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        next_poll = time.monotonic()
        while not self._stopped.is_set():
            self.poll_once()
            next_poll = max(next_poll + self.period, time.monotonic())
            self._stopped.wait(next_poll - time.monotonic())

    def poll_once(self) -> None:
        """One bounded read; never raises."""
        try:
            records = dict(self._read())
            now = time.time()
            self.ledger.update(records)
            self.clock.observe(max((r.step for r in records.values() if usable(r)), default=None), now)
        except Exception as error:
            self._failed(error)
            return
        if self._failing:
            self._failing = False
            logger.info("Reading the trainers' progress from the DHT works again")
        self._snapshot = SwarmSnapshot(records=records, taken_at=now, ok=True, totals=self.ledger.totals(),
                                       next_step_at=self.clock.next_step_at())
        self._last_success = now

    def _read(self) -> Mapping[bytes, TrainerRecord]:
        if self._pending is not None and not self._pending.done.is_set():
            raise TimeoutError(f"the previous DHT read has not returned yet (timeout {self.timeout} s)")
        call = self._pending = _Call(self.fetch)
        if not call.done.wait(self.timeout):
            raise TimeoutError(f"the DHT read took longer than {self.timeout} s")
        if call.error is not None:
            raise call.error
        return call.result

    def _failed(self, error: Exception) -> None:
        self._snapshot, self._failing = replace(self._snapshot, ok=False), True
        age = time.time() - self._snapshot.taken_at
        level = logging.DEBUG
        if time.monotonic() - self._last_warning >= 60:
            level, self._last_warning = logging.WARNING, time.monotonic()
        logger.log(level, "Could not read the trainers' progress from the DHT (%s: %s); serving data %.0f s old",
                   type(error).__name__, error, age)


class MetricsServer(ThreadingHTTPServer):
    """/metrics and /healthz on a background thread (built by ``serve``); ``close()`` stops it and frees the port."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, health: Callable[[], bool]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry, self.health = registry, health
        super().__init__(address, _Handler)
        self.host, self.port = self.server_address[:2]
        self._thread = threading.Thread(target=self.serve_forever, name="swarm-metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception:
                logger.warning("Building the metrics failed", exc_info=True)
                return self._reply(500, b"collecting metrics failed; see the monitor's log\n")
            self._reply(200, body, _TEXT_FORMAT)
        elif path == "/healthz":
            healthy = self.server.health()
            self._reply(200 if healthy else 503, b"ok" if healthy else b"stale: no recent successful DHT read")
        else:
            self._reply(404, b"not found; try /metrics or /healthz\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def serve(source: Union[CollectorRegistry, Collector], host: str, port: int, *,
          health: Optional[Callable[[], bool]] = None) -> MetricsServer:
    """Serve ``source`` (a registry, or one collector in a registry of its own) at http://host:port/metrics.

    ``health`` decides /healthz (200 "ok" or 503); without it /healthz is always 200. Port 0 picks a free one.
    """
    if not isinstance(source, CollectorRegistry):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(source)
        source = registry
    try:
        return MetricsServer((host, port), source, health or (lambda: True))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise SwarmError(f"port {port} is already in use on {host}; pick another --metrics-port") from None
        raise SwarmError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
