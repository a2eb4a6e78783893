"""hivemind's matchmaking, reading the DHT at a bounded rate.

While an averager looks for a group, hivemind 1.1.12 re-reads the group key's entry from the DHT as soon as its
queue of potential leaders is empty, which is the whole time for a peer that leads (it waits for followers, and
for a peer that has tried every leader it knows). Measured in a 3-trainer swarm of configs/tiny.yaml on this
2-core machine: ~13 reads a second by each trainer's gradient averager and ~9 by its parameter averager, each a
DHT lookup over several peers that validates every record returned; the DHT processes used as much CPU as the
training. ``PacedGroupKeys`` lets one averager read the entry at most every ``POLL_SECONDS``: a leader declared
meanwhile is seen at most that much later, well within a matchmaking time (seconds).
"""

from __future__ import annotations

import asyncio
import time

from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import Matchmaking

POLL_SECONDS = 0.5


class PacedGroupKeys(GroupKeyManager):
    """A GroupKeyManager whose ``get_averagers`` reads the DHT at most every POLL_SECONDS (it waits the rest)."""

    last_read = -float("inf")

    async def get_averagers(self, group_key, only_active):
        wait = self.last_read + POLL_SECONDS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.last_read = time.monotonic()
        return await super().get_averagers(group_key, only_active)


class PacedMatchmaking(Matchmaking):
    """Matchmaking with PacedGroupKeys."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keys = self.group_key_manager
        self.group_key_manager = PacedGroupKeys(keys.dht, keys.prefix, keys.group_bits, keys.target_group_size)
