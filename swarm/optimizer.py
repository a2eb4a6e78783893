"""hivemind.Optimizer set up from the swarm config, recording how each global step's averaging went.

The subclass wraps the three places where hivemind decides between averaged and local gradients, and records a
``Round`` for every global step, so "trained alone while looking healthy" shows up in logs and metrics; after a
round that failed it steps with the peer's own gradients (hivemind's fallback used zeros). It also changes how a
peer catches up: one that ran ahead alone goes back to the swarm's step; one left behind downloads the state
without waiting for a step of its own (``_left_behind``); a download waits out an imminent end of the swarm's step
and is followed at once by looking for the swarm's current round (``load_state_from_peers``); and rounds the
swarm has left behind, or that find no group once the peer is leaving, are called off rather than held until their
timeout (``call_off_stale_round``, ``call_off_stale_gradient_round``, ``call_off_rounds_when_leaving``); so is
any round once no other trainer is left (``call_off_rounds_alone``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from concurrent.futures import CancelledError, InvalidStateError
from functools import partial
from typing import Callable, Iterable

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.access import MemberGate, gated_averager
from swarm.compression import build_compression, counting_averager
from swarm.config import AveragingConfig, OptimizerConfig, TimeoutsConfig
from swarm.rounds import PartialRoundWatch, Round, RoundLog
from swarm.state import check_downloads, verified_state_averager
from swarm.tracker import ABSURD_STEPS, QUORUM_AHEAD, BoundedProgressTracker

logger = logging.getLogger(__name__)
FALLBACK_RETRY_SECONDS = 30.0  # after failing to fetch the swarm's state, a peer ahead or behind waits this long
STALE_ROUND_POLL_SECONDS = 1.0  # how often a trainer checks whether its parameter round has been left behind
PROGRESS_READ_SECONDS = 5.0  # (the check's DHT read; a DHT process that is gone would never answer)
PROGRESS_READ_REUSE_SECONDS = STALE_ROUND_POLL_SECONDS / 2  # one DHT read serves all the checks of a poll
JOIN_MARGIN_SECONDS = 1.0  # a round joined during a download must have this long left to find its group


class _RemembersLastRound(DecentralizedAverager):
    """Mixin placed below TrainingStateAverager in the MRO (hivemind starts every state-averaging round, scheduled
    or not, through ``super().step``): remembers the last round begun in the background, so that a trainer about
    to leave or to download the swarm's state can call off a round still looking for a group instead of waiting
    out its timeout (``SwarmOptimizer.call_off_lonely_round``)."""

    last_round: StepControl | None = None
    last_round_epoch: int | None = None  # the epoch the round is for (its peers' epoch once they have stepped)

    def step(self, *args, **kwargs):
        control = super().step(*args, **kwargs)
        if isinstance(control, StepControl):
            self.last_round, self.last_round_epoch = control, kwargs.get("gather")
        return control


class _SwarmGradientAverager(GradientAverager):
    """hivemind's gradient averager, with two changes:

    - every round gathers the step it is for (``round_epoch``, set by the optimizer), so a peer can tell which
      step's round its group was in (see ``SwarmOptimizer._join_the_round_while_downloading``);
    - it downloads no state. No trainer shares its gradients (``allow_state_sharing=False``), yet hivemind's
      optimizer asks it to download after every state download: that read the gradient averagers' unsigned donor
      registry from the DHT for nothing (and said "could not load state from peers" at INFO); had anyone listed
      itself there, the newcomer would have downloaded whatever it served, unchecked, and dropped it."""

    round_epoch: Callable[[], int] | None = None

    def schedule_step(self, scheduled_time=None, **kwargs) -> StepControl:
        if "gather" not in kwargs and self.round_epoch is not None:
            kwargs["gather"] = self.round_epoch()
        return super().schedule_step(scheduled_time, **kwargs)

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None):
        return None


_SwarmGradientAverager.__name__ = GradientAverager.__name__  # hivemind names its RPC handlers after the class


class SwarmOptimizer(hivemind.Optimizer):
    leaving: threading.Event | None = None  # set once the peer is leaving (the trainer's stop event)

    def __init__(self, *, round_log: RoundLog, partial_watch: PartialRoundWatch, gate: MemberGate | None = None,
                 owner_subkey: bytes | None = None, seed_key: bytes | None = None, **kwargs):
        self.round_log, self.partial_watch = round_log, partial_watch
        self._gate = gate  # private swarms: averagers serve members only
        self._owner_subkey = owner_subkey  # signs this peer's entry in the state-donor registry
        self._seed_key = seed_key  # signs the swarm config: vouches for a checkpoint it serves (swarm.state)
        self._partial_seen = partial_watch.count
        self._recorded_epoch = -1
        self._joined = False
        self._fallback_retry_at = 0.0
        self._grads_in_averager = False  # our gradients are in the averager for a round that began
        self._joined_round: tuple[StepControl, int] | None = None  # (round, step) joined with weight 0 to download
        self._stop_watching, self._stale_watch = threading.Event(), None
        self._first_seen: dict[bytes, tuple[int, float]] = {}  # trainer -> (epoch, its record's time when first seen)
        self._progress_read: tuple[float, tuple] = (-math.inf, ())  # (when, what) of the last _other_progress read
        super().__init__(**kwargs)
        this = weakref.ref(self)  # (the optimizer must stay collectable: see _watch_for_stale_rounds)
        self.grad_averager.round_epoch = lambda: this().local_epoch
        self._stale_watch = threading.Thread(target=_watch_for_stale_rounds, args=(weakref.ref(self),
                                             self._stop_watching), daemon=True, name="stale-round-watch")
        self._stale_watch.start()

    def shutdown(self):
        self._stop_watching.set()
        if self._stale_watch is not None:
            self._stale_watch.join(timeout=PROGRESS_READ_SECONDS + 1.0)
        # hivemind cancels a round whose stage still reads "looking for a group" without asking whether it is over:
        # one called off a moment ago (by the watch, say) then raised InvalidStateError out of shutdown
        if self.scheduled_grads is not None and self.scheduled_grads.done():
            self.scheduled_grads = None
        if self.scheduled_state is not None and self.scheduled_state.done():
            self.scheduled_state = None
        if self._joined_round is not None and _looking_for_group(self._joined_round[0]):
            _cancel(self._joined_round[0])
        super().shutdown()

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        verified = verified_state_averager(TrainingStateAverager, owner_subkey=self._owner_subkey)
        remembering = type(verified.__name__, (verified, _RemembersLastRound), {"__module__": __name__})
        state_cls = gated_averager(counting_averager(remembering, "state"), self._gate)
        averager = state_cls(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs,
        )
        check_downloads(averager, dht=self.dht, run_id=self.run_id, seed_key=self._seed_key)
        return averager

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> BoundedProgressTracker:
        return BoundedProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                      client_mode=self.client_mode, status_loglevel=self.status_loglevel, start=True,
                                      min_step_seconds=self.matchmaking_time, **kwargs)

    def _record(self, outcome: str, group_size: int, reason: str = "", step: int | None = None) -> None:
        step = self.local_epoch if step is None else step
        if self._recorded_epoch == step:
            return  # one record per global step
        self._recorded_epoch = step
        if outcome == "averaged" and self.partial_watch.count > self._partial_seen:
            outcome, reason = "partial", "some peers' parts were missing from the all-reduce"
        self._partial_seen = self.partial_watch.count
        self.round_log.record(Round(step=step, outcome=outcome, group_size=group_size, reason=reason))

    def _should_load_state_from_peers(self) -> bool:
        if self._ran_ahead_alone() is not None or self._left_behind():
            return True
        if self.local_epoch > self.tracker.global_epoch:  # a view fetched before our own download, or peers that
            return False  # have yet to step: nobody has a newer state (hivemind re-downloaded ours, dropping a round)
        # hivemind's once-a-step exact check follows any peer one step ahead, a lone runaway too: a healed trainer
        # and the two others it had paired with swapped steps, each side downloading the other's state in the same
        # second. The runaway comes back to us instead (_ran_ahead_alone).
        if self.tracker.only_one_past(self.local_epoch):
            return False
        return super()._should_load_state_from_peers()

    def _ran_ahead_alone(self) -> int | None:
        """The step the swarm is at, when this peer stepped alone past it (its peers do not follow a lone peer:
        see BoundedProgressTracker) and has not just failed to fetch the swarm's state."""
        majority = getattr(self.tracker, "majority_step", None)
        if majority is None or majority >= self.local_epoch or time.monotonic() < self._fallback_retry_at:
            return None
        return majority

    def _left_behind(self) -> bool:
        """Whether the swarm finished our step without us: at least two other trainers, and half of them (or the only
        other trainer), have been past our step for a matchmaking time, and we have no gradient round in a group.
        hivemind lets a peer one step behind go on (the others may have just stepped) and checks exact sync only
        right after a step of our own: a trainer whose link came back, or a newcomer whose download arrived after
        the swarm's round, went on one step behind, and its next round for the old step fell into the swarm's round
        for the next one (rounds carry no step). Seen as a healed trainer back in sync three steps late, and as a
        pair of trainers one step apart for three rounds after one was resumed from SIGSTOP (that check happened to
        read while they were level). A round already in a group is for the step the others are finishing: we are in
        it, not behind."""
        since = self.tracker.behind_since(self.local_epoch)
        if since is None or get_dht_time() - since < self.matchmaking_time or \
                time.monotonic() < self._fallback_retry_at:
            return False
        control = self.scheduled_grads
        return control is None or _looking_for_group(control) or _failed(control)

    def load_state_from_peers(self, **kwargs) -> None:
        behind_at, majority = self.local_epoch, self._ran_ahead_alone()
        if self._joined:
            self.call_off_lonely_round(grace=0.0, why="downloading the swarm's state instead")
            self._drop_ungrouped_gradient_round()
        self._joined_round = None  # (one joined for an earlier download: over or winding down by itself)
        if majority is not None:
            logger.warning("This peer stepped alone to step %d while the swarm is at step %d; taking the swarm's "
                           "state", behind_at, majority)
            self.state_averager.local_epoch = majority  # (hivemind refuses a state older than our own epoch)
        else:
            if not self._join_the_round_while_downloading():
                self._wait_for_the_step_boundary()
                self._join_the_round_while_downloading()
        super().load_state_from_peers(**kwargs)
        self._step_with_the_joined_round()
        if self._joined and self.state_averager.loaded_from is None:  # no verified state: not again at once
            self._fallback_retry_at = time.monotonic() + FALLBACK_RETRY_SECONDS
        if majority is not None and self.state_averager.loaded_from is None:  # keep ours
            self.state_averager.local_epoch = behind_at
            self.tracker.report_local_progress(local_epoch=behind_at, samples_accumulated=0)
            return
        if majority is not None and self.local_epoch != self.state_averager.loaded_epoch:
            # hivemind "caught up" with the step after the one downloaded, as its view of the swarm (our own record
            # included) was one step further: our own lead. That labelled the swarm's state with our step.
            self.state_averager.local_epoch = self.state_averager.loaded_epoch
            self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
        if self._joined:  # mid-run: the gradients this peer accumulated were dropped
            where = "ran ahead of the swarm alone" if majority is not None else "fell behind the swarm"
            got = (f"downloaded its state at step {self.state_averager.loaded_epoch}"
                   if self.state_averager.loaded_from is not None
                   else "no peer served a state that passed the checks")
            self._record("skipped", 1, f"{where}; {got}", step=behind_at)
        if self.state_averager.loaded_from is not None:
            # hivemind's once-a-step sync check must read a view fetched after the download, not the one before it
            self.tracker.fetched_global_progress_this_epoch.clear()
            self._look_for_the_current_round()
        self._joined = True

    def _wait_for_the_step_boundary(self) -> None:
        """Before downloading the swarm's state: if the swarm's step ends before a download (as long as the last
        one, or one matchmaking time) and a matchmaking could be done, wait until it has ended (an averaging
        timeout at most). The state would otherwise arrive too late to join the step's round, or one step old:
        seen as a newcomer that downloaded step 7 a second after the swarm stepped to 8, downloaded again, and
        fell into the swarm's next round one step behind. Only while at least two other trainers are at that step:
        with fewer, the step's round may need us (a peer waiting here once left a lone partner failing its rounds
        until the wait ran out; another waited 20 s for a step that two of the three trainers had just left)."""
        tracker = self.tracker
        epoch, due = tracker.global_epoch, tracker.global_progress.eta_next_epoch - get_dht_time()
        if not -self.averaging_timeout < due <= self._download_lead() or not self._quorum_at(epoch):
            return  # (an end long overdue: a swarm that is stalled, or an estimate that is off)
        logger.debug("The swarm's step %d ends in %.1f s: downloading its state after that", epoch, due)
        deadline = time.monotonic() + max(due, 0.0) + self.averaging_timeout
        while tracker.global_epoch <= epoch and time.monotonic() < deadline and self._quorum_at(epoch):
            time.sleep(0.1)

    def _download_lead(self) -> float:
        """How long before the end of the swarm's step a download must begin to land in time for the step's round:
        the last download's duration (a matchmaking time before the first) plus a matchmaking time."""
        return self.matchmaking_time + (self.state_averager.download_seconds or self.matchmaking_time)

    def _quorum_at(self, epoch: int) -> bool:
        """Whether at least QUORUM_AHEAD other trainers are at ``epoch`` or past it, in the tracker's last view."""
        return sum(claim >= epoch for claim in self.tracker.other_epochs) >= QUORUM_AHEAD

    def _join_the_round_while_downloading(self) -> bool:
        """Before a download that would land within a matchmaking time of the end of the swarm's step: join that
        step's gradient round now, with weight 0 (we have no gradients for it), so that its group forms while the
        state downloads. The round brings the swarm's averaged gradients for the step the download brings; once the
        state has landed, the peer takes the step with them and is at the swarm's next step, in sync
        (``_step_with_the_joined_round``), instead of looking for the step's group after the download, when it has
        formed without us. Seen: a newcomer whose 3 s download landed 1 s before the end of a 4 s step (tiny.yaml)
        stepped alone once. Returns whether it joined; only while two other trainers are at the step (as
        ``_wait_for_the_step_boundary``).

        The round declares itself due at the step's end or a matchmaking time from now, whichever is later: after
        the others, who began looking earlier, so that it joins their group rather than lead one of its own. It
        gives up a moment after that, and what it brings is used only if its group gathered this step: rounds
        carry no step, and one still looking once the swarm has stepped could fall into the next step's round."""
        if self.use_local_updates or self.auxiliary or not self.use_gradient_averaging:
            return False
        epoch, eta, now = self.tracker.global_epoch, self.tracker.global_progress.eta_next_epoch, get_dht_time()
        if not JOIN_MARGIN_SECONDS < eta - now <= self._download_lead() or not self._quorum_at(epoch):
            return False
        scheduled = max(eta, now + self.matchmaking_time)
        control = self.grad_averager.schedule_step(scheduled_time=scheduled, gather=epoch, allow_retries=False,
                                                   timeout=scheduled - now + JOIN_MARGIN_SECONDS)
        control.weight = 0.0
        control.allow_allreduce()  # (runs as soon as the group forms: nobody waits for our download)
        self._joined_round = control, epoch
        logger.debug("Joined the swarm's round for step %d (due in %.1f s) before downloading its state", epoch,
                     eta - now)
        return True

    def _step_with_the_joined_round(self) -> None:
        """After a download: wait for the round joined for it and take the swarm's step with its gradients, if the
        state is at that round's step (the donor may have stepped first) and the round's group gathered that step.
        Otherwise the peer stays at the downloaded step (the swarm may not have finished it; if it has, the peer is
        behind and downloads again). No micro-batch is computed meanwhile: its gradients would not be in the
        round, and hivemind would count its samples towards the step."""
        if self._joined_round is None:
            return
        control, epoch = self._joined_round
        if self.state_averager.loaded_from is None or self.state_averager.loaded_epoch != epoch:
            self._joined_round = None
            return
        try:
            other = self._other_step_in(control.result(timeout=self.averaging_timeout), epoch)
        except BaseException as error:
            other = f"{type(error).__name__}: {error}"[:200]
        if other is not None:
            logger.info("The round joined while downloading the state of step %d did not average that step (%s)",
                        epoch, other)
            self._joined_round = None
            return
        # hivemind labels a state one step behind its view of the swarm with the swarm's step: this one keeps its own
        self.state_averager.local_epoch = epoch
        self._update_global_epoch(grad_scaler=None)  # (uses the joined round: _begin_averaging_gradients)
        logger.debug("Took step %d with the swarm's gradients from the round joined while downloading", epoch)

    def _look_for_the_current_round(self) -> None:
        """After a download (on joining or catching up), start looking for the swarm's round now if it ends
        within the averaging timeout. hivemind starts looking only after the next micro-batch and within one
        matchmaking time of the step's end; a peer that caught up late (or whose micro-batches are slow on a
        loaded machine) then missed the round, ended the step behind, and fell into the next step's round: seen
        as a trainer that downloaded the state every other step. Its trigger comes with its next micro-batch, as
        for any peer in a group."""
        eta = self.tracker.estimated_next_update_time
        now = get_dht_time()
        if self.scheduled_grads is not None or self.use_local_updates or eta - now >= self.averaging_timeout - 1:
            return
        scheduled = max(eta, now + self.grad_averager.matchmaking_kwargs["min_matchmaking_time"])
        logger.debug("Caught up at step %d: looking for the swarm's round, due in %.1f s", self.local_epoch, eta - now)
        self.scheduled_grads = self.grad_averager.schedule_step(scheduled_time=scheduled, timeout=self.averaging_timeout)

    def _drop_ungrouped_gradient_round(self) -> None:
        """Cancel a pre-scheduled gradient round that has no group yet. hivemind would join it with weight 0 and
        wait for the whole round, i.e. until the swarm's current step ends, before downloading: the download then
        brings a state that is already one step old. (A round with a group is still joined with weight 0, as
        hivemind does, so that the group's all-reduce does not wait for our parts.)"""
        control = self.scheduled_grads
        if control is not None and not control.triggered and _looking_for_group(control):
            _cancel(control)  # (the stale-round watch may call it off at the same moment)
            self.scheduled_grads = None

    def call_off_lonely_round(self, grace: float, why: str = "leaving") -> None:
        """Give a background parameter-averaging round ``grace`` seconds to find its group, then cancel it: before
        leaving (the peers it waits for may have left already) or before downloading the swarm's state (the round
        would average parameters the download replaces). hivemind would wait ``averaging_timeout``."""
        control = self.state_averager.last_round  # (_RemembersLastRound)
        deadline = time.monotonic() + grace
        while control is not None and not control.done():
            if not _looking_for_group(control):
                return  # it has a group: let it finish (bounded by averaging_timeout)
            if time.monotonic() >= deadline:
                logger.info("Calling off a parameter averaging round without a group after %.0f s: %s", grace, why)
                _cancel(control)
                return
            time.sleep(0.1)

    def call_off_stale_round(self) -> bool:
        """Cancel the background parameter-averaging round when it is still looking for a group one matchmaking
        time after it should have begun and at least half of the other trainers are done with the step it is for:
        the group it was meant for has averaged without it. Returns whether it was called off.

        A trainer is done with the step when its progress record claims a later one, or when its records have
        shown it at that step for a matchmaking time while our round was looking: had the two of us been in touch,
        our rounds would have grouped by then. hivemind runs the next optimizer step only after that round ends
        (one executor thread), so a trainer cut off from the swarm sat in its step until ``averaging_timeout``
        after its link came back, while the swarm went on: seen as a healed peer back in sync three steps late.
        The check reads the progress records from the DHT itself, because the tracker pauses its updates for the
        whole global step, i.e. while blocked. A trainer still cut off sees no new record and waits out its
        round, so it does not step alone at full speed (and run ahead of the swarm it will come back to)."""
        averager = self.state_averager
        control, epoch = averager.last_round, averager.last_round_epoch  # (_RemembersLastRound)
        if control is None or epoch is None or not _looking_for_group(control) or \
                get_dht_time() < control.scheduled_time + self.matchmaking_time:
            return False
        done, others = self._peers_done(epoch, looking_since=control.scheduled_time - self.matchmaking_time)
        if not done or 2 * done < others or not _looking_for_group(control):
            return False
        logger.info("Calling off the parameter averaging round for step %d, still without a group: %d of %d other "
                    "trainers are done with that step", epoch, done, others)
        return _cancel(control)

    def call_off_stale_gradient_round(self) -> bool:
        """Cancel our gradient round for the current step while it is still looking for a group and the swarm has
        finished that step (at least two other trainers, and half of them, or the only other trainer, are past it;
        see ``behind_since``). Rounds carry no step: it could only fall into the swarm's round for the next step,
        averaging gradients taken at other parameters, and leave this peer one step behind, round after round (seen
        as a newcomer whose download came a second too late for the swarm's round). The peer then steps with its
        own gradients (and downloads the swarm's state if it is still behind: ``_left_behind``).

        Once our step has begun (the round is triggered), hivemind pauses the tracker's refreshes until the step
        ends, so the check reads the progress records from the DHT itself: a trainer resumed from SIGSTOP began its
        step while its partner was level, the partner stepped alone a moment later, and the two rounds paired one
        step apart twice before a download put them level. Returns whether it was called off."""
        control, epoch = self.scheduled_grads, self.local_epoch
        if control is None or not _looking_for_group(control):
            return False
        if self.tracker.behind_since(epoch) is None and not (
                control.triggered and self.tracker.past_our_step(self._other_progress()[0])):
            return False
        if not _looking_for_group(control):  # (it may have found its group during the read)
            return False
        logger.info("Calling off the gradient averaging round for step %d, still without a group: the swarm has "
                    "finished that step", epoch)
        return _cancel(control)

    def call_off_rounds_alone(self) -> bool:
        """Cancel the gradient round our step waits on, and the background parameter round, while still looking for
        a group after they should have begun, once the trainers we were training with have all left: the DHT shows
        no other live progress record (beyond-belief ones aside), and withdrawn records (hivemind's tracker
        withdraws its record when its trainer shuts down) for at least as many trainers as our tracker counted
        besides us at the start of the step. Our tracker's view is a step old (it pauses during the step), so
        hivemind went on looking for the trainers that had just finished their last step, each round until
        ``averaging_timeout``: a trainer whose two partners reached their --max-steps together stalled 21 s, and
        18 s more on its next parameter round. The step then uses our own gradients and parameters.

        Records that are merely missing call nothing off: a trainer cut off from the swarm sees only its own, and
        its rounds waiting out their timeout are what keep it from running ahead alone (see
        ``call_off_stale_round``). So does a read that fails or does not show our own record. Returns whether a
        round was called off."""
        now, rounds = get_dht_time(), []
        grads, params = self.scheduled_grads, self.state_averager.last_round  # (_RemembersLastRound)
        if grads is not None and grads.triggered:  # (one merely scheduled holds nobody up)
            rounds.append(("gradient", grads, self.local_epoch))
        if params is not None:
            rounds.append(("parameter", params, self.state_averager.last_round_epoch))
        rounds = [r for r in rounds if _looking_for_group(r[1]) and now >= r[1].scheduled_time]
        if not rounds:
            return False
        others, seen_own, withdrawn = self._other_progress()
        if not seen_own or any(peer.epoch <= self.local_epoch + ABSURD_STEPS for peer in others) or \
                withdrawn < max(1, self.tracker.global_progress.num_peers - 1):
            return False
        called_off = False
        for kind, control, epoch in rounds:
            if _looking_for_group(control):
                logger.info("Calling off the %s averaging round for step %s: no other trainer is left to average "
                            "with", kind, epoch)
                called_off |= _cancel(control)
        return called_off

    def call_off_rounds_when_leaving(self) -> bool:
        """Once the peer is leaving (``leaving`` is set), cancel a gradient or parameter round still without a group
        a matchmaking time after it should have begun: its partners have left or are not coming, and hivemind would
        hold the departing peer until ``averaging_timeout`` (a trainer whose partner had just left took 15 s to obey
        Ctrl-C, blocked on its parameter round in hivemind's executor). The last step then uses our own gradients.
        Returns whether a round was called off."""
        if self.leaving is None or not self.leaving.is_set():
            return False
        called_off = False
        for kind, control in (("gradient", self.scheduled_grads), ("parameter", self.state_averager.last_round)):
            if control is not None and _looking_for_group(control) and \
                    get_dht_time() >= control.scheduled_time + self.matchmaking_time:
                logger.info("Calling off the %s averaging round, still without a group: leaving", kind)
                called_off |= _cancel(control)
        return called_off

    def _peers_done(self, epoch: int, looking_since: float) -> tuple[int, int]:
        """How many other trainers' progress records in the DHT show them done with ``epoch`` (see
        ``call_off_stale_round``; our round has been looking for a group since ``looking_since``), and how many
        records of other trainers there are. It takes half of them: one trainer alone ahead, or one that lies,
        does not call off our round (an absurd claim is not counted at all)."""
        done, others, first_seen = 0, 0, {}
        for peer in self._other_progress()[0]:
            seen_epoch, seen_at = self._first_seen.get(peer.peer_id, (None, 0.0))
            if seen_epoch != peer.epoch:
                seen_at = peer.time
            first_seen[peer.peer_id] = (peer.epoch, seen_at)
            others += 1
            done += epoch < peer.epoch <= epoch + ABSURD_STEPS or (
                peer.epoch == epoch and peer.time - max(seen_at, looking_since) >= self.matchmaking_time)
        self._first_seen = first_seen  # (only the trainers in this read: bounded by the records)
        return done, others

    def _other_progress(self) -> tuple[list[LocalTrainingProgress], bool, int]:
        """From the DHT itself: the other trainers' live progress records, whether our own is there (if not, the
        read says little about who is), and how many other trainers' records are withdrawn. The checks of one watch
        poll run within milliseconds of each other and share one read."""
        read_at, result = self._progress_read
        if time.monotonic() - read_at >= PROGRESS_READ_REUSE_SECONDS:
            result = self._read_other_progress()
            self._progress_read = (time.monotonic(), result)
        return result

    def _read_other_progress(self) -> tuple[list[LocalTrainingProgress], bool, int]:
        found = self.dht.get(self.tracker.training_progress_key, latest=True, return_future=True).result(
            timeout=PROGRESS_READ_SECONDS)
        if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
            return [], False, 0
        own, others, seen_own, withdrawn = self.dht.peer_id.to_bytes(), [], False, 0
        for subkey, item in found.value.items():
            value = item.value if isinstance(item, ValueWithExpiration) else None
            if value is None:
                withdrawn += subkey != self.tracker._local_public_key
                continue
            try:
                peer = LocalTrainingProgress.parse_obj(value)
            except Exception:
                continue
            if peer.peer_id == own:
                seen_own = True
            else:
                others.append(peer)
        return others, seen_own, withdrawn

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        self._grads_in_averager = False  # (hivemind's own fallback in there must read the accumulators)
        if self._joined_round is not None:  # joined during our download, with weight 0: its result is this step's
            self.scheduled_grads, self._joined_round = self._joined_round[0], None
            return True
        control, peers = self.scheduled_grads, self.tracker.global_progress.num_peers
        began = super()._begin_averaging_gradients(grad_scaler)
        self._grads_in_averager = began  # (GradientAverager.step moved them there and zeroed the accumulators)
        if not began:
            self._record("skipped", 1, _why_no_round(control, peers))
        return began

    def _load_local_gradients_into_optimizer(self) -> None:
        """The fallback after a round that failed or was called off. hivemind reloads the accumulators into the
        averager, but once a round has begun they are zero: it moved our gradients into the averager and reset
        them. Every step after a failed round was taken with zero gradients (Adam's momentum alone) while the log
        said "local gradients". The averager still holds our own gradients (after an all-reduce that broke off
        half-way, some parts already averaged): use those."""
        if self._grads_in_averager:
            self._grads_in_averager = False
            self._load_averaged_gradients_into_optimizer_()
        else:
            super()._load_local_gradients_into_optimizer()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        try:
            if maybe_step_control is None:
                self._record("skipped", 1, "no averaging round was scheduled")
            else:
                group_info = maybe_step_control.result(self.averaging_timeout)
                self._load_averaged_gradients_into_optimizer_()
                self._record("averaged", len(group_info))
                return
        except CancelledError:
            self._record("failed", 1, "called off without a group")
        except BaseException as error:
            self._record("failed", 1, f"{type(error).__name__}: {error}"[:200])
        self._load_local_gradients_into_optimizer()

    def _other_step_in(self, group_info: dict, epoch: int) -> int | None:
        """A step other than ``epoch`` that a groupmate gathered (the step its round was for), if any."""
        own = self.dht.peer_id
        return next((claim for peer, claim in group_info.items()
                     if peer != own and isinstance(claim, int) and claim != epoch), None)


def _why_no_round(control: StepControl | None, peers: int) -> str:
    """Why hivemind began no gradient round at a step, given the round scheduled for it (if any) and the peers its
    tracker counted, this one included (with one, hivemind calls the scheduled round off itself)."""
    if peers > 1 and control is not None:
        if control.cancelled():
            return "its round for this step had been called off"
        if control.done():
            return "the round scheduled for this step had already ended"
        if control.triggered:
            return "the round scheduled for this step was already in use"
    return f"no other peers were ready for this step ({peers} visible, this one included)"


def _looking_for_group(control: StepControl) -> bool:
    """A round not over and without a group yet: calling it off fails nobody's all-reduce."""
    return not control.done() and control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)


def _failed(control: StepControl) -> bool:
    """A round that is over without a result (cancelled, also from another thread, or failed)."""
    if not control.done():
        return False
    try:
        return control.exception(timeout=0) is not None
    except CancelledError:
        return True


def _cancel(control: StepControl) -> bool:
    """Cancel a round from any thread; False if it was called off (or finished) elsewhere in the meantime."""
    try:
        control.cancel()
    except InvalidStateError:
        return False
    return True


def _watch_for_stale_rounds(optimizer_ref: weakref.ref, stop: threading.Event) -> None:
    """The thread behind ``SwarmOptimizer.call_off_stale_round`` and its kin (it holds the optimizer weakly, so that an
    optimizer nobody shut down is still collected, and shut down, by hivemind's ``__del__``)."""
    while not stop.wait(STALE_ROUND_POLL_SECONDS):
        optimizer = optimizer_ref()
        if optimizer is None:
            return
        for check in (optimizer.call_off_rounds_when_leaving, optimizer.call_off_stale_gradient_round,
                      optimizer.call_off_rounds_alone, optimizer.call_off_stale_round):
            try:
                check()
            except Exception as error:  # (a DHT read that timed out, or one shutting down): never end a trainer
                logger.debug("%s failed: %s", check.__name__, error)
        del optimizer, check


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    dht: hivemind.DHT,
    private_key: RSAPrivateKey,
    run_id: str,
    batch_size: int,
    client_mode: bool,
    optim: OptimizerConfig,
    averaging: AveragingConfig,
    timeouts: TimeoutsConfig,
    round_log: RoundLog,
    partial_watch: PartialRoundWatch,
    gate: MemberGate | None = None,
    seed_key: bytes | None = None,
) -> SwarmOptimizer:
    def codec(name: str):
        return build_compression(name, size_threshold=averaging.size_threshold)

    averager_opts = dict(request_timeout=timeouts.request, part_size_bytes=averaging.part_size_bytes)
    # hivemind passes averager_opts to the state averager only. allow_state_sharing=False: joiners need
    # parameters and optimizer state, not others' half-accumulated gradients, which hivemind would otherwise
    # download in fp32 and throw away.
    grad_cls = gated_averager(counting_averager(_SwarmGradientAverager, "grad"), gate)
    grad_averager = partial(grad_cls, allow_state_sharing=False, **averager_opts)

    return SwarmOptimizer(
        round_log=round_log,
        partial_watch=partial_watch,
        gate=gate,
        owner_subkey=RSASignatureValidator(private_key).local_public_key,
        seed_key=seed_key,
        dht=dht,
        run_id=run_id,
        target_batch_size=averaging.target_batch_size,
        batch_size_per_step=batch_size,
        params=list(params),
        optimizer=optimizer_factory(optim),
        scheduler=scheduler_factory(optim),
        matchmaking_time=timeouts.matchmaking,
        averaging_timeout=timeouts.averaging,
        next_chunk_timeout=timeouts.next_chunk,
        load_state_timeout=timeouts.load_state,
        offload_optimizer=averaging.offload_optimizer,
        delay_optimizer_step=averaging.delay_optimizer_step,
        delay_grad_averaging=averaging.delay_grad_averaging,
        delay_state_averaging=averaging.delay_state_averaging,
        average_state_every=averaging.average_state_every,
        client_mode=client_mode,  # always explicit: hivemind 1.1.12 inverts it when omitted
        grad_compression=codec(averaging.compression),
        state_averaging_compression=codec(averaging.state_compression),
        load_state_compression=codec(averaging.load_state_compression),
        grad_averager_factory=grad_averager,
        averager_opts=averager_opts,
        # refresh the swarm's progress often enough that no peer notices the end of a step a matchmaking late
        # (and while it sees no other peer, look again soon: the first global step must not go alone)
        # A peer that vanished (kill -9, power cut) keeps its progress record, and with it a claim on the global
        # step, until the record expires: with hivemind's 60 s default the survivors believed they had fallen
        # behind and re-downloaded state for a minute. Records are re-published every expiration/2 even
        # without progress, so slow peers do not expire.
        tracker_opts=dict(private_key=private_key, min_refresh_period=0.5, default_refresh_period=0.5,
                          max_refresh_period=max(1.0, min(timeouts.matchmaking / 2, 10.0)),
                          metadata_expiration=max(10.0, timeouts.matchmaking + timeouts.averaging)),
        verbose=False,
    )


def build_state_averager(params: Iterable[torch.nn.Parameter], *, dht: hivemind.DHT, run_id: str,
                         optim: OptimizerConfig, averaging: AveragingConfig, timeouts: TimeoutsConfig,
                         share: bool, start: bool = True, gate: MemberGate | None = None,
                         owner_subkey: bytes | None = None, seed_key: bytes | None = None) -> TrainingStateAverager:
    """A stand-alone averager over the same state as the trainers' optimizers (same prefix, parameter order and
    optimizer), for peers that do not train: the monitor downloads state with it (``share=False``); a seed
    resumed from a checkpoint serves its state with it (``share=True``). ``gate``: in a private swarm, serve
    members only; ``seed_key``: the public key that signs the swarm config (swarm.state.seed_vouch)."""
    verified = verified_state_averager(TrainingStateAverager, owner_subkey=owner_subkey)
    averager = gated_averager(verified, gate)(
        dht=dht, prefix=f"{run_id}_state_averager", params=list(params), optimizer=optimizer_factory(optim),
        scheduler=scheduler_factory(optim), allow_state_sharing=share, client_mode=dht.client_mode,
        state_compression=build_compression(averaging.load_state_compression, size_threshold=averaging.size_threshold),
        request_timeout=timeouts.request, next_chunk_timeout=timeouts.next_chunk, start=start,
    )
    check_downloads(averager, dht=dht, run_id=run_id, seed_key=seed_key)
    return averager


def optimizer_factory(optim: OptimizerConfig):
    def make(params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                 weight_decay=optim.weight_decay)

    return make


def scheduler_factory(optim: OptimizerConfig):
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim))


def lr_lambda(optim: OptimizerConfig):
    """Linear warm-up then cosine decay to 10%, as a function of the global step."""

    def schedule(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.total_steps - optim.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule
