"""Finding the swarm's config in the DHT, given nothing but a live peer's address.

The seed publishes its signed config (swarm.records); every trainer re-stores the verified record now and
then, so the config outlives the seed and any live peer can hand it to a newcomer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import hivemind
import yaml
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm import net, records
from swarm.config import SwarmConfig
from swarm.errors import SwarmError
from swarm.records import CONFIG_KEY, ConfigRecord, sign_config, verify_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedConfig:
    subkey: str
    value: dict
    record: ConfigRecord

    @property
    def shared(self) -> dict:
        return yaml.safe_load(self.record.config_yaml)


def publish_config(dht: hivemind.DHT, private_key: RSAPrivateKey, config: SwarmConfig) -> PublishedConfig:
    subkey, value = sign_config(private_key, config.run_id, config.shared_yaml())
    published = PublishedConfig(subkey, value, verify_config(subkey, value))
    keep_alive(dht, published, ttl=config.timeouts.config_ttl, wait=True)
    return published


def keep_alive(dht: hivemind.DHT, published: PublishedConfig, *, ttl: float, wait: bool = False) -> None:
    """(Re-)store the signed record verbatim; only its expiration moves."""
    ok = dht.store(CONFIG_KEY, published.value, expiration_time=get_dht_time() + ttl, subkey=published.subkey,
                   return_future=not wait)
    if wait and not ok:
        raise SwarmError("could not store the swarm config in the DHT; is another process using this identity?")


def connect(addresses: Sequence[str], *, host: str = "127.0.0.1", port: int = 0, identity: str | None = None,
            announce: Sequence[str] = (), client_mode: bool = False, run_id: str | None = None,
            timeout: float = 60.0) -> tuple[hivemind.DHT, RSAPrivateKey, PublishedConfig]:
    """Join the DHT through any live peer's address and fetch the swarm's verified config.

    The caller owns the returned DHT and must shut it down; on failure nothing is left running.
    """
    addresses = net.parse_peer_addresses(addresses)
    identity_path, private_key = net.load_identity(identity)
    dht = net.start_dht(initial_peers=addresses, host=host, port=port, identity_path=identity_path,
                        announce=announce, client_mode=client_mode,
                        validators=records.base_validators(private_key), join_timeout=timeout)
    try:
        published = fetch_config(dht, run_id=run_id, timeout=min(timeout, 30.0))
        dht.add_validators(records.run_validators(published.record.run_id))
    except BaseException:
        dht.shutdown()
        raise
    return dht, private_key, published


def keep_alive_until(stop: threading.Event, dht: hivemind.DHT, published: PublishedConfig, *, ttl: float) -> None:
    """Re-store the config every few minutes (at most every ttl/4) until ``stop`` is set."""
    while not stop.wait(min(ttl / 4, 300.0)):
        keep_alive(dht, published, ttl=ttl)


def fetch_config(dht: hivemind.DHT, *, run_id: str | None, timeout: float) -> PublishedConfig:
    """The one verified config in the DHT (matching ``run_id`` when given), retried for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        candidates = _verified_configs(dht)
        if run_id is not None:
            candidates = [c for c in candidates if c.record.run_id == run_id]
        run_ids = sorted({c.record.run_id for c in candidates})
        if len(run_ids) == 1:
            return max((c for c in candidates), key=lambda c: c.record.created)
        if len(run_ids) > 1:
            raise SwarmError(f"several swarms advertise a config here ({', '.join(run_ids)}): pass --run-id NAME")
        if time.monotonic() >= deadline:
            wanted = f" for run {run_id!r}" if run_id else ""
            raise SwarmError(
                f"connected, but found no swarm config{wanted} in the DHT after {timeout:.0f} s: "
                "is the address a swarm peer (started with `swarm seed` or `swarm join`)?"
            )
        time.sleep(1.0)


def _verified_configs(dht: hivemind.DHT) -> list[PublishedConfig]:
    found = dht.get(CONFIG_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    verified = []
    for subkey, entry in found.value.items():
        record = verify_config(subkey, entry.value)
        if record is None:
            logger.warning("Ignoring a swarm config whose signature does not verify")
            continue
        verified.append(PublishedConfig(subkey, entry.value, record))
    return verified
