"""``swarm token``: mint access tokens for a private swarm (``swarm seed --private``), or check one.

    swarm token --identity seed.key --name alice --expires 7d --out alice.token
    swarm token --identity seed.key --name bob --expires 12h      # prints the token as one line instead
    swarm token --show alice.token                                # whose, valid until when, for which swarm

A token admits one peer. It holds a fresh identity key for that peer and hivemind's AccessToken for it (the
name and expiry), signed by the seed's key: the --identity file that `swarm seed --private --identity seed.key`
runs with. The volunteer joins with `swarm join ADDR --token alice.token` (the monitor and `swarm status` take
--token too). A token is a secret, like a password: hand it over privately; --out writes it readable by you
only. It cannot be revoked before it expires, so prefer short expiries and mint new ones.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path

from swarm import net
from swarm.access import Authority, TokenFile, format_time, mint, parse_lifetime, read_token, write_token
from swarm.errors import SwarmError

logger = logging.getLogger("swarm.token")


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    if args.show is not None:
        print(describe(read_token(args.show), args.show))
        return 0
    if args.identity is None or args.name is None:
        raise SwarmError("pass --identity SEED_KEY and --name NAME (e.g. swarm token --identity seed.key "
                         "--name alice --expires 7d --out alice.token), or --show TOKEN")
    lifetime = parse_lifetime(args.expires)
    if not Path(args.identity).is_file():
        raise SwarmError(f"--identity {args.identity}: no such file; pass the key your private seed runs with "
                         f"(`swarm seed --private --identity {args.identity}` creates it)")
    _, authority_key = net.load_identity(args.identity)
    token = mint(authority_key, args.name, lifetime)
    if args.out is None:
        print(token.encode(), flush=True)
    else:
        write_token(args.out, token)
    logger.info("Token for %r, valid until %s (peer id %s), signed by swarm key %s%s", args.name,
                token.token.expiration_time, token.peer_id, Authority(token.authority).fingerprint,
                f", written to {args.out}" if args.out else "")
    logger.info("Keep it secret; the volunteer joins with: swarm join ADDR --token %s", args.out or "TOKEN")
    return 0


def describe(token: TokenFile, source: str) -> str:
    """What a token says about itself; a SwarmError when it is expired or not validly signed."""
    problem = Authority(token.authority).problem(token.token)
    if problem is not None:
        raise SwarmError(f"{source}: {problem}; ask the swarm's researcher for a new one")
    left = token.expires - time.time()
    return "\n".join([
        f"token for {token.token.username!r}: valid until {format_time(token.expires)} ({_duration(left)} left)",
        f"peer id   {token.peer_id}",
        f"swarm key {Authority(token.authority).fingerprint}",
    ])


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"
