"""DHT key names and record schemas: the one place that says what peers write into the DHT.

Two kinds of records:

* ``swarm_config`` (one fixed key, so a joiner that knows nothing but an address can find it): the seed's
  shared config as YAML, signed *inside the value* by the seed's RSA key, under a subkey derived from that key.
  ``ConfigRecordValidator`` makes every honest DHT node refuse a record whose signature does not verify, so
  nobody can replace the seed's config, while any peer may re-store the signed record verbatim to keep it
  alive after the seed leaves.
* ``{run_id}_metrics``: one subkey per trainer (``[owner:<its public key>]``, so only that trainer can write
  it; hivemind's RSASignatureValidator checks), holding a schema-validated ``TrainerRecord`` for the monitor.

In a private swarm (swarm.access) each member also publishes its access token under ``swarm_members``, subkey its
peer id, so the averagers can tell members' peer ids from strangers'; ``access.MembershipValidator`` admits
only tokens signed by the swarm's authority, each under its own holder's peer id.
"""

from __future__ import annotations

import hashlib
import time
from typing import Dict, Optional

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.serializer import MSGPackSerializer
from pydantic.v1 import BaseModel, StrictStr, confloat, conint, conlist, constr

CONFIG_KEY = "swarm_config"
MEMBERS_KEY = "swarm_members"  # private swarms: {peer id: access token}
MAX_CONFIG_BYTES = 64 * 1024
# Bounds on what honest DHT nodes keep, so a peer cannot exhaust their memory: only the keys swarm peers use are
# stored at all (KeyPolicyValidator), each record lives at most MAX_TTL (the config MAX_CONFIG_TTL), a key holds at
# most MAX_SUBKEYS entries (a flood evicts the soonest-expiring ones) and a value at most MAX_VALUE_BYTES.
MAX_TTL = 3600.0
MAX_CONFIG_TTL = 30 * 86400.0
MAX_SUBKEYS = 2048
MAX_KEYS = 4096
MAX_VALUE_BYTES = 2 * MAX_CONFIG_BYTES
DIGEST_SIZE = 64  # values of a trainer's parameters published for joiners to check downloads against
# Upper bounds of TrainerRecord's numbers (all are >= 0). NaN/inf fail them, so they never reach a dashboard;
# the monitor re-checks the same bounds on what it serves.
RECORD_LIMITS = dict(step=10**9, loss=1e4, samples_per_second=1e15, tokens_per_second=1e15, samples_done=10**15,
                     bytes_sent=10**18, bytes_received=10**18, rounds_averaged=10**9, rounds_partial=10**9,
                     rounds_skipped=10**9, rounds_failed=10**9, time=1e11)


def _count(name: str):
    return conint(ge=0, le=RECORD_LIMITS[name], strict=True)


def _amount(name: str):
    return confloat(ge=0.0, le=RECORD_LIMITS[name], strict=True)


# a state's parameters at a few fixed coordinates (swarm.state.state_digest): joiners check a downloaded state
# against the digests trainers (and a seed serving a checkpoint) publish
_digest = conlist(confloat(strict=True, ge=-1e6, le=1e6), max_items=DIGEST_SIZE)


_rejected = conint(ge=0, le=10**9, strict=True)


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


def run_keys(run_id: str) -> list[str]:
    """Every DHT key a run uses: ours, and those hivemind's optimizer derives from the run id (progress records,
    state-donor registries, matchmaking group keys)."""
    averagers = [f"{run_id}_grad_averager", f"{run_id}_state_averager"]
    # not hivemind's unsigned "{prefix}.all_averagers" donor registry: swarm.state keeps a signed one instead
    return ([metrics_key(run_id), f"{run_id}_progress"] + [f"{prefix}_donors" for prefix in averagers]
            + [f"{prefix}.0b" for prefix in averagers])


class TrainerRecord(BaseModel):
    """What each trainer publishes about itself (refreshed every few seconds, expires after timeouts.record_ttl)."""

    step: _count("step")
    loss: _amount("loss")
    samples_per_second: _amount("samples_per_second")
    tokens_per_second: _amount("tokens_per_second")
    samples_done: _count("samples_done")
    bytes_sent: _count("bytes_sent")
    bytes_received: _count("bytes_received")
    rounds_averaged: _count("rounds_averaged")
    rounds_partial: _count("rounds_partial")
    rounds_skipped: _count("rounds_skipped")
    rounds_failed: _count("rounds_failed")
    device: constr(strict=True, max_length=32)
    time: _amount("time")
    digest: _digest = []  # of the trainer's parameters at global step digest_step
    digest_step: _count("step") = 0
    config: constr(strict=True, max_length=64) = ""  # subkey (signer) of the swarm config this trainer follows
    # all-reduce contributions this trainer's averagers refused since it started, one field per swarm.guard.REASONS
    rejected_nonfinite: _rejected = 0
    rejected_norm: _rejected = 0
    rejected_weight: _rejected = 0
    rejected_shape: _rejected = 0
    rejected_dtype: _rejected = 0
    rejected_codebook: _rejected = 0
    rejected_malformed: _rejected = 0
    rejected_result: _rejected = 0


class MetricsSchema(BaseModel):
    metrics: Dict[BytesWithPublicKey, Optional[TrainerRecord]]


class DonorRecord(BaseModel):
    """A peer offering its state for download (swarm.state): its peer id, which must be its signing key's."""

    peer_id: bytes
    priority: confloat(strict=True, ge=-1.0, le=RECORD_LIMITS["step"])
    # a seed serving a checkpoint (``swarm seed --resume``) publishes the digest of that state: signed by the key
    # that signs the swarm config, it vouches for the checkpoint while no trainer publishes a digest yet
    digest: _digest = []
    digest_step: _count("step") = 0


class DonorsSchema(BaseModel):
    donors: Dict[BytesWithPublicKey, Optional[DonorRecord]]


class ConfigRecord(BaseModel):
    run_id: constr(strict=True, min_length=1, max_length=64)
    config_yaml: constr(strict=True, max_length=MAX_CONFIG_BYTES)
    public_key: bytes
    signature: bytes
    created: confloat(strict=True, ge=0.0, le=1e11)


class ConfigSchema(BaseModel):
    swarm_config: Dict[StrictStr, ConfigRecord]


def key_fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:32]


def _signed_payload(run_id: str, config_yaml: str, created: float) -> bytes:
    return b"\0".join([b"swarm-config-v1", run_id.encode(), config_yaml.encode(), repr(created).encode()])


def sign_config(private_key: RSAPrivateKey, run_id: str, config_yaml: str) -> tuple[str, dict]:
    """Returns (subkey, value) for ``dht.store(CONFIG_KEY, value, expiration, subkey=subkey)``."""
    public_key = private_key.get_public_key().to_bytes()
    created = time.time()
    signature = private_key.sign(_signed_payload(run_id, config_yaml, created))
    value = dict(run_id=run_id, config_yaml=config_yaml, public_key=public_key, signature=signature, created=created)
    return key_fingerprint(public_key), value


def verify_config(subkey: object, value: object) -> Optional[ConfigRecord]:
    """The parsed record when its signature and subkey match its public key; else None."""
    try:
        record = ConfigRecord.parse_obj(value)
        public_key = RSAPublicKey.from_bytes(record.public_key)
        payload = _signed_payload(record.run_id, record.config_yaml, record.created)
        if subkey != key_fingerprint(record.public_key) or not public_key.verify(payload, record.signature):
            return None
        return record
    except Exception:  # any malformed input from the network means "not valid"
        return None


class ConfigRecordValidator(RecordValidatorBase):
    """Refuses ``swarm_config`` records whose in-value signature does not match their subkey's key."""

    _key_id = DHTID.generate(source=CONFIG_KEY).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        if record.subkey is None or len(record.value) > 2 * MAX_CONFIG_BYTES:
            return False
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        return verify_config(subkey, value) is not None

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): sees the value after its signature is stripped

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, ConfigRecordValidator)


class KeyPolicyValidator(RecordValidatorBase):
    """Refuses records under keys no swarm peer uses, records that would outlive MAX_TTL (MAX_CONFIG_TTL for the
    config), and values over MAX_VALUE_BYTES. Policies for several runs merge into one."""

    def __init__(self, keys: list[str]):
        self._ttl = {DHTID.generate(source=key).to_bytes(): MAX_TTL for key in keys}
        self._ttl[ConfigRecordValidator._key_id] = MAX_CONFIG_TTL

    def validate(self, record: DHTRecord) -> bool:
        ttl = self._ttl.get(record.key)
        return (ttl is not None and len(record.value) <= MAX_VALUE_BYTES
                and record.expiration_time <= time.time() + ttl + 60.0)  # + clock skew between peers

    @property
    def priority(self) -> int:
        return 20  # first: the cheapest check

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, KeyPolicyValidator):
            return False
        self._ttl.update(other._ttl)
        return True


def base_validators(private_key: RSAPrivateKey) -> list[RecordValidatorBase]:
    """Validators every peer installs before it joins (the run id is not known yet)."""
    return [
        KeyPolicyValidator([CONFIG_KEY, MEMBERS_KEY]),
        RSASignatureValidator(private_key),
        SchemaValidator(ConfigSchema, allow_extra_keys=True),
        ConfigRecordValidator(),
    ]


def run_validators(run_id: str) -> list[RecordValidatorBase]:
    """Validators added once the run id is known."""
    return [KeyPolicyValidator(run_keys(run_id)), SchemaValidator(MetricsSchema, prefix=run_id, allow_extra_keys=True),
            SchemaValidator(DonorsSchema, prefix=f"{run_id}_state_averager", allow_extra_keys=True)]


def bound_dht_storage() -> None:
    """Cap every DHT node this process starts from now on (its storage and cache, MAX_KEYS keys, and each key's
    dictionary, MAX_SUBKEYS entries): hivemind's are unbounded. Idempotent; call before the DHT process forks."""
    from hivemind.dht import protocol, storage

    if getattr(storage.DictionaryDHTValue, "_swarm_bounded", False):
        return

    class BoundedDictionary(storage.DictionaryDHTValue):
        _swarm_bounded = True

        def __init__(self, maxsize=None):
            super().__init__(maxsize=min(maxsize or MAX_SUBKEYS, MAX_SUBKEYS))

    class BoundedStorage(storage.DHTLocalStorage):
        def __init__(self, maxsize=None):
            super().__init__(maxsize=min(maxsize or MAX_KEYS, MAX_KEYS))

    code = MSGPackSerializer._ext_types[storage.DictionaryDHTValue]  # serialized as the class it extends
    MSGPackSerializer._ext_types[BoundedDictionary] = code
    storage.DictionaryDHTValue = BoundedDictionary
    protocol.DHTLocalStorage = BoundedStorage
