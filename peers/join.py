"""``swarm join ADDR``: a volunteer's trainer. It needs nothing but a live peer's address.

    swarm join /ip4/203.0.113.5/tcp/31337/p2p/QmSeed... [--max-steps 100]
    swarm join /ip4/203.0.113.5/tcp/31337/p2p/QmSeed... --token alice.token     # a private swarm

It fetches and verifies the swarm's config, builds the model and its data shard, downloads the current
state from peers, and trains with 8-bit gradient averaging until stopped (or until the swarm has made
--max-steps global steps while it took part).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import threading
import time

from hivemind.utils.multiaddr import Multiaddr

from peers.common import reinstall_stop_handlers
from swarm import compression, guard, net
from swarm.access import Access, MemberGate, keep_membership_until, load_access
from swarm.config import SwarmConfig, adopt_shared, peer_from_overrides
from swarm.data import train_batches
from swarm.devices import choose_batch_size, choose_device
from swarm import discovery
from swarm.discovery import keep_alive, keep_alive_until
from swarm.files import write_atomic
from swarm.optimizer import build_optimizer
from swarm.progress import ProgressPublisher
from swarm.rounds import PartialRoundWatch, RoundLog
from swarm.state import state_digest
from swarm.tokenizer import build_tokenizer
from swarm.training import Trainer, TrainResult, owner_subkey, peer_seed

logger = logging.getLogger("swarm.join")


def local_overrides(args: argparse.Namespace) -> list[str]:
    host = args.host if args.host is not None else default_host(args.addresses)
    flags = {"device": args.device, "batch_size": args.batch_size, "client_mode": args.client_mode,
             "identity": args.identity, "host": host, "port": args.port}
    return list(args.set) + [f"peer.{name}={value}" for name, value in flags.items() if value is not None]


def default_host(addresses: list[str]) -> str:
    """Loopback for a local swarm; all interfaces when the swarm is elsewhere, so its peers can dial us."""
    for address in addresses:
        try:
            host = Multiaddr(address).value_for_protocol("ip4") or Multiaddr(address).value_for_protocol("ip6")
            if host and not ipaddress.ip_address(host).is_loopback:
                logger.info("The swarm is remote: listening on 0.0.0.0 (override with --host)")
                return "0.0.0.0"
        except Exception:
            continue
    return "127.0.0.1"


def connect(args: argparse.Namespace, overrides: list[str], access: Access | None = None):
    """Join the swarm through the given addresses and adopt its config (with our own peer.* choices)."""
    local = peer_from_overrides(overrides)  # bad per-peer flags fail before we connect
    dht, private_key, published = discovery.connect(
        args.addresses, host=local.host, port=local.port, identity=local.identity, announce=local.announce,
        client_mode=local.client_mode, run_id=args.run_id, timeout=args.timeout, access=access)
    try:
        config = adopt_shared(published.shared, overrides)
    except BaseException:
        dht.shutdown()
        raise
    logger.info("Joined swarm %r (config %s)", config.run_id, config.fingerprint())
    return dht, private_key, config, published


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    access = load_access(args.token)  # an expired or tampered token fails before we connect
    dht, private_key, config, published = connect(args, local_overrides(args), access)
    optimizer = trainer = None
    try:
        if access is not None:  # re-publish our token; stop when it expires
            threading.Thread(target=keep_membership_until, args=(stop, dht, access), daemon=True,
                             name="membership").start()
        keep_alive(dht, published, ttl=config.timeouts.config_ttl)  # the config outlives the seed through us
        threading.Thread(target=keep_alive_until, args=(stop, dht, published), daemon=True,
                         kwargs=dict(ttl=config.timeouts.config_ttl), name="config-keep-alive").start()
        net.write_addr_file(args.addr_file, net.reachable_maddrs(dht))
        trainer, optimizer, round_log, counters, num_params = build_trainer(
            config, dht, private_key, gate=access.gate() if access else None, seed_key=published.record.public_key)
        reinstall_stop_handlers()  # hivemind's averagers just set SIGINT to "ignore"
        trainer.publisher.config_subkey = published.subkey
        result = trainer.train(max_steps=args.max_steps, stop=stop, wait_for=args.wait_for_peers,
                               wait_timeout=config.timeouts.join)
        write_report(args.report_json, result, round_log, counters, num_params, dht)
        if args.save_model:
            trainer.model.save_pretrained(args.save_model)
            logger.info("Saved the model to %s", args.save_model)
        logger.info("Done: took part in global steps %d -> %d", result.start_step, result.final_step)
        return 0 if not result.stopped_early or args.max_steps is None else 130
    finally:
        if trainer is not None:  # first: shutting the averagers down takes seconds, and our digest is no witness
            trainer.publisher.withdraw()  # of the swarm's state once we stop training
        if optimizer is not None:
            optimizer.shutdown()
        dht.shutdown()


def build_trainer(config: SwarmConfig, dht, private_key, gate: MemberGate | None = None,
                  seed_key: bytes | None = None):
    from swarm.model import build_model, count_parameters  # transformers: slow to import, needed only here

    plan = choose_device(config.peer.device)
    tokenizer = build_tokenizer(config.tokenizer)
    model = build_model(config.model, vocab_size=tokenizer.vocab_size).to(plan.device)
    num_params = count_parameters(model)
    batch_size = choose_batch_size(config.peer.batch_size, plan=plan, num_params=num_params,
                                   seq_len=config.data.seq_len, d_model=config.model.d_model,
                                   n_layer=config.model.n_layer, target_batch_size=config.averaging.target_batch_size)
    logger.info("Model: %s, %.1fM parameters; gradients averaged as %s", config.model.architecture,
                num_params / 1e6, config.averaging.compression)
    compression.check_codecs()
    counters = compression.WireCounters()
    compression.install_wire_counters(counters)
    partial_watch = PartialRoundWatch().install()
    rejected = guard.GuardCounters()  # poisoned all-reduce contributions refused by this trainer's averagers
    guard.install(rejected, max_weight=guard.max_weight(config.averaging.target_batch_size))
    round_log = RoundLog()
    optimizer = build_optimizer(
        model.parameters(), dht=dht, private_key=private_key, run_id=config.run_id, batch_size=batch_size,
        client_mode=config.peer.client_mode, optim=config.optimizer, averaging=config.averaging,
        timeouts=config.timeouts, round_log=round_log, partial_watch=partial_watch, gate=gate, seed_key=seed_key,
    )
    batches = train_batches(config.data, tokenizer, batch_size=batch_size, seed=peer_seed(dht, config.peer.seed))
    publisher = ProgressPublisher(dht=dht, run_id=config.run_id, subkey=owner_subkey(private_key),
                                  device=plan.label, round_log=round_log, counters=counters,
                                  ttl=config.timeouts.record_ttl, rejected=rejected)
    parameters = list(model.parameters())
    publisher.digest_source = lambda: (optimizer.local_epoch, state_digest(parameters))
    trainer = Trainer(model=model, optimizer=optimizer, batches=batches, plan=plan,
                      max_grad_norm=config.optimizer.max_grad_norm, publisher=publisher)
    return trainer, optimizer, round_log, counters, num_params


def write_report(path: str | None, result: TrainResult, round_log: RoundLog, counters, num_params: int,
                 dht) -> None:
    if not path:
        return
    report = dict(
        peer_id=dht.peer_id.to_base58(), num_params=num_params, start_step=result.start_step,
        final_step=result.final_step, lr=result.lr, losses={str(k): v for k, v in sorted(result.losses.items())},
        rounds=round_log.as_dicts(), wire=counters.snapshot(), time=time.time(),
    )
    write_atomic(path, json.dumps(report, indent=1))
