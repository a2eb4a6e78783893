"""Fault injection into a real swarm: trainers killed with SIGKILL mid-run, one by its pid alone, one with its
whole process group. The rest must keep training with finite, agreeing parameters; the dead trainers' helper
processes (DHT, averagers, p2pd) must exit by themselves; the monitor must drop them once their records expire.
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, PeerProcesses, metric, report, wait_for_step

STEPS = 10  # trainer-0 makes at least this many steps
SYNC_STEPS = 2  # a resumed trainer averages with the swarm again within this many global steps (issue 4, item 9)
AFTER_RESUME = SYNC_STEPS + 4  # trainer-0 stops this many steps after the resume: its last 3 rounds are with trainer-1
RECORD_TTL = 30  # timeouts.record_ttl in configs/tiny.yaml
PAUSE = 30  # seconds trainer-1 is stopped (SIGSTOP to its whole process group)
PAUSE_AFTER_KILL = 10  # trainer-1 publishes a record every 2 s: its last one outlives the dead trainers' by >= 7 s
pytestmark = pytest.mark.timeout(900)  # one module-wide swarm, slow on a loaded 2-core machine


@pytest.fixture(scope="module")
def killed_swarm(tmp_path_factory):
    """Four trainers; after step 1, trainer-2 is killed by pid and trainer-3 with its process group; garbage is
    sent to the seed's and the monitor's ports, then ``swarm status`` asks the seed about the swarm. PAUSE_AFTER_KILL
    seconds after the kill, trainer-1 is paused with SIGSTOP for PAUSE seconds (its record outlives the dead ones',
    so the monitor must come down to 2 trainers meanwhile) and resumed. Once trainer-0 is AFTER_RESUME steps past
    the swarm's step at the resume (so that its last rounds are the ones after trainer-1 is back, however late the
    pause came), it is stopped with SIGINT; then trainer-1 with SIGINT to its whole process group (a terminal's
    Ctrl-C: its helpers and p2pd get it too) and the monitor with SIGINT to its process alone."""
    work = tmp_path_factory.mktemp("faults")
    procs = PeerProcesses(work)
    try:
        procs.start("seed", "seed", "--config", TINY, "--addr-file", str(work / "seed.addr"))
        addrs = procs.wait_file(work / "seed.addr", "seed")
        for i in range(4):
            procs.start(f"trainer-{i}", "join", *addrs, "--wait-for-peers", "4",
                        "--report-json", str(work / f"trainer-{i}.json"), "--save-model", str(work / f"model-{i}"),
                        new_session=(i in (1, 3)))
        procs.start("monitor", "monitor", *addrs, "--metrics-port", "0", "--poll-period", "1",
                    "--addr-file", str(work / "monitor.url"), "--checkpoint-dir", str(work / "checkpoints"),
                    "--checkpoint-every", "1000")
        url = procs.wait_file(work / "monitor.url", "monitor")[0]
        wait_for_step(procs, "trainer-0", 1)
        helpers = {name: descendants(procs, name) for name in ("trainer-2", "trainer-3")}
        killed_at = time.monotonic()
        os.kill(procs.procs["trainer-2"].pid, signal.SIGKILL)  # the main process alone
        os.killpg(procs.procs["trainer-3"].pid, signal.SIGKILL)  # its whole process group
        _, alive = psutil.wait_procs(helpers["trainer-2"] + helpers["trainer-3"], timeout=20)
        orphans = [p.cmdline() for p in alive]
        for port in (port_of(addrs[0]), port_of(url)):
            send_garbage("127.0.0.1", port, garbage())
        procs.start("status", "status", *addrs)  # the seed, just sent garbage, still answers
        time.sleep(max(0.0, killed_at + PAUSE_AFTER_KILL - time.monotonic()))
        os.killpg(procs.procs["trainer-1"].pid, signal.SIGSTOP)  # the trainer and all its helpers
        paused_at = time.monotonic()
        peers_seen = wait_for_peers_metric(url, 2, timeout=RECORD_TTL + 30)
        dropped_after = time.monotonic() - killed_at
        time.sleep(max(0.0, paused_at + PAUSE - time.monotonic()))
        rounds_before_pause = len(re.findall(r"Step \d+: averag", procs.log("trainer-1")))
        os.killpg(procs.procs["trainer-1"].pid, signal.SIGCONT)
        swarm_step_at_resume = max(map(int, re.findall(r"Global step (\d+) done", procs.log("trainer-0"))))
        wait_for_step(procs, "trainer-0", max(STEPS, swarm_step_at_resume + AFTER_RESUME), timeout=400)
        procs.stop("trainer-0", signal.SIGINT)
        codes = {"trainer-0": procs.wait("trainer-0", 120)}
        procs.remember_children()
        os.killpg(procs.procs["trainer-1"].pid, signal.SIGINT)  # Ctrl-C as a terminal sends it: to the whole group
        procs.stop("monitor", signal.SIGINT)  # to the process alone, after hivemind's averagers set it to "ignore"
        codes["trainer-1"] = procs.wait("trainer-1", 60)
        codes["monitor"] = procs.wait("monitor", 60)
        codes["status"] = procs.wait("status", 120)
        pause = (rounds_before_pause, swarm_step_at_resume)
        yield work, procs, helpers, orphans, peers_seen, dropped_after, codes, pause
    finally:
        procs.close()


def port_of(address: str) -> int:
    """The TCP port of a multiaddr or an http URL."""
    if "/tcp/" in address:
        return int(address.split("/tcp/")[1].split("/")[0])
    return int(address.rsplit(":", 1)[1].split("/")[0])


def descendants(procs: PeerProcesses, name: str) -> list[psutil.Process]:
    children = psutil.Process(procs.procs[name].pid).children(recursive=True)
    assert any("p2pd" in child.name() for child in children), [c.cmdline() for c in children]
    return children


def wait_for_peers_metric(url: str, count: int, timeout: float) -> list[float]:
    """swarm_peers as scraped every second until it reads ``count`` (returns every value seen)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(metric(url, "swarm_peers"))
        if seen[-1] == count:
            return seen
        time.sleep(1)
    return seen


def test_helpers_of_a_killed_trainer_exit_by_themselves(killed_swarm):
    _, _, helpers, orphans, *_ = killed_swarm
    assert all(helpers.values()), helpers
    assert not orphans, f"helpers still running 20 s after their trainer was killed: {orphans}"


def test_the_others_keep_training_and_averaging(killed_swarm):
    work, procs, *_, codes, _ = killed_swarm
    assert codes["trainer-0"] == 0, procs.log("trainer-0")[-2000:]
    result = report(work, "trainer-0")
    assert result["final_step"] - result["start_step"] >= STEPS
    # the round in flight when two of four peers vanished may fail or go partial, and trainer-0 steps alone while
    # trainer-1 is paused; once trainer-1 is back in sync, the two survivors average together again, at the same
    # steps: neither skips a step (fell behind, ran ahead, alone) and each round of one has the other's at its step.
    # A round may come back partial on a loaded machine (hivemind then used some of the peer's parts), and one may
    # fail on both sides (seen once: trainer-1's reducer waited for trainer-0's part while trainer-0 was still
    # looking for a group, hivemind's matchmaking on a loaded machine); not two.
    *_, (_, swarm_step_at_resume) = killed_swarm
    rounds = [r for r in result["rounds"] if r["step"] > swarm_step_at_resume + SYNC_STEPS]
    assert len(rounds) >= 3, result["rounds"]
    outcomes = [r["outcome"] for r in rounds]
    assert "skipped" not in outcomes and outcomes.count("failed") <= 1, result["rounds"]
    assert outcomes.count("averaged") >= 2, result["rounds"]
    assert all(r["group_size"] >= 2 for r in rounds if r["outcome"] != "failed"), result["rounds"]
    partner = report(work, "trainer-1")
    partner_outcome = {r["step"]: r["outcome"] for r in partner["rounds"]}
    assert all(partner_outcome.get(r["step"]) in ("averaged", "partial", "failed") for r in rounds), \
        (result["rounds"], partner["rounds"])
    assert partner["final_step"] >= result["final_step"]


def test_ctrl_c_stops_a_trainer_and_a_checkpointing_monitor(killed_swarm):
    _, procs, *_, codes, _ = killed_swarm
    assert codes["trainer-1"] == 0 and codes["monitor"] == 0, codes
    assert "Received SIGINT" in procs.log("trainer-1") and "Received SIGINT" in procs.log("monitor")
    assert "Traceback" not in procs.log("trainer-1"), procs.log("trainer-1")[-3000:]


def test_garbage_on_the_wire_does_not_crash_a_peer(killed_swarm):
    _, procs, *_, codes, _ = killed_swarm
    assert procs.procs["seed"].poll() is None  # (the monitor, also sent garbage, exited 0 on SIGINT above)
    assert codes["status"] == 0 and "swarm 'tiny'" in procs.log("status"), procs.log("status")[-2000:]


def test_parameters_stay_finite_and_agree(killed_swarm):
    work, *_ = killed_swarm
    first, second = (load_file(work / f"model-{i}" / "model.safetensors") for i in range(2))
    for name, tensor in first.items():
        assert torch.isfinite(tensor).all() and torch.isfinite(second[name]).all(), name
    if report(work, "trainer-1")["final_step"] == report(work, "trainer-0")["final_step"]:
        for name, tensor in first.items():  # (trainer-1 may have stepped alone once trainer-0 had left)
            torch.testing.assert_close(second[name], tensor, atol=2e-3, rtol=1e-2, msg=f"{name} differs")


def test_the_monitor_drops_the_dead_within_their_record_expiry(killed_swarm):
    *_, peers_seen, dropped_after, _, _ = killed_swarm
    assert peers_seen and peers_seen[-1] == 2, (peers_seen, f"{dropped_after:.0f} s after the kill")
    assert max(peers_seen) <= 4


def test_a_paused_trainer_is_back_in_sync_within_two_steps(killed_swarm):
    work, *_, (rounds_before_pause, swarm_step_at_resume) = killed_swarm
    rounds = report(work, "trainer-1")["rounds"][rounds_before_pause:]
    # the round in flight when it stopped may fail, and it downloads the state it missed; within two global steps
    # of the swarm's step when it resumed, it averages with the swarm again
    averaged = [r["step"] for r in rounds if r["outcome"] == "averaged" and r["group_size"] >= 2]
    assert averaged and averaged[0] <= swarm_step_at_resume + SYNC_STEPS, (swarm_step_at_resume, rounds)
    assert report(work, "trainer-1")["final_step"] >= report(work, "trainer-0")["final_step"]


def test_nothing_is_left_running(killed_swarm):
    _, procs, *_ = killed_swarm
    procs.close()
    assert not procs.leftovers(), [p.cmdline() for p in procs.leftovers()]


def send_garbage(host: str, port: int, payloads: list[bytes]) -> None:
    import socket

    for payload in payloads:
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(2)
                try:
                    sock.recv(4096)
                except OSError:
                    pass
        except OSError:
            pass  # the peer may reset the connection: that is a fine answer to garbage


def garbage() -> list[bytes]:
    import random

    rng = random.Random(7)
    noise = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (1, 17, 512, 65536)]
    truncated = [b"\x13/multistream/1.0.0\n", b"\x13/multistream/1.0.0\n\x0d/noise\n"[:25],
                 b"\x13/multistream/1.0.0\n\x07/tls/1.0.0\n"[:-3], b"\xff\xff\xff\xff\x0f" + b"A" * 100]
    http = [b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", b"\x00" * 1000,
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"]
    return noise + truncated + http
