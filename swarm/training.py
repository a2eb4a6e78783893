"""The trainer: one loop a reader can follow in one sitting.

    batch -> forward/backward -> clip -> SwarmOptimizer.step() (accumulates toward the swarm's global batch,
    averages 8-bit gradients with peers, steps) -> publish progress into the DHT

It runs until the swarm has made ``max_steps`` global steps while this peer took part, or ``stop`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarm.data import seed_from_peer_id
from swarm.devices import DevicePlan
from swarm.optimizer import SwarmOptimizer
from swarm.progress import ProgressPublisher, read_trainer_records

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    start_step: int
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)  # global step -> mean local loss over that step
    stopped_early: bool = False
    lr: float = 0.0  # the learning rate in force at the end (it follows the global step)


class Trainer:
    def __init__(self, *, model: torch.nn.Module, optimizer: SwarmOptimizer, batches: Iterator[torch.Tensor],
                 plan: DevicePlan, max_grad_norm: float, publisher: ProgressPublisher):
        self.model, self.opt, self.batches, self.plan = model, optimizer, batches, plan
        self.max_grad_norm, self.publisher = max_grad_norm, publisher

    def join_swarm(self) -> int:
        """Download the newest state from peers (if any have progressed); returns the step we start at."""
        logger.info("Downloading the current state from peers...")
        self.opt.load_state_from_peers()
        logger.info("Starting at global step %d", self.opt.local_epoch)
        return self.opt.local_epoch

    def wait_for_peers(self, count: int, stop: threading.Event, *, timeout: float) -> None:
        """Hold off training until ``count`` trainers (this one included) have published progress records,
        so that trainers started together make their first global step together."""
        if count <= 1:
            return
        deadline = time.monotonic() + timeout
        seen = reported = 0
        while not stop.is_set() and time.monotonic() < deadline:
            self.publisher.maybe_publish(step=self.opt.local_epoch, loss=0.0, samples_done=0, samples_per_second=0.0,
                                         tokens_per_second=0.0, wait=True)
            seen = len(read_trainer_records(self.publisher.dht, self.publisher.run_id))
            if seen >= count:
                logger.info("%d trainers are here; starting", seen)
                return
            if seen != reported:
                logger.info("Waiting for %d trainers (%d visible)", count, seen)
                reported = seen
            stop.wait(0.5)
        if not stop.is_set():
            logger.warning("Only %d of %d trainers showed up within %.0f s; starting anyway", seen, count, timeout)

    def train(self, *, max_steps: int | None, stop: threading.Event, wait_for: int = 1,
              wait_timeout: float = 60.0) -> TrainResult:
        self.opt.leaving = stop  # (a round without a group is called off once we are leaving)
        start = self.join_swarm()
        self.wait_for_peers(wait_for, stop, timeout=wait_timeout)
        result = TrainResult(start_step=start, final_step=start)
        step_losses: list[float] = []
        samples_done = tokens_done = 0
        began = time.monotonic()
        self.model.train()
        while not stop.is_set():
            if max_steps is not None and self.opt.local_epoch - start >= max_steps:
                break
            batch = next(self.batches).to(self.plan.device, non_blocking=True)
            with self.plan.autocast():
                loss = self.model(input_ids=batch, labels=batch).loss
            loss.backward()
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            step_before = self.opt.local_epoch
            self.opt.step()
            self.opt.zero_grad()
            step_losses.append(float(loss.detach()))
            samples_done += batch.shape[0]
            tokens_done += batch.numel()
            if self.opt.local_epoch != step_before:
                result.losses[step_before] = sum(step_losses) / len(step_losses)
                logger.info("Global step %d done: local loss %.3f", self.opt.local_epoch, result.losses[step_before])
                step_losses.clear()
            elapsed = max(time.monotonic() - began, 1e-6)
            self.publisher.maybe_publish(
                step=self.opt.local_epoch, loss=result.losses.get(self.opt.local_epoch - 1, float(loss.detach())),
                samples_done=samples_done, samples_per_second=samples_done / elapsed,
                tokens_per_second=tokens_done / elapsed,
            )
        result.stopped_early = stop.is_set()
        self._settle(grace=0.0 if result.stopped_early else 2 * self.opt.matchmaking_time)
        result.final_step = self.opt.local_epoch
        result.lr = float(self.opt.opt.param_groups[0]["lr"])
        return result

    def _settle(self, grace: float) -> None:
        """Apply a background parameter-averaging round that finished after our last step; one that has not found
        its group within ``grace`` seconds is called off (its peers may have left). After max_steps the grace is two
        matchmaking times, so that trainers finishing together average their last parameters; on a stop signal it
        is none: whoever asked us to stop is waiting, and a round without a group yet loses the others nothing."""
        try:
            self.opt.call_off_lonely_round(grace=grace)
            self.opt.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
        except Exception as error:  # a peer left mid-round: our own parameters are still valid
            logger.warning("Last parameter averaging round did not finish: %s", error)


def peer_seed(dht: hivemind.DHT, override: int | None) -> int:
    """Data-order seed: from peer.seed when set, else from the peer id, so volunteers read different orders."""
    return override if override is not None else seed_from_peer_id(dht.peer_id.to_base58())


def owner_subkey(private_key: RSAPrivateKey) -> bytes:
    """The ``[owner:<public key>]`` subkey under which only this peer can write its progress record."""
    return RSASignatureValidator(private_key).local_public_key
