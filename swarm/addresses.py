"""Peer multiaddr checks that need no stack (no hivemind, no torch), so that the CLI answers a mistyped address
at once; ``net.parse_peer_addresses`` runs them before hivemind's full parse."""

from __future__ import annotations

import ipaddress

from swarm.errors import SwarmError

EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
_VALUES = {"ip4": ipaddress.IPv4Address, "ip6": ipaddress.IPv6Address, "tcp": int, "udp": int}


def invalid(address: str, why: str) -> SwarmError:
    return SwarmError(f"{address!r} is not a valid multiaddr ({why}); expected e.g. {EXAMPLE}")


def check_peer_address(address: str) -> None:
    """Raise SwarmError if ``address`` is plainly not a peer's multiaddr: not /-separated, an ip4/ip6/tcp/udp value
    that does not parse, or no /p2p/ part. Protocols it does not know are left to hivemind's parser."""
    text = address.strip()
    if not text.startswith("/"):
        raise invalid(address, "a multiaddr starts with '/'")
    parts = text.strip("/").split("/")
    for name, value in zip(parts, parts[1:] + [None]):
        if name not in _VALUES:
            continue
        if value is None:
            raise invalid(address, f"/{name} needs a value")
        try:
            number = _VALUES[name](value)
        except ValueError:
            raise invalid(address, f"{value!r} is not a valid {name} value") from None
        if name in ("tcp", "udp") and not 0 <= number <= 65535:
            raise invalid(address, f"port {value} is out of range")
    if "p2p" not in parts and "ipfs" not in parts:
        raise lacks_peer_id(address)


def lacks_peer_id(address: str) -> SwarmError:
    return SwarmError(f"{address!r} lacks the peer id part (/p2p/...): copy the whole address a peer printed")
