"""``swarm seed``: start the first peer of a new swarm and publish its signed config.

    swarm seed --config configs/tiny.yaml --addr-file seed.addr

The seed trains nothing; it is a DHT node that holds and re-publishes the config. Once trainers have joined,
it may exit: they keep the config and the model state alive.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from swarm import net, records
from swarm.config import SwarmConfig, load_config
from swarm.discovery import keep_alive_until, publish_config

logger = logging.getLogger("swarm.seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="swarm config YAML (see configs/)")
    parser.add_argument("--host", help="interface to listen on (default: peer.host, 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="TCP port to listen on (default: peer.port; 0 picks a free one)")
    parser.add_argument("--identity", help="key file for a stable peer id and signing key (created if missing)")
    parser.add_argument("--addr-file", help="write this peer's multiaddrs here, one per line, once it is ready")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, e.g. --set averaging.compression=fp16 (repeatable)")


def peer_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags are shorthands for --set peer.* (flags win)."""
    flags = {"host": args.host, "port": args.port, "identity": args.identity}
    return list(args.set) + [f"peer.{name}={value}" for name, value in flags.items() if value is not None]


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    config = load_config(args.config, peer_overrides(args))
    identity_path, private_key = net.load_identity(config.peer.identity)
    dht = net.start_dht(
        initial_peers=[], host=config.peer.host, port=config.peer.port, identity_path=identity_path,
        announce=config.peer.announce,
        validators=records.base_validators(private_key) + records.run_validators(config.run_id),
    )
    try:
        published = publish_config(dht, private_key, config)
        addresses = net.reachable_maddrs(dht)
        announce(config, addresses)
        net.write_addr_file(args.addr_file, addresses)
        keep_alive_until(stop, dht, published, ttl=config.timeouts.config_ttl)
        return 0
    finally:
        logger.info("Seed shutting down")
        dht.shutdown()


def announce(config: SwarmConfig, addresses: list[str]) -> None:
    logger.info("Swarm %r is up (config %s). This peer's addresses:", config.run_id, config.fingerprint())
    for address in addresses:
        logger.info("  %s", address)
    command = "swarm join " + " ".join(addresses)
    print(f"\nVolunteers join with:\n\n  {command}\n", file=sys.stdout, flush=True)
    if config.peer.host in ("127.0.0.1", "localhost", "::1"):
        logger.info("Listening on %s only: to accept peers from other machines, pass --host 0.0.0.0",
                    config.peer.host)
