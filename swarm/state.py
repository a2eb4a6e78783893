"""Verified state downloads: a joiner checks the state a donor serves, refuses it if bad, and tries another donor.

hivemind 1.1.12 downloads the state (parameters, optimizer statistics, epoch) from the donor with the highest
priority in an unsigned registry, and loads whatever arrives. Here:

- ``verified_state_averager(cls)`` gives a hivemind ``TrainingStateAverager`` (sub)class whose downloads go donor by
  donor: the averager's process fetches one donor's state (skipping donors already refused, and trying donors
  whose state was found bad in earlier downloads last), and the caller's process checks it before it is loaded.
  Donors offer their state in a signed registry (``{prefix}_donors``: one entry per owner key, naming the peer id
  of that key), so nobody can list, promote or hide another peer.
- ``StateCheck`` is that check: the right number of tensors with the shapes and dtypes of our own, all finite, Adam's
  second moments non-negative, an epoch no further ahead than the swarm's progress records support, and parameters
  that agree with the digests the other trainers publish in their signed progress records (``state_digest``: the
  values at a few fixed coordinates, compared to the median over the trainers at the same step). While no trainer
  publishes one near the state's step, only a seed serving a checkpoint can vouch: its donor entry, signed with the
  key that signs the swarm config, carries the checkpoint's digest (``seed_vouch``). Nothing else is loaded.

The digest stops corrupt, non-finite, stale and foreign states (another model, another run, a random init). It does
not stop a donor that crafts a state matching the published coordinates and differing elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import InvalidStateError
import math
import random
import time
from typing import Any, Callable, Sequence

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import deserialize_torch_tensor
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, ValueWithExpiration, get_dht_time
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.asyncio import aiter_with_timeout

from swarm.access import peer_id_of
from swarm.records import DIGEST_SIZE, DonorRecord

logger = logging.getLogger(__name__)

# Relative distance of a downloaded state's digest to the median of the trainers' digests within DIGEST_STEPS steps
# of the state's: honest states differ by a few percent per step (Adam moves each weight by about the learning
# rate); another model, another run or a random init by about 1.4 (two independent draws).
DIGEST_TOLERANCE = 0.5
DIGEST_STEPS = 2
INITIAL_TOLERANCE = 1e-4  # a state at step 0 must be the config's own initial model
DONOR_LOOKUP_SECONDS = 15.0  # reading the donor registry from the DHT; a download then has its own timeouts
MAX_DONORS_TRIED = 8
DECLARE_INTERVAL = 1.0  # seconds between two stores of this peer's donor entry, at least
REFUSED_DONOR_SECONDS = 600.0  # a donor whose state was refused is tried after all others for this long

Check = Callable[[dict, Sequence[torch.Tensor]], "str | None"]


class Unplaced(str):
    """A refusal that says nothing against the donor: the state's step is not one our view of the swarm places
    (a donor that has just stepped, seen through progress records fetched a moment earlier)."""


class _VerifiedDownload(DecentralizedAverager):
    """Mixin placed between TrainingStateAverager and DecentralizedAverager in the MRO (see verified_state_averager)."""

    state_check: Check | None = None  # set by the owner in the parent process
    loaded_from: bytes | None = None  # the donor of the last state that passed the check (None: none did)
    loaded_epoch: int | None = None  # the step of that state
    download_seconds: float = 0.0  # how long the download of the last state that passed the check took
    owner_subkey: bytes | None = None  # "[owner:<public key>]" of this peer's DHT key: signs its donor entry
    vouch: tuple[int, list[float]] | None = None  # a seed serving a checkpoint: (its step, state_digest), published
    refused_until: dict[bytes, float] | None = None  # donor -> until when it is tried last (its state was refused)

    async def _declare_for_download_periodically(self):
        """Offer our state in a signed registry ({prefix}_donors, one entry per owner key, naming the owner's peer
        id), instead of hivemind's unsigned one, where anyone could list or hide any peer.

        The entry is stored again when it changes (sharing switched on or off, a new priority: the epoch) or half
        its lifetime has passed, and at most once a second: hivemind wakes this loop for every tensor that an
        all-reduce updates, and storing on each wake-up was ~10 DHT stores a second per trainer."""
        key = f"{self._matchmaking.group_key_manager.prefix}_donors"
        stored, expiration, last_store = None, -math.inf, -math.inf
        while True:
            now = get_dht_time()
            value = None
            if self.allow_state_sharing:
                vouch = dict(digest_step=self.vouch[0], digest=list(self.vouch[1])) if self.vouch else {}
                # every field spelled out: the DHT's schema check refuses a value that parsing would change
                value = DonorRecord(peer_id=self.peer_id.to_bytes(), priority=float(self.state_sharing_priority),
                                    **vouch).dict()
            due = value != stored or (value is not None and now >= expiration - self.declare_state_period / 2)
            if due and self.owner_subkey is not None:
                if now < last_store + DECLARE_INTERVAL:
                    await asyncio.sleep(last_store + DECLARE_INTERVAL - now)
                    continue
                expiration = now + self.declare_state_period
                asyncio.create_task(asyncio.wait_for(self.dht.store(
                    key, subkey=self.owner_subkey, value=value, expiration_time=expiration, return_future=True),
                    timeout=self.declare_state_period))
                stored, last_store = value, now
            self._state_updated.clear()
            refresh = None  # nothing offered: wait for a change
            if stored is not None:
                refresh = max(0.0, expiration - self.declare_state_period / 2 - get_dht_time())
            try:
                await asyncio.wait_for(self._state_updated.wait(), timeout=refresh)
            except asyncio.TimeoutError:
                pass

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        if not wait:
            raise ValueError("verified state downloads are synchronous")
        refused: list[bytes] = []
        self.loaded_from = None
        now = get_dht_time()
        self.refused_until = {donor: until for donor, until in (self.refused_until or {}).items() if until > now}
        for _ in range(MAX_DONORS_TRIED):
            began, future = time.monotonic(), MPFuture()
            self._outer_pipe.send(("_download_state_from", [], dict(future=future, timeout=timeout,
                                                                     refused=list(refused),
                                                                     last=list(self.refused_until))))
            try:
                result = future.result(timeout=timeout)
            except TimeoutError:
                logger.warning("No state arrived within %s s; keeping this peer's own state for now", timeout)
                future.cancel()
                return None
            if result is None:
                return None
            donor, metadata, tensors = result
            problem = self.state_check(metadata, tensors) if self.state_check is not None else None
            if problem is None:
                self.loaded_from, self.download_seconds = donor, time.monotonic() - began
                self.loaded_epoch = metadata["epoch"]  # (the check made sure it is a step)
                return metadata, tensors
            logger.warning("Refusing the state served by peer %s: %s; trying another peer",
                           PeerID(donor).to_base58(), problem)
            refused.append(donor)
            if not isinstance(problem, Unplaced):
                self.refused_until[donor] = get_dht_time() + REFUSED_DONOR_SECONDS
        logger.warning("Refused the state of %d donors in a row; keeping this peer's own state", len(refused))
        return None

    async def _download_state_from(self, future: MPFuture, timeout: float | None, refused: list[bytes],
                                   last: list[bytes] = ()):
        """Runs in the averager's process: the first donor (by priority, then at random; those in ``last`` after
        all others) that serves a state."""
        try:
            try:
                donors = await asyncio.wait_for(self._donors(refused, last), DONOR_LOOKUP_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("The state-donor registry did not answer within %.0f s", DONOR_LOOKUP_SECONDS)
                return
            for peer in donors:
                try:
                    metadata, tensors = await self._download_from(peer, timeout)
                except Exception as error:
                    logger.warning("Could not download the state from %s: %s", peer, repr(error)[:200])
                    continue
                if metadata is not None:
                    _settle(future, (peer.to_bytes(), metadata, tensors))
                    return
                logger.warning("Could not download the state from %s: it served none", peer)
        finally:
            _settle(future, None)

    async def _donors(self, refused: list[bytes], last: Sequence[bytes] = ()) -> list[PeerID]:
        key = f"{self._matchmaking.group_key_manager.prefix}_donors"
        found = await self.dht.get(key, latest=True, return_future=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        ranked = []
        for subkey, item in entries.items():
            donor = _donor(subkey, item.value if isinstance(item, ValueWithExpiration) else None)
            if donor is None or donor[1].to_bytes() in refused or donor[1] == self.peer_id:
                continue
            ranked.append((donor[1].to_bytes() not in last, donor[0], random.random(), donor[1]))
        ranked.sort(key=lambda entry: entry[:3], reverse=True)
        return [peer for *_, peer in ranked[:MAX_DONORS_TRIED]]

    async def _download_from(self, peer: PeerID, timeout: float | None) -> tuple[Any, list[torch.Tensor]]:
        logger.info("Downloading the state from peer %s", peer)
        chunk_timeout = self.next_chunk_timeout or self.request_timeout  # per chunk, as hivemind intends
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()), chunk_timeout)
        metadata, parts, tensors = None, [], []
        async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:  # a dtype marks the start of the next tensor
                tensors.append(_tensor_from(parts, len(tensors)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(_tensor_from(parts, len(tensors)))
        return metadata, tensors


def _tensor_from(parts: list, index: int) -> torch.Tensor:
    """One tensor of a downloaded state from its streamed parts; a stream that broke off mid-tensor (seen as
    torch's "shape '[1024, 256]' is invalid for input of size 98304") says so."""
    try:
        return deserialize_torch_tensor(combine_from_streaming(parts))
    except Exception as error:
        raise ValueError(f"tensor {index} arrived incomplete or malformed ({error})") from None


def _settle(future: MPFuture, result: Any) -> None:
    """Set the result unless the caller already gave up (timed out) or it is set."""
    if not future.done():
        try:
            future.set_result(result)
        except InvalidStateError:
            pass


def _donor(subkey: object, value: object) -> tuple[float, PeerID] | None:
    """(priority, peer id) of a donor entry whose peer id belongs to the key that signed it; else None."""
    prefix = b"[owner:"
    if not (isinstance(subkey, bytes) and subkey.startswith(prefix) and subkey.endswith(b"]")):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("peer_id"), bytes):
        return None
    priority = value.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not math.isfinite(priority):
        return None
    try:
        owner = peer_id_of(subkey[len(prefix):-1])
    except Exception:
        return None
    return (float(priority), owner) if owner.to_bytes() == value["peer_id"] else None


def verified_state_averager(cls: type, *, owner_subkey: bytes | None = None) -> type:
    """``cls`` (a TrainingStateAverager or subclass) with verified downloads and a signed donor entry (under
    ``owner_subkey``, the ``[owner:...]`` subkey of this peer's DHT key; None: never offer state). Keeps
    ``cls.__name__`` because hivemind names its RPC handlers after the class."""
    verified = type(cls.__name__, (cls, _VerifiedDownload), {"__module__": __name__, "owner_subkey": owner_subkey})
    verified.__qualname__ = f"verified_state_averager.<{cls.__name__}>"
    return verified


def digest_coordinates(sizes: Sequence[int], count: int = DIGEST_SIZE) -> list[tuple[int, int]]:
    """``count`` fixed (tensor index, flat index) pairs, uniform over all values, the same on every peer."""
    total = sum(sizes)
    generator = random.Random(f"swarm-digest-{total}")
    offsets, start = [], 0
    for size in sizes:
        offsets.append(start)
        start += size
    picks = sorted(generator.randrange(total) for _ in range(min(count, total)))
    coordinates, tensor = [], 0
    for flat in picks:
        while tensor + 1 < len(sizes) and flat >= offsets[tensor + 1]:
            tensor += 1
        coordinates.append((tensor, flat - offsets[tensor]))
    return coordinates


def state_digest(tensors: Sequence[torch.Tensor]) -> list[float]:
    """The values of ``tensors`` at the digest coordinates (see digest_coordinates)."""
    with torch.no_grad():
        flat = [t.detach().reshape(-1) for t in tensors]
        coordinates = digest_coordinates([t.numel() for t in flat])
        picked = [flat[i][j].float() for i, j in coordinates]
        return torch.stack(picked).cpu().tolist() if picked else []  # one device sync


def digest_scales(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Per digest coordinate, the scale of the tensor it lies in (its RMS in ``tensors``, at least the median RMS
    of all tensors): distances are measured in these units, so that LayerNorm gains near 1 do not drown the
    differences of weights near 0.02, and biases near 0 do not magnify noise."""
    with torch.no_grad():
        rms = [float(t.detach().float().pow(2).mean().sqrt()) if t.numel() else 0.0 for t in tensors]
        floor = float(torch.tensor(rms).median()) if rms else 1.0
        floor = floor if floor > 0 else 1.0
        coordinates = digest_coordinates([t.numel() for t in tensors])
        return [max(rms[i], floor) for i, _ in coordinates]


class StateCheck:
    """Checks a downloaded (metadata, tensors) against our own state's layout and the swarm's published digests.

    ``local_tensors``: our parameters (+ extras) then our optimizer's flat tensors, in the order hivemind sends them;
    ``swarm_view``: (the highest step the trainers' records support or None, {step: trainers' digests});
    ``seed_vouch``: (step, digest) of the checkpoint the swarm's seed serves, or None (see seed_vouch).
    """

    def __init__(self, *, num_parameters: int, local_tensors: Callable[[], list[torch.Tensor]],
                 second_moments: Callable[[], set[int]], initial_digest: list[float], scales: list[float],
                 swarm_view: Callable[[], tuple[int | None, dict[int, list[list[float]]]]],
                 seed_vouch: Callable[[], tuple[int, list[float]] | None] = lambda: None):
        self.num_parameters, self.local_tensors, self.second_moments = num_parameters, local_tensors, second_moments
        self.initial_digest, self.swarm_view, self.seed_vouch = initial_digest, swarm_view, seed_vouch
        self.scales = torch.tensor(scales)

    def __call__(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        if not isinstance(metadata, dict) or isinstance(metadata.get("epoch"), bool) \
                or not isinstance(metadata.get("epoch"), int) or metadata["epoch"] < 0:
            return "its metadata has no valid step"
        epoch, (bound, digests) = metadata["epoch"], self.swarm_view()
        if bound is not None and epoch > bound:
            return Unplaced(f"it claims step {epoch}, but the swarm's progress records support at most {bound}")
        problem = self._layout(tensors)
        if problem is None:
            problem = self._agreement(digests, epoch, tensors[: self.num_parameters])
        return problem

    def _layout(self, tensors: Sequence[torch.Tensor]) -> str | None:
        expected = self.local_tensors()
        if len(tensors) != len(expected):
            return f"it has {len(tensors)} tensors, this swarm's state has {len(expected)}"
        second_moments = self.second_moments()
        for index, (got, want) in enumerate(zip(tensors, expected)):
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                return f"tensor {index} has shape {tuple(getattr(got, 'shape', ()))}, expected {tuple(want.shape)}"
            if got.dtype.is_floating_point != want.dtype.is_floating_point:
                return f"tensor {index} has dtype {got.dtype}, expected {want.dtype}"
            if got.dtype.is_floating_point and not torch.isfinite(got).all():
                return f"tensor {index} has non-finite values"
            if index - self.num_parameters in second_moments and bool((got < 0).any()):
                return f"tensor {index} (Adam's second moment) has negative values"
        return None

    def _agreement(self, digests: dict[int, list[list[float]]], epoch: int,
                   parameters: Sequence[torch.Tensor]) -> str | None:
        ours = torch.tensor(state_digest(parameters))
        if epoch == 0:  # nobody has stepped yet: it must be the model the config builds
            distance = self._distance(ours, torch.tensor(self.initial_digest))
            if not distance <= INITIAL_TOLERANCE:
                return f"it claims step 0, but its parameters are not the config's initial model (distance {distance:.3g})"
            return None
        near = [d for step, ds in digests.items() if abs(step - epoch) <= DIGEST_STEPS for d in ds]
        published = sum(len(ds) for ds in digests.values())
        if len(near) < 2 and published >= 2:  # (one near, if it is the donor's own, would vouch for itself)
            return Unplaced(f"it claims step {epoch}, but fewer than two of the {published} trainers' records are "
                            "near that step")
        witnesses, logged = f"what {len(near)} trainers publish near step {epoch}", f"{len(near)} trainers' digests"
        if not near:  # no trainer can vouch (none publishes, or the one that does is elsewhere): only the seed can
            seed = self.seed_vouch()
            if seed is None or seed[0] != epoch:
                who = "no trainer publishes a digest" if not published else "the one trainer publishing a digest " \
                    "is not near that step"
                where = "" if seed is None else f", and the checkpoint the seed serves is at step {seed[0]}"
                return Unplaced(f"nobody vouches for step {epoch}: {who}{where}")
            near, witnesses = [seed[1]], f"the digest of the checkpoint the seed serves at step {epoch}"
            logged = "the seed's checkpoint digest"
        # the one trainer publishing (it may be the donor), or the median of two or more (it outvotes a liar)
        distance = self._distance(ours, torch.tensor(near).median(dim=0).values)
        logger.info("Downloaded state at step %d vs %s: relative distance %.4f", epoch, logged, distance)
        if not distance <= DIGEST_TOLERANCE:
            return (f"its parameters differ from {witnesses} "
                    f"(relative distance {distance:.3g}, allowed {DIGEST_TOLERANCE})")
        return None

    def _distance(self, ours: torch.Tensor, reference: torch.Tensor) -> float:
        """Relative distance of two digests, each coordinate in units of its tensor's scale."""
        if ours.shape != reference.shape or reference.shape != self.scales.shape:
            return math.inf
        ours, reference = ours / self.scales, reference / self.scales
        return float((ours - reference).norm() / reference.norm().clamp_min(1e-12))


def second_moment_indices(optimizer: torch.optim.Optimizer) -> set[int]:
    """Positions of Adam's ``exp_avg_sq`` tensors among the optimizer's flat tensors (hivemind's flattening order)."""
    indices, position = set(), 0
    for path, leaf in _flatten_with_paths(optimizer.state_dict()):
        if isinstance(leaf, torch.Tensor):
            if path and path[-1] in ("exp_avg_sq", "max_exp_avg_sq"):
                indices.add(position)
            position += 1
    return indices


def _flatten_with_paths(node: Any, path: tuple = ()):
    """hivemind.utils.nested.nested_flatten's order (dicts by sorted key), with each leaf's path."""
    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _flatten_with_paths(item, path)
    elif isinstance(node, dict):
        for key, value in sorted(node.items()):
            yield from _flatten_with_paths(value, path + (key,))
    else:
        yield path, node


def records_bounds(dht: hivemind.DHT, run_id: str,
                   own_subkey: bytes | None = None) -> tuple[int | None, dict[int, list[list[float]]]]:
    """From the trainers' signed progress records: the highest step claimed by at least two trainers + 1, and the
    digests the other trainers publish by step. The bound is None when fewer than two trainers other than us
    (``own_subkey``) publish: our own record can witness a step one past ours, but a peer alone with one other
    trainer, which it fell behind by two steps or more, would otherwise refuse that trainer's state. Our own digest
    is left out: it is of the state we are replacing, and counted as a trainer far from the donor's step it made a
    joiner alone with one trainer refuse that trainer's state for good."""
    from swarm.progress import read_trainer_records

    return swarm_view(read_trainer_records(dht, run_id), own_subkey)


def swarm_view(found: dict[bytes, Any], own_subkey: bytes | None = None
               ) -> tuple[int | None, dict[int, list[list[float]]]]:
    """records_bounds of the trainers' records ``found`` (TrainerRecord by subkey)."""
    records = list(found.values())
    steps = sorted((record.step for record in records), reverse=True)
    bound = steps[1] + 1 if len([subkey for subkey in found if subkey != own_subkey]) >= 2 else None
    digests: dict[int, list[list[float]]] = {}
    for subkey, record in found.items():
        if record.digest and subkey != own_subkey:
            digests.setdefault(record.digest_step, []).append(list(record.digest))
    return bound, digests


def seed_vouch(dht: hivemind.DHT, prefix: str, seed_key: bytes | None) -> tuple[int, list[float]] | None:
    """(step, digest) of the checkpoint the swarm's seed serves, from its donor entry in ``{prefix}_donors``, which
    only ``seed_key`` (the public key that signs the swarm config) can write; None when it serves none."""
    if seed_key is None:
        return None
    found = dht.get(f"{prefix}_donors", latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    item = entries.get(RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", seed_key))
    try:
        record = DonorRecord.parse_obj(item.value if isinstance(item, ValueWithExpiration) else None)
    except ValueError:
        return None
    return (record.digest_step, list(record.digest)) if len(record.digest) == DIGEST_SIZE else None


def check_downloads(averager, *, dht: hivemind.DHT, run_id: str, seed_key: bytes | None = None) -> None:
    """Make ``averager`` (built from verified_state_averager) check every state it downloads; call in its owner's
    process once it is built. ``seed_key``: the public key that signs the swarm config (see seed_vouch)."""
    from hivemind.optim.state_averager import dump_optimizer_state

    def parameters() -> list[torch.Tensor]:
        groups = averager.optimizer.param_groups
        return [p for group in groups for p in group["params"]] + list(averager.extra_tensors)

    num_parameters = len(parameters())
    averager.state_check = StateCheck(
        num_parameters=num_parameters, initial_digest=state_digest(parameters()), scales=digest_scales(parameters()),
        local_tensors=lambda: parameters() + list(dump_optimizer_state(averager.optimizer)[1]),
        second_moments=lambda: second_moment_indices(averager.optimizer),
        swarm_view=lambda: records_bounds(dht, run_id, own_subkey=averager.owner_subkey),
        seed_vouch=lambda: seed_vouch(dht, averager.prefix, seed_key),
    )
