"""The monitor's checkpointer: every N global steps, download the swarm's state from a peer, check it, evaluate it
on the held-out split and save it (``swarm.checkpoint``). Imported only with ``--checkpoint-dir``: it needs torch
and transformers, which the rest of the monitor does without.

The state is downloaded the way a joining trainer downloads it (hivemind's ``load_state_from_peers`` through a
``TrainingStateAverager`` over the same model and optimizer), but this averager never serves state or averages.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import hivemind
import torch
import transformers

from monitor.collector import CheckpointStatus
from swarm.checkpoint import EVAL_FILE, CheckpointError, CheckpointStore, now_state, write_checkpoint
from swarm import guard
from swarm.config import SwarmConfig
from swarm.data import eval_batches
from swarm.evaluation import Evaluation, evaluate
from swarm.model import build_model, count_parameters
from swarm.optimizer import build_state_averager
from swarm.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 8
NOT_DOWNLOADED = -1  # the averager's local_epoch until a download succeeds (every donor's epoch is >= 0)


class StatePuller:
    """The swarm's model and optimizer state, downloaded on demand."""

    def __init__(self, dht: hivemind.DHT, config: SwarmConfig, *, eval_batch_count: int,
                 seed_key: bytes | None = None):
        transformers.utils.logging.disable_progress_bar()  # one "Writing model shards" bar per save otherwise
        # hivemind replays the schedule up to the downloaded step without optimizer steps; torch warns about it
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        self.config = config
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.model = build_model(config.model, vocab_size=self.tokenizer.vocab_size)
        self.num_params = count_parameters(self.model)
        self.eval_batches = (eval_batches(config.data, self.tokenizer, batch_size=EVAL_BATCH_SIZE,
                                          max_batches=eval_batch_count) if eval_batch_count > 0 else [])
        # it only downloads, but any averager of ours checks what it would receive (swarm.guard), installed pre-fork
        guard.install(guard.GuardCounters(), max_weight=guard.max_weight(config.averaging.target_batch_size))
        self.averager = build_state_averager(self.model.parameters(), dht=dht, run_id=config.run_id,
                                             optim=config.optimizer, averaging=config.averaging,
                                             timeouts=config.timeouts, share=False, seed_key=seed_key)
        self.averager.local_epoch = NOT_DOWNLOADED

    def pull(self) -> Optional[int]:
        """Download the newest state a peer offers; returns its global step, or None if nothing came."""
        self.averager.load_state_from_peers(timeout=self.config.timeouts.load_state)
        step = self.averager.local_epoch
        return None if step == NOT_DOWNLOADED else step

    def check(self) -> None:
        for name, param in self.model.named_parameters():
            if not torch.isfinite(param).all():
                raise CheckpointError(f"the state downloaded from the swarm has non-finite values in {name}; not saved")

    def evaluate(self, step: int) -> Optional[Evaluation]:
        return evaluate(self.model, self.eval_batches, step=step)

    def write(self, directory: Path, step: int, evaluation: Optional[Evaluation]) -> None:
        state = now_state(step=step, run_id=self.config.run_id, fingerprint=self.config.fingerprint(),
                          num_params=self.num_params)
        write_checkpoint(directory, model=self.model, optimizer=self.averager.optimizer, tokenizer=self.tokenizer,
                         config_yaml=self.config.shared_yaml(), state=state,
                         evaluation=evaluation.as_dict() if evaluation else None)

    def shutdown(self) -> None:
        self.averager.shutdown()


class Checkpointer(threading.Thread):
    """Saves a checkpoint once the swarm's step (from ``step_source``) reaches the last saved step + ``every``.
    After an attempt that saved nothing (no newer state, a refused or broken download) it waits ``retry_after``
    seconds, doubling with each such attempt in a row up to ``max_retry_after``: every attempt downloads the whole
    state from a trainer, which for a real model is gigabytes."""

    def __init__(self, puller: StatePuller, store: CheckpointStore, *, every: int,
                 step_source: Callable[[], Optional[int]], stop: threading.Event, poll: float = 1.0,
                 retry_after: float = 5.0, max_retry_after: float = 120.0):
        super().__init__(name="checkpointer", daemon=True)
        self.puller, self.store, self.every, self.step_source = puller, store, every, step_source
        self.stop_event, self.poll = stop, poll
        self.retry_after, self.max_retry_after = retry_after, max_retry_after
        self.status = _status_on_disk(store)

    def current_status(self) -> CheckpointStatus:
        return self.status

    def run(self) -> None:
        retry_at, misses = 0.0, 0
        while not self.stop_event.wait(self.poll):
            step = self.step_source()
            last_saved = self.status.step or 0
            if step is None or step < last_saved + self.every or time.monotonic() < retry_at:
                continue
            try:
                saved = self.checkpoint_once()
            except Exception as error:  # noqa: BLE001 - one bad round must not end the monitor
                message = str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"
                logger.error("Checkpoint failed: %s", message)
                self.status = CheckpointStatus(self.status.step, self.status.eval_loss, self.status.eval_perplexity,
                                               self.status.failures + 1)
                saved = False
            misses = 0 if saved else misses + 1
            if misses:
                retry_at = time.monotonic() + self.retry_delay(misses)

    def retry_delay(self, misses: int) -> float:
        """Seconds to wait after ``misses`` attempts in a row that saved nothing."""
        return min(self.retry_after * 2 ** min(misses - 1, 30), self.max_retry_after)

    def checkpoint_once(self) -> bool:
        """Pull, check, evaluate, save. False when no peer had newer state than the last checkpoint."""
        step = self.puller.pull()
        if step is None or (self.status.step is not None and step <= self.status.step):
            logger.info("No newer state to checkpoint yet (last checkpoint: step %s)", self.status.step)
            return False
        self.puller.check()
        evaluation = self.puller.evaluate(step)
        path = self.store.save(step, lambda tmp: self.puller.write(tmp, step, evaluation))
        loss = evaluation.loss if evaluation else None
        self.status = CheckpointStatus(step, loss, evaluation.perplexity if evaluation else None, self.status.failures)
        if evaluation:
            logger.info("Saved checkpoint %s: eval loss %.3f, perplexity %.1f", path, evaluation.loss,
                        evaluation.perplexity)
        else:
            logger.info("Saved checkpoint %s (no held-out data to evaluate on)", path)
        return True


def _status_on_disk(store: CheckpointStore) -> CheckpointStatus:
    """Start from the newest checkpoint already in the directory (a restarted monitor keeps its numbering)."""
    latest = store.latest()
    if latest is None:
        return CheckpointStatus()
    step, path = latest
    try:
        evaluation = json.loads((path / EVAL_FILE).read_text())
        return CheckpointStatus(step, float(evaluation["loss"]), float(evaluation["perplexity"]))
    except (OSError, ValueError, KeyError, TypeError):
        return CheckpointStatus(step)
