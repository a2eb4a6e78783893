"""Every metric the monitor exports: names, help texts, types and label names, in one place.

The collector (``monitor.collector``) builds its families only through ``MetricSpec.family()``, and the
Grafana dashboard may only use names listed in ``ALL``/``PER_PEER``. Names follow Prometheus' guides: the
``swarm_`` prefix, base units (``_seconds``, ``_bytes``), ``_total`` only on counters, and labels with bounded
values only (``stat``, ``outcome``; ``peer`` appears only when per-peer series are switched on).

``name`` is the exact name of the exposed samples. prometheus_client strips a trailing ``_total`` from a
``CounterMetricFamily`` name and adds it back on exposition, so counters keep their ``_total`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LOSS_STATS = ("min", "median", "max", "mean")
ROUND_OUTCOMES = ("averaged", "partial", "skipped", "failed")
# why a trainer refused an all-reduce contribution: swarm.guard.REASONS (tests check they agree)
REJECT_REASONS = ("nonfinite", "norm", "weight", "shape", "dtype", "codebook", "malformed", "result")
RUN_INFO_LABELS = ("run_id", "model", "version")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    kind: Literal["gauge", "counter"]
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert self.name.startswith("swarm_"), self.name
        assert (self.kind == "counter") == self.name.endswith("_total"), f"{self.name}: _total only on counters"

    def family(self) -> Union[GaugeMetricFamily, CounterMetricFamily]:
        """An empty family to fill with ``add_metric(label_values, value)``."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


UP = MetricSpec("swarm_up", "1 while the monitor's last DHT read succeeded, else 0.", "gauge")
STEP = MetricSpec("swarm_step", "Global optimizer step: the highest step among live trainers.", "gauge")
PEERS = MetricSpec("swarm_peers", "Live trainers (with a valid progress record in the DHT).", "gauge")
SAMPLES_PER_SECOND = MetricSpec(
    "swarm_samples_per_second", "Training throughput in samples per second, summed over live trainers.", "gauge")
TOKENS_PER_SECOND = MetricSpec(
    "swarm_tokens_per_second", "Training throughput in tokens per second, summed over live trainers.", "gauge")
LOSS = MetricSpec("swarm_loss", "Training loss over live trainers; stat is one of min, median, max, mean.",
                  "gauge", ("stat",))
ETA_NEXT_STEP = MetricSpec(
    "swarm_eta_next_step_seconds",
    "Seconds until the global step is expected to advance, from the pace at which the monitor saw it advance; "
    "0 when unknown (fewer than two advances seen) or overdue.", "gauge")
AVERAGING_ROUNDS = MetricSpec(
    "swarm_averaging_rounds_total",
    "Averaging rounds counted by each trainer, summed over trainers seen since the monitor started, by outcome.",
    "counter", ("outcome",))
AVERAGING_SENT = MetricSpec(
    "swarm_averaging_sent_bytes_total", "Bytes sent for averaging, summed over trainers seen.", "counter")
AVERAGING_RECEIVED = MetricSpec(
    "swarm_averaging_received_bytes_total", "Bytes received for averaging, summed over trainers seen.", "counter")
REJECTED_CONTRIBUTIONS = MetricSpec(
    "swarm_rejected_contributions_total",
    "All-reduce contributions (parts sent, or a reducer's averages) refused by trainers as poisoned, summed over "
    "trainers seen, by reason; each refusal also bans the sender from the refusing trainer's later rounds.",
    "counter", ("reason",))
RUN_INFO = MetricSpec("swarm_run_info", "Always 1; labels describe the monitored run.", "gauge", RUN_INFO_LABELS)
SNAPSHOT_AGE = MetricSpec(
    "swarm_snapshot_age_seconds", "Age of the served data: seconds since the last successful DHT read.", "gauge")
SCRAPE_DURATION = MetricSpec(
    "swarm_scrape_duration_seconds", "Time the exporter spent building this scrape's metrics.", "gauge")

# Only from a monitor started with --checkpoint-dir; the eval and step series appear after the first checkpoint.
CHECKPOINT_STEP = MetricSpec("swarm_checkpoint_step", "Global step of the latest checkpoint written.", "gauge")
EVAL_LOSS = MetricSpec(
    "swarm_eval_loss", "Held-out loss (nats per token) of the latest checkpoint, on the swarm's eval split.", "gauge")
EVAL_PERPLEXITY = MetricSpec("swarm_eval_perplexity", "Held-out perplexity of the latest checkpoint.", "gauge")
CHECKPOINT_FAILURES = MetricSpec(
    "swarm_checkpoint_failures_total", "Checkpoints that could not be downloaded, checked or saved.", "counter")

CHECKPOINT = (CHECKPOINT_STEP, EVAL_LOSS, EVAL_PERPLEXITY, CHECKPOINT_FAILURES)

ALL = (UP, STEP, PEERS, SAMPLES_PER_SECOND, TOKENS_PER_SECOND, LOSS, ETA_NEXT_STEP, AVERAGING_ROUNDS,
       AVERAGING_SENT, AVERAGING_RECEIVED, REJECTED_CONTRIBUTIONS, RUN_INFO, SNAPSHOT_AGE,
       SCRAPE_DURATION) + CHECKPOINT

# Only with per_peer=True: one series per live trainer, labelled by a short hash of its DHT subkey.
PEER_LABEL = "peer"
PEER_STEP = MetricSpec("swarm_peer_step", "Each live trainer's local step.", "gauge", (PEER_LABEL,))
PEER_LOSS = MetricSpec("swarm_peer_loss", "Each live trainer's training loss.", "gauge", (PEER_LABEL,))
PEER_SAMPLES_PER_SECOND = MetricSpec(
    "swarm_peer_samples_per_second", "Each live trainer's samples per second.", "gauge", (PEER_LABEL,))
PEER_TOKENS_PER_SECOND = MetricSpec(
    "swarm_peer_tokens_per_second", "Each live trainer's tokens per second.", "gauge", (PEER_LABEL,))
PEER_RECORD_AGE = MetricSpec(
    "swarm_peer_record_age_seconds", "Seconds since each live trainer wrote its record (by its own clock).",
    "gauge", (PEER_LABEL,))

PER_PEER = (PEER_STEP, PEER_LOSS, PEER_SAMPLES_PER_SECOND, PEER_TOKENS_PER_SECOND, PEER_RECORD_AGE)
