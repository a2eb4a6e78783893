"""Checks on every all-reduce contribution a peer receives, and bans on the peers that send garbage.

hivemind 1.1.12's all-reduce trusts its groupmates: ``TensorPartReducer`` adds each incoming part with the
sender's own weight, so one NaN, one huge value, a weight of 1e9 or a shape-(1,) tensor (broadcast) decides
the average, and a reducer's answer for its shard is applied as it comes. This module owns the defence:

- What is checked, per part received (``check_wire`` before decoding, ``check_part`` after): the declared shape
  and dtype are exactly those of our own part at that index; the buffer's length matches its codec; an 8-bit
  codebook or blockwise absmax is finite; the decoded values are finite; the weight is finite, >= 0 and at most
  ``max_weight`` (the honest weight is a peer's accumulated sample count, so about the target batch size).
  Every answer of a reducer for its shard (``check_result``) must be finite, of our part's shape and within
  the norm bound; otherwise that shard counts as failed and keeps our local values, as hivemind does for a
  reducer that drops out. Our own tensors must be finite before they are compressed and sent (8-bit codecs
  would turn a NaN into a finite number): otherwise this peer leaves the round.
- The norm bound, learned from the swarm: a reducer waits for every sender's copy of a part anyway, so the
  parts are screened together. The reference norm is the larger of our own part's norm (trusted: it is ours)
  and the *lower* median of the norms of all parts of weight > 0, ours included (a part of weight 0, sent by a
  peer that tags along before downloading state, holds stale buffers and is not averaged); a part whose norm exceeds ``norm_ratio`` times
  the reference is refused. With an honest majority the lower median is an honest norm, and with two peers it
  is the smaller one, so neither a huge part nor a swarm of zero parts moves it far; ``norm_ratio`` (16) leaves
  room for honest spread (small batches have noisier, larger gradients). When every reference is 0 (e.g. an
  embedding slice none of our samples touched) the bound falls back to a running RMS of earlier rounds' parts.
- Identification: one WARNING per refusal naming the peer id and reason, a count per reason in shared memory
  (``GuardCounters``, made before the averagers fork, read by the trainer for its progress record), and a ban.
- Bans live in each averager process (the only place that sees the parts), in a bounded LRU list with an
  expiry: a banned peer's join requests are refused, we do not join its groups, and in a group that still
  contains it (an honest leader has not banned it yet) its parts are refused and its shard keeps our values.

``install`` puts the guarded runner and matchmaking into hivemind's averager module, process-wide, so it must
run before the averagers fork (like ``compression.install_wire_counters``). Parameter averaging goes through
the same runner, so it is covered too. Not covered: a malicious reducer returning plausible (finite, in-bound)
but wrong values for its own shard; that needs redundant reduction, which hivemind does not do.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import multiprocessing as mp
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Sequence

import numpy as np
import torch
import hivemind.averaging.averager as hivemind_averager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from swarm.matchmaking import PacedMatchmaking

logger = logging.getLogger(__name__)

# Why a contribution was refused. "result": a reducer's answer for its shard; "malformed": a buffer that does
# not match its codec, or more parts than expected.
REASONS = ("nonfinite", "norm", "weight", "shape", "dtype", "codebook", "malformed", "result")
MAX_BANNED = 1024
WEIGHT_SLACK = 2  # an honest weight (samples accumulated) can pass the target batch while a round is matched


def max_weight(target_batch_size: int) -> float:
    """The largest weight accepted from a peer of a swarm with this ``averaging.target_batch_size``."""
    if target_batch_size < 1:
        raise ValueError(f"target_batch_size must be at least 1, got {target_batch_size}")
    return float(WEIGHT_SLACK * target_batch_size)


class GuardCounters:
    """Refused contributions by reason, counted by this process and the averagers it forks (int64, shared)."""

    def __init__(self) -> None:
        self._array = mp.Array(ctypes.c_int64, len(REASONS))

    def add(self, reason: str) -> None:
        index = REASONS.index(reason)
        with self._array.get_lock():
            self._array.get_obj()[index] += 1

    def snapshot(self) -> dict[str, int]:
        with self._array.get_lock():
            return dict(zip(REASONS, self._array.get_obj()[:]))


@dataclass(frozen=True)
class GuardSettings:
    max_weight: float
    norm_ratio: float = 16.0
    ban_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be a positive number, got {self.max_weight}")
        if not (math.isfinite(self.norm_ratio) and self.norm_ratio > 1):
            raise ValueError(f"norm_ratio must be a number above 1, got {self.norm_ratio}")
        if not self.ban_seconds > 0:
            raise ValueError(f"ban_seconds must be positive, got {self.ban_seconds}")


_settings: Optional[GuardSettings] = None
_counters: Optional[GuardCounters] = None
_banned: OrderedDict[PeerID, float] = OrderedDict()  # peer -> monotonic time its ban ends; per process
_rms_floor = 0.0  # running RMS of screened parts, the norm reference when a round's own reference is 0
_PLAIN = (hivemind_averager.AllReduceRunner, hivemind_averager.Matchmaking)


def install(counters: GuardCounters, *, max_weight: float, norm_ratio: float = 16.0,
            ban_seconds: float = 3600.0) -> None:
    """Guard every averager this process forks from now on; count refusals into ``counters``. Idempotent."""
    global _settings, _counters
    _settings = GuardSettings(max_weight=max_weight, norm_ratio=norm_ratio, ban_seconds=ban_seconds)
    _counters = counters
    hivemind_averager.AllReduceRunner = GuardedAllReduceRunner
    hivemind_averager.Matchmaking = GuardedMatchmaking


def uninstall() -> None:
    """Back to hivemind's plain runner and matchmaking (for tests); forgets settings, bans and norms seen."""
    global _settings, _counters, _rms_floor
    hivemind_averager.AllReduceRunner, hivemind_averager.Matchmaking = _PLAIN
    _settings, _counters, _rms_floor = None, None, 0.0
    _banned.clear()


def is_banned(peer_id: PeerID) -> bool:
    until = _banned.get(peer_id)
    if until is None:
        return False
    if time.monotonic() < until:
        return True
    del _banned[peer_id]
    return False


def refuse(peer_id: PeerID, reason: str, detail: str) -> None:
    """Count, log and ban: the one thing done for every refused contribution."""
    assert reason in REASONS, reason
    seconds = _settings.ban_seconds if _settings is not None else 3600.0
    _banned.pop(peer_id, None)
    _banned[peer_id] = time.monotonic() + seconds
    while len(_banned) > MAX_BANNED:
        _banned.popitem(last=False)
    if _counters is not None:
        _counters.add(reason)
    logger.warning("Refused a contribution from peer %s (%s: %s); it is left out of averaging for %.0f s",
                   peer_id, reason, detail, seconds)


class RefusedContribution(AllreduceException):
    """A part or result failed a check; its sender (or reducer) is out of this round and banned."""


def _codec_name(kind: int) -> str:
    return runtime_pb2.CompressionType.Name(kind) if kind in runtime_pb2.CompressionType.values() else str(kind)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_wire(serialized: runtime_pb2.Tensor, shape: Sequence[int], dtype: torch.dtype) -> Optional[str]:
    """The reason to refuse a serialized part before decoding it (None: decode it)."""
    if tuple(serialized.size) != tuple(shape):
        return "shape"
    if serialized.dtype != _dtype_name(dtype):
        return "dtype"
    numel, buffer, kind = math.prod(shape), serialized.buffer, serialized.compression
    if kind == runtime_pb2.NONE:
        return None if len(buffer) == numel * torch.empty((), dtype=dtype).element_size() else "malformed"
    if kind == runtime_pb2.FLOAT16:
        return None if len(buffer) == 2 * numel else "malformed"
    if kind in (runtime_pb2.UNIFORM_8BIT, runtime_pb2.QUANTILE_8BIT):
        return _check_tables(buffer, numel, header=1)
    if kind == runtime_pb2.BLOCKWISE_8BIT:
        return _check_tables(buffer, numel, header=2)
    return None  # other codecs: the decoded values are still checked


def _check_tables(buffer: bytes, numel: int, *, header: int) -> Optional[str]:
    """8-bit layouts: ``header`` int64 table sizes, the float32 tables (absmax, codebook), one byte per value."""
    if len(buffer) < 8 * header:
        return "malformed"
    sizes = np.frombuffer(buffer, dtype=np.int64, count=header)
    if (sizes < 0).any() or len(buffer) != 8 * header + 4 * int(sizes.sum()) + numel:
        return "malformed"
    tables = np.frombuffer(buffer, dtype=np.float32, offset=8 * header, count=int(sizes.sum()))
    return None if np.isfinite(tables).all() else "codebook"


def check_part(tensor: torch.Tensor, weight: float, *, shape: Sequence[int], dtype: torch.dtype,
               max_weight: float) -> Optional[str]:
    """The reason to refuse a decoded part with its weight (None: accept it, subject to the norm screen)."""
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and 0 <= weight <= max_weight):
        return "weight"
    if tuple(tensor.shape) != tuple(shape):
        return "shape"
    if tensor.dtype != dtype:
        return "dtype"
    if not math.isfinite(float(tensor.norm())) and not bool(torch.isfinite(tensor).all()):  # one pass when finite
        return "nonfinite"  # (finite values whose norm overflows are left to the norm screen)
    return None


def norm_bound(norms: Sequence[float], *, local_norm: float, numel: int, ratio: float) -> float:
    """The largest norm accepted for a part, given every part's norm (ours included) in this round."""
    lower_median = sorted(norms)[(len(norms) - 1) // 2] if norms else 0.0
    reference = max(local_norm, lower_median)
    if reference == 0.0:
        reference = _rms_floor * math.sqrt(numel)
    return ratio * reference if reference > 0 else math.inf  # nothing to judge by yet: finite parts pass


def _note_reference(norm: float, numel: int) -> None:
    global _rms_floor
    if numel and math.isfinite(norm):
        _rms_floor = max(0.99 * _rms_floor, norm / math.sqrt(numel))


def check_result(delta: torch.Tensor, local: torch.Tensor, *, ratio: float, judge_norm: bool = True) -> Optional[str]:
    """The reason to refuse a reducer's answer (averaged minus our part) for one of our parts. ``judge_norm``:
    False when our part had weight 0 (hivemind's tag-along: a peer about to download state joins a round it
    was matched into, with whatever its buffers held), so our part says nothing about the round's scale."""
    if tuple(delta.shape) != tuple(local.shape) or not torch.is_floating_point(delta):
        return "result"
    if not judge_norm:
        return None if bool(torch.isfinite(delta).all()) else "result"
    local_norm = float(local.norm())
    bound = norm_bound([], local_norm=local_norm, numel=local.numel(), ratio=ratio)
    # |averaged| <= bound implies |delta| <= bound + |ours|; one norm, which is NaN/inf for any NaN/inf in delta
    return None if float(delta.norm()) <= bound + local_norm else "result"


def check_local(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every value this peer is about to send is finite."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


class GuardedReducer(TensorPartReducer):
    """A ``TensorPartReducer`` that checks each part as it comes and screens each part's norms together.

    Parts are kept until every current sender's copy of the part index is in (hivemind waits for that anyway);
    then the norm screen runs and the accepted parts are averaged with their weights.
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, part_dtypes: Sequence[torch.dtype],
                 local_sender: Optional[int], sender_ids: Sequence[PeerID], settings: GuardSettings):
        self.part_dtypes, self.local_sender, self.sender_ids = tuple(part_dtypes), local_sender, tuple(sender_ids)
        self.settings = settings
        self._pending: list[tuple[int, torch.Tensor, float]] = []
        self._refused: dict[int, str] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        self._pending = []

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:  # earlier parts are still being reduced
            finished = asyncio.create_task(self.finished.wait())
            await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if self.finished.is_set():
                raise AllreduceException("attempted to aggregate a part in a finalized reducer")
        if sender_index in self._refused or self.sender_failed_after[sender_index] != math.inf:
            raise BannedException(f"sender {sender_index} was banned")
        future = self.current_part_future
        if sender_index != self.local_sender:
            reason = check_part(tensor_part, weight, shape=self.part_shapes[part_index],
                                dtype=self.part_dtypes[part_index], max_weight=self.settings.max_weight)
            if reason is not None:
                self._refuse(sender_index, reason, f"part {part_index}, weight {weight:.3g}", counted=False)
                raise RefusedContribution(reason)
        self._pending.append((sender_index, tensor_part, float(weight)))
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        averaged = await future
        if sender_index in self._refused:
            raise RefusedContribution(self._refused[sender_index])
        return averaged

    def _refuse(self, sender_index: int, reason: str, detail: str, *, counted: bool) -> None:
        """Leave a sender out from the current part on; ``counted``: its current part is already pending."""
        self._refused[sender_index] = reason
        self.sender_failed_after[sender_index] = self.current_part_index
        refuse(self.sender_ids[sender_index], reason, detail)
        if not counted:
            self.num_current_senders -= 1
            self.check_current_part_finished()

    def on_sender_failed(self, sender_index: int) -> None:
        if self.sender_failed_after[sender_index] == math.inf:  # not already left out by a refusal
            super().on_sender_failed(sender_index)

    def check_current_part_finished(self) -> None:
        if self.current_part_accumulated_from == self.num_current_senders:
            self._reduce_pending()
        super().check_current_part_finished()

    def _reduce_pending(self) -> None:
        """Screen the pending parts' norms, then put their weighted sum into the accumulator."""
        norms = {sender: float(part.norm()) for sender, part, _ in self._pending}
        numel = math.prod(self.part_shapes[self.current_part_index])
        # a part of weight 0 (a peer tagging along) is not averaged, so it sets no reference, ours included
        weighted = [norms[sender] for sender, _, weight in self._pending if weight > 0]
        local_norm = next((norms[s] for s, _, weight in self._pending if s == self.local_sender and weight > 0), 0.0)
        bound = norm_bound(weighted, local_norm=local_norm, numel=numel, ratio=self.settings.norm_ratio)
        accepted = []
        for sender, part, weight in self._pending:
            if sender != self.local_sender and weight > 0 and not norms[sender] <= bound:
                detail = f"part {self.current_part_index}, norm {norms[sender]:.3g} > bound {bound:.3g}"
                self._refuse(sender, "norm", detail, counted=True)
            else:
                accepted.append((part, weight))
        if accepted and math.isfinite(bound):
            _note_reference(bound / self.settings.norm_ratio, numel)
        total = sum(weight for _, weight in accepted)
        for part, weight in accepted:
            self.accumulator.add_(part.to(self.accumulator.dtype), alpha=weight if total > 0 else 1.0)
        self.denominator = total if total > 0 else float(max(1, len(accepted)))
        self._pending = []


class GuardedAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with the checks of this module on what it receives and sends."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        assert _settings is not None, "guard.install() sets the settings before any runner is built"
        plain = self.tensor_part_reducer
        plain.finished.set()  # discarded unused: without this, its finalizer would log a "partial round"
        local = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        self.tensor_part_reducer = GuardedReducer(
            plain.part_shapes, plain.num_senders, part_dtypes=[p.dtype for p in self.parts_for_local_averaging],
            local_sender=local, sender_ids=self.sender_peer_ids, settings=_settings)
        # bans decided before this round; a peer refused during it still has the rest of what it sent checked
        self._banned_before = {peer for peer in self.ordered_peer_ids if peer != self.peer_id and is_banned(peer)}
        self._check_results_of_reducers()

    def _check_results_of_reducers(self) -> None:
        container, register = self.tensor_part_container, self.tensor_part_container.register_processed_part
        own_index = self.ordered_peer_ids.index(self.peer_id)

        def register_checked(peer_index: int, part_index: int, part: torch.Tensor) -> None:
            if peer_index != own_index:
                local = container._input_parts_by_peer[peer_index][part_index][0]
                reason = check_result(part, local, ratio=_settings.norm_ratio, judge_norm=self.weight > 0)
                if reason is not None:  # raised inside _communicate_with_peer: hivemind keeps our local parts
                    refuse(self.ordered_peer_ids[peer_index], reason, f"its average for part {part_index}")
                    raise RefusedContribution(reason)
            register(peer_index, part_index, part)

        container.register_processed_part = register_checked

    async def run(self) -> AsyncIterator[torch.Tensor]:
        if self.peer_id in self.sender_peer_ids and not check_local(self.tensor_part_container.local_tensors):
            error = AllreduceException("this peer's own tensors contain NaN or Inf; it does not send them")
            logger.error("Not averaging this round: %s", error)
            self.finalize(exception=error)
            raise error
        for peer_id in self.sender_peer_ids:
            if peer_id in self._banned_before:
                await self._ban_sender(peer_id)
        async for delta in super().run():
            yield delta

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        if peer_id in self._banned_before:  # send it nothing; its shard keeps our values
            self.tensor_part_container.register_failed_reducer(self.ordered_peer_ids.index(peer_id))
            return
        await super()._communicate_with_peer(peer_id)

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                          sender_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        peer_id = self.sender_peer_ids[sender_index]
        if peer_id in self._banned_before:
            await self._ban_sender(peer_id)
            return
        async for message in super()._accumulate_parts_streaming(self._checked(stream, peer_id), sender_index):
            yield message

    async def _checked(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                       peer_id: PeerID) -> AsyncIterator[averaging_pb2.AveragingData]:
        reducer = self.tensor_part_reducer
        part_index = 0
        async for message in stream:
            if part_index >= reducer.num_parts:
                reason = "malformed"
            else:
                reason = check_wire(message.tensor_part, reducer.part_shapes[part_index],
                                    reducer.part_dtypes[part_index])
            if reason is not None:
                refuse(peer_id, reason, f"part {part_index}, codec {_codec_name(message.tensor_part.compression)}")
                raise RefusedContribution(reason)
            part_index += 1
            yield message


class GuardedMatchmaking(PacedMatchmaking):
    """Matchmaking that neither accepts a banned peer into our group nor joins a banned leader's (and reads the
    DHT at a bounded rate, see swarm.matchmaking)."""

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context) -> AsyncIterator:
        if is_banned(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _request_join_group(self, leader: PeerID):
        if is_banned(leader):
            return None
        return await super()._request_join_group(leader)
