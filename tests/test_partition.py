"""Partition and heal: each peer runs in a network namespace made here; one trainer's link is cut for CUT seconds
and restored. The other two go on training; the cut one must rejoin and average with them again within two
global steps of the swarm's step when its link came back. Needs root (ip netns, ip link), else skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import TINY, PeerProcesses, report, wait_for_step

# Seconds trainer-1's link is down: longer than a round's averaging timeout (20 s in tiny.yaml). The others' TCP
# connections to it back off meanwhile (retransmissions 0.2 s, 0.4 s, ... 25.6 s apart): after 30 s their next one
# can come 21 s after the heal, 5-6 of these 3-4 s steps, and the healed trainer is late (1 of 36 runs on
# 2026-11-25; the README lists it as not defended). A 24 s cut fared no better: the others' first round after the
# cut timed out right at the heal, and catching up (noticing, waiting out the step's end, downloading) took as long.
CUT = 30
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="cutting a peer's link needs root and iproute2 (network namespaces, ip link)"),
    pytest.mark.timeout(600),
]


class NamespacedPeers(PeerProcesses):
    """PeerProcesses for peers started in the namespaces of a ``benchmarks.wan.Wan`` (which stops them)."""

    def __init__(self, wan, workdir):
        super().__init__(workdir)
        self.wan = wan

    def start(self, name: str, i: int, *args: str) -> None:
        proc = self.start_forked(name, [*args, "--host", self.wan.address(i)], new_session=True,
                                 netns=self.wan.namespace(i))
        self.wan.procs.append(proc)  # the Wan stops its process group


def set_link(wan, i: int, state: str) -> None:
    """Bring the bridge side of peer i's cable down or up: its packets go nowhere, its sockets stay open."""
    subprocess.run(["ip", "link", "set", f"swb{wan.tag}h{i}", state], check=True, capture_output=True)


@pytest.fixture(scope="module")
def healed_swarm(tmp_path_factory):
    from benchmarks.wan import Wan, our_leftovers

    work = tmp_path_factory.mktemp("partition")
    wan = Wan(4, rate_mbit=1000)  # namespace 0: the seed; 1..3: trainer-0..2
    with wan:
        peers = NamespacedPeers(wan, work)
        peers.start("seed", 0, "seed", "--config", TINY, "--addr-file", str(work / "seed.addr"))
        addrs = peers.wait_file(work / "seed.addr", "seed")
        for t in range(3):
            peers.start(f"trainer-{t}", t + 1, "join", *addrs, "--wait-for-peers", "3",
                        "--report-json", str(work / f"trainer-{t}.json"))
        wait_for_step(peers, "trainer-0", 1)
        rounds_before_cut = len(re.findall(r"Step \d+: averag", peers.log("trainer-1")))
        swarm_step_at_cut = max(map(int, re.findall(r"Global step (\d+) done", peers.log("trainer-0"))))
        set_link(wan, 2, "down")
        time.sleep(CUT)
        swarm_step_at_cut_end = max(map(int, re.findall(r"Global step (\d+) done", peers.log("trainer-0"))))
        set_link(wan, 2, "up")
        wait_for_step(peers, "trainer-0", swarm_step_at_cut_end + 3, timeout=300)
        wait_for_step(peers, "trainer-1", swarm_step_at_cut_end + 3, timeout=120)  # its rounds up to heal + 2 are in
        for name in ("trainer-0", "trainer-1", "trainer-2"):
            peers.procs[name].send_signal(signal.SIGINT)
        codes = {name: peers.procs[name].wait(60) for name in ("trainer-0", "trainer-1", "trainer-2")}
        yield work, peers, codes, rounds_before_cut, swarm_step_at_cut, swarm_step_at_cut_end
    left = our_leftovers(wan.tag)
    assert not left, f"namespaces or links left behind: {left}"


def test_the_others_train_on(healed_swarm):
    work, peers, codes, _, step_at_cut, _ = healed_swarm
    assert codes["trainer-0"] == 0 and codes["trainer-2"] == 0, codes
    for name in ("trainer-0", "trainer-2"):  # past the round the cut broke, they average again (with or without it)
        rounds = report(work, name)["rounds"]
        assert any(r["outcome"] == "averaged" and r["group_size"] >= 2 for r in rounds if r["step"] > step_at_cut), \
            (name, step_at_cut, rounds)


def test_the_cut_trainer_is_back_in_sync_within_two_steps(healed_swarm):
    work, peers, codes, rounds_before_cut, _, step_at_heal = healed_swarm
    assert codes["trainer-1"] == 0, peers.log("trainer-1")[-3000:]
    rounds = report(work, "trainer-1")["rounds"][rounds_before_cut:]
    # while cut off it cannot average: its first round that is not "averaged" is the cut's (a round in flight
    # when the cable went may still have finished); after that, averaged again within two steps
    cut = next((k for k, r in enumerate(rounds) if r["outcome"] != "averaged"), None)
    assert cut is not None, ("no round of trainer-1 noticed the cut", rounds)
    averaged = [r["step"] for r in rounds[cut:] if r["outcome"] == "averaged" and r["group_size"] >= 2]
    assert averaged and averaged[0] <= step_at_heal + 2, (step_at_heal, rounds)
    # in sync, not merely grouped: past heal + 2, its rounds group with the others' rounds for the same step (rounds
    # carry no step: a healed trainer one step ahead paired with their previous step's, round after round)
    others = [r for name in ("trainer-0", "trainer-2") for r in report(work, name)["rounds"]
              if r["outcome"] in ("averaged", "partial")]
    for round_ in rounds[cut:]:
        if round_["step"] > step_at_heal + 2 and round_["outcome"] in ("averaged", "partial"):
            beside = [r["step"] for r in others if abs(r["ended"] - round_["ended"]) <= 1.5]
            assert set(beside) <= {round_["step"]}, (round_, others)
    assert report(work, "trainer-1")["final_step"] >= step_at_heal + 2
