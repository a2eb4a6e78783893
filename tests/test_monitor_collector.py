"""The monitor's exporter on synthetic progress records: aggregates, monotonic counters, failure handling,
exposition hygiene (promtool), the HTTP endpoints and the ledger's memory bound. No DHT, no network."""

from __future__ import annotations

import logging
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitor import metrics
from monitor.collector import (CheckpointStatus, CounterLedger, SnapshotPoller, StepClock, SwarmCollector,
                               SwarmSnapshot, serve)
from swarm.errors import SwarmError
from swarm.records import TrainerRecord

RUN_INFO = dict(run_id="demo-run", model="tiny-gpt", version="0.1.0")


def record(step: int = 10, loss: float = 2.0, **fields) -> TrainerRecord:
    values = dict(step=step, loss=loss, samples_per_second=8.0, tokens_per_second=1024.0, samples_done=100,
                  bytes_sent=1000, bytes_received=2000, rounds_averaged=5, rounds_partial=1, rounds_skipped=2,
                  rounds_failed=0, device="cpu", time=time.time())
    values.update(fields)
    return TrainerRecord(**values)


def unchecked(**fields) -> TrainerRecord:
    """A record that bypassed the DHT schema (what a buggy or hostile node might still hand us)."""
    return TrainerRecord.construct(**{**record().dict(), **fields})


def exposition(source, per_peer: bool = False, checkpoint: CheckpointStatus | None = None) -> str:
    registry = CollectorRegistry()
    registry.register(SwarmCollector(run_info=RUN_INFO, snapshot_source=source, per_peer=per_peer,
                                     checkpoint_source=None if checkpoint is None else lambda: checkpoint))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def polled(records: dict) -> SnapshotPoller:
    poller = SnapshotPoller(lambda: records, period=60, timeout=5)
    poller.poll_once()
    return poller


def test_aggregates_over_live_peers():
    records = {b"a": record(step=7, loss=3.0, samples_per_second=1.5, tokens_per_second=100.0),
               b"b": record(step=9, loss=1.0, samples_per_second=2.5, tokens_per_second=300.0),
               b"c": record(step=8, loss=2.0, samples_per_second=4.0, tokens_per_second=600.0),
               b"nan": unchecked(loss=float("nan")), b"inf": unchecked(samples_per_second=float("inf")),
               b"huge": unchecked(step=10**12)}
    text = exposition(polled(records).latest)
    assert value(text, "swarm_up") == 1
    assert value(text, "swarm_peers") == 3  # the three records that bypassed the schema are ignored
    assert value(text, "swarm_step") == 9
    assert value(text, "swarm_samples_per_second") == 8.0
    assert value(text, "swarm_tokens_per_second") == 1000.0
    assert {stat: value(text, "swarm_loss", stat=stat) for stat in metrics.LOSS_STATS} == \
        dict(min=1.0, median=2.0, max=3.0, mean=2.0)
    assert value(text, "swarm_run_info", **RUN_INFO) == 1
    assert value(text, "swarm_averaging_rounds_total", outcome="averaged") == 15
    assert value(text, "swarm_averaging_sent_bytes_total") == 3000
    assert value(text, "swarm_averaging_received_bytes_total") == 6000


def test_no_peers_gives_zero_sums_and_no_step_or_loss():
    text = exposition(polled({}).latest)
    assert value(text, "swarm_peers") == 0 and value(text, "swarm_samples_per_second") == 0
    names = {name for name, _ in samples(text)}
    assert "swarm_step" not in names and "swarm_loss" not in names


def test_run_info_keys_are_checked():
    with pytest.raises(ValueError, match="unknown: \\['codec'\\]"):
        SwarmCollector(run_info={**RUN_INFO, "codec": "8bit"}, snapshot_source=polled({}).latest)


def test_counters_grow_by_deltas_and_never_go_back():
    ledger = CounterLedger()
    ledger.update({b"a": record(rounds_averaged=5, bytes_sent=100), b"b": record(rounds_averaged=3, bytes_sent=50)})
    assert ledger.totals()["rounds_averaged"] == 8 and ledger.totals()["bytes_sent"] == 150
    ledger.update({b"a": record(rounds_averaged=7, bytes_sent=160)})  # b left: keeps its contribution
    assert ledger.totals()["rounds_averaged"] == 10 and ledger.totals()["bytes_sent"] == 210
    ledger.update({b"a": record(rounds_averaged=1, bytes_sent=10)})  # a restarted: its new values count
    assert ledger.totals()["rounds_averaged"] == 11 and ledger.totals()["bytes_sent"] == 220
    ledger.update({b"a": record(rounds_averaged=2, bytes_sent=30), b"b": record(rounds_averaged=3, bytes_sent=50)})
    assert ledger.totals()["rounds_averaged"] == 12 and ledger.totals()["bytes_sent"] == 240  # b unchanged


def test_exposed_counters_survive_departures_and_restarts():
    current = {b"a": record(rounds_failed=4, bytes_received=500), b"b": record(rounds_failed=2, bytes_received=300)}
    poller = SnapshotPoller(lambda: current, period=60, timeout=5)
    seen = []
    for update in ({}, {b"b": None}, {b"a": record(rounds_failed=1, bytes_received=20)}):
        for subkey, new in update.items():
            current.pop(subkey) if new is None else current.__setitem__(subkey, new)
        poller.poll_once()
        text = exposition(poller.latest)
        seen.append((value(text, "swarm_averaging_rounds_total", outcome="failed"),
                     value(text, "swarm_averaging_received_bytes_total")))
    assert seen == [(6, 800), (6, 800), (7, 820)]


def test_failing_fetch_serves_last_snapshot_with_up_zero_then_recovers(caplog):
    broken = threading.Event()

    def fetch():
        if broken.is_set():
            raise ConnectionError("DHT unreachable")
        return {b"a": record(step=3)}

    poller = SnapshotPoller(fetch, period=60, timeout=5)
    poller.poll_once()
    taken_at = poller.latest().taken_at
    broken.set()
    with caplog.at_level(logging.DEBUG, logger="monitor.collector"):
        poller.poll_once()
        poller.poll_once()
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1  # at most one warning a minute
    text = exposition(poller.latest)
    assert value(text, "swarm_up") == 0
    assert value(text, "swarm_peers") == 1 and value(text, "swarm_step") == 3  # the last good data
    assert value(text, "swarm_snapshot_age_seconds") >= 0 and poller.latest().taken_at == taken_at
    broken.clear()
    poller.poll_once()
    assert value(exposition(poller.latest), "swarm_up") == 1 and poller.latest().taken_at > taken_at


def test_hanging_fetch_times_out_and_recovers():
    release, calls = threading.Event(), []

    def fetch():
        calls.append(1)
        if len(calls) == 2:
            release.wait(30)
        return {b"a": record(step=len(calls))}

    poller = SnapshotPoller(fetch, period=60, timeout=0.3)
    try:
        poller.poll_once()
        poller.poll_once()  # hangs past the timeout
        text = exposition(poller.latest)
        assert value(text, "swarm_up") == 0 and value(text, "swarm_step") == 1
        assert value(text, "swarm_snapshot_age_seconds") >= 0.3
        poller.poll_once()  # the hung read is still running: no second one piles up
        assert len(calls) == 2 and not poller.latest().ok
    finally:
        release.set()
    _wait_until(lambda: poller.poll_once() or poller.latest().ok)  # once the hung read has returned
    text = exposition(poller.latest)
    assert value(text, "swarm_up") == 1 and value(text, "swarm_step") >= 3


def test_eta_from_observed_step_advances():
    clock = StepClock()
    clock.observe(4, now=100.0)
    clock.observe(5, now=110.0)
    assert clock.next_step_at() is None  # one advance seen: pace unknown
    clock.observe(5, now=115.0)
    clock.observe(7, now=130.0)
    assert clock.next_step_at() == pytest.approx(140.0)  # 2 steps in 20 s since the first advance
    clock.observe(0, now=131.0)  # a new run
    assert clock.next_step_at() is None

    def snapshot(next_step_at):
        return lambda: SwarmSnapshot(records={}, taken_at=time.time(), ok=True, next_step_at=next_step_at)

    assert 0 < value(exposition(snapshot(time.time() + 50)), "swarm_eta_next_step_seconds") <= 50
    assert value(exposition(snapshot(time.time() - 50)), "swarm_eta_next_step_seconds") == 0  # overdue
    assert value(exposition(snapshot(None)), "swarm_eta_next_step_seconds") == 0  # unknown


def _expositions() -> dict[str, str]:
    hostile = {b"a": record(), b"b": unchecked(loss=float("inf"), tokens_per_second=float("nan")),
               b"c": unchecked(time=float("-inf")), b"d": record(step=0, loss=0.0, samples_per_second=0.0)}
    never_read = SnapshotPoller(lambda: {}, period=60, timeout=5)
    saved = CheckpointStatus(step=12, eval_loss=3.2, eval_perplexity=24.5, failures=1)
    return dict(full=exposition(polled(hostile).latest),
                per_peer=exposition(polled(hostile).latest, per_peer=True, checkpoint=saved),
                empty=exposition(polled({}).latest), never_read=exposition(never_read.latest, per_peer=True),
                no_checkpoint_yet=exposition(polled({}).latest, checkpoint=CheckpointStatus()),
                diverged=exposition(polled({}).latest, checkpoint=CheckpointStatus(3, float("nan"), float("inf"))))


def test_exposition_has_no_nan_or_inf_and_only_swarm_names():
    for kind, text in _expositions().items():
        assert "nan" not in text.lower() and "inf" not in text.lower().replace("_info", ""), kind
        names = {name for name, _ in samples(text)}
        assert names and all(name.startswith("swarm_") for name in names), kind
        assert all(math.isfinite(v) for v in samples(text).values()), kind
    listed = {spec.name for spec in metrics.ALL + metrics.PER_PEER}
    assert {name for name, _ in samples(_expositions()["per_peer"])} == listed


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (CI installs Debian's prometheus package)")
def test_promtool_finds_nothing():
    for kind, text in _expositions().items():
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (kind, result)


def test_per_peer_series_only_when_asked():
    source = polled({b"a": record(step=1), b"b": record(step=2)}).latest
    assert not any(name.startswith("swarm_peer_") for name, _ in samples(exposition(source)))
    per_peer = samples(exposition(source, per_peer=True))
    peers = {dict(labels)["peer"] for name, labels in per_peer if name == "swarm_peer_step"}
    assert len(peers) == 2 and all(len(p) == 12 for p in peers)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_http_metrics_and_health():
    fail = threading.Event()

    def fetch():
        if fail.is_set():
            raise ConnectionError("DHT unreachable")
        return {b"a": record(step=4)}

    poller = SnapshotPoller(fetch, period=0.05, timeout=1, stale_after=0.5)
    poller.start()
    server = serve(SwarmCollector(run_info=RUN_INFO, snapshot_source=poller.latest), "127.0.0.1", 0,
                   health=poller.healthy)
    try:
        base = f"http://127.0.0.1:{server.port}"
        _wait_until(poller.healthy)
        status, text = _get(f"{base}/metrics")
        assert status == 200 and value(text, "swarm_step") == 4 and value(text, "swarm_up") == 1
        assert _get(f"{base}/healthz") == (200, "ok")
        assert _get(f"{base}/other")[0] == 404
        fail.set()  # reads fail from now on: stale after stale_after
        _wait_until(lambda: _get(f"{base}/healthz")[0] == 503)
        fail.clear()
        _wait_until(lambda: _get(f"{base}/healthz")[0] == 200)
        poller.stop()
        assert _get(f"{base}/healthz")[0] == 503
        assert _get(f"{base}/metrics")[0] == 200  # still serves the last data
    finally:
        poller.stop()
        server.close()


def test_port_in_use_is_a_swarm_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SwarmError, match="--metrics-port"):
            serve(SwarmCollector(run_info=RUN_INFO, snapshot_source=polled({}).latest), "127.0.0.1", port)


def test_ledger_memory_is_bounded():
    one = record()
    poller = SnapshotPoller(lambda: batch, period=60, timeout=5)
    for start in (0, 10_000):
        batch = {f"peer-{i}".encode(): one for i in range(start, start + 10_000)}
        poller.poll_once()
    assert len(poller.ledger) == poller.ledger.max_peers == 10_000
    assert poller.latest().totals["rounds_averaged"] == 20_000 * one.rounds_averaged
    assert b"peer-0" not in poller.ledger and b"peer-19999" in poller.ledger  # the oldest were forgotten


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_checkpoint_series_only_from_a_checkpointing_monitor():
    plain = samples(exposition(polled({}).latest))
    assert not any(name.startswith(("swarm_eval_", "swarm_checkpoint_")) for name, _ in plain)
    none_yet = samples(exposition(polled({}).latest, checkpoint=CheckpointStatus()))
    assert none_yet[("swarm_checkpoint_failures_total", frozenset())] == 0
    assert not any(name.startswith("swarm_eval_") or name == "swarm_checkpoint_step" for name, _ in none_yet)
    saved = samples(exposition(polled({}).latest, checkpoint=CheckpointStatus(12, 3.25, 25.8, 2)))
    assert saved[("swarm_eval_loss", frozenset())] == 3.25
    assert saved[("swarm_checkpoint_step", frozenset())] == 12
    assert saved[("swarm_checkpoint_failures_total", frozenset())] == 2
