"""A trainer's background parameter-averaging round that finds no group is called off instead of holding the
trainer for ``averaging_timeout`` (SwarmOptimizer.call_off_lonely_round): a real optimizer with its averager
processes and a DHT on 127.0.0.1, alone, so its round can never find a group."""

from __future__ import annotations

import time

import torch
from hivemind import DHT
from hivemind.utils.crypto import RSAPrivateKey

from conftest import TINY
from swarm.config import load_config
from swarm.optimizer import build_optimizer
from swarm.rounds import PartialRoundWatch, RoundLog


def test_a_parameter_round_without_a_group_is_called_off():
    config = load_config(TINY)
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    optimizer = None
    try:
        optimizer = build_optimizer(
            torch.nn.Linear(8, 8).parameters(), dht=dht, private_key=RSAPrivateKey(), run_id="lonely", batch_size=4,
            client_mode=False, optim=config.optimizer, averaging=config.averaging, timeouts=config.timeouts,
            round_log=RoundLog(), partial_watch=PartialRoundWatch())
        averager = optimizer.state_averager
        averager.step(averaging_round=True, delay_averaging=True,
                      averaging_opts=dict(timeout=config.timeouts.averaging))
        deadline = time.monotonic() + 30
        while averager.last_round is None and time.monotonic() < deadline:  # begun in hivemind's executor thread
            time.sleep(0.1)
        lonely = averager.last_round
        assert lonely is not None and not lonely.done(), lonely
        optimizer.call_off_lonely_round(grace=0.5)
        assert lonely.cancelled(), lonely
        averager.step(wait_for_delayed_updates=True)  # the trainer's next call: nothing is left to wait for
        assert not averager.pending_updates
        optimizer.call_off_lonely_round(grace=0.5)  # again: nothing to call off, and no error
    finally:
        if optimizer is not None:
            optimizer.shutdown()
        dht.shutdown()
