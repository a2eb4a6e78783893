"""Private swarms: tokens minted by `swarm token`, members that average together, and everyone else refused.

One module-scoped swarm on 127.0.0.1: a `swarm seed --private`, two trainers with tokens (alice keeps
training, bob stops after 2 global steps) and a monitor with a token of its own. Against it: `swarm join` and
`swarm monitor` with no token, `swarm join` with an expired token and a tampered one; and a raw intruder (this file run as a script) that starts plain hivemind DHT nodes, with no
token, an expired one and one signed by a stranger's key, and calls the trainers' averaging and state download
RPCs directly. The same script with a valid token is the control: it proves the probes would have worked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

if __name__ != "__main__":
    from conftest import TINY, PeerProcesses, metric, swarm_cli

TRAINER_TIMEOUT = 300  # generous: the machine is shared; outcomes are asserted, never durations
PROBE_MODES = ("member", "none", "expired", "stranger")


# ---------------------------------------------------------------- unit tests: swarm token, no network


def swarm_in_process(*argv: str) -> int:
    """Parse and run a subcommand like ``swarm ARGV`` in this process (no signal handlers, no logging set-up)."""
    from peers.cli import build_parser, chosen_command, role
    from peers.common import run_entry

    args = build_parser(chosen_command(list(argv))).parse_args(list(argv))
    return run_entry(lambda: role(args.command).run(args, threading.Event()))


@pytest.fixture(scope="module")
def seed_key(tmp_path_factory) -> Path:
    from hivemind.p2p import P2P

    path = tmp_path_factory.mktemp("authority") / "seed.key"
    P2P.generate_identity(str(path))
    return path


def test_token_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        swarm_in_process("token", "--help")
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for words in ("--identity", "--name", "--expires", "--out", "--show", "swarm join ADDR --token", "secret"):
        assert words in text, words


def test_token_round_trip(tmp_path, seed_key, capsys):
    from swarm.access import load_access, read_token

    out = tmp_path / "alice.token"
    assert swarm_in_process("token", "--identity", str(seed_key), "--name", "alice", "--expires", "7d",
                            "--out", str(out)) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it holds a private key
    access = load_access(str(out))
    assert access.token.username == "alice" and 6.9 * 86400 < access.expires - time.time() <= 7 * 86400
    assert access.authority.public_key == read_token(str(out)).authority
    capsys.readouterr()
    assert swarm_in_process("token", "--show", str(out)) == 0
    assert "token for 'alice': valid until" in capsys.readouterr().out

    assert swarm_in_process("token", "--identity", str(seed_key), "--name", "bob", "--expires", "90s") == 0
    printed = capsys.readouterr().out.strip()  # the printable form is accepted wherever a file is
    assert load_access(printed).token.username == "bob"
    assert load_access(printed).authority.public_key == access.authority.public_key


@pytest.mark.parametrize("argv, words", [
    (["--identity", "{missing}", "--name", "alice"], ["no such file", "swarm seed --private --identity"]),
    (["--identity", "{key}", "--name", "alice", "--expires", "7x"], ["--expires", "7d"]),
    (["--identity", "{key}", "--name", "alice", "--expires", "0d"], ["--expires"]),
    (["--identity", "{key}", "--name", "alice", "--expires", "9999w"], ["at most 10 years"]),
    (["--identity", "{key}", "--name", "a/b"], ["--name"]),
    (["--identity", "{key}", "--name", "alice", "--out", "{existing}"], ["already exists"]),
    (["--name", "alice"], ["--identity SEED_KEY"]),
    (["--show", "{garbage}"], ["not a swarm access token"]),
    (["--show", "{missing}"], ["no such file"]),
])
def test_token_bad_input(tmp_path, seed_key, capsys, argv, words):
    (tmp_path / "existing").write_text("keep me")
    (tmp_path / "garbage").write_text("hello")
    paths = dict(key=seed_key, missing=tmp_path / "missing.key", existing=tmp_path / "existing",
                 garbage=tmp_path / "garbage")
    assert swarm_in_process("token", *[arg.format(**paths) for arg in argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), errors
    assert (tmp_path / "existing").read_text() == "keep me"


def test_private_seed_needs_its_key(capsys):
    assert swarm_in_process("seed", "--config", TINY, "--private") == 2
    assert "--private needs --identity" in capsys.readouterr().err


# ---------------------------------------------------------------- a private swarm, its members and intruders


def write_tokens(folder: Path, seed_key: Path) -> dict[str, Path]:
    """Valid tokens for the members, and the bad ones: expired, tampered (expiry extended), a stranger's."""
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm import access, net

    _, authority = net.load_identity(str(seed_key))
    tokens = {name: access.mint(authority, name, 3600) for name in ("alice", "bob", "carol", "dave", "frank")}
    eve = access.mint(authority, "eve", 3600)
    tokens["expired"] = access.TokenFile(identity=eve.identity, authority=eve.authority, token=access.sign_token(
        authority, "eve", eve.token.public_key, time.time() - 60))
    forged = type(tokens["alice"].token)()
    forged.CopyFrom(tokens["alice"].token)
    forged.expiration_time = access.format_time(time.time() + 365 * 86400)
    tokens["tampered"] = access.TokenFile(identity=tokens["alice"].identity, token=forged,
                                          authority=tokens["alice"].authority)
    tokens["stranger"] = access.mint(RSAPrivateKey(), "mallory", 3600)
    paths = {}
    for name, token in tokens.items():
        paths[name] = folder / f"{name}.token"
        access.write_token(str(paths[name]), token)
    return paths


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, seed_key) -> dict[str, Path]:
    return write_tokens(tmp_path_factory.mktemp("tokens"), seed_key)


@pytest.mark.parametrize("name, words", [
    ("expired", ["--token", "expired.token", "token 'eve' expired at", "ask the swarm's researcher for a new one"]),
    ("tampered", ["--token", "tampered.token", "not signed by this swarm's key", "new one"]),
    ("dave", ["--token carries this peer's identity", "drop --identity"]),
])
def test_join_refuses_bad_tokens(tokens, tmp_path, capsys, name, words):
    address = "/ip4/127.0.0.1/tcp/9/p2p/QmXbWuVnPxYeSy3nnKxPfFd52qUDeK1fFsqH8bX9TaJRJK"  # refused before dialing
    extra = ["--identity", str(tmp_path / "other.key")] if name == "dave" else []
    assert swarm_in_process("join", address, "--token", str(tokens[name]), *extra) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), errors


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, seed_key, tokens):
    work = tmp_path_factory.mktemp("private")
    procs = PeerProcesses(work)
    try:
        procs.start("seed", "seed", "--config", TINY, "--private", "--identity", str(seed_key),
                    "--addr-file", str(work / "seed.addr"))
        seed = procs.wait_file(work / "seed.addr", "seed", timeout=TRAINER_TIMEOUT)
        common = ["--wait-for-peers", "2"]
        procs.start("alice", "join", *seed, "--token", str(tokens["alice"]), "--addr-file", str(work / "alice.addr"),
                    *common)
        procs.start("bob", "join", *seed, "--token", str(tokens["bob"]), "--max-steps", "2",
                    "--report-json", str(work / "bob.json"), *common)
        procs.start("no-token", "join", *seed, "--timeout", "5")  # refused while the trainers start
        procs.start("monitor", "monitor", *seed, "--token", str(tokens["frank"]), "--metrics-port", "0",
                    "--poll-period", "1", "--addr-file", str(work / "monitor.url"))
        procs.start("monitor-no-token", "monitor", *seed, "--metrics-port", "0", "--timeout", "5")
        yield argparse.Namespace(work=work, procs=procs, tokens=tokens, seed=seed)
    finally:
        procs.close()
        assert not procs.leftovers(), procs.leftovers()


def error_line(procs: PeerProcesses, name: str) -> str:
    assert procs.wait(name, TRAINER_TIMEOUT) == 2, procs.log(name)[-2000:]
    log = procs.log(name)
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    return errors[0]


def test_joining_without_a_token_fails_with_advice(swarm):
    line = error_line(swarm.procs, "no-token")
    assert "could not reach" in line and "--token" in line


def test_monitor_needs_a_token_and_with_one_sees_the_trainers(swarm):
    line = error_line(swarm.procs, "monitor-no-token")
    assert "could not reach" in line and "--token" in line
    url = swarm.procs.wait_file(swarm.work / "monitor.url", "monitor", timeout=TRAINER_TIMEOUT)[0]
    deadline = time.monotonic() + TRAINER_TIMEOUT
    while metric(url, "swarm_peers") < 1:  # alice trains until the end of the module
        assert time.monotonic() < deadline and swarm.procs.procs["monitor"].poll() is None, \
            swarm.procs.log("monitor")[-3000:]
        time.sleep(1)
    assert metric(url, "swarm_step") >= 0


def test_members_average_together(swarm):
    assert swarm.procs.wait("bob", TRAINER_TIMEOUT) == 0, swarm.procs.log("bob")[-3000:]
    rounds = json.loads((swarm.work / "bob.json").read_text())["rounds"]
    averaged = [r for r in rounds if r["outcome"] == "averaged" and r["group_size"] == 2]
    assert len(rounds) == 2 and averaged, rounds
    assert "averaged gradients with 2 peers" in swarm.procs.log("alice")


def test_intruders_cannot_read_the_dht_average_or_download_state(swarm):
    procs, work = swarm.procs, swarm.work
    alice = procs.wait_file(work / "alice.addr", "alice", timeout=TRAINER_TIMEOUT)
    deadline = time.monotonic() + TRAINER_TIMEOUT
    while "Starting at global step" not in procs.log("alice"):  # its averagers serve from now on
        assert time.monotonic() < deadline and procs.procs["alice"].poll() is None, procs.log("alice")[-3000:]
        time.sleep(0.5)
    out = work / "probes.json"
    procs.start_script("intruder", Path(__file__), "--seed", swarm.seed[0], "--target", alice[0], "--run-id", "tiny",
                       "--out", str(out), *[f"--token-{mode}={swarm.tokens[name]}" for mode, name in
                                            (("member", "carol"), ("expired", "expired"), ("stranger", "stranger"))])
    assert procs.wait("intruder", TRAINER_TIMEOUT) == 0, procs.log("intruder")[-3000:]
    probes = json.loads(out.read_text())
    member = probes.pop("member")  # the control: the same probes work for a member
    assert member["config"] and member["state_messages"] > 0, member
    assert member["join"] not in ("PROTOCOL_VIOLATION", "ACCEPTED") and member["part"] != "PROTOCOL_VIOLATION", member
    logs = procs.log("seed") + procs.log("alice")
    assert f"from peer {member['peer_id']}" not in logs
    for mode, probe in probes.items():
        peer = probe.pop("peer_id")
        # hivemind may hang up before the refusal of a part reaches the sender: the log line is the outcome
        assert probe.pop("part") in ("PROTOCOL_VIOLATION", "no answer (TimeoutError)", "no answer (BrokenPipeError)",
                                     "no answer (ConnectionResetError)", "no answer (StopAsyncIteration)"), (mode, probe)
        assert probe == dict(config=False, join="PROTOCOL_VIOLATION", state_messages=0), (mode, probe)
        for what in ("a request to join an averaging group", "an all-reduce part", "a state download"):
            assert f"Refused {what} from peer {peer}: it has no valid access token" in logs, (mode, what)
    for refusal in ("a DHT request from a peer: no access token", "from peer 'eve': token 'eve' expired at",
                    "from peer 'mallory': token 'mallory' is not signed by this swarm's key"):
        assert refusal in logs, refusal
    assert alice and procs.procs["alice"].poll() is None  # and alice trains on


def test_status_needs_the_token(swarm):
    alice = (swarm.work / "alice.addr").read_text().split()
    result = swarm_cli("status", *alice, "--token", str(swarm.tokens["dave"]), timeout=TRAINER_TIMEOUT)
    assert result.returncode == 0 and "swarm 'tiny'" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------- the intruder (run as a script by the test above)


def probe_averagers(dht, target: str, run_id: str) -> dict:
    """Call the target's averaging and state download RPCs directly, as hivemind's own peers would."""
    from hivemind.optim.grad_averager import GradientAverager
    from hivemind.optim.state_averager import TrainingStateAverager
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils import get_dht_time

    peer = PeerID.from_base58(target.rsplit("/p2p/", 1)[1])
    grad_prefix = f"{run_id}_grad_averager"

    async def probe() -> dict:
        p2p = await dht.replicate_p2p()
        grad = GradientAverager.get_stub(p2p, peer, namespace=grad_prefix)
        stream = await grad.rpc_join_group(averaging_pb2.JoinRequest(
            schema_hash=b"\1" * 20, expiration=get_dht_time() + 30, group_key=f"{grad_prefix}.0b"))
        join = averaging_pb2.MessageCode.Name((await anext(stream)).code)
        answered = asyncio.Event()

        async def parts():  # like a real sender, keep the stream open until the peer answers (else it hangs up)
            yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"\0" * 20)
            await answered.wait()

        try:  # hivemind holds a member's part for an unknown group until its next group forms
            reply = await asyncio.wait_for(anext(await grad.rpc_aggregate_part(parts())), timeout=5)
            part = averaging_pb2.MessageCode.Name(reply.code)
        except Exception as error:
            part = f"no answer ({type(error).__name__})"
        answered.set()
        state = TrainingStateAverager.get_stub(p2p, peer, namespace=f"{run_id}_state_averager")
        messages = [m async for m in await state.rpc_download_state(averaging_pb2.DownloadRequest())]
        return dict(join=join, part=part, state_messages=len(messages))

    return asyncio.run(probe())


def lying_authorizer(token_path: str):
    """An authorizer that presents its token whatever it says (an honest one would refuse to send it)."""
    from hivemind.utils.auth import TokenAuthorizerBase

    from swarm.access import identity_key, read_token

    token_file = read_token(token_path)

    class Liar(TokenAuthorizerBase):
        async def get_token(self):
            return token_file.token

        def is_token_valid(self, access_token) -> bool:
            return True

        def does_token_need_refreshing(self, access_token) -> bool:
            return False

    return Liar(identity_key(token_file.identity)), token_file.identity


def intrude(argv: list[str]) -> int:
    import hivemind
    from hivemind.p2p import PeerID

    from swarm import access, records

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--out", required=True)
    for mode in ("member", "expired", "stranger"):
        parser.add_argument(f"--token-{mode}", required=True)
    args = parser.parse_args(argv)
    results = {}
    for mode in PROBE_MODES:
        kwargs, identity = {}, None
        if mode == "member":
            member = access.load_access(args.token_member)
            kwargs = dict(authorizer=member.authorizer(), identity_path=member.identity_path)
        elif mode != "none":
            kwargs["authorizer"], identity = lying_authorizer(getattr(args, f"token_{mode}"))
            kwargs["identity_path"] = access.identity_file(identity)
        dht = hivemind.DHT(initial_peers=[args.seed, args.target], ensure_bootstrap_success=False, start=True,
                           client_mode=False, **kwargs)
        try:
            if mode == "member":
                access.publish_membership(dht, member)
            found = dht.get(records.CONFIG_KEY, latest=True)
            results[mode] = dict(config=found is not None, peer_id=dht.peer_id.to_base58(),
                                 **probe_averagers(dht, args.target, args.run_id))
            assert identity is None or dht.peer_id == PeerID.from_identity(identity)
        finally:
            dht.shutdown()
    Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(intrude(sys.argv[1:]))
