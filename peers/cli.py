"""The ``swarm`` command: one entry point, one subcommand per peer role.

    swarm seed --config configs/tiny.yaml      # a researcher starts a swarm
    swarm join /ip4/.../p2p/...                # a volunteer joins it
    swarm demo --peers 3 --steps 10            # seed + trainers on 127.0.0.1, with a summary
    swarm monitor /ip4/.../p2p/...             # Prometheus metrics at http://127.0.0.1:9100/metrics
    swarm status /ip4/.../p2p/...              # the swarm's state in the terminal
    swarm token --identity seed.key --name alice --expires 7d --out alice.token   # for a private swarm
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from peers.common import install_stop_handlers, route_hivemind_logs, run_entry, setup_logging
from peers.options import OPTIONS
from swarm.addresses import check_peer_address

ROLES = {
    "seed": "start the first peer of a new swarm and publish its config",
    "join": "join a swarm as a trainer, given any live peer's address",
    "demo": "run a seed and N trainers on 127.0.0.1 and print a summary",
    "monitor": "serve a running swarm's state to Prometheus at /metrics",
    "status": "print a running swarm's step, loss, peers and averaging outcomes",
    "token": "mint an access token for a private swarm (swarm seed --private), or check one",
}


def role(name: str):
    """Roles are imported on demand, to run: the seed, monitor and status need no transformers or bitsandbytes."""
    return importlib.import_module(f"peers.{name}")


def role_doc(name: str) -> str | None:
    """A role module's docstring, read without importing the module (and its stack)."""
    source = Path(importlib.util.find_spec(f"peers.{name}").origin).read_text()
    return ast.get_docstring(ast.parse(source), clean=False)


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if it is one."""
    words = [word for word in argv if not word.startswith("-")]
    return words[0] if words and words[0] in ROLES else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI, with ``command``'s options in full. No role module is imported (see peers.options): a role
    brings its stack (torch, hivemind, transformers), which takes seconds to import."""
    parser = argparse.ArgumentParser(prog="swarm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, including hivemind's")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in ROLES.items():
        if name != command:
            commands.add_parser(name, help=summary)  # `swarm --help` lists it; `swarm NAME` builds it in full
            continue
        sub = commands.add_parser(name, help=summary, description=role_doc(name),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        OPTIONS[name](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(chosen_command(argv))
    args = parser.parse_args(argv)
    if getattr(args, "max_steps", None) is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    setup_logging(args.verbose)
    return run_entry(lambda: start(args))


def start(args: argparse.Namespace) -> int:
    for address in getattr(args, "addresses", None) or []:
        check_peer_address(address)  # a mistyped address is answered before the stack is imported
    module = role(args.command)
    route_hivemind_logs()
    return module.run(args, install_stop_handlers())


if __name__ == "__main__":
    sys.exit(main())
