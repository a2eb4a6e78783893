"""Publishing and reading trainers' progress records (schemas in swarm.records)."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import hivemind
from hivemind.utils import get_dht_time

from swarm.compression import WireCounters
from swarm.guard import REASONS, GuardCounters
from swarm.records import TrainerRecord, metrics_key
from swarm.rounds import RoundLog

logger = logging.getLogger(__name__)


class ProgressPublisher:
    """Stores this trainer's signed record every ``period`` seconds without blocking the training loop."""

    def __init__(self, *, dht: hivemind.DHT, run_id: str, subkey: bytes, device: str, round_log: RoundLog,
                 counters: WireCounters, ttl: float, period: float = 2.0, rejected: GuardCounters | None = None):
        self.dht, self.run_id, self.subkey, self.device = dht, run_id, subkey, device
        self.rejected = rejected  # contributions this trainer's averagers refused, by reason (swarm.guard)
        self.key = metrics_key(run_id)
        self.round_log, self.counters, self.ttl, self.period = round_log, counters, ttl, period
        self._last = 0.0
        # () -> (global step, digest of the parameters at that step), for joiners to check downloads against
        self.digest_source: Callable[[], tuple[int, list[float]]] | None = None
        self.config_subkey = ""  # which signed config this trainer follows (joiners count these when in doubt)

    def maybe_publish(self, *, step: int, loss: float, samples_done: int, samples_per_second: float,
                      tokens_per_second: float, wait: bool = False) -> None:
        """Store a fresh record if ``period`` has passed (``wait``: always, and block until stored)."""
        now = time.monotonic()
        if not wait and now - self._last < self.period:
            return
        self._last = now
        record = self.record(step=step, loss=loss, samples_done=samples_done,
                             samples_per_second=samples_per_second, tokens_per_second=tokens_per_second)
        self.dht.store(self.key, record.dict(), expiration_time=get_dht_time() + self.ttl, subkey=self.subkey,
                       return_future=not wait)

    def withdraw(self, timeout: float = 5.0) -> None:
        """Replace this trainer's record with an empty one (hivemind's tracker does the same with its progress), so
        that the monitor, joiners' state checks and config discovery stop counting a trainer that has left at once,
        not when its record expires."""
        try:
            self.dht.store(self.key, None, expiration_time=get_dht_time() + self.ttl, subkey=self.subkey,
                           return_future=True).result(timeout=timeout)
        except Exception as error:  # leaving anyway: the record then expires by itself
            logger.debug("Could not withdraw this trainer's progress record: %r", error)

    def record(self, *, step: int, loss: float, samples_done: int, samples_per_second: float,
               tokens_per_second: float) -> TrainerRecord:
        counts = self.round_log.counts()
        wire = self.counters.snapshot()
        return TrainerRecord(
            step=step, loss=_finite(loss), samples_per_second=_finite(samples_per_second),
            tokens_per_second=_finite(tokens_per_second), samples_done=samples_done,
            bytes_sent=int(sum(channel["sent_bytes"] for channel in wire.values())),
            bytes_received=int(sum(channel["received_bytes"] for channel in wire.values())),
            rounds_averaged=counts["averaged"], rounds_partial=counts["partial"],
            rounds_skipped=counts["skipped"], rounds_failed=counts["failed"],
            device=self.device[:32], time=time.time(), config=self.config_subkey, **self._digest(),
            **self._rejected(),
        )

    def _rejected(self) -> dict:
        counts = self.rejected.snapshot() if self.rejected is not None else dict.fromkeys(REASONS, 0)
        return {f"rejected_{reason}": min(int(count), 10**9) for reason, count in counts.items()}

    def _digest(self) -> dict:
        if self.digest_source is None:
            return {}
        step, values = self.digest_source()
        if not all(math.isfinite(v) and abs(v) <= 1e6 for v in values):
            return {}  # a diverged model publishes no digest, so nobody vouches for its state
        return dict(digest_step=step, digest=values)


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) and value >= 0 else 0.0


def read_trainer_records(dht: hivemind.DHT, run_id: str) -> dict[bytes, TrainerRecord]:
    """Live trainers' records by subkey; malformed ones are skipped (the DHT already validated the schema)."""
    found = dht.get(metrics_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    records = {}
    for subkey, entry in found.value.items():
        try:
            records[subkey] = TrainerRecord.parse_obj(entry.value)
        except Exception:
            logger.debug("Skipping a malformed progress record under %r", subkey)
    return records
