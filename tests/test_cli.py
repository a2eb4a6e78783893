"""Every subcommand through a real subprocess: --help, and bad input answered with one line and a non-zero exit."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, swarm_cli

FAKE_PEER = "/ip4/127.0.0.1/tcp/{port}/p2p/QmXbWuVnPxYeSy3nnKxPfFd52qUDeK1fFsqH8bX9TaJRJK"


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize("command", [[], ["seed"], ["join"], ["demo"], ["status"], ["monitor"]])
def test_help(command):
    result = swarm_cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: swarm" in result.stdout
    if command:
        assert "--" in result.stdout and len(result.stdout.splitlines()) > 5


def test_monitor_and_status_import_no_training_stack():
    """Only the chosen role is imported: watching a swarm needs neither transformers nor bitsandbytes."""
    probe = ("import sys; from peers.cli import build_parser; "
             "build_parser('monitor').parse_args(['monitor', 'x']); build_parser('status'); "
             "print(sorted({'transformers', 'bitsandbytes'} & {m.split('.')[0] for m in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_and_bad_configs_answer_before_the_stack_is_imported(tmp_path):
    """torch and hivemind take seconds to import: `swarm ROLE --help`, a bad seed config and a mistyped address
    need neither."""
    config = tmp_path / "config.yaml"
    config.write_text("run_id: x\nmodel:\n  n_layers: 2\n")
    probe = ("import sys; from peers.cli import ROLES, build_parser, main; [build_parser(name) for name in ROLES]; "
             f"codes = [main(['seed', '--config', {str(config)!r}]), main(['join', '/ip4/127.0.0.1/tcp/5']), "
             "main(['status', '/ip4/1.2.3.256/tcp/5/p2p/Qm'])]; "
             "print(codes, sorted({'torch', 'hivemind'} & {m.split('.')[0] for m in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "[2, 2, 2] []", result.stdout + result.stderr
    assert "unknown field model.n_layers" in result.stderr and "lacks the peer id" in result.stderr
    assert "'1.2.3.256' is not a valid ip4 value" in result.stderr


def test_no_command_is_a_usage_error():
    result = swarm_cli()
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.parametrize("content, words", [
    (None, ["does not exist"]),
    ("run_id: x\nmodel: {n_layer: [\n", ["broken YAML"]),
    ("run_id: x\nmodel:\n  n_layers: 2\n", ["unknown field model.n_layers", "n_layer"]),
    ("run_id: x\nmodel:\n  n_layer: two\n", ["model.n_layer"]),
    ("run_id: has.dot\n", ["run_id"]),
])
def test_seed_rejects_bad_configs(tmp_path, content, words):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    assert_one_line_error(swarm_cli("seed", "--config", str(path)), *words)


def test_unreadable_config(tmp_path):
    path = tmp_path / "dir.yaml"
    path.mkdir()
    assert_one_line_error(swarm_cli("seed", "--config", str(path)), "cannot read")


def test_bad_set_override():
    assert_one_line_error(swarm_cli("seed", "--config", TINY, "--set", "averaging.compression=zip"),
                          "averaging.compression")


@pytest.mark.parametrize("address, words", [
    ("not-an-address", ["not a valid multiaddr"]),
    ("/ip4/127.0.0.1/tcp/5", ["peer id"]),
    ("/ip4/999.1.1.1/tcp/5/p2p/Qm", ["not a valid multiaddr"]),
    ("/ip4/1.2.3.4/tcp/70000/p2p/Qm", ["not a valid multiaddr", "port 70000"]),
    ("/ip4/1.2.3.4/tcp/5/p2p/Qm", ["not a valid multiaddr"]),  # (the peer id, parsed by hivemind)
])
def test_join_rejects_malformed_addresses(address, words):
    assert_one_line_error(swarm_cli("join", address), *words)


@pytest.mark.parametrize("command", ["join", "status"])
def test_unreachable_peer_gives_up_with_advice(command):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    result = swarm_cli(command, FAKE_PEER.format(port=port), "--timeout", "1")
    assert_one_line_error(result, "could not reach", "firewall", "--host")


def test_port_in_use():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert_one_line_error(swarm_cli("seed", "--config", TINY, "--port", str(port)), "already in use", "--port")


def test_corrupt_identity_file(tmp_path):
    identity = tmp_path / "id.key"
    identity.write_bytes(b"\x00garbage\xff" * 10)
    assert_one_line_error(swarm_cli("seed", "--config", TINY, "--identity", str(identity)), "corrupt", str(identity))
    assert identity.read_bytes() == b"\x00garbage\xff" * 10  # never overwritten: the user may want it back


def test_joiner_conflicting_with_swarm_config(peers, tmp_path):
    peers.start("seed", "seed", "--config", TINY, "--addr-file", str(tmp_path / "seed.addr"))
    addresses = peers.wait_file(tmp_path / "seed.addr", "seed")
    result = swarm_cli("join", *addresses, "--set", "averaging.compression=none", "--timeout", "20")
    assert_one_line_error(result, "averaging.compression", "conflicts")
    result = swarm_cli("join", *addresses, "--set", "peer.batch_size=-1", "--timeout", "20")
    assert_one_line_error(result, "peer.batch_size")


def test_seed_stops_cleanly_on_sigint(peers, tmp_path):
    peers.start("seed", "seed", "--config", TINY, "--addr-file", str(tmp_path / "seed.addr"))
    addresses = peers.wait_file(tmp_path / "seed.addr", "seed")
    assert addresses[0].startswith("/ip4/127.0.0.1/tcp/") and "/p2p/" in addresses[0]
    assert "swarm join " + addresses[0] in peers.log("seed")
    peers.remember_children()
    assert peers.seen, "the seed should run a DHT process and p2pd"
    peers.stop("seed", signal.SIGINT)
    assert peers.wait("seed", 30) == 0
    import psutil

    psutil.wait_procs(list(peers.seen.values()), timeout=10)
    assert not peers.leftovers(), [p.cmdline() for p in peers.leftovers()]

