"""What a joiner refuses to load (swarm.state.StateCheck) and what the progress tracker refuses to believe
(swarm.tracker). The end-to-end cases, with a real malicious donor and liar in a swarm, are in
test_swarm.py."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.records import TrainerRecord
from swarm.state import (DIGEST_TOLERANCE, StateCheck, Unplaced, digest_scales, second_moment_indices, state_digest,
                         swarm_view)


def make_state(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(64, 32, generator=generator) * 0.02, torch.ones(32)]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(p.clone()) for p in params])
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    from hivemind.optim.state_averager import dump_optimizer_state

    return params, optimizer, list(dump_optimizer_state(optimizer)[1])


def checker(params, optimizer, opt_tensors, *, bound=None, digests=None, initial=None, seed=None):
    return StateCheck(num_parameters=len(params), local_tensors=lambda: params + opt_tensors,
                      second_moments=lambda: second_moment_indices(optimizer),
                      initial_digest=initial if initial is not None else state_digest(params),
                      scales=digest_scales(params),
                      swarm_view=lambda: (bound, digests or {}), seed_vouch=lambda: seed)


def test_an_honest_state_passes():
    params, optimizer, opt = make_state()
    trainers = {5: [state_digest(params), state_digest([p * 1.01 for p in params])]}
    assert checker(params, optimizer, opt, bound=6, digests=trainers)({"epoch": 5}, params + opt) is None


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t[:1], "tensors"),
    (lambda t: [t[0][:10]] + t[1:], "shape"),
    (lambda t: [t[0].int()] + t[1:], "dtype"),
    (lambda t: [t[0].clone().fill_(math.nan)] + t[1:], "non-finite"),
    (lambda t: [t[0].clone().fill_(math.inf)] + t[1:], "non-finite"),
])
def test_a_malformed_state_is_refused(corrupt, message):
    params, optimizer, opt = make_state()
    problem = checker(params, optimizer, opt)({"epoch": 0}, corrupt(params + opt))
    assert problem is not None and message in problem


def test_negative_second_moments_are_refused():
    params, optimizer, opt = make_state()
    index = min(second_moment_indices(optimizer))
    bad = list(opt)
    bad[index] = -bad[index] - 1.0
    problem = checker(params, optimizer, opt)({"epoch": 0}, params + bad)
    assert problem is not None and "second moment" in problem


@pytest.mark.parametrize("metadata", [None, {}, {"epoch": -1}, {"epoch": "5"}, {"epoch": True}])
def test_bad_metadata_is_refused(metadata):
    params, optimizer, opt = make_state()
    assert checker(params, optimizer, opt)(metadata, params + opt) is not None


def test_a_step_beyond_what_the_swarm_supports_is_refused():
    params, optimizer, opt = make_state()
    problem = checker(params, optimizer, opt, bound=7)({"epoch": 10**12}, params + opt)
    assert problem is not None and "support at most 7" in problem
    assert isinstance(problem, Unplaced)  # (our view may be behind: the donor is not tried last for it)


def test_a_foreign_model_is_refused():
    params, optimizer, opt = make_state(seed=0)
    foreign, _, _ = make_state(seed=1)
    trainers = {5: [state_digest(params)] * 3}
    problem = checker(params, optimizer, opt, bound=6, digests=trainers)({"epoch": 5}, foreign + opt)
    assert problem is not None and "differ" in problem and f"allowed {DIGEST_TOLERANCE}" in problem
    assert not isinstance(problem, Unplaced)  # a bad state: its donor is tried last from now on


def test_a_step_far_from_every_trainer_is_refused():
    params, optimizer, opt = make_state()
    problem = checker(params, optimizer, opt, digests={50: [state_digest(params)] * 2})({"epoch": 5}, params + opt)
    assert problem is not None and "near that step" in problem
    assert isinstance(problem, Unplaced)


def _record(step: int, params) -> TrainerRecord:
    return TrainerRecord(step=step, loss=1.0, samples_per_second=1.0, tokens_per_second=1.0, samples_done=0,
                         bytes_sent=0, bytes_received=0, rounds_averaged=0, rounds_partial=0, rounds_skipped=0,
                         rounds_failed=0, device="cpu", time=0.0, digest=state_digest(params), digest_step=step)


def test_a_joiner_alone_with_one_trainer_checks_against_that_trainer():
    """A joiner far behind the one trainer left (its own record at its old step): its own digest is no witness, so
    the trainer's state is loaded and a foreign one at the same step refused (CI once saw a joiner refuse the
    trainer's state for 5 minutes, counting its own stale record as a second trainer far from the donor's step)."""
    params, optimizer, opt = make_state(seed=0)
    stale, _, _ = make_state(seed=2)
    foreign, _, _ = make_state(seed=1)
    bound, digests = swarm_view({b"me": _record(2, stale), b"trainer": _record(74, params)}, own_subkey=b"me")
    assert bound is None and digests == {74: [state_digest(params)]}
    check = checker(params, optimizer, opt, bound=bound, digests=digests)
    assert check({"epoch": 74}, params + opt) is None
    problem = check({"epoch": 74}, foreign + opt)
    assert problem is not None and "differ from what 1 trainers" in problem and not isinstance(problem, Unplaced)
    assert swarm_view({b"me": _record(2, stale), b"trainer": _record(74, params)})[1] == {
        2: [state_digest(stale)], 74: [state_digest(params)]}  # (without own_subkey, every digest counts)


def test_a_donor_cannot_vouch_for_its_own_state():
    """A liar publishing a digest of its own (foreign) state at a step no honest trainer is near: with two trainers
    publishing, one digest near the step is not enough."""
    params, optimizer, opt = make_state(seed=0)
    foreign, _, _ = make_state(seed=1)
    digests = {74: [state_digest(params)], 2: [state_digest(foreign)]}
    problem = checker(params, optimizer, opt, digests=digests)({"epoch": 2}, foreign + opt)
    assert isinstance(problem, Unplaced) and "fewer than two" in problem, problem


@pytest.mark.parametrize("digests", [{}, {50: "params"}], ids=["no trainer publishes", "the one trainer is far"])
def test_a_state_nobody_vouches_for_is_refused(digests):
    """Past step 0, with no trainer's digest near the step and no checkpoint of the seed's at it, nothing is
    loaded (a monitor once checkpointed a malicious donor's foreign state this way, after the trainers had left)."""
    params, optimizer, opt = make_state()
    digests = {step: [state_digest(params)] for step in digests}
    for seed in (None, (7, state_digest(params))):
        problem = checker(params, optimizer, opt, digests=digests, seed=seed)({"epoch": 5}, params + opt)
        assert isinstance(problem, Unplaced) and "nobody vouches for step 5" in problem, problem


def test_the_seeds_checkpoint_digest_vouches_while_no_trainer_publishes():
    params, optimizer, opt = make_state(seed=0)
    foreign, _, _ = make_state(seed=1)
    check = checker(params, optimizer, opt, seed=(5, state_digest(params)))
    assert check({"epoch": 5}, params + opt) is None
    problem = check({"epoch": 5}, foreign + opt)
    assert "differ from the digest of the checkpoint the seed serves at step 5" in problem, problem
    assert not isinstance(problem, Unplaced)
    # trainers publishing near the step are the witnesses then, not the seed
    trainers = {6: [state_digest(foreign)]}
    assert checker(params, optimizer, opt, digests=trainers, seed=(5, state_digest(params)))(
        {"epoch": 5}, foreign + opt) is None


def test_at_step_zero_only_the_configs_initial_model_passes():
    params, optimizer, opt = make_state(seed=0)
    foreign, _, _ = make_state(seed=1)
    check = checker(params, optimizer, opt, initial=state_digest(params))
    assert check({"epoch": 0}, params + opt) is None
    assert "initial model" in check({"epoch": 0}, foreign + opt)


def test_the_digest_is_the_same_on_every_peer():
    params, _, _ = make_state()
    assert state_digest(params) == state_digest([p.clone() for p in params])
    assert len(state_digest(params)) == 64


def tracker(own_epoch: int = 5, target: int = 96, own_rate: float = 10.0):
    """A BoundedProgressTracker's reading logic without its DHT and thread."""
    import threading
    import types

    from hivemind.optim.progress_tracker import LocalTrainingProgress
    from hivemind.utils import get_dht_time
    from swarm.tracker import BoundedProgressTracker

    t = BoundedProgressTracker.__new__(BoundedProgressTracker)
    threading.Thread.__init__(t, daemon=True)  # never started
    t.target_batch_size, t.max_refresh_period, t.min_step_seconds, t.metadata_expiration = target, 1.0, 3.0, 23.0
    t._epoch_began, t._epoch_of_begin, t._warned, t._distrusted = get_dht_time() - 10, own_epoch, set(), {}
    t._alone_since, t.alone_seconds, t._behind, t._lead_behind = None, 0.0, None, None
    t.performance_ema = types.SimpleNamespace(samples_per_second=own_rate)
    t.dht = types.SimpleNamespace(peer_id=types.SimpleNamespace(to_bytes=lambda: b"me"))
    t.local_progress = LocalTrainingProgress(peer_id=b"me", epoch=own_epoch, samples_accumulated=0,
                                             samples_per_second=own_rate, time=get_dht_time(), client_mode=False)
    return t


def records(*claims):
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    from hivemind.utils import ValueWithExpiration, get_dht_time

    return {f"peer-{i}".encode(): ValueWithExpiration(LocalTrainingProgress(
        peer_id=f"peer-{i}".encode(), epoch=epoch, samples_accumulated=samples, samples_per_second=rate,
        time=get_dht_time(), client_mode=False).dict(), get_dht_time() + 30)
        for i, (epoch, samples, rate) in enumerate(claims)}


def test_a_liar_is_ignored_and_honest_peers_are_kept():
    t = tracker()
    kept = t._bounded(records((5, 40, 10.0), (6, 0, 10.0), (10**12, 10**15, 1e15)))
    assert sorted(kept) == [b"peer-0", b"peer-1"]  # one step ahead is fine; the liar is dropped
    assert sorted(t._bounded(records((5, 40, 10.0), (6, 0, 10.0), (5, 10, 10.0)))) == [b"peer-0", b"peer-1"]
    assert t._distrusted  # and stays ignored even once it claims plausible things


def test_claims_far_ahead_need_two_peers_or_time():
    assert tracker()._believed_epoch([_claim(20), _claim(20, b"b")]) == 20
    assert tracker()._believed_epoch([_claim(20), _claim(5, b"b")]) == 6  # a lone claim among several peers
    assert tracker()._believed_epoch([_claim(20)]) == 5 + 1 + 3  # alone: as far as 10 s of 3 s steps allow


def test_a_peer_ahead_alone_is_not_followed_nor_banned():
    t = tracker()  # others at 5: a peer that stepped alone to 9 is left out, not distrusted (it may be honest)
    assert sorted(t._bounded(records((5, 40, 10.0), (5, 10, 10.0), (9, 20, 10.0)))) == [b"peer-0", b"peer-1"]
    assert not t._distrusted
    assert sorted(t._bounded(records((5, 40, 10.0), (9, 0, 10.0), (9, 20, 10.0)))) == [b"peer-0", b"peer-1",
                                                                                        b"peer-2"]  # two agree


def test_a_peer_alone_ahead_learns_the_swarms_step():
    t = tracker(own_epoch=12)
    t.alone_seconds = 30.0
    t._believed_epoch([_claim(3), _claim(2, b"b"), _claim(3, b"c")])
    assert t.majority_step is None  # the others may only be catching up: not before they stay behind a while
    t._alone_since -= 30.0
    t._believed_epoch([_claim(3), _claim(2, b"b"), _claim(3, b"c")])
    assert t.majority_step == 3
    t._believed_epoch([_claim(12), _claim(3, b"b"), _claim(3, b"c")])
    assert t.majority_step is None and t._alone_since is None  # a peer is with us again: the clock restarts
    t.alone_seconds = 0.0
    t._believed_epoch([_claim(3), _claim(2, b"b"), _claim(3, b"c")])
    assert t.majority_step == 3  # we ran ahead: fall back to what two others support
    t._believed_epoch([_claim(13), _claim(3, b"b"), _claim(3, b"c")])
    assert t.majority_step is None  # a peer is with us (or past us): the normal rules apply
    t._believed_epoch([_claim(3)])
    assert t.majority_step is None  # one other peer is no majority


def test_one_step_ahead_of_everyone_for_a_while_is_running_ahead():
    """A healed trainer one step ahead of the other two paired its rounds with their previous step's: one step
    ahead of all of them for two matchmaking times on end, it falls back to their step."""
    from hivemind.utils import get_dht_time

    t = tracker(own_epoch=6)
    t.alone_seconds = 30.0
    t._believed_epoch([_claim(5), _claim(5, b"b")])
    assert t.majority_step is None  # the first to finish a step is ahead of the others for a moment
    t._alone_since -= 2 * t.min_step_seconds  # (not the 30 s a peer further ahead waits)
    t.local_progress = t.local_progress.copy(update=dict(epoch=7))  # (it stays ahead across its own steps)
    t._epoch_began = get_dht_time()
    t._believed_epoch([_claim(6, age=1.0), _claim(6, b"b", age=1.0)])  # (records from before our step began)
    assert t.majority_step is None  # we have just stepped: the others may step a moment after us
    t._epoch_began -= t.min_step_seconds
    t._believed_epoch([_claim(6, age=1.0 + t.min_step_seconds), _claim(6, b"b", age=1.0 + t.min_step_seconds)])
    assert t.majority_step == 6  # a matchmaking time later, still one step ahead of all of them
    t._believed_epoch([_claim(7), _claim(6, b"b")])
    assert t.majority_step is None and t._alone_since is None  # one of them reached our step


def test_others_stepping_while_still_behind_us_means_we_ran_ahead():
    """The runaway pairing: a healed trainer one step ahead, each of its rounds grouped with the others' previous
    step, all stepping together, so none of its steps lasts long enough for the wait above. Once the others have
    stepped and are still behind it, it falls back at once; a peer the others catch up with does not."""
    from hivemind.utils import get_dht_time

    t = tracker(own_epoch=6)
    t.alone_seconds = 30.0
    t._epoch_began = get_dht_time()  # (every step short: the wait above never runs out)
    t._believed_epoch([_claim(5), _claim(5, b"b")])
    assert t.majority_step is None  # the first to finish a step is ahead of the others for a moment
    t.local_progress = t.local_progress.copy(update=dict(epoch=7))  # a round together: we step to 7, they to 6
    t._epoch_began = get_dht_time() - 1.0
    t._believed_epoch([_claim(6, age=2.0), _claim(6, b"b", age=2.0)])
    assert t.majority_step is None  # records from before our step: they may be finishing it with us
    t._believed_epoch([_claim(6), _claim(6, b"b")])
    assert t.majority_step == 6  # they stepped, and they are still behind us
    t._believed_epoch([_claim(7), _claim(6, b"b")])
    assert t.majority_step is None and t._lead_behind is None  # one of them is at our step: not alone

    t._believed_epoch([_claim(6), _claim(6, b"b")])
    t._believed_epoch([_claim(7), _claim(7, b"b")])
    assert t.majority_step is None  # they caught up with us: a peer that stepped first, not a runaway

    t = tracker(own_epoch=6)  # a trainer cut off reads the records its DHT still holds, frozen
    t.alone_seconds = 30.0
    t._epoch_began = get_dht_time() - 1.0
    t._believed_epoch([_claim(4, age=20.0), _claim(4, b"b", age=20.0)])
    assert t.majority_step is None
    t._believed_epoch([_claim(5, age=2.0), _claim(5, b"b", age=2.0)])  # the link is back: where the swarm is now
    assert t.majority_step is None  # (but from before our step began: they may be stepping to ours)
    t._believed_epoch([_claim(5), _claim(5, b"b")])
    assert t.majority_step == 5  # they stepped while we were away, and work on a step we are done with
    t._believed_epoch([_claim(6), _claim(6, b"b")])
    assert t.majority_step is None

    t = tracker(own_epoch=6)  # far ahead of frozen records: no clock runs on them either
    t._believed_epoch([_claim(3, age=20.0), _claim(3, b"b", age=20.0)])
    assert t.majority_step is None and t._alone_since is None
    t._believed_epoch([_claim(3), _claim(3, b"b")])
    assert t.majority_step == 3  # (alone_seconds is 0 here)


def test_a_lone_peer_one_step_past_us_is_not_followed():
    """hivemind's once-a-step sync check follows any peer one step ahead; with another trainer at our step, the
    one ahead is the runaway, and it comes back to us (a healed trainer and the two it had paired with once swapped
    steps, each side downloading the other's state in the same second)."""
    t = tracker(own_epoch=5)
    t._believed_epoch([_claim(6), _claim(5, b"b")])
    assert t.only_one_past(5)
    t._believed_epoch([_claim(6), _claim(6, b"b")])
    assert not t.only_one_past(5)  # the swarm stepped: follow it
    t._believed_epoch([_claim(6), _claim(4, b"b")])
    assert t.only_one_past(5)  # (the other's record from before our round: seen right after one)
    t._believed_epoch([_claim(6)])
    assert not t.only_one_past(5)  # one other trainer: the lone-partner rules apply


def test_behind_needs_two_peers_past_us_and_half_of_them():
    t = tracker(own_epoch=5)
    t._believed_epoch([_claim(6), _claim(5, b"b")])
    assert t.behind_since(5) is None  # one peer past: it may just have stepped
    t._believed_epoch([_claim(6), _claim(6, b"b"), _claim(5, b"c")])
    since = t.behind_since(5)
    assert since is not None and t.behind_since(6) is None
    t._believed_epoch([_claim(6), _claim(7, b"b"), _claim(5, b"c")])
    assert t.behind_since(5) == since  # still behind: the clock goes on
    t._believed_epoch([_claim(6), _claim(6, b"b"), _claim(5, b"c"), _claim(5, b"d"), _claim(5, b"e")])
    assert t.behind_since(5) is None  # two of five: not half
    t._believed_epoch([_claim(10**9), _claim(10**9, b"b")])
    assert t.behind_since(5) is None  # absurd claims count for nothing
    t._distrusted[b"peer-0"] = float("inf")  # a peer caught lying counts for nothing either
    t._bounded(records((6, 0, 10.0), (6, 0, 10.0), (5, 0, 10.0)))
    assert t.behind_since(5) is None and t.other_epochs == [6, 5]


def test_the_only_other_trainer_past_us_means_we_are_behind():
    """Two trainers: once the other is past our step, its round for our step is over (ours could only pair with
    its next one), and nobody else could outvote it anyway."""
    t = tracker(own_epoch=5)
    t._believed_epoch([_claim(5)])
    assert t.behind_since(5) is None  # level
    t._believed_epoch([_claim(6)])
    since = t.behind_since(5)
    assert since is not None and t.behind_since(6) is None
    t._believed_epoch([_claim(7)])  # (10 s of 3 s steps: as far as we believe a lone peer)
    assert t.behind_since(5) == since
    t._believed_epoch([_claim(10**6)])
    assert t.behind_since(5) is None  # beyond belief: not behind it
    t._believed_epoch([_claim(6), _claim(5, b"b")])
    assert t.behind_since(5) is None  # one of two: it may just have stepped


def test_fast_claims_are_bounded():
    t = tracker()
    (item,) = t._bounded(records((5, 96, 35.0))).values()  # 3.5x our rate: kept as it is
    assert item.value["samples_per_second"] == 35.0
    bounded = t._bounded(records((5, 40, 10.0), (5, 40, 10.0), (5, 300, 500.0)))  # 50x the median of 10
    assert bounded[b"peer-2"].value["samples_per_second"] == 40.0  # 4x the median
    assert bounded[b"peer-2"].value["samples_accumulated"] == 96  # at most the target batch


def test_honest_rates_are_believed_before_anyone_has_measured_its_own():
    t = tracker(own_rate=1e-20)  # hivemind's "not measured yet"; so are the two newcomers below
    kept = t._bounded(records((5, 16, 5.8), (5, 32, 5.7), (5, 0, 1e-20), (5, 0, 1e-20)))
    assert len(kept) == 4 and not t._distrusted  # this once banned both honest peers for 600 s
    assert kept[b"peer-0"].value["samples_per_second"] == 5.8


def test_our_own_record_is_the_one_we_know():
    """hivemind takes the number of records read for the number of peers, us included; a trainer whose own record
    had expired while it was stopped read only its partner's, took itself to be alone and stepped on the partner's
    samples without averaging."""
    import logging
    import types

    from hivemind.optim.progress_tracker import GlobalTrainingProgress

    t = tracker(own_epoch=4)
    t._local_public_key, t.metadata_expiration, t.prefix, t.status_loglevel = b"my-key", 30.0, "run", logging.DEBUG
    t.expected_drift_peers, t.expected_drift_rate, t.min_refresh_period = 3, 0.2, 0.5
    t.performance_ema = types.SimpleNamespace(samples_per_second=10.0, eps=1e-9, num_updates=5)
    t.global_progress = GlobalTrainingProgress(epoch=4, samples_accumulated=0, target_batch_size=96, num_peers=2,
                                               num_clients=0, eta_next_epoch=math.inf, next_fetch_time=0.0)
    partner_only = records((4, 40, 10.0))
    progress = t._parse_swarm_progress_data(partner_only)
    assert progress.num_peers == 2 and progress.epoch == 4, progress  # the partner and us
    assert progress.samples_accumulated == 40, progress  # (ours: none yet)

    ours = records((4, 40, 10.0), (4, 8, 10.0))
    ours[b"my-key"] = ours.pop(b"peer-1")
    ours[b"my-key"].value["peer_id"] = b"me"
    assert t._parse_swarm_progress_data(ours).num_peers == 2  # already there: not counted twice

    # our record in the DHT from before a download that took us back a step: ours is what we know, not what it says
    ours[b"my-key"].value["epoch"] = 5
    progress = t._parse_swarm_progress_data(ours)
    assert progress.epoch == 4 and progress.num_peers == 2, progress
    forged = records((4, 40, 10.0), (9, 8, 10.0))  # another key claiming our peer id
    forged[b"peer-1"].value["peer_id"] = b"me"
    progress = t._parse_swarm_progress_data(forged)
    assert progress.epoch == 4 and progress.num_peers == 2, progress

    t.performance_ema.num_updates = 0  # a newcomer far behind publishes no record: it does not count itself either
    t.global_progress = GlobalTrainingProgress(epoch=9, samples_accumulated=0, target_batch_size=96, num_peers=2,
                                               num_clients=0, eta_next_epoch=math.inf, next_fetch_time=0.0)
    assert t._parse_swarm_progress_data(records((9, 40, 10.0), (9, 8, 10.0))).num_peers == 2


def _claim(epoch: int, peer: bytes = b"a", age: float = 0.0):
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    from hivemind.utils import get_dht_time

    return LocalTrainingProgress(peer_id=peer, epoch=epoch, samples_accumulated=0, samples_per_second=1.0,
                                 time=get_dht_time() - age, client_mode=False)


def test_a_peer_out_of_sync_publishes_its_progress_once_it_has_trained():
    """hivemind hides the progress of peers out of sync; a leader alone ahead then never saw the peers it left
    behind. Ours publishes a peer that has trained; a newcomer that has not caught up stays hidden."""
    import time

    import hivemind
    from hivemind.utils.crypto import RSAPrivateKey
    from swarm.tracker import BoundedProgressTracker

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    trackers = []
    try:
        def published(t, epoch: int, timeout: float = 10.0) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                found = dht.get(t.training_progress_key, latest=True)
                entry = found.value.get(t._local_public_key) if found is not None else None
                if entry is not None and entry.value is not None and entry.value["epoch"] == epoch:
                    return True
                time.sleep(0.2)
            return False

        for trained in (True, False):
            t = BoundedProgressTracker(dht=dht, prefix=f"out-of-sync-{trained}", target_batch_size=96,
                                       private_key=RSAPrivateKey(), min_refresh_period=30,
                                       default_refresh_period=30, max_refresh_period=30, start=True)
            time.sleep(0.5)  # its first fetch is done; the next one (which would reset the epoch below) is 30 s away
            trackers.append(t)
            if trained:
                t.report_local_progress(local_epoch=0, samples_accumulated=8)
            t.global_progress.epoch = 5  # the swarm (as this peer believes) is 5 steps ahead
            t.report_local_progress(local_epoch=1, samples_accumulated=0, update_global_samples=False)
            assert published(t, 1, timeout=5.0 if trained else 3.0) is trained, trained
    finally:
        for t in trackers:
            t.shutdown(timeout=5)
        dht.shutdown()


def test_a_state_stream_that_breaks_off_mid_tensor_says_so():
    from hivemind.compression import serialize_torch_tensor
    from hivemind.utils.streaming import split_for_streaming
    from swarm.state import _tensor_from

    parts = list(split_for_streaming(serialize_torch_tensor(torch.arange(4096.0)), 4096))
    assert len(parts) > 1 and torch.equal(_tensor_from(parts, 0), torch.arange(4096.0))
    with pytest.raises(ValueError, match="tensor 3 arrived incomplete or malformed"):
        _tensor_from(parts[:-1], 3)
