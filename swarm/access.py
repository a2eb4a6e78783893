"""Private swarms: access tokens signed by the seed's key, and the checks that keep everyone else out.

A private swarm has one *authority*: the seed's RSA key (``swarm seed --private --identity seed.key``). The
researcher mints a token per volunteer with ``swarm token``. A token file holds

* a fresh RSA key that becomes the volunteer's identity: its libp2p peer id and its DHT signing key, so the
  peer id that other peers see is bound to the token;
* hivemind's ``AccessToken`` for that key's public half (name, expiry), signed by the authority;
* the authority's public key, which pins the swarm: a member only accepts tokens signed by it and only the
  config that it signed. A stranger can mint tokens with a key of their own, but nobody accepts that key.

Three doors are guarded. DHT requests and responses carry the sender's token and a signature
(``SwarmAuthorizer``, hivemind's ``TokenAuthorizerBase``). Averaging (``rpc_join_group``,
``rpc_aggregate_part``) and state download (``rpc_download_state``), which hivemind does not authenticate, are
served only to peer ids with a valid token published under ``records.MEMBERS_KEY`` (``gated_averager``).
A peer that cannot use the DHT cannot read the config, find groups or find state donors in the first place.

The token file is a secret (it holds a private key): it is written readable by its owner only.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Optional

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, crypto_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.serializer import MSGPackSerializer

from swarm import records
from swarm.errors import SwarmError
from swarm.records import MEMBERS_KEY, key_fingerprint

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "swarm-token-v1:"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_LIFETIME = 10 * 365 * 86400.0
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MEMBERSHIP_TTL = 600.0  # a member re-publishes its token every third of this
REFUSAL_LOG_PERIOD = 60.0  # at most one log line per refused peer and reason per minute
NEGATIVE_CACHE = 5.0  # an unknown peer id is looked up in the DHT at most this often


def parse_lifetime(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds; SwarmError naming the fix otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text or "")
    if not match or int(match.group(1)) == 0:
        raise SwarmError(f"--expires {text!r}: expected a positive number with a unit: 90s, 30m, 12h, 7d or 2w")
    seconds = int(match.group(1)) * UNITS[match.group(2)]
    if seconds > MAX_LIFETIME:
        raise SwarmError(f"--expires {text!r}: at most 10 years (520w)")
    return float(seconds)


def format_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def _payload(token: AccessToken) -> bytes:
    return b"\0".join([b"swarm-access-v1", token.username.encode(), token.public_key, token.expiration_time.encode()])


def peer_id_of(public_key: bytes) -> PeerID:
    """The libp2p peer id of an RSA public key in hivemind's (OpenSSH) encoding."""
    key = serialization.load_ssh_public_key(public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


class Authority:
    """The public key that signs a private swarm's tokens (the seed's), and the checks made with it."""

    def __init__(self, public_key: bytes):
        self.public_key = public_key
        self._key = RSAPublicKey.from_bytes(public_key)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    def problem(self, token: AccessToken, now: float | None = None) -> Optional[str]:
        """Why ``token`` does not admit its holder now (None when it does)."""
        if not token.public_key and not token.signature:
            return "no access token"
        try:
            signed = self._key.verify(_payload(token), token.signature)
            expires = _parse_time(token.expiration_time)
        except Exception:  # malformed fields from the network
            signed, expires = False, 0.0
        if not signed:
            return f"token {token.username!r} is not signed by this swarm's key (tampered, or for another swarm)"
        if expires <= (time.time() if now is None else now):
            return f"token {token.username!r} expired at {token.expiration_time}"
        return None


def sign_token(authority_key: RSAPrivateKey, name: str, public_key: bytes, expires: float) -> AccessToken:
    if not NAME_PATTERN.match(name):
        raise SwarmError(f"--name {name!r}: use 1-64 letters, digits or . _ @ - (e.g. alice)")
    token = AccessToken(username=name, public_key=public_key, expiration_time=format_time(expires))
    token.signature = authority_key.sign(_payload(token))
    return token


@dataclass(frozen=True)
class TokenFile:
    """What a volunteer holds: its identity key, its signed token and the swarm's authority key."""

    identity: bytes  # libp2p PrivateKey protobuf, the same bytes as an identity file
    token: AccessToken
    authority: bytes

    @property
    def expires(self) -> float:
        return _parse_time(self.token.expiration_time)

    @property
    def peer_id(self) -> PeerID:
        return PeerID.from_identity(self.identity)

    def encode(self) -> str:
        blob = MSGPackSerializer.dumps(dict(identity=self.identity, token=self.token.SerializeToString(),
                                            authority=self.authority))
        return TOKEN_PREFIX + base64.urlsafe_b64encode(blob).decode()

    @classmethod
    def decode(cls, text: str, source: str) -> "TokenFile":
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise SwarmError(f"{source} is not a swarm access token (it should start with {TOKEN_PREFIX!r})")
        try:
            fields = MSGPackSerializer.loads(base64.urlsafe_b64decode(text[len(TOKEN_PREFIX):]))
            token = AccessToken.FromString(fields["token"])
            PeerID.from_identity(fields["identity"])
            RSAPublicKey.from_bytes(fields["authority"])
            return cls(identity=fields["identity"], token=token, authority=fields["authority"])
        except Exception:
            raise SwarmError(f"{source} is corrupt (truncated or edited): ask the swarm's researcher for a new "
                             "token") from None


def mint(authority_key: RSAPrivateKey, name: str, lifetime: float) -> TokenFile:
    """A token for a fresh identity, valid for ``lifetime`` seconds from now."""
    volunteer = RSAPrivateKey()
    identity = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=volunteer.to_bytes())
    public_key = volunteer.get_public_key().to_bytes()
    token = sign_token(authority_key, name, public_key, time.time() + lifetime)
    return TokenFile(identity=identity.SerializeToString(), token=token,
                     authority=authority_key.get_public_key().to_bytes())


def write_token(path: str, token_file: TokenFile) -> None:
    """Write the token readable by its owner only (it holds a private key); never over an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SwarmError(f"--out {path} already exists: pick another name or remove it first") from None
    except OSError as error:
        raise SwarmError(f"cannot write --out {path}: {error.strerror}") from None
    with os.fdopen(fd, "w") as file:
        file.write(token_file.encode() + "\n")


def read_token(path_or_text: str) -> TokenFile:
    """A token file's path, or the token string itself (what ``swarm token`` prints)."""
    if path_or_text.strip().startswith(TOKEN_PREFIX):
        return TokenFile.decode(path_or_text, "the --token string")
    try:
        text = Path(path_or_text).read_text()
    except FileNotFoundError:
        raise SwarmError(f"--token {path_or_text}: no such file; pass the file the swarm's researcher gave you "
                         "(made by `swarm token`)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SwarmError(f"cannot read --token {path_or_text}: {getattr(error, 'strerror', None) or error}") from None
    return TokenFile.decode(text, f"--token {path_or_text}")


class Access:
    """This peer's membership of a private swarm: its identity, its token and the swarm's authority."""

    def __init__(self, *, private_key: RSAPrivateKey, identity_path: str, token: AccessToken, authority: Authority):
        self.private_key, self.identity_path = private_key, identity_path
        self.token, self.authority = token, authority

    @property
    def expires(self) -> float:
        return _parse_time(self.token.expiration_time)

    def authorizer(self) -> "SwarmAuthorizer":
        return SwarmAuthorizer(self)

    def validators(self) -> list[RecordValidatorBase]:
        validators: list[RecordValidatorBase] = [MembershipValidator(self.authority)]
        key_policy = getattr(records, "KeyPolicyValidator", None)  # refuses keys it was not told about
        if key_policy is not None:
            validators.append(key_policy([MEMBERS_KEY]))
        return validators

    def gate(self) -> "MemberGate":
        return MemberGate(self.authority)


def member_access(token_file: TokenFile, source: str) -> Access:
    """A volunteer's Access from its token; an expired or tampered token is a SwarmError saying what to do."""
    authority = Authority(token_file.authority)
    problem = authority.problem(token_file.token)
    if problem is not None:
        raise SwarmError(f"{source}: {problem}; ask the swarm's researcher for a new one (swarm token)")
    if RSAPublicKey.from_bytes(token_file.token.public_key).to_bytes() != _public_key(token_file.identity):
        raise SwarmError(f"{source}: its key does not match its token (edited): ask for a new token")
    return Access(private_key=identity_key(token_file.identity), identity_path=identity_file(token_file.identity),
                  token=token_file.token, authority=authority)


def seed_access(private_key: RSAPrivateKey, identity_path: str) -> Access:
    """The seed is the authority: it signs its own token (for as long as a token may live)."""
    token = sign_token(private_key, "seed", private_key.get_public_key().to_bytes(), time.time() + MAX_LIFETIME)
    return Access(private_key=private_key, identity_path=identity_path, token=token,
                  authority=Authority(private_key.get_public_key().to_bytes()))


def identity_key(identity: bytes) -> RSAPrivateKey:
    """The RSA key inside identity bytes (libp2p's PrivateKey protobuf)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(crypto_pb2.PrivateKey.FromString(identity).data, None)
    return key


def _public_key(identity: bytes) -> bytes:
    return identity_key(identity).get_public_key().to_bytes()


def identity_file(identity: bytes) -> str:
    """p2pd reads its identity from a file: a private temporary one, removed at exit."""
    folder = tempfile.mkdtemp(prefix="swarm-token-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "identity.key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(identity)
    return path


class _RefusalLog:
    """One warning per (request kind, peer, reason) per minute, so an intruder cannot flood the log; bounded memory."""

    def __init__(self):
        self._last: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def refused(self, what: str, who: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._last) > 1024:
                self._last.clear()
            if now - self._last.get((what, who, reason), -REFUSAL_LOG_PERIOD) < REFUSAL_LOG_PERIOD:
                return
            self._last[(what, who, reason)] = now
        logger.warning("Refused %s from %s: %s", what, who, reason)


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorization with our tokens: every DHT request and response carries the sender's token
    and is signed by the token's key (the sender's identity); both sides refuse what our authority did not sign."""

    def __init__(self, access: Access):
        super().__init__(access.private_key)
        self._access = access
        self._log = _RefusalLog()

    async def get_token(self) -> AccessToken:
        return self._access.token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self._access.authority.problem(access_token) is None

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # nothing to refresh from: an expired peer is refused by the others and stops (join.py)

    async def validate_request(self, request) -> bool:
        problem = self._access.authority.problem(request.auth.client_access_token)
        if problem is None and await super().validate_request(request):
            return True
        who = f"peer {request.auth.client_access_token.username!r}" if problem != "no access token" else "a peer"
        self._log.refused("a DHT request", who, problem or "bad signature, clock off by over a minute, or a replay")
        return False

    async def validate_response(self, response, request) -> bool:
        if await super().validate_response(response, request):
            return True
        problem = self._access.authority.problem(response.auth.service_access_token)
        self._log.refused("a DHT response", "a peer", problem or "bad signature")
        return False


class MembershipValidator(RecordValidatorBase):
    """Under ``MEMBERS_KEY`` only tokens our authority signed, each under its own holder's peer id."""

    _key_id = DHTID.generate(source=MEMBERS_KEY).to_bytes()

    def __init__(self, authority: Authority):
        self.authority = authority

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            token = AccessToken.FromString(MSGPackSerializer.loads(record.value))
            return self.authority.problem(token) is None and subkey == peer_id_of(token.public_key).to_bytes()
        except Exception:
            return False

    @property
    def priority(self) -> int:
        return 5

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, MembershipValidator) and other.authority.public_key == self.authority.public_key


def publish_membership(dht, access: Access, *, wait: bool = True) -> None:
    """Store this peer's token in the DHT, so that other members' averagers serve it."""
    expiration = min(access.expires, time.time() + MEMBERSHIP_TTL)
    ok = dht.store(MEMBERS_KEY, access.token.SerializeToString(), expiration_time=expiration,
                   subkey=dht.peer_id.to_bytes(), return_future=not wait)
    if wait and not ok:
        raise SwarmError("could not publish this peer's access token in the DHT: is the token for this swarm?")


def keep_membership_until(stop: threading.Event, dht, access: Access) -> None:
    """Re-publish the token every few minutes until ``stop`` is set or the token expires (then set ``stop``)."""
    while not stop.is_set():
        left = access.expires - time.time()
        if left <= 0:
            logger.error("This peer's access token expired at %s: stopping. Ask the swarm's researcher for a new "
                         "one and rejoin with --token", access.token.expiration_time)
            stop.set()
            return
        if stop.wait(min(MEMBERSHIP_TTL / 3, left)):
            return
        if access.expires > time.time():
            publish_membership(dht, access, wait=False)


class MemberGate:
    """In an averager's process: is the peer behind an incoming RPC a member? Peer ids with a valid token under
    ``MEMBERS_KEY`` are cached until their token expires; an unknown one is looked up at most every few seconds."""

    def __init__(self, authority: Authority):
        self.authority = authority
        self._members: dict[PeerID, float] = {}
        self._looked_up: dict[PeerID, float] = {}
        self._log = _RefusalLog()

    async def admits(self, dht, peer_id: PeerID, what: str) -> bool:
        if self._members.get(peer_id, 0.0) > time.time():
            return True
        last = self._looked_up.get(peer_id)
        if last is None or time.monotonic() - last >= NEGATIVE_CACHE:
            if len(self._looked_up) > 4096:
                self._looked_up.clear()
            self._looked_up[peer_id] = time.monotonic()
            await self._refresh(dht)
            if self._members.get(peer_id, 0.0) > time.time():
                return True
        self._log.refused(what, f"peer {peer_id}", "it has no valid access token to this swarm")
        return False

    async def _refresh(self, dht) -> None:
        try:
            found = await dht.get(MEMBERS_KEY, latest=True, return_future=True)
        except Exception as error:  # the DHT is shutting down or unreachable: admit nobody new
            logger.debug("Could not read the members' tokens: %r", error)
            return
        if found is None or not isinstance(found.value, dict):
            return
        now = time.time()
        for subkey, entry in found.value.items():
            try:
                token = AccessToken.FromString(entry.value)
                if self.authority.problem(token, now) is None and subkey == peer_id_of(token.public_key).to_bytes():
                    self._members[PeerID(subkey)] = _parse_time(token.expiration_time)
            except Exception:
                continue


def gated_averager(cls: type, gate: MemberGate | None) -> type:
    """A subclass of the hivemind averager ``cls`` that serves averaging and state download to members only
    (``cls`` itself when ``gate`` is None: a public swarm).

    Keeps ``cls.__name__`` (hivemind names RPC handlers after the class) and calls ``cls``'s own handlers, so
    it composes with other wrappers of the same class (wire counters, part validation).
    """
    if gate is None:
        return cls

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await gate.admits(self.dht, context.remote_id, "a request to join an averaging group"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in cls.rpc_join_group(self, request, context):
            yield message

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await gate.admits(self.dht, context.remote_id, "an all-reduce part"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in cls.rpc_aggregate_part(self, stream, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await gate.admits(self.dht, context.remote_id, "a state download"):
            return  # an empty stream: the downloader moves on to the next donor
        async for message in cls.rpc_download_state(self, request, context):
            yield message

    handlers = dict(rpc_join_group=rpc_join_group, rpc_aggregate_part=rpc_aggregate_part,
                    rpc_download_state=rpc_download_state, __module__=__name__)
    subclass = type(cls.__name__, (cls,), handlers)
    subclass.__qualname__ = f"gated_averager.<{cls.__qualname__}>"
    return subclass


def load_access(path_or_text: str | None) -> Access | None:
    """``--token``: None for a public swarm; an unreadable, expired or tampered token is a SwarmError."""
    if path_or_text is None:
        return None
    token_file = read_token(path_or_text)
    source = "the --token string" if path_or_text.strip().startswith(TOKEN_PREFIX) else f"--token {path_or_text}"
    return member_access(token_file, source)
