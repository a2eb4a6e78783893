"""How often a peer's averagers use the DHT (swarm.matchmaking, swarm.state): a group key is read at a bounded
rate while looking for a group, and a burst of state updates becomes one or two stores of the donor entry, which
ends up with the latest priority. Real DHTs and a real averager process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import hivemind
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from conftest import TINY
from swarm import records
from swarm.config import load_config
from swarm.matchmaking import POLL_SECONDS, PacedGroupKeys
from swarm.optimizer import build_state_averager
from swarm.training import owner_subkey


def test_a_group_key_is_read_at_a_bounded_rate():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        keys = PacedGroupKeys(dht, "pacetest", "", None)

        async def declare_then_read_three_times():
            await keys.declare_averager(keys.current_key, dht.peer_id, get_dht_time() + 60)
            began = time.monotonic()
            found = [await keys.get_averagers(keys.current_key, only_active=True) for _ in range(3)]
            return found, time.monotonic() - began

        found, elapsed = asyncio.run(declare_then_read_three_times())
        assert all([peer for peer, _ in averagers] == [dht.peer_id] for averagers in found), found
        assert elapsed >= 2 * POLL_SECONDS  # (a lower bound: a slow machine cannot fail it)
    finally:
        dht.shutdown()


def test_a_burst_of_state_updates_is_one_or_two_stores_of_the_latest_priority(monkeypatch):
    config = load_config(TINY)
    key = RSAPrivateKey()
    stores = mp.Value("i", 0)  # counted in the averager's process (forked below), read here
    store = hivemind.DHT.store

    def counting_store(self, dht_key, *args, **kwargs):
        if str(dht_key).endswith("_donors"):
            with stores.get_lock():
                stores.value += 1
        return store(self, dht_key, *args, **kwargs)

    monkeypatch.setattr(hivemind.DHT, "store", counting_store)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       record_validators=records.base_validators(key) + records.run_validators("burst"))
    averager = None
    try:
        averager = build_state_averager(torch.nn.Linear(4, 4).parameters(), dht=dht, run_id="burst",
                                        optim=config.optimizer, averaging=config.averaging, timeouts=config.timeouts,
                                        share=True, owner_subkey=owner_subkey(key))
        time.sleep(2)  # the first store, at start
        before = stores.value
        for priority in range(1, 31):  # 30 wake-ups of the donor loop, as an all-reduce gives it
            averager.state_sharing_priority = priority
        time.sleep(3)
        burst = stores.value - before
        entry = dht.get("burst_state_averager_donors", latest=True)
        priorities = [item.value["priority"] for item in entry.value.values()] if entry else []
        assert before >= 1 and 1 <= burst <= 2, (before, burst)
        assert priorities == [30.0], entry
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()
