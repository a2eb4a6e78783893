"""The options of each role, kept apart from the roles themselves: a role module imports its stack (torch,
hivemind, transformers: seconds), and ``swarm ROLE --help`` or a mistyped option should answer at once."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="swarm config YAML (see configs/); with --resume, default: the checkpoint's")
    parser.add_argument("--resume", metavar="DIR",
                        help="start from a checkpoint: a step-N directory, or a --checkpoint-dir (its latest)")
    parser.add_argument("--host", help="interface to listen on (default: peer.host, 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="TCP port to listen on (default: peer.port; 0 picks a free one)")
    parser.add_argument("--identity", help="key file for a stable peer id and signing key (created if missing)")
    parser.add_argument("--addr-file", help="write this peer's multiaddrs here, one per line, once it is ready")
    parser.add_argument("--private", action="store_true",
                        help="admit only peers with an access token signed by --identity (see `swarm token`)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, e.g. --set averaging.compression=fp16 (repeatable)")


def join(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("addresses", nargs="+", metavar="ADDR", help="multiaddr of any live peer of the swarm")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA with bf16 if present")
    parser.add_argument("--batch-size", type=int, help="local micro-batch (default: sized from memory)")
    parser.add_argument("--max-steps", type=int, help="exit 0 once the swarm made N global steps with this peer")
    parser.add_argument("--client-mode", action="store_true", default=None,
                        help="behind NAT/firewall: connect out only (others cannot dial this peer)")
    parser.add_argument("--identity", help="key file for a stable peer id and signing key (created if missing)")
    parser.add_argument("--token", metavar="FILE",
                        help="a private swarm's access token (file or string from its researcher); it is also "
                             "this peer's identity")
    parser.add_argument("--host", help="interface to listen on (default: 0.0.0.0 for remote swarms, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port to listen on (default 0: a free one)")
    parser.add_argument("--addr-file", help="write this peer's multiaddrs here, one per line, once it is ready")
    parser.add_argument("--run-id", help="which swarm, if several advertise through this address")
    parser.add_argument("--wait-for-peers", type=int, default=1, metavar="N",
                        help="start training only once N trainers (this one included) are visible (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to retry unreachable addresses before giving up (default 60)")
    parser.add_argument("--report-json", help="write this peer's outcome (rounds, losses, bytes) here on exit")
    parser.add_argument("--save-model", metavar="DIR", help="save the final model here (Hugging Face format) on exit")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a per-peer field, e.g. --set peer.seed=7; shared fields must match the swarm")


def demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=3, help="number of trainers (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="global steps to make (default 10)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="swarm config (default configs/tiny.yaml)")
    parser.add_argument("--summary-json", help="also write the summary here as JSON")
    parser.add_argument("--workdir", help="where peer logs and reports go (default: a new temporary directory)")
    parser.add_argument("--metrics-port", type=int, default=9100,
                        help="port of the demo's monitor peer, for Prometheus (default 9100; 0: any free port)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field for the whole demo swarm (repeatable)")


def monitor(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--token", metavar="FILE",
                        help="a private swarm's access token (file or string); it is also this peer's identity")
    parser.add_argument("--run-id", help="which swarm, if several advertise through this address")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to retry unreachable addresses before giving up (default 60)")
    parser.add_argument("--addr-file", help="write the metrics URL here once it serves")
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpoint-dir", metavar="DIR", help="save the swarm's model and optimizer state here")
    group.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                       help="save once the swarm has made N more global steps (default 100)")
    group.add_argument("--keep", type=int, default=3, metavar="K", help="keep the last K checkpoints (default 3)")
    group.add_argument("--eval-batches", type=int, default=16, metavar="B",
                       help="evaluate each checkpoint on B held-out batches of 8 sequences (default 16; 0: skip)")


def status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("addresses", nargs="+", metavar="ADDR", help="multiaddr of any live peer of the swarm")
    parser.add_argument("--run-id", help="which swarm, if several advertise through this address")
    parser.add_argument("--token", metavar="FILE", help="a private swarm's access token (file or string)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to retry unreachable addresses before giving up (default 30)")


def token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity", metavar="SEED_KEY",
                        help="the private seed's key file (its --identity): tokens are signed with it")
    parser.add_argument("--name", help="who the token is for (letters, digits, . _ @ -), shown in the peers' logs")
    parser.add_argument("--expires", default="7d", metavar="DURATION",
                        help="how long the token is valid: 90s, 30m, 12h, 7d, 2w (default 7d)")
    parser.add_argument("--out", metavar="FILE", help="write the token here, readable by you only (default: print it)")
    parser.add_argument("--show", metavar="TOKEN",
                        help="instead of minting: check a token (file or string) and print whose it is and until when")


OPTIONS = {"seed": seed, "join": join, "demo": demo, "monitor": monitor, "status": status, "token": token}
