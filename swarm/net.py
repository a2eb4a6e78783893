"""Joining the DHT: identities, multiaddr checks, listening addresses, and bounded retries with clear errors.

One key file serves as both the libp2p identity (stable peer id) and the RSA key that signs this peer's DHT
records, so a peer's records can be tied to its peer id.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Sequence

import hivemind
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.auth import AuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from swarm import records
from swarm.addresses import check_peer_address, invalid, lacks_peer_id
from swarm.errors import SwarmError
from swarm.files import write_atomic

logger = logging.getLogger(__name__)

REACHABILITY_HINT = (
    "check the address (copy it from the seed's output or --addr-file), that the peer is still running, "
    "that no firewall blocks its port, and that it listens on a reachable interface (--host 0.0.0.0); "
    "a private swarm answers only peers with a valid --token from its researcher"
)


def parse_peer_addresses(addresses: Sequence[str]) -> list[str]:
    """Validate multiaddrs like /ip4/1.2.3.4/tcp/31337/p2p/Qm...; raise SwarmError naming the bad one."""
    if not addresses:
        raise SwarmError("no peer address given: pass one or more multiaddrs printed by a running peer")
    parsed = []
    for address in addresses:
        check_peer_address(address)
        try:
            maddr = Multiaddr(address.strip())
        except Exception as error:
            raise invalid(address, str(error)) from None
        if "p2p" not in [proto.name for proto in maddr.protocols()]:  # ("p2p" as another protocol's value)
            raise lacks_peer_id(address)
        parsed.append(str(maddr))
    return parsed


def load_identity(path: str | None) -> tuple[str, RSAPrivateKey]:
    """(identity file path, its RSA key). Creates the file when missing; a throwaway one when path is None."""
    if path is None:
        folder = tempfile.mkdtemp(prefix="swarm-identity-")
        path = os.path.join(folder, "identity.key")
        P2P.generate_identity(path)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return path, _read_identity(path)
    file = Path(path)
    if not file.exists():
        if not file.parent.is_dir():
            raise SwarmError(f"--identity {path}: directory {file.parent} does not exist")
        P2P.generate_identity(str(file))
        logger.info("Created a new identity in %s (keep it to keep your peer id)", path)
    return str(file), _read_identity(str(file))


def _read_identity(path: str) -> RSAPrivateKey:
    try:
        data = Path(path).read_bytes()
        proto = crypto_pb2.PrivateKey.FromString(data)
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = serialization.load_der_private_key(proto.data, password=None)
        return key
    except OSError as error:
        raise SwarmError(f"cannot read identity file {path}: {error.strerror}") from None
    except Exception:
        raise SwarmError(
            f"identity file {path} is corrupt or not a swarm identity; move it away and a new one will be created"
        ) from None


def check_port_free(host: str, port: int) -> None:
    """p2pd binds with SO_REUSEPORT, so two peers could silently share a port: refuse that up front."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise SwarmError(f"port {port} on {host} is already in use: pick another with --port, or 0") from None
            raise SwarmError(f"cannot listen on {host}:{port}: {error.strerror}; check --host/--port") from None


BLACKLIST_SECONDS = 3.0
# How long a leaving peer waits for its DHT process to stop before terminating it (hivemind: 3 s). Every trainer
# used up the 3 s: its DHT process first reads requests whose reply pipe is already gone (most likely from the
# averager processes, which exit first), fails to unpickle each and sleeps its RPC timeout (3 s) after each one.
DHT_SHUTDOWN_SECONDS = 1.0


def host_maddrs(host: str, port: int) -> list[str]:
    proto = "ip6" if ":" in host else "ip4"
    return [f"/{proto}/{host}/tcp/{port}"]


def start_dht(
    *,
    initial_peers: Sequence[str],
    host: str,
    port: int,
    identity_path: str,
    validators: list,
    announce: Sequence[str] = (),
    client_mode: bool = False,
    join_timeout: float = 60.0,
    authorizer: AuthorizerBase | None = None,
) -> hivemind.DHT:
    """Start this peer's DHT node, retrying unreachable initial peers for up to ``join_timeout`` seconds.
    ``authorizer`` (private swarms, swarm.access) signs and checks every DHT request and response."""
    check_port_free(host, port)
    records.bound_dht_storage()  # before the DHT process forks
    deadline = time.monotonic() + join_timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            return hivemind.DHT(
                initial_peers=list(initial_peers),
                host_maddrs=host_maddrs(host, port),
                announce_maddrs=list(announce) or None,
                identity_path=identity_path,
                client_mode=client_mode,
                record_validators=validators,
                authorizer=authorizer,
                # hivemind bans a peer that does not answer for 5 s, doubling on each failure: after a 30 s
                # outage peers kept ignoring each other for tens of seconds once the link was back. A short,
                # constant ban keeps dead peers out of lookups and lets a healed one back within seconds.
                blacklist_time=BLACKLIST_SECONDS,
                backoff_rate=1.0,
                shutdown_timeout=DHT_SHUTDOWN_SECONDS,
                start=True,
            )
        except Exception as error:  # p2pd reports unreachable bootstrap peers as a generic daemon error
            if not initial_peers:
                raise SwarmError(f"could not start the DHT on {host}:{port}: {error}") from None
            if time.monotonic() >= deadline:
                raise SwarmError(
                    f"could not reach any of {', '.join(initial_peers)} after {join_timeout:.0f} s: {REACHABILITY_HINT}"
                ) from None
            logger.warning("Could not reach the swarm yet (attempt %d): %s; retrying", attempt, _short(error))
            time.sleep(min(2.0 * attempt, 5.0, max(deadline - time.monotonic(), 0.1)))


def _short(error: Exception) -> str:
    return str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__


def reachable_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(maddr) for maddr in dht.get_visible_maddrs()]


def write_addr_file(path: str | None, addresses: Sequence[str]) -> None:
    """Write one multiaddr per line, atomically, so a watcher never reads a half-written file."""
    if not path:
        return
    write_atomic(path, "".join(f"{address}\n" for address in addresses))
