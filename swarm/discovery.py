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
from swarm.access import Access, publish_membership
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
            timeout: float = 60.0, access: Access | None = None) -> tuple[hivemind.DHT, RSAPrivateKey, PublishedConfig]:
    """Join the DHT through any live peer's address and fetch the swarm's verified config.

    With ``access`` (a private swarm's token) this peer's identity is the token's, every DHT request is
    authorized, only the config signed by the token's authority is accepted, and the token is published.
    The caller owns the returned DHT and must shut it down; on failure nothing is left running.
    """
    addresses = net.parse_peer_addresses(addresses)
    if access is not None and identity is not None:
        raise SwarmError("--token carries this peer's identity: drop --identity (or peer.identity)")
    identity_path, private_key = (access.identity_path, access.private_key) if access else net.load_identity(identity)
    validators = records.base_validators(private_key) + (access.validators() if access else [])
    dht = net.start_dht(initial_peers=addresses, host=host, port=port, identity_path=identity_path,
                        announce=announce, client_mode=client_mode, validators=validators, join_timeout=timeout,
                        authorizer=access.authorizer() if access else None)
    try:
        published = fetch_config(dht, run_id=run_id, timeout=min(timeout, 30.0),
                                 signer=access.authority.public_key if access else None)
        dht.add_validators(records.run_validators(published.record.run_id))
        if access is not None:
            publish_membership(dht, access)
    except BaseException:
        dht.shutdown()
        raise
    return dht, private_key, published


def keep_alive_until(stop: threading.Event, dht: hivemind.DHT, published: PublishedConfig, *, ttl: float) -> None:
    """Re-store the config every few minutes (at most every ttl/4) until ``stop`` is set."""
    while not stop.wait(min(ttl / 4, 300.0)):
        keep_alive(dht, published, ttl=ttl)


def fetch_config(dht: hivemind.DHT, *, run_id: str | None, timeout: float,
                 signer: bytes | None = None) -> PublishedConfig:
    """The one verified config in the DHT (matching ``run_id`` when given, signed by ``signer`` when given: a
    private swarm's authority), retried for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        candidates = _verified_configs(dht)
        if signer is not None:
            candidates = [c for c in candidates if c.record.public_key == signer]
        if run_id is not None:
            candidates = [c for c in candidates if c.record.run_id == run_id]
        run_ids = sorted({c.record.run_id for c in candidates})
        if len(run_ids) == 1:
            return _choose_signer(dht, candidates)
        if len(run_ids) > 1:
            raise SwarmError(f"several swarms advertise a config here ({', '.join(run_ids)}): pass --run-id NAME")
        if time.monotonic() >= deadline:
            wanted = f" for run {run_id!r}" if run_id else ""
            wanted += " signed by your token's swarm key" if signer is not None else ""
            raise SwarmError(
                f"connected, but found no swarm config{wanted} in the DHT after {timeout:.0f} s: "
                "is the address a swarm peer (started with `swarm seed` or `swarm join`)?"
            )
        time.sleep(1.0)


def _choose_signer(dht: hivemind.DHT, candidates: list[PublishedConfig]) -> PublishedConfig:
    """One run's config. Anyone can sign a config for any run id with their own key, so when several keys did, take
    the one that the live trainers' signed progress records say they follow, and refuse to guess on a tie."""
    newest = {}
    for candidate in sorted(candidates, key=lambda c: c.record.created):
        newest[candidate.subkey] = candidate
    if len(newest) == 1:
        return next(iter(newest.values()))
    from swarm.progress import read_trainer_records

    votes = {subkey: 0 for subkey in newest}
    run_id = candidates[0].record.run_id
    dht.add_validators(records.run_validators(run_id))  # this node refuses the run's records until it has them
    for record in read_trainer_records(dht, run_id).values():
        if record.config in votes:
            votes[record.config] += 1
    ranked = sorted(votes.items(), key=lambda item: item[1], reverse=True)
    if ranked[0][1] > ranked[1][1]:
        logger.warning("%d keys sign a config for run %r; following %s, the one %d live trainers follow",
                       len(newest), candidates[0].record.run_id, ranked[0][0], ranked[0][1])
        return newest[ranked[0][0]]
    raise SwarmError(f"{len(newest)} different keys sign a config for run {candidates[0].record.run_id!r} and no "
                     "live trainer settles which is the swarm's: join through the seed's own address later, or ask "
                     "the researcher which seed key to trust")


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
