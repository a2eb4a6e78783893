"""Forged and flooded DHT records against a real honest DHT node (its own process and p2pd): an attacker node with
no validators of its own stores unknown keys, far-future and oversized records, forged signed records and floods of
subkeys. The honest node keeps none of the refused records, and its storage stays within the bounds of
swarm.records; the attacker's store of a refused record fails."""

from __future__ import annotations

import math

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm import records

RUN = "tiny"
SMALL_SUBKEY_CAP = 64  # the victim is forked with this cap, so the flood stays small


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    original = records.MAX_SUBKEYS
    records.MAX_SUBKEYS = SMALL_SUBKEY_CAP  # read by the victim's storage at run time, after the fork
    records.bound_dht_storage()
    key = RSAPrivateKey()
    victim = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                          record_validators=records.base_validators(key) + records.run_validators(RUN))
    attacker_key = RSAPrivateKey()
    attacker = hivemind.DHT(initial_peers=[str(a) for a in victim.get_visible_maddrs()],
                            host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                            record_validators=[RSASignatureValidator(attacker_key)])
    try:
        yield victim, key, attacker, attacker_key
    finally:
        records.MAX_SUBKEYS = original
        attacker.shutdown()
        victim.shutdown()


def trainer_record(step: int) -> dict:
    """A valid record as a trainer publishes it (every field present: the schema check refuses missing ones)."""
    return records.TrainerRecord(step=step, loss=2.0, samples_per_second=1.0, tokens_per_second=64.0,
                                 samples_done=10, bytes_sent=1, bytes_received=1, rounds_averaged=1, rounds_partial=0,
                                 rounds_skipped=0, rounds_failed=0, device="cpu", time=1.0).dict()


async def _stored(_dht, node) -> dict[bytes, int]:
    """Inside the DHT process: stored keys and how many entries each holds."""
    return {key.to_bytes(): len(item.value) if hasattr(item.value, "data") else 1
            for key, item in node.protocol.storage.items()}


def stored_at(victim, key: str) -> int:
    return victim.run_coroutine(_stored).get(DHTID.generate(source=key).to_bytes(), 0)


def test_unknown_keys_are_not_stored(nodes):
    victim, _, attacker, _ = nodes
    futures = [attacker.store(f"flood_{i}", b"x" * 64, get_dht_time() + 60, return_future=True) for i in range(200)]
    for future in futures:
        future.result()
    assert all(stored_at(victim, f"flood_{i}") == 0 for i in range(0, 200, 17))
    assert victim.get("flood_3") is None


def test_far_future_records_are_refused(nodes):
    victim, _, attacker, _ = nodes
    group_key = f"{RUN}_grad_averager.0b"
    assert not attacker.store(group_key, 1.0, get_dht_time() + 10 * 86400, subkey=b"far")
    assert stored_at(victim, group_key) == 0


@pytest.mark.parametrize("key, size, lifetime, ok", [
    (f"{RUN}_progress", 100, 60, True),
    (f"{RUN}_progress", records.MAX_VALUE_BYTES + 1, 60, False),  # oversized
    (f"{RUN}_progress", 100, records.MAX_TTL + 3600, False),  # outlives MAX_TTL
    (records.CONFIG_KEY, 100, 7 * 86400, True),
    (records.CONFIG_KEY, 100, records.MAX_CONFIG_TTL + 3600, False),
    ("someone_elses_key", 100, 60, False),
    (f"{RUN}_state_averager.all_averagers", 100, 60, False),  # hivemind's unsigned donor registry
])
def test_key_policy(key, size, lifetime, ok):
    from hivemind.dht.validation import DHTRecord

    policy = records.run_validators(RUN)[0]
    policy.merge_with(records.base_validators(RSAPrivateKey())[0])
    record = DHTRecord(key=DHTID.generate(source=key).to_bytes(), subkey=b"", value=b"x" * size,
                       expiration_time=get_dht_time() + lifetime)
    assert policy.validate(record) is ok


def test_a_subkey_flood_is_capped(nodes):
    victim, _, attacker, _ = nodes
    key = f"{RUN}_state_averager.0b"
    futures = [attacker.store(key, 1.0, get_dht_time() + 60 + i, subkey=i.to_bytes(4, "big"), return_future=True)
               for i in range(3 * SMALL_SUBKEY_CAP)]
    for future in futures:
        future.result()
    assert 0 < stored_at(victim, key) <= SMALL_SUBKEY_CAP


def test_another_peers_signed_record_cannot_be_overwritten(nodes):
    victim, key, attacker, _ = nodes
    owner = RSASignatureValidator(key).local_public_key
    honest = trainer_record(step=3)
    assert victim.store(records.metrics_key(RUN), honest, get_dht_time() + 60, subkey=owner)
    forged = dict(honest, step=10**6)
    attacker.store(records.metrics_key(RUN), forged, get_dht_time() + 60, subkey=owner)
    found = victim.get(records.metrics_key(RUN), latest=True)
    assert found.value[owner].value["step"] == 3


def test_a_trainer_withdraws_its_own_record_and_no_one_elses(nodes):
    from swarm.compression import WireCounters
    from swarm.progress import ProgressPublisher, read_trainer_records
    from swarm.rounds import RoundLog

    victim, key, attacker, _ = nodes
    owner = RSASignatureValidator(key).local_public_key
    assert victim.store(records.metrics_key(RUN), trainer_record(step=4), get_dht_time() + 90, subkey=owner)
    attacker.store(records.metrics_key(RUN), None, get_dht_time() + 120, subkey=owner)  # not its record to withdraw
    assert read_trainer_records(victim, RUN)[owner].step == 4
    ProgressPublisher(dht=victim, run_id=RUN, subkey=owner, device="cpu", round_log=RoundLog(),
                      counters=WireCounters(), ttl=120).withdraw()  # as a trainer does when it leaves
    assert owner not in read_trainer_records(victim, RUN)


@pytest.mark.parametrize("field, value", [("loss", math.nan), ("loss", math.inf), ("step", 10**15)])
def test_out_of_bounds_values_are_refused(nodes, field, value):
    victim, _, attacker, attacker_key = nodes
    owner = RSASignatureValidator(attacker_key).local_public_key
    record = trainer_record(step=1)
    record[field] = value
    attacker.store(records.metrics_key(RUN), record, get_dht_time() + 60, subkey=owner)
    found = victim.get(records.metrics_key(RUN), latest=True)
    assert found is None or owner not in found.value


def test_expiry_bounds_match_the_configs_limits():
    from swarm.config import TimeoutsConfig

    limits = TimeoutsConfig.model_fields
    assert max(m.le for m in limits["record_ttl"].metadata if hasattr(m, "le")) <= records.MAX_TTL
    assert max(m.le for m in limits["config_ttl"].metadata if hasattr(m, "le")) <= records.MAX_CONFIG_TTL
