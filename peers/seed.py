"""``swarm seed``: start the first peer of a new swarm and publish its signed config.

    swarm seed --config configs/tiny.yaml --addr-file seed.addr
    swarm seed --config configs/tiny.yaml --resume checkpoints/        # continue from the latest checkpoint

The seed trains nothing; it is a DHT node that holds and re-publishes the config. Once trainers have joined,
it may exit: they keep the config and the model state alive.

With --resume it also serves a checkpoint's weights, optimizer state and step to the trainers that join, so the
new swarm continues where the checkpoint left off (trainers download it as a late joiner downloads state).

With --private only peers holding an access token signed by the seed's key (--identity) may use the DHT,
average or download state; mint tokens with `swarm token --identity SEED_KEY --name NAME --expires 7d`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from pathlib import Path
from typing import TYPE_CHECKING

from peers.common import reinstall_stop_handlers, route_hivemind_logs
from swarm.config import SwarmConfig, load_config
from swarm.errors import SwarmError

if TYPE_CHECKING:
    from swarm.access import Access

logger = logging.getLogger("swarm.seed")


def peer_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags are shorthands for --set peer.* (flags win)."""
    flags = {"host": args.host, "port": args.port, "identity": args.identity}
    return list(args.set) + [f"peer.{name}={value}" for name, value in flags.items() if value is not None]


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    checkpoint = None
    if args.resume:
        from swarm.checkpoint import CONFIG_FILE, resolve  # (torch)

        checkpoint = resolve(args.resume)
    if args.config is None and checkpoint is None:
        raise SwarmError("pass --config FILE (a swarm config, see configs/) or --resume DIR (a checkpoint)")
    config = load_config(args.config or checkpoint / CONFIG_FILE, peer_overrides(args))
    if args.private and config.peer.identity is None:
        raise SwarmError("--private needs --identity FILE: tokens are signed with that key, so keep the file")
    # the network stack only now: a bad config or flag is answered before seconds of importing it
    from swarm import net, records
    from swarm.access import seed_access
    from swarm.discovery import keep_alive_until, publish_config
    from swarm.training import owner_subkey as signing_subkey

    route_hivemind_logs()
    identity_path, private_key = net.load_identity(config.peer.identity)
    access = seed_access(private_key, identity_path) if args.private else None
    dht = net.start_dht(
        initial_peers=[], host=config.peer.host, port=config.peer.port, identity_path=identity_path,
        announce=config.peer.announce, authorizer=access.authorizer() if access else None,
        validators=records.base_validators(private_key) + records.run_validators(config.run_id)
        + (access.validators() if access else []),
    )
    state = None
    try:
        if checkpoint is not None:
            # before anyone learns our address
            state = serve_checkpoint(dht, config, checkpoint, access, owner_subkey=signing_subkey(private_key))
        published = publish_config(dht, private_key, config)
        addresses = net.reachable_maddrs(dht)
        announce(config, addresses, private_key=identity_path if access else None)
        net.write_addr_file(args.addr_file, addresses)
        keep_alive_until(stop, dht, published, ttl=config.timeouts.config_ttl)
        return 0
    finally:
        logger.info("Seed shutting down")
        if state is not None:
            state.shutdown()
        dht.shutdown()


def serve_checkpoint(dht, config: SwarmConfig, path: Path, access: Access | None = None, *,
                     owner_subkey: bytes | None = None):
    """A state averager holding the checkpoint, offered to joining trainers like a trainer's own state."""
    from swarm import guard
    from swarm.checkpoint import load_optimizer, load_weights, read_state
    from swarm.model import build_model  # transformers: needed only when resuming
    from swarm.optimizer import build_state_averager
    from swarm.state import state_digest
    from swarm.tokenizer import build_tokenizer

    step = read_state(path)["step"]
    model = build_model(config.model, vocab_size=build_tokenizer(config.tokenizer).vocab_size)
    # it only serves state, but any averager of ours checks what it would receive (swarm.guard), installed pre-fork
    guard.install(guard.GuardCounters(), max_weight=guard.max_weight(config.averaging.target_batch_size))
    averager = build_state_averager(model.parameters(), dht=dht, run_id=config.run_id, optim=config.optimizer,
                                    averaging=config.averaging, timeouts=config.timeouts, share=True, start=False,
                                    gate=access.gate() if access else None, owner_subkey=owner_subkey)
    load_weights(model, path)
    load_optimizer(averager.optimizer, [name for name, _ in model.named_parameters()], path)
    averager.local_epoch = step
    averager.state_sharing_priority = step  # trainers that get further outrank us as donors
    averager.vouch = (step, state_digest(list(model.parameters())))  # joiners check our state (and others') by it
    averager.run_in_background(await_ready=True)
    reinstall_stop_handlers()  # hivemind's averager just set SIGINT to "ignore"
    logger.info("Resuming from %s: global step %d; joining trainers download its weights and optimizer state",
                path, step)
    return averager


def announce(config: SwarmConfig, addresses: list[str], private_key: str | None = None) -> None:
    """``private_key``: the identity file of a private seed, named in the instructions for minting tokens."""
    logger.info("Swarm %r is up (config %s). This peer's addresses:", config.run_id, config.fingerprint())
    for address in addresses:
        logger.info("  %s", address)
    command = "swarm join " + " ".join(addresses)
    if private_key is None:
        print(f"\nVolunteers join with:\n\n  {command}\n", file=sys.stdout, flush=True)
    else:
        print(f"\nThis swarm is private. Mint a token for each volunteer:\n\n  swarm token --identity {private_key} "
              f"--name NAME --expires 7d --out NAME.token\n\nand hand it over privately; they join with:\n\n"
              f"  {command} --token NAME.token\n", file=sys.stdout, flush=True)
    if config.peer.host in ("127.0.0.1", "localhost", "::1"):
        logger.info("Listening on %s only: to accept peers from other machines, pass --host 0.0.0.0",
                    config.peer.host)
