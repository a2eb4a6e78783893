"""``swarm monitor ADDR``: a non-training peer that serves the swarm's state to Prometheus.

    swarm monitor /ip4/203.0.113.5/tcp/31337/p2p/QmSeed... --metrics-port 9100
    swarm monitor ADDR --checkpoint-dir ckpt --checkpoint-every 100 --keep 3
    swarm monitor ADDR --token monitor.token         # a private swarm

It reads the trainers' signed progress records from the DHT every few seconds and serves aggregates at
http://HOST:PORT/metrics (a scrape never waits on the DHT), with /healthz for process supervisors.

With --checkpoint-dir it also downloads the swarm's state every N global steps, evaluates it on the held-out
split and saves it in Hugging Face format (ckpt/step-NNNNNNNN, ckpt/latest), for from_pretrained(...) and for
`swarm seed --resume`.
"""

from __future__ import annotations

import argparse
import logging
import threading

from monitor.collector import SnapshotPoller, SwarmCollector, serve, usable
from peers.common import reinstall_stop_handlers
from swarm import discovery
from swarm.access import keep_membership_until, load_access
from swarm.config import adopt_shared
from swarm.errors import SwarmError
from swarm.net import write_addr_file
from swarm.progress import read_trainer_records

logger = logging.getLogger("swarm.monitor")

VERSION = "0.1.0"


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    store = open_checkpoint_store(args)  # an unwritable directory fails now, not at the first save
    try:
        return monitor(args, stop, store)
    finally:
        if store is not None:
            store.close()


def open_checkpoint_store(args: argparse.Namespace):
    if args.checkpoint_dir is None:
        return None
    if args.checkpoint_every < 1 or args.keep < 1 or args.eval_batches < 0:
        raise SwarmError("--checkpoint-every and --keep must be at least 1, --eval-batches at least 0")
    from swarm.checkpoint import CheckpointStore

    return CheckpointStore(args.checkpoint_dir, keep=args.keep).open()


def monitor(args: argparse.Namespace, stop: threading.Event, store) -> int:
    access = load_access(args.token)
    dht, _, published = discovery.connect(args.addresses, host=args.host, port=args.port, identity=args.identity,
                                          run_id=args.run_id, timeout=args.timeout, access=access)
    run_id = published.record.run_id
    poller = server = checkpointer = None
    try:
        if access is not None:  # trainers serve state downloads (checkpoints) to members only
            threading.Thread(target=keep_membership_until, args=(stop, dht, access), daemon=True,
                             name="membership").start()
        poller = SnapshotPoller(lambda: read_trainer_records(dht, run_id), period=args.poll_period,
                                timeout=2 * args.poll_period)
        poller.start()
        if store is not None:
            checkpointer = start_checkpointer(args, dht, published, store, poller, stop)
        model = published.shared.get("model", {})
        run_info = dict(run_id=run_id, model=f"{model.get('architecture')}-{model.get('n_layer')}x{model.get('d_model')}",
                        version=VERSION)
        collector = SwarmCollector(run_info=run_info, snapshot_source=poller.latest, per_peer=args.per_peer,
                                   checkpoint_source=checkpointer.current_status if checkpointer else None)
        server = serve(collector, args.metrics_host, args.metrics_port, health=poller.healthy)
        url = f"http://{server.host}:{server.port}/metrics"
        logger.info("Monitoring swarm %r: metrics at %s, health at http://%s:%d/healthz", run_id, url,
                    server.host, server.port)
        write_addr_file(args.addr_file, [url])
        stop.wait()
        return 0
    finally:
        if server is not None:
            server.close()
        if checkpointer is not None:
            checkpointer.stop_event.set()
            checkpointer.join(timeout=10)  # let a save in progress finish (an unfinished one is cleared later)
            checkpointer.puller.shutdown()
        if poller is not None:
            poller.stop()
        dht.shutdown()


def start_checkpointer(args: argparse.Namespace, dht, published, store, poller: SnapshotPoller,
                       stop: threading.Event):
    from monitor.checkpoints import Checkpointer, StatePuller  # torch + transformers: only when checkpointing

    config = adopt_shared(published.shared)
    puller = StatePuller(dht, config, eval_batch_count=args.eval_batches, seed_key=published.record.public_key)
    reinstall_stop_handlers()  # hivemind's averager just set SIGINT to "ignore"
    checkpointer = Checkpointer(puller, store, every=args.checkpoint_every, stop=stop,
                                step_source=lambda: swarm_step(poller.latest()))
    checkpointer.start()
    logger.info("Checkpoints of %.1fM parameters every %d global steps into %s (keeping %d)",
                puller.num_params / 1e6, args.checkpoint_every, store.root, args.keep)
    return checkpointer


def swarm_step(snapshot) -> int | None:
    steps = [record.step for record in snapshot.records.values() if usable(record)]
    return max(steps, default=None)
