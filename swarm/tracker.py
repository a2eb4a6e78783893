"""A progress tracker that does not believe every peer: hivemind's ProgressTracker with claims bounded.

hivemind's ``ProgressTracker`` takes the largest epoch any peer claims as the swarm's global step, and sums every
peer's claimed samples and throughput into the estimate of when the step ends. A single signed record claiming
epoch 10**12 made honest peers download state and jump their epoch (and learning-rate schedule); a claim of huge
samples or throughput made them step at once. ``BoundedProgressTracker`` reads the same records but:

- an epoch more than one step ahead of this peer is believed only when at least two peers claim it; when there is
  only one other peer, only as far ahead as the time since our own step began allows (a step takes at least one
  matchmaking), so a peer that was paused catches up and a claim of step 10**12 does not move anyone. A record
  with an epoch we do not believe is left out of that refresh: not followed, and its samples do not count;
- a peer whose claims are beyond belief (an epoch ABSURD_STEPS past what we believe, over ABSURD_BATCHES target
  batches of samples, or a throughput ABSURD_RATE times the bound below) is ignored altogether for
  DISTRUST_SECONDS;
- each peer's throughput counts at most ``RATE_FACTOR`` times the median throughput of the swarm (or one target
  batch per matchmaking, if more);
- each peer's accumulated samples count at most the target batch, and at most what its bounded throughput could
  have produced since this step began (plus the refresh slack).

The other side of the first rule: an honest peer can run ahead alone (it started while the others were still
loading, or it was cut off and stepped by itself). The others will not follow it, so it must come back to them: when
at least QUORUM_AHEAD other peers claim steps (in records as fresh as a live peer's: a peer cut off still reads the
records from before the cut) and none is at ours or past it, for ALONE_SECONDS on end (two matchmaking times when
one step ahead; the first peer to finish a step is ahead for a moment, and a peer that fell behind a moment ago is
catching up), or once they have all stepped and are still behind us, ``majority_step`` names the step they support,
and the optimizer downloads their state (see ``SwarmOptimizer``). One step ahead is enough: rounds carry no step, so
a healed trainer one step ahead of the other two paired its rounds with their previous step's, round after round,
while no sync check on either side saw anything to act on. The mirror case: when at least QUORUM_AHEAD other peers,
and at least half of them, claim steps past ours (or the only other peer does, a step ahead or as far as we believe
it), ``behind_since`` says since when; a peer still at the old step a while later has missed the swarm's round (see
``SwarmOptimizer._left_behind``).

For that, peers must see each other's progress while out of sync. hivemind publishes a peer's progress only while
it is in sync with the largest epoch it believes: peers that fell behind a lone leader vanished from everyone's
view, the leader saw nobody, stepped alone every few seconds, and the others chased it without end (their verified
downloads refuse a state only one peer vouches for). Here a peer that has trained publishes its progress always;
one that never trained still waits, as in hivemind, so that newcomers at step 0 do not outvote a running swarm.

Claims that are cut are logged once per peer and claim at WARNING. Not handled: a peer that claims exactly one step
ahead at all times makes honest peers end each step early (smaller steps, never skipped ones).
"""

from __future__ import annotations

import asyncio
import logging
import statistics

from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration, get_dht_time

logger = logging.getLogger(__name__)

RATE_FACTOR = 4.0  # a peer may be this many times faster than the median before its throughput claim is cut
MEASURED_RATE = 1e-6  # samples/s: below this, a rate is hivemind's "not measured yet" (1e-20), not a measurement
QUORUM_AHEAD = 2  # peers that must claim an epoch more than one step ahead of ours before we believe it
# Claims beyond these make a peer's whole record ignored for DISTRUST_SECONDS (not merely bounded): an honest peer
# stops accumulating at about one target batch, and is never thousands of times faster than the bounded rate.
ABSURD_BATCHES = 4
ABSURD_RATE = 1000.0
DISTRUST_SECONDS = 600.0
ABSURD_STEPS = 10_000  # an honest peer runs ahead by a few steps at most, never by thousands
ALONE_STEPS = 3  # global steps' worth of time (at least ALONE_SECONDS) a peer must be alone ahead before it falls back
ALONE_SECONDS = 10.0
ONE_AHEAD_STEPS = 2  # the same for a peer only one step ahead of all the others (matchmaking times; see below)


class BoundedProgressTracker(ProgressTracker):
    def __init__(self, *args, min_step_seconds: float = 1.0, **kwargs):
        self.min_step_seconds = max(min_step_seconds, 0.1)  # no global step is shorter (one matchmaking at least)
        self._epoch_began = get_dht_time()
        self._epoch_of_begin = 0
        self._warned: set[tuple[bytes, str]] = set()
        self._distrusted: dict[bytes, float] = {}  # peer id -> until when its records are ignored
        self.majority_step: int | None = None  # set while we are alone ahead of QUORUM_AHEAD peers (see above)
        self._alone_since: float | None = None
        self._lead_behind: tuple[int, bool] | None = None  # (the others' lead, whether it rose) while all are behind us
        self._behind: tuple[int, float] | None = None  # (our epoch, since when) while the swarm is past it
        self.other_epochs: list[int] = []  # the steps the other trainers claimed in the last refresh
        self.alone_seconds = max(ALONE_SECONDS, ALONE_STEPS * self.min_step_seconds)
        super().__init__(*args, **kwargs)

    async def _progress_reporter(self):
        """Publish our progress when it changes and every metadata_expiration / 2: hivemind's reporter, except that
        a peer out of sync is published too once it has trained (see the module's docstring)."""
        loop, store, last_report = asyncio.get_event_loop(), None, -float("inf")
        try:
            while not self.shutdown_triggered.is_set():
                timeout = max(0.0, last_report + self.metadata_expiration / 2 - get_dht_time())
                await loop.run_in_executor(None, self.should_report_progress.wait, timeout)
                self.should_report_progress.clear()
                if self.shutdown_triggered.is_set():
                    break
                progress, last_report = self.local_progress, get_dht_time()
                if not self._publishes(progress):
                    continue  # a newcomer that has not caught up yet
                store = asyncio.create_task(asyncio.wait_for(self.dht.store(
                    key=self.training_progress_key, subkey=self._local_public_key, value=progress.dict(),
                    expiration_time=last_report + self.metadata_expiration, return_future=True),
                    timeout=self.metadata_expiration))
        finally:
            if store is not None:
                store.cancel()

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        if local_epoch != self._epoch_of_begin:
            self._epoch_of_begin, self._epoch_began = local_epoch, get_dht_time()
        super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)

    def _publishes(self, progress: LocalTrainingProgress) -> bool:
        """Whether our record goes out: once we have trained, or while within a step of the swarm's (a newcomer far
        behind stays out of the others' view until it has caught up)."""
        return self.performance_ema.num_updates > 0 or progress.epoch >= self.global_epoch - 1

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        if isinstance(metadata, dict) and metadata and hasattr(self, "local_progress"):
            metadata = self._with_own(self._bounded(metadata))
        else:
            self._behind, self.other_epochs = None, []  # nobody else in view
        return super()._parse_swarm_progress_data(metadata)

    def _bounded(self, metadata: dict) -> dict:
        entries = {}
        for subkey, item in metadata.items():
            try:
                entries[subkey] = (item, LocalTrainingProgress.parse_obj(item.value))
            except Exception:  # the schema validator already refuses these; never let one break the tracker
                continue
        if not entries:
            return {}
        now = get_dht_time()
        believed = self._believed_epoch([peer for _, peer in entries.values()
                                         if not self._distrusts(peer.peer_id, now)])
        max_rate = self._max_rate([peer.samples_per_second for _, peer in entries.values()])
        elapsed = max(0.0, now - self._epoch_began) + self.max_refresh_period + 1.0
        bounded = {}
        for subkey, (item, peer) in entries.items():
            if self._distrusts(peer.peer_id, now):
                continue
            absurd = {name: getattr(peer, name) for name, too_much in (
                ("epoch", peer.epoch > believed + ABSURD_STEPS),
                ("samples_accumulated", peer.samples_accumulated > ABSURD_BATCHES * self.target_batch_size),
                ("samples_per_second", peer.samples_per_second > ABSURD_RATE * max_rate)) if too_much}
            if absurd:  # a peer caught lying this far is not believed at all for a while
                self._distrust(peer.peer_id, absurd)
                continue
            if peer.epoch > believed:  # ahead of everyone else: not followed (it must come back to us)
                self._warn_once(peer.peer_id, peer, {"epoch": believed}, "Not following peer %s: %s (beyond %s, "
                                "the step other peers support)")
                continue
            changes = {}
            if peer.samples_per_second > max_rate:
                changes["samples_per_second"] = max_rate
            # (at least an eighth of the target: early on our own rate estimate is still low)
            max_samples = min(self.target_batch_size, max(int(max_rate * elapsed), self.target_batch_size // 8))
            if peer.samples_accumulated > max_samples:
                changes["samples_accumulated"] = max_samples
            if peer.time > get_dht_time() + 5.0:
                changes["time"] = get_dht_time()
            if changes:
                self._warn_once(peer.peer_id, peer, changes)
                item = type(item)(peer.copy(update=changes).dict(), item.expiration_time)
            bounded[subkey] = item
        return bounded

    def _with_own(self, bounded: dict) -> dict:
        """The records read, with ours taken from memory (in place of what the DHT holds, or where it holds nothing),
        as long as we publish one. hivemind counts the records as the swarm's peers, us included, and steps alone,
        its round called off, when it counts one. A trainer resumed after a 30 s SIGSTOP (its record had expired
        meanwhile, its new one not yet stored) read only its partner's record: it took the partner for itself,
        stepped twice in a second on the partner's samples without averaging, and from then on its rounds paired
        with the partner's for the step before, until the partner downloaded its state five steps later. And a
        trainer that had run ahead and downloaded the swarm's state read its own record from before the download,
        one step ahead: hivemind's sync check took that step for the swarm's, downloaded again and "caught up" to
        it, labelling the swarm's state with our old step. A record claiming our peer id under another key is
        dropped. (Not in the first read, made while hivemind builds the tracker: a newcomer is not in the swarm
        yet.)"""
        own = self.dht.peer_id.to_bytes()
        if not bounded or not hasattr(self, "global_progress") or not self._publishes(self.local_progress):
            return bounded
        others = {key: item for key, item in bounded.items() if item.value["peer_id"] != own}  # (parsed in _bounded)
        return {**others, self._local_public_key: ValueWithExpiration(
            self.local_progress.dict(), get_dht_time() + self.metadata_expiration)}

    def _max_rate(self, claimed: list[float]) -> float:
        """The throughput we believe of any one peer: RATE_FACTOR times the median of the measured rates (ours and
        the peers'), and never less than one target batch per matchmaking. Peers that have not trained yet report
        ~0: early on the median is ~0, and a bound from it alone once banned honest peers for claiming 6 samples/s."""
        own = self.performance_ema.samples_per_second
        measured = [rate for rate in claimed + [own] if rate > MEASURED_RATE]
        median = statistics.median(measured) if measured else 0.0
        return max(RATE_FACTOR * max(median, own), self.target_batch_size / self.min_step_seconds)

    def _distrusts(self, peer_id: bytes, now: float) -> bool:
        return self._distrusted.get(peer_id, 0.0) > now

    def _distrust(self, peer_id: bytes, claims: dict) -> None:
        if len(self._distrusted) >= 10_000:  # bounded: forget the oldest verdicts first
            self._distrusted.pop(next(iter(self._distrusted)))
        if peer_id not in self._distrusted:
            logger.warning("Ignoring peer %s's progress for %.0f s: implausible claims %s", _short_id(peer_id),
                           DISTRUST_SECONDS, claims)
        self._distrusted[peer_id] = get_dht_time() + DISTRUST_SECONDS

    def _believed_epoch(self, peers: list[LocalTrainingProgress]) -> int:
        """The largest epoch we believe: ours + 1 from anyone (the first peer to finish a step is one ahead for a
        moment); beyond that, only an epoch that QUORUM_AHEAD peers claim (at least)."""
        own, now = self.local_progress.epoch, get_dht_time()
        claims, others = self._claims(peers), self._other_trainers(peers)
        self.other_epochs, ahead, alone = claims, False, False
        if len(claims) >= QUORUM_AHEAD:
            supported = claims[QUORUM_AHEAD - 1]
            # nobody else is at our step: we ran ahead alone, and the swarm is elsewhere. The clock below runs only
            # on records as fresh as a live peer's: a trainer cut off reads the ones its DHT still holds, frozen
            # where the swarm was when the link went (one fell back 20 s into a cut, "the swarm is at step 0", and
            # spent the rest of it trying to download)
            ahead = claims[0] < own
            alone = ahead and all(p.time >= now - self._fresh_seconds for p in others)
        elif claims:  # one other peer: believe it as far as the time since our step began allows
            supported = self._lone_belief(claims[0])
        else:
            supported = own
        if not self._past_our_step(claims):
            self._behind = None
        elif self._behind is None or self._behind[0] != own:
            self._behind = (own, now)
        if not alone or self._alone_since is None:
            self._alone_since = now if alone else None
        followed_behind = self._stepped_behind_us(claims if ahead else [], others)
        # One step ahead: a shorter wait, as each of our rounds meanwhile pairs with the others' previous step, but
        # only once our step has lasted a matchmaking time (the others step a moment after us when we all finish a
        # step; a trainer that came back from a cut stepped alone as the swarm stepped, and its alone-clock had
        # run through the cut, on records its DHT still held).
        far = bool(claims) and claims[0] < own - 1
        wait = self.alone_seconds if far else min(self.alone_seconds, ONE_AHEAD_STEPS * self.min_step_seconds)
        settled = far or now - self._epoch_began >= self.min_step_seconds
        waited = alone and settled and now - self._alone_since >= wait
        self.majority_step = supported if waited or followed_behind else None
        return max(own + 1, supported)

    def _stepped_behind_us(self, claims: list[int], others: list[LocalTrainingProgress]) -> bool:
        """Whether the other trainers, all behind us (``claims``, empty when not), have stepped since we first saw
        them there and are still behind: they are not about to catch up, they follow their own steps. That is the
        runaway's mark, and it shows across our steps: a healed trainer one step ahead paired each round with the
        others' previous step, all of them stepping together, so none of its steps lasted the matchmaking time the
        rule above waits for (with tiny.yaml's 3-4 s steps, and the tracker paused during each step). Where we first
        saw them may be a record its trainer has not refreshed for a while (one waiting out a round for us, or one
        frozen in our DHT while we were cut off); that they stepped and are still behind is read from records they
        published after our own step began: no peer in our last round reports our previous step after it."""
        if not claims:
            self._lead_behind = None
        elif self._lead_behind is None or claims[0] < self._lead_behind[0]:
            self._lead_behind = (claims[0], False)
        elif claims[0] > self._lead_behind[0] and all(p.time >= self._epoch_began for p in others):
            self._lead_behind = (claims[0], True)  # (records from before our step: they may be finishing it with us)
        return self._lead_behind is not None and self._lead_behind[1]

    @property
    def _fresh_seconds(self) -> float:
        """How old a record's ``time`` may be for it to show where a live trainer is. ``time`` is the trainer's last
        report (one per micro-batch), kept as it was when the record is republished; a trainer blocked in a long
        round looks stale as well, and the rules that use this then wait for fresher records."""
        return self.metadata_expiration / 2 + self.max_refresh_period + 1.0

    def _claims(self, peers: list[LocalTrainingProgress]) -> list[int]:
        """The steps the other trainers claim, largest first."""
        return sorted((p.epoch for p in self._other_trainers(peers)), reverse=True)

    def _other_trainers(self, peers: list[LocalTrainingProgress]) -> list[LocalTrainingProgress]:
        own = self.dht.peer_id.to_bytes()
        return [p for p in peers if not p.client_mode and p.peer_id != own]

    def _lone_belief(self, claim: int) -> int:
        """How far we believe the only other trainer: as far as the time since our step began allows."""
        elapsed = max(0.0, get_dht_time() - self._epoch_began)
        return min(claim, self.local_progress.epoch + 1 + int(elapsed / self.min_step_seconds))

    def _past_our_step(self, claims: list[int]) -> bool:
        """Whether the swarm is done with our step: QUORUM_AHEAD other trainers, and half of them, are past it, or
        the only other trainer is, as far as we believe it (its round for our step is over: ours could only pair
        with its round for the next step; nobody else is there to outvote a liar, nor to be misled by one)."""
        own = self.local_progress.epoch
        if len(claims) == 1:
            return own < claims[0] <= self._lone_belief(claims[0])
        past = sum(own < claim <= own + ABSURD_STEPS for claim in claims)
        return past >= QUORUM_AHEAD and 2 * past >= len(claims)

    def behind_since(self, epoch: int) -> float | None:
        """Since when (DHT time) at least QUORUM_AHEAD other peers, and at least half of them, or the only other
        peer, have claimed steps past ``epoch``, as last seen while we were at ``epoch``; None if they do not."""
        behind = self._behind
        return behind[1] if behind is not None and behind[0] == epoch else None

    def only_one_past(self, epoch: int) -> bool:
        """Whether, in the last refresh, exactly one of two or more other trainers was past ``epoch``: a lone peer
        ahead, which the others do not follow (it comes back to them, see ``majority_step``). The others may show
        a step behind ours: right after a round, a partner's record can still be at the step before."""
        claims = self.other_epochs
        return len(claims) >= QUORUM_AHEAD and sum(c > epoch for c in claims) == 1

    def past_our_step(self, records: list[LocalTrainingProgress]) -> bool:
        """``behind_since``'s rule on records read from the DHT by the caller: hivemind pauses our refreshes for
        the whole global step, while our gradient round looks for its group (peers we distrust do not count)."""
        now = get_dht_time()
        return self._past_our_step(self._claims([peer for peer in records if not self._distrusts(peer.peer_id, now)]))

    def _warn_once(self, peer_id: bytes, peer: LocalTrainingProgress, changes: dict,
                   message: str = "Bounding the progress claims of peer %s: %s (to %s)") -> None:
        """One WARNING per peer and claim (bounded memory: at most 10,000 entries)."""
        new = [name for name in changes if (peer_id, name) not in self._warned]
        if not new or len(self._warned) > 10_000:
            return
        self._warned.update((peer_id, name) for name in new)
        logger.warning(message, _short_id(peer_id), {name: getattr(peer, name) for name in new},
                       {name: changes[name] for name in new})


def _short_id(peer_id: bytes) -> str:
    try:
        from hivemind.p2p import PeerID

        return PeerID(peer_id).to_base58()[-8:]
    except Exception:
        return peer_id.hex()[:16]
