"""``swarm monitor ADDR``: a non-training peer that serves the swarm's state to Prometheus.

    swarm monitor /ip4/203.0.113.5/tcp/31337/p2p/QmSeed... --metrics-port 9100

It reads the trainers' signed progress records from the DHT every few seconds and serves aggregates at
http://HOST:PORT/metrics (a scrape never waits on the DHT), with /healthz for process supervisors.
"""

from __future__ import annotations

import argparse
import logging
import threading

from monitor.collector import SnapshotPoller, SwarmCollector, serve
from swarm import discovery
from swarm.net import write_addr_file
from swarm.progress import read_trainer_records

logger = logging.getLogger("swarm.monitor")

VERSION = "0.1.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("addresses", nargs="+", metavar="ADDR", help="multiaddr of any live peer of the swarm")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="interface for /metrics (default 127.0.0.1)")
    parser.add_argument("--metrics-port", type=int, default=9100, help="port for /metrics (default 9100; 0: any)")
    parser.add_argument("--per-peer", action="store_true",
                        help="also export one series per trainer (bounded only by the swarm's size)")
    parser.add_argument("--poll-period", type=float, default=5.0, metavar="SECONDS",
                        help="how often to read the trainers' records from the DHT (default 5)")
    parser.add_argument("--host", default="127.0.0.1", help="interface for the DHT (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port for the DHT (default 0: a free one)")
    parser.add_argument("--identity", help="key file for a stable peer id (created if missing)")
    parser.add_argument("--run-id", help="which swarm, if several advertise through this address")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to retry unreachable addresses before giving up (default 60)")
    parser.add_argument("--addr-file", help="write the metrics URL here once it serves")


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    dht, _, published = discovery.connect(args.addresses, host=args.host, port=args.port, identity=args.identity,
                                          run_id=args.run_id, timeout=args.timeout)
    run_id = published.record.run_id
    poller = server = None
    try:
        poller = SnapshotPoller(lambda: read_trainer_records(dht, run_id), period=args.poll_period,
                                timeout=2 * args.poll_period)
        poller.start()
        model = published.shared.get("model", {})
        run_info = dict(run_id=run_id, model=f"{model.get('architecture')}-{model.get('n_layer')}x{model.get('d_model')}",
                        version=VERSION)
        collector = SwarmCollector(run_info=run_info, snapshot_source=poller.latest, per_peer=args.per_peer)
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
        if poller is not None:
            poller.stop()
        dht.shutdown()
