"""Poisoned all-reduce contributions (issue 4, item 4): swarm.guard refuses them, counts them and bans the sender.

The swarm test runs real hivemind averagers (real DHT, p2pd, forked averager processes) on 127.0.0.1: three
honest ones, with the project's blockwise 8-bit codec, and one fresh attacker per attack. Each round checks the
honest peers' result against the honest-only weighted average and that the attack was counted under its reason;
the attacker of the previous round comes back with plausible, shifted values and must be left out.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import multiprocessing as mp
import threading
import time

import psutil
import pytest
import torch
import hivemind
import hivemind.averaging.averager as hivemind_averager
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from swarm import guard
from swarm.compression import build_compression, check_codecs
from swarm.optimizer import _cancel

SIZES = (100_000, 100_000, 100_000, 1_000)  # three blockwise 8-bit parts and one fp16 part
HONEST_WEIGHTS = (8.0, 16.0, 24.0)
MAX_WEIGHT = 192.0  # 2 x configs/tiny.yaml's target_batch_size
# Relative L2 error allowed against the honest-only average: each part crosses blockwise 8-bit once out and once
# back as a small delta (measured ~1.3% per crossing for one tensor; the average of three is closer).
TOLERANCE = 0.03


def honest_values(round_index: int, peer_index: int) -> list[torch.Tensor]:
    """Similar tensors (a shared direction plus 10% noise), as honest gradients are."""
    base = torch.Generator().manual_seed(1000 + round_index)
    noise = torch.Generator().manual_seed(100 * round_index + peer_index)
    return [torch.randn(n, generator=base) + 0.1 * torch.randn(n, generator=noise) for n in SIZES]


# ---------------------------------------------------------------- unit level: the checks and the reducer


def test_wire_and_part_checks():
    x = torch.randn(5000)
    for kind in (runtime_pb2.NONE, runtime_pb2.FLOAT16, runtime_pb2.BLOCKWISE_8BIT, runtime_pb2.UNIFORM_8BIT):
        assert guard.check_wire(serialize_torch_tensor(x, kind), x.shape, torch.float32) is None
    assert guard.check_wire(serialize_torch_tensor(torch.zeros(1), runtime_pb2.NONE), x.shape, torch.float32) == "shape"
    assert guard.check_wire(serialize_torch_tensor(x.double(), runtime_pb2.NONE), x.shape, torch.float32) == "dtype"
    truncated = serialize_torch_tensor(x, runtime_pb2.NONE)
    truncated.buffer = truncated.buffer[:-4]
    assert guard.check_wire(truncated, x.shape, torch.float32) == "malformed"
    assert guard.check_wire(infinite_absmax(serialize_torch_tensor(x, runtime_pb2.BLOCKWISE_8BIT)),
                            x.shape, torch.float32) == "codebook"
    uniform = serialize_torch_tensor(x, runtime_pb2.UNIFORM_8BIT)
    uniform.buffer = uniform.buffer[:8] + torch.tensor([math.nan]).numpy().tobytes() + uniform.buffer[12:]
    assert guard.check_wire(uniform, x.shape, torch.float32) == "codebook"

    def part(tensor, weight=1.0):
        return guard.check_part(tensor, weight, shape=x.shape, dtype=torch.float32, max_weight=MAX_WEIGHT)

    assert part(x) is None and part(x, 0.0) is None and part(x, MAX_WEIGHT) is None
    assert part(x, 1e9) == part(x, -1.0) == part(x, math.nan) == "weight"
    assert part(torch.where(torch.arange(5000) == 7, math.nan, x)) == "nonfinite"
    assert part(torch.full_like(x, math.inf)) == "nonfinite"
    assert part(x[:1]) == "shape" and part(x.double()) == "dtype"
    assert guard.check_result(torch.zeros_like(x), x, ratio=16.0) is None
    assert guard.check_result(torch.full_like(x, math.nan), x, ratio=16.0) == "result"
    assert guard.check_result(1e6 * x, x, ratio=16.0) == "result"
    assert guard.check_result(x[:10], x, ratio=16.0) == "result"
    # a peer tagging along with weight 0 (its buffers stale or zero) judges no scale, only finiteness
    try:
        guard._note_reference(1.0, x.numel())
        assert guard.check_result(1e3 * x, torch.zeros_like(x), ratio=16.0) == "result"
        assert guard.check_result(1e3 * x, torch.zeros_like(x), ratio=16.0, judge_norm=False) is None
    finally:
        guard.uninstall()
    assert guard.check_result(torch.full_like(x, math.inf), x, ratio=16.0, judge_norm=False) == "result"
    assert not guard.check_local([x, torch.tensor([1.0, math.inf])]) and guard.check_local([x])


def test_norm_bound_is_robust():
    # the lower median of an honest majority is honest; with two parts it is the smaller; ours always counts
    assert guard.norm_bound([1.0, 1.2, 0.9, 1e6], local_norm=1.0, numel=10, ratio=16) == 16 * 1.0
    assert guard.norm_bound([1.0, 1e6], local_norm=1.0, numel=10, ratio=16) == 16.0
    assert guard.norm_bound([0.0, 0.0, 0.0, 2.0], local_norm=2.0, numel=10, ratio=16) == 32.0


def test_reducer_refuses_and_averages_the_rest(caplog):
    """A reducer with three senders (ours first): a 1e6 x part and a wrong-shape part are refused, counted and
    logged with the sender's id; the accepted parts are averaged with their weights."""
    counters, peers = guard.GuardCounters(), [PeerID(bytes([18, 32]) + bytes([i]) * 32) for i in range(4)]
    guard.install(counters, max_weight=MAX_WEIGHT)
    try:
        local, honest = torch.randn(1000), torch.randn(1000)
        results = asyncio.run(_reduce([(local, 2.0), (honest, 6.0), (1e6 * honest, 1.0), (honest[:1], 1.0)], peers))
        assert isinstance(results[2], guard.RefusedContribution) and isinstance(results[3], guard.RefusedContribution)
        expected = (2 * local + 6 * honest) / 8
        assert torch.allclose(results[0], expected, atol=1e-6) and torch.allclose(results[1], expected, atol=1e-6)
        assert counters.snapshot() == {**dict.fromkeys(guard.REASONS, 0), "norm": 1, "shape": 1}
        assert guard.is_banned(peers[2]) and guard.is_banned(peers[3]) and not guard.is_banned(peers[1])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == guard.__name__]
        assert any(str(peers[2]) in w and "norm" in w for w in warnings), warnings
    finally:
        guard.uninstall()


def test_a_reducer_tagging_along_with_weight_0_sets_no_norm_reference():
    """Our part of weight 0 (zeros: hivemind's tag-along before a state download) must not make the honest
    sender's part look huge; the average is the weighted senders' alone, and nobody is banned."""
    counters, peers = guard.GuardCounters(), [PeerID(bytes([18, 32]) + bytes([i]) * 32) for i in range(2)]
    guard.install(counters, max_weight=MAX_WEIGHT)
    try:
        guard._note_reference(1e-6, 1000)  # earlier rounds' parts were tiny
        honest = torch.randn(1000)
        results = asyncio.run(_reduce([(torch.zeros(1000), 0.0), (honest, 8.0)], peers))
        assert torch.allclose(results[0], honest) and torch.allclose(results[1], honest)
        assert sum(counters.snapshot().values()) == 0 and not guard.is_banned(peers[1])
    finally:
        guard.uninstall()


def test_rejections_reach_the_progress_record_and_the_monitor():
    from monitor import metrics
    from monitor.collector import CounterLedger, SwarmCollector, SwarmSnapshot
    from swarm.compression import WireCounters
    from swarm.progress import ProgressPublisher
    from swarm.rounds import RoundLog

    assert metrics.REJECT_REASONS == guard.REASONS
    counters = guard.GuardCounters()
    counters.add("norm")
    counters.add("norm")
    publisher = ProgressPublisher(dht=None, run_id="run", subkey=b"me", device="cpu", round_log=RoundLog(),
                                  counters=WireCounters(), ttl=30, rejected=counters)
    record = publisher.record(step=1, loss=2.0, samples_done=8, samples_per_second=1.0, tokens_per_second=64.0)
    assert record.rejected_norm == 2 and record.rejected_weight == 0
    ledger = CounterLedger()
    ledger.update({b"me": record})
    snapshot = SwarmSnapshot(records={b"me": record}, taken_at=0.0, ok=True, totals=ledger.totals())
    collector = SwarmCollector(run_info=dict(run_id="run", model="gpt2", version="0"), snapshot_source=lambda: snapshot)
    family = next(f for f in collector.collect() if f.name == "swarm_rejected_contributions")
    assert {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")} == {
        **dict.fromkeys(guard.REASONS, 0.0), "norm": 2.0}


async def _reduce(parts, peers):
    reducer = guard.GuardedReducer([torch.Size([1000])], len(parts), part_dtypes=[torch.float32], local_sender=0,
                                   sender_ids=peers[: len(parts)], settings=guard._settings)
    calls = [reducer.accumulate_part(i, 0, tensor, weight) for i, (tensor, weight) in enumerate(parts)]
    return await asyncio.gather(*calls, return_exceptions=True)


def infinite_absmax(serialized: runtime_pb2.Tensor) -> runtime_pb2.Tensor:
    """A blockwise 8-bit part whose first absmax is +inf (the layout: two int64 sizes, absmax, codebook, bytes)."""
    buffer = bytearray(serialized.buffer)
    buffer[16:20] = torch.tensor([math.inf]).numpy().tobytes()
    serialized.buffer = bytes(buffer)
    return serialized


# ---------------------------------------------------------------- the attacker: a real averager that lies


def poison(message: averaging_pb2.AveragingData, mode: str) -> averaging_pb2.AveragingData:
    values = deserialize_torch_tensor(message.tensor_part)
    kind, weight = message.tensor_part.compression, message.weight
    if mode == "nan":
        values, kind = torch.full_like(values, math.nan), runtime_pb2.NONE  # 8-bit would make NaN finite
    elif mode == "inf":
        values, kind = torch.where(torch.arange(values.numel()) % 7 == 0, math.inf, values), runtime_pb2.NONE
    elif mode == "huge":
        values = values * 1e6
    elif mode == "weight":
        weight = 1e9
    elif mode == "shape":
        values, kind = values[:1].clone(), runtime_pb2.NONE
    elif mode == "dtype":
        values, kind = values.double(), runtime_pb2.NONE
    elif mode == "sneaky":  # plausible values, shifted: shows whether a banned peer still gets in
        values = values + 3.0
    serialized = serialize_torch_tensor(values, runtime_pb2.BLOCKWISE_8BIT if mode == "codebook" else kind)
    if mode == "codebook":
        serialized = infinite_absmax(serialized)
    return averaging_pb2.AveragingData(code=message.code, group_id=message.group_id, tensor_part=serialized,
                                       weight=weight)


_evil: tuple = ("none", None)  # in an attacker's process: (its attack, shared flag "now act plausible")


class EvilRunner(AllReduceRunner):
    """hivemind's plain runner, sending poisoned parts; as a reducer (mode "nan") it answers NaN."""

    @property
    def attack(self) -> str:
        attack, sneaky = _evil
        return "sneaky" if sneaky is not None and sneaky.value else attack

    async def _generate_input_for_peer(self, peer_index: int):
        async for message in super()._generate_input_for_peer(peer_index):
            yield poison(message, self.attack)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        async for message in super()._accumulate_parts_streaming(stream, sender_index):
            if self.attack == "nan" and message.code == averaging_pb2.AVERAGED_PART:
                delta = torch.full_like(deserialize_torch_tensor(message.tensor_part), math.nan)
                message = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                      tensor_part=serialize_torch_tensor(delta, runtime_pb2.NONE))
            yield message


class EvilAverager(DecentralizedAverager):
    def __init__(self, *args, mode: str, **kwargs):
        self.attack, self.sneaky = mode, mp.Value("b", 0)  # not self.mode: hivemind's averager has one
        super().__init__(*args, **kwargs)

    def run(self):  # the forked child's first code: only this process uses the evil runner
        global _evil
        _evil = (self.attack, self.sneaky)
        hivemind_averager.AllReduceRunner = EvilRunner
        hivemind_averager.Matchmaking = guard._PLAIN[1]
        super().run()


EvilAverager.__name__ = DecentralizedAverager.__name__  # hivemind names its RPC handlers after the class


# ---------------------------------------------------------------- the swarm


def averager_options(**extra):
    options = dict(prefix="guardtest", start=True, min_matchmaking_time=2.0, request_timeout=1.0, min_group_size=2,
                   target_group_size=8, shutdown_timeout=2, part_size_bytes=2**15, allreduce_timeout=40.0,
                   next_chunk_timeout=10.0, compression=build_compression("blockwise8", size_threshold=2**16))
    return {**options, **extra}


class Swarm:
    def __init__(self):
        check_codecs()  # as build_trainer does; it also imports bitsandbytes before the fork (see the report)
        self.counters = guard.GuardCounters()
        guard.install(self.counters, max_weight=MAX_WEIGHT)  # before the averagers fork, as build_trainer does
        self.first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        self.seeds = self.first.get_visible_maddrs()
        self.dhts = [self.first] + [self.dht() for _ in HONEST_WEIGHTS[1:]]
        self.honest = [DecentralizedAverager([torch.zeros(n) for n in SIZES], dht, **averager_options())
                       for dht in self.dhts]
        self.ids = [dht.peer_id for dht in self.dhts]
        self.attempts: dict[DecentralizedAverager, tuple[list, list[threading.Thread]]] = {}  # attackers' steps

    def dht(self) -> hivemind.DHT:
        return hivemind.DHT(start=True, initial_peers=self.seeds, host_maddrs=["/ip4/127.0.0.1/tcp/0"])

    def attacker(self, mode: str, client_mode: bool):
        dht = self.dht()
        # (short timeouts: the honest peers refuse its parts, and its round must wind down before the next one)
        averager = EvilAverager([torch.zeros(n) for n in SIZES], dht, mode=mode, **averager_options(
            client_mode=client_mode, allreduce_timeout=8.0, next_chunk_timeout=4.0))
        return dht, averager

    def stop(self, pair) -> None:
        if pair is not None:
            controls, threads = self.attempts.pop(pair[1], ([], []))
            deadline = time.monotonic() + 30
            while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
                for control in list(controls):  # (again and again: a thread may begin its step meanwhile)
                    if not control.done():
                        _cancel(control)
                for thread in threads:
                    thread.join(timeout=0.2)
            pair[1].shutdown()
            pair[0].shutdown()

    def round(self, index: int, attackers: list[DecentralizedAverager]):
        """One averaging round of every peer; the honest peers' (result, gathered group) by index."""
        for i, averager in enumerate(self.honest):
            with averager.get_tensors() as tensors:
                for tensor, value in zip(tensors, honest_values(index, i)):
                    tensor.copy_(value)
        for averager in attackers:  # in threads: an attacker stuck in its failed last round must not hold us up
            controls, thread = self.attempts.setdefault(averager, ([], []))
            thread.append(threading.Thread(target=_step_quietly, args=(averager, index, controls), daemon=True))
            thread[-1].start()
        controls = [a.step(weight=w, gather=i, wait=False, timeout=45, allow_retries=False)
                    for i, (a, w) in enumerate(zip(self.honest, HONEST_WEIGHTS))]
        outcomes = []
        for averager, control in zip(self.honest, controls):
            try:
                gathered = control.result(timeout=60)
            except Exception as error:  # e.g. matchmaking timed out on a loaded machine: the caller tries again
                logging.getLogger(__name__).warning("An honest averager's round failed: %r", error)
                return None
            with averager.get_tensors() as tensors:
                outcomes.append(([t.clone() for t in tensors], gathered))
        return outcomes

    def close(self):
        for averager in self.honest:
            averager.shutdown()
        for dht in self.dhts:
            dht.shutdown()
        guard.uninstall()
        # free the shared tensors now, not at interpreter exit: freed then, torch's shared-memory client aborted
        # the process ("terminate called after throwing std::system_error: Broken pipe")
        self.honest, self.dhts, self.first, self.attempts = [], [], None, {}
        gc.collect()


def _step_quietly(averager: DecentralizedAverager, index: int, controls: list) -> None:
    try:
        with averager.get_tensors() as tensors:  # held by the averager while its (failed) last round winds down
            for tensor, value in zip(tensors, honest_values(index, 9)):
                tensor.copy_(value)
        controls.append(averager.step(weight=8.0, gather="attacker", wait=False, timeout=15, allow_retries=False))
        controls[-1].result(timeout=30)
    except BaseException:
        pass  # refused, banned, left alone or stopped: any way of failing is the attacker's


@pytest.fixture(scope="module")
def swarm():
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    made = Swarm()
    yield made
    made.close()
    # (not torch_shm_manager: torch starts it for this very process when the averagers share their tensors, and it
    # must live as long as this process does; killed here, the next hivemind DHT in this pytest process aborted it)
    started = [p for p in psutil.Process().children(recursive=True)
               if p.pid not in before and p.name() != "torch_shm_manager"]
    _, alive = psutil.wait_procs(started, timeout=10)
    for process in alive:  # only processes this fixture started (averagers, DHTs and their p2pd)
        process.kill()


def check_honest_result(outcomes, round_index: int, *, kept_allowed: float) -> None:
    """Each honest peer's result is the weighted average of the honest peers of its group, except (at most a
    ``kept_allowed`` fraction) values exactly equal to its own: a shard whose reducer was refused. (A few values
    equal ours by chance after fp16 rounding, hence 1e-3 and not 0 when every reducer is honest.)"""
    for i, (result, gathered) in enumerate(outcomes):
        members = [j for j in gathered.values() if isinstance(j, int)]
        assert i in members and len(members) >= 2, gathered
        total = sum(HONEST_WEIGHTS[j] for j in members)
        expected = [sum(HONEST_WEIGHTS[j] * honest_values(round_index, j)[k] for j in members) / total
                    for k in range(len(SIZES))]
        mine = honest_values(round_index, i)
        result, expected, mine = torch.cat(result), torch.cat(expected), torch.cat(mine)
        assert torch.isfinite(result).all()
        kept = result == mine
        assert kept.float().mean() <= kept_allowed
        error = float((result - expected)[~kept].norm() / expected[~kept].norm())
        assert error <= TOLERANCE, f"peer {i}: relative error {error:.4f} against the honest-only average"


# (mode, client mode, reasons it may be counted under). A normal-mode attacker also reduces a shard; in mode
# "nan" its answers are NaN, so the honest peers refuse them ("result") and keep their own values there.
# Two attacks per round (their reasons differ), so the seven attacks take four rounds.
ROUNDS: list[list[tuple[str, bool, set]]] = [
    [("nan", False, {"nonfinite", "result"}), ("inf", True, {"nonfinite"})],
    [("huge", True, {"norm"}), ("weight", True, {"weight"})],
    [("shape", True, {"shape"}), ("dtype", True, {"dtype"})],
    [("codebook", True, {"codebook"})],
    [],  # the last attackers, banned, try once more
]


def test_poisoned_parts_are_refused_and_senders_left_out(swarm):
    """Per attack: counted under its reason, honest result close to the honest-only average; and the attackers
    of the round before (banned, now sending plausible values shifted by +3) are in no honest peer's group."""
    previous, upcoming = [], [swarm.attacker(mode, client) for mode, client, _ in ROUNDS[0]]
    for index, attacks in enumerate(ROUNDS):
        current = upcoming  # started a round early: ready when their turn comes
        later = ROUNDS[index + 1] if index + 1 < len(ROUNDS) else []
        upcoming = [swarm.attacker(mode, client) for mode, client, _ in later]
        for _, averager in previous:
            averager.sneaky.value = 1
        before = swarm.counters.snapshot()
        # new attackers that missed the honest group (slow start, or still in a step that missed the last round) or a
        # failed round: up to five rounds (three were not enough once: the 'weight' attacker missed all of them)
        for _attempt in range(5):
            outcomes = swarm.round(index, [averager for _, averager in current + previous])
            after = swarm.counters.snapshot()
            caught = all(after[_primary(mode)] > before[_primary(mode)] for mode, _, _ in attacks)
            if outcomes is not None and caught:
                break
        assert outcomes is not None, "no honest round succeeded in five attempts"
        grown = {reason for reason in guard.REASONS if after[reason] > before[reason]}
        assert grown == set().union(*(reasons for _, _, reasons in attacks)), (attacks, before, after)
        check_honest_result(outcomes, index, kept_allowed=1e-3 if all(c for _, c, _ in attacks) else 0.5)
        for dht, _ in previous:
            assert all(dht.peer_id not in gathered for _, gathered in outcomes), (index, outcomes)
        for pair in previous:
            swarm.stop(pair)
        previous = current


def _primary(mode: str) -> str:
    return {"nan": "nonfinite", "inf": "nonfinite", "huge": "norm"}.get(mode, mode)
