"""A trainer's background parameter-averaging round that finds no group is called off instead of holding the
trainer for ``averaging_timeout`` (SwarmOptimizer.call_off_lonely_round), also as soon as half of the other trainers
have finished the step it is for (SwarmOptimizer.call_off_stale_round), a trainer catching up by download drops
a gradient round without a group and looks for the swarm's current one, and a trainer that is leaving calls off its
rounds without a group (SwarmOptimizer.call_off_rounds_when_leaving), as does one whose partners have all left
(SwarmOptimizer.call_off_rounds_alone): a real optimizer with its averager processes and a DHT on
127.0.0.1, whose rounds can never find a group (its partners, where a test has any, are progress trackers
without averagers)."""

from __future__ import annotations

import threading
import time

import torch
from hivemind import DHT
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.averaging.control import AveragingStage
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from conftest import TINY
from swarm.config import load_config
from swarm.optimizer import build_optimizer
from swarm.rounds import PartialRoundWatch, RoundLog


def lonely_optimizer(dht: DHT, config, model: torch.nn.Module | None = None):
    return build_optimizer(
        (model or torch.nn.Linear(8, 8)).parameters(), dht=dht, private_key=RSAPrivateKey(), run_id="lonely", batch_size=4,
        client_mode=False, optim=config.optimizer, averaging=config.averaging, timeouts=config.timeouts,
        round_log=RoundLog(), partial_watch=PartialRoundWatch())


def other_dhts(dht: DHT, count: int = 2) -> list[DHT]:
    return [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht.get_visible_maddrs())
            for _ in range(count)]


def trackers_at_step_0(dhts: list[DHT], config, samples: int) -> list[ProgressTracker]:
    """Other trainers' progress trackers (no averagers: no group can form), at step 0 with ``samples`` each."""
    trackers = []
    for dht in dhts:
        trackers.append(ProgressTracker(dht, prefix="lonely", min_refresh_period=0.2, default_refresh_period=0.2,
                                        private_key=RSAPrivateKey(), start=True,
                                        target_batch_size=config.averaging.target_batch_size))
        trackers[-1].report_local_progress(local_epoch=0, samples_accumulated=samples)
    return trackers


def shut_down(*parts) -> None:
    """Trainers' parts first, then their DHTs (None: never started)."""
    for part in parts:
        if part is not None:
            part.shutdown()


def finish_step(tracker: ProgressTracker) -> None:
    """Another trainer steps from 0 to 1."""
    with tracker.pause_updates():
        tracker.update_epoch(1)
    tracker.report_local_progress(local_epoch=1, samples_accumulated=0)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_parameter_round_without_a_group_is_called_off():
    config = load_config(TINY)
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    optimizer = None
    try:
        optimizer = lonely_optimizer(dht, config)
        averager = optimizer.state_averager
        averager.step(averaging_round=True, delay_averaging=True,
                      averaging_opts=dict(timeout=config.timeouts.averaging))
        wait_until(lambda: averager.last_round is not None)  # begun in hivemind's executor thread
        lonely = averager.last_round
        assert lonely is not None and not lonely.done(), lonely
        optimizer.call_off_lonely_round(grace=0.5)
        assert lonely.cancelled(), lonely
        averager.step(wait_for_delayed_updates=True)  # the trainer's next call: nothing is left to wait for
        assert not averager.pending_updates
        optimizer.call_off_lonely_round(grace=0.5)  # again: nothing to call off, and no error
    finally:
        if optimizer is not None:
            optimizer.shutdown()
        dht.shutdown()


def test_a_parameter_round_is_called_off_once_the_others_are_done_with_its_step():
    config = load_config(TINY)
    # (a long averaging timeout: the round must not end by timing out while the test waits on a loaded machine)
    timeouts = config.timeouts.model_copy(update=dict(matchmaking=1.0, averaging=120.0))
    config = config.model_copy(update=dict(timeouts=timeouts))
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    other_dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht.get_visible_maddrs())
    optimizer = other = None
    try:
        optimizer = lonely_optimizer(dht, config)
        averager = optimizer.state_averager

        def begin_round(step: int):
            averager.step(increment_epoch=True, averaging_round=True, delay_averaging=True,
                          averaging_opts=dict(timeout=config.timeouts.averaging))
            wait_until(lambda: averager.last_round_epoch == step)
            assert averager.last_round_epoch == step and not averager.last_round.done(), averager.last_round
            return averager.last_round

        def other_at(epoch: int, samples: int = 8):
            if epoch != other.local_progress.epoch:
                with other.pause_updates():
                    other.update_epoch(epoch)
            other.report_local_progress(local_epoch=epoch, samples_accumulated=samples)

        # a peer (with no averager: no group can form) that reached step 1 and then made no more progress that we
        # could see: as a cut-off trainer sees the records it fetched before the cut. (It is there before our round
        # begins: a trainer alone calls its rounds off, call_off_rounds_alone.)
        other = partner_in(other_dht, config, optimizer)
        round_ = begin_round(1)
        other_at(1)
        wait_until(lambda: optimizer._peers_done(1, looking_since=get_dht_time())[1] == 1)
        assert optimizer._peers_done(1, looking_since=get_dht_time()) == (0, 1)  # its record is there, at step 1
        time.sleep(3 * config.timeouts.matchmaking)  # looking well past its start: the watch had its chances
        assert not round_.done(), "called off while no peer was seen training at its step"
        assert not optimizer.call_off_stale_round()

        for samples in range(9, 40):  # the peer trains on at step 1: had it been in touch, we would have grouped
            other_at(1, samples)
            if round_.done():
                break
            time.sleep(0.2)
        wait_until(round_.done, timeout=10)  # the watch thread calls it off
        assert round_.cancelled(), round_
        averager.step(wait_for_delayed_updates=True)  # the next step is not held
        assert not averager.pending_updates

        round_ = begin_round(2)
        other_at(3)  # once a matchmaking time has passed, a peer past the round's step calls it off at once
        wait_until(round_.done, timeout=10)
        assert round_.cancelled(), round_
    finally:
        for peer in optimizer, other:
            if peer is not None:
                peer.shutdown()
        other_dht.shutdown()
        dht.shutdown()


def test_a_catch_up_drops_a_round_without_a_group_and_looks_for_the_current_one():
    config = load_config(TINY)
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    optimizer = None
    try:
        optimizer = lonely_optimizer(dht, config)
        stale = optimizer.scheduled_grads = optimizer.grad_averager.schedule_step(timeout=config.timeouts.averaging)
        wait_until(lambda: stale.stage == AveragingStage.LOOKING_FOR_GROUP)
        optimizer._drop_ungrouped_gradient_round()  # hivemind would wait for it with weight 0
        assert optimizer.scheduled_grads is None and stale.cancelled(), stale

        optimizer._look_for_the_current_round()  # the step ends far beyond the averaging timeout: not yet
        assert optimizer.tracker.estimated_next_update_time - get_dht_time() > config.timeouts.averaging
        assert optimizer.scheduled_grads is None
        optimizer.tracker.report_local_progress(optimizer.local_epoch, config.averaging.target_batch_size)
        optimizer._look_for_the_current_round()  # the swarm's batch is full: its round is due now
        current = optimizer.scheduled_grads
        assert current is not None and not current.done() and not current.triggered
        wait_until(lambda: current.stage == AveragingStage.LOOKING_FOR_GROUP)
        assert current.stage == AveragingStage.LOOKING_FOR_GROUP
    finally:
        if optimizer is not None:
            optimizer.shutdown()  # (cancels the round still looking for a group)
        dht.shutdown()


def test_a_trainer_the_swarm_left_behind_calls_its_round_off_and_downloads():
    config = load_config(TINY)
    config = config.model_copy(update=dict(timeouts=config.timeouts.model_copy(update=dict(matchmaking=1.0))))
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = other_dhts(dht)
    optimizer, others = None, []
    try:
        optimizer = lonely_optimizer(dht, config)
        others = trackers_at_step_0(dhts, config, samples=8)

        round_ = optimizer.scheduled_grads = optimizer.grad_averager.schedule_step(timeout=120.0)  # (outlasts the test)
        finish_step(others[0])  # one of two finished step 0: it may have just stepped, we are not behind
        wait_until(lambda: optimizer.tracker.global_epoch == 1)
        assert optimizer.tracker.global_epoch == 1
        time.sleep(3 * config.timeouts.matchmaking)
        assert not optimizer._left_behind() and not round_.done(), round_

        # our round for step 0 still looks for a group while both others are past it: the swarm left us behind.
        # The watch calls the round off (it could only fall into the swarm's round for step 1), and we download.
        finish_step(others[1])
        wait_until(round_.done)
        assert round_.cancelled(), round_
        wait_until(optimizer._left_behind)
        assert optimizer._left_behind() and optimizer.local_epoch == 0
        assert optimizer._should_load_state_from_peers()
    finally:
        shut_down(optimizer, *others, *dhts, dht)


def test_a_round_begun_before_the_only_other_trainer_stepped_is_called_off():
    """Two trainers. Our step has begun (hivemind pauses our tracker's refreshes until it ends) and our round looks
    for a group; the other trainer then steps without us: our round could only pair with its round for step 1. The
    watch reads the records from the DHT itself and calls the round off."""
    config = load_config(TINY)
    config = config.model_copy(update=dict(timeouts=config.timeouts.model_copy(update=dict(matchmaking=1.0))))
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = other_dhts(dht, count=1)
    optimizer, others = None, []
    try:
        optimizer = lonely_optimizer(dht, config)
        others = trackers_at_step_0(dhts, config, samples=8)
        wait_until(lambda: optimizer.tracker.global_progress.num_peers == 2)
        round_ = optimizer.scheduled_grads = optimizer.grad_averager.schedule_step(timeout=120.0)
        with optimizer.tracker.pause_updates():  # what hivemind's step does
            round_.allow_allreduce()  # triggered: our step waits for this round
            time.sleep(3 * config.timeouts.matchmaking)
            assert not round_.done(), round_  # the other trainer is at our step: it may still come
            finish_step(others[0])
            wait_until(round_.done)
            assert round_.cancelled(), round_
            assert optimizer.tracker.behind_since(0) is None  # (the paused tracker never saw it)
    finally:
        shut_down(optimizer, *others, *dhts, dht)


def test_a_download_waits_for_the_step_to_end_only_while_others_are_at_it():
    """Before downloading, a trainer waits for the swarm's step to end if it ends soon and two others are at it; if
    they leave meanwhile, it stops waiting (seen: a late joiner waited 20 s, the averaging timeout, for a step that
    two of the three trainers had just left; the one left needed that long to fill the global batch alone)."""
    config = load_config(TINY)
    timeouts = config.timeouts.model_copy(update=dict(matchmaking=1.0, averaging=3600.0))  # (outlasts the test)
    config = config.model_copy(update=dict(timeouts=timeouts))
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = other_dhts(dht)
    optimizer, others = None, []
    try:
        optimizer = lonely_optimizer(dht, config)
        half = config.averaging.target_batch_size // 2  # two trainers that have the global batch together
        others = trackers_at_step_0(dhts, config, samples=half)
        tracker = optimizer.tracker
        wait_until(lambda: len(tracker.other_epochs) == 2 and tracker.global_progress.samples_accumulated >= 2 * half)
        assert tracker.other_epochs == [0, 0], tracker.other_epochs

        waiting = threading.Thread(target=optimizer._wait_for_the_step_boundary, daemon=True)
        waiting.start()
        waiting.join(3 * config.timeouts.matchmaking)
        assert waiting.is_alive(), "did not wait for the step the two others are finishing"
        for other in others:
            other.shutdown()  # (withdraws its record)
        waiting.join(30)
        assert not waiting.is_alive(), f"still waiting after the others left: {tracker.other_epochs}"
        assert tracker.global_epoch == 0  # it stopped because they left, not because the step ended
    finally:
        shut_down(optimizer, *others, *dhts, dht)


def test_a_step_after_a_called_off_round_uses_our_own_gradients():
    """hivemind's fallback after a round that began and then failed reloaded the (already zeroed) accumulators:
    the step went with zero gradients while the log said "local gradients"."""
    config = load_config(TINY)
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    optimizer = None
    try:
        model = torch.nn.Linear(8, 8)
        optimizer = lonely_optimizer(dht, config, model)
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).square().sum().backward()
        ours = [param.grad.clone() for param in model.parameters()]
        optimizer.grad_averager.accumulate_grads_(batch_size=4)
        round_ = optimizer.scheduled_grads = optimizer.grad_averager.schedule_step(timeout=120.0)
        with optimizer.tracker.pause_updates():  # as if another peer were there: the round begins
            optimizer.tracker.global_progress.num_peers = 2
            assert optimizer._begin_averaging_gradients(None)
        assert round_.triggered and round_.cancel()  # e.g. called off, or no group in time
        optimizer._average_gradients_and_load_into_optimizer(round_)
        stepped = [param.grad for group in optimizer.state_averager.optimizer.param_groups
                   for param in group["params"]]
        assert len(stepped) == len(ours)
        for used, own in zip(stepped, ours):
            assert torch.allclose(used, own), (used, own)
        assert optimizer.round_log.rounds[-1].outcome == "failed"
    finally:
        if optimizer is not None:
            optimizer.shutdown()
        dht.shutdown()


def test_a_leaving_peer_calls_off_its_rounds_without_a_group():
    """A trainer told to stop (Ctrl-C) while its gradient round and its background parameter round find nobody
    (its partner has just left) leaves within seconds, stepping with its own gradients, instead of waiting out the
    rounds' timeouts."""
    config = load_config(TINY)
    config = config.model_copy(update=dict(timeouts=config.timeouts.model_copy(update=dict(matchmaking=1.0))))
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    partner_dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht.get_visible_maddrs())
    optimizer = partner = None
    try:
        model = torch.nn.Linear(8, 8)
        optimizer = lonely_optimizer(dht, config, model)
        partner = partner_in(partner_dht, config, optimizer)  # still here: our rounds are not called off for that
        gradient_round, parameter_round = begin_rounds(optimizer, model)
        optimizer.leaving = threading.Event()
        latest = max(gradient_round.scheduled_time, parameter_round.scheduled_time)
        wait_until(lambda: get_dht_time() > latest + 2 * config.timeouts.matchmaking)
        assert not gradient_round.done() and not parameter_round.done()  # the watch leaves them alone while we stay
        optimizer.leaving.set()
        wait_until(lambda: gradient_round.done() and parameter_round.done(), timeout=30)  # (their timeouts: 120 s)
        assert gradient_round.cancelled() and parameter_round.cancelled(), (gradient_round, parameter_round)
        optimizer._average_gradients_and_load_into_optimizer(gradient_round)
        assert optimizer.round_log.rounds[-1].outcome == "failed"
    finally:
        for peer in optimizer, partner:
            if peer is not None:
                peer.shutdown()
        partner_dht.shutdown()
        dht.shutdown()


def begin_rounds(optimizer, model: torch.nn.Module):
    """A background parameter round, and a gradient round that the step waits on (begun as if our tracker saw
    another peer); neither can find a group. Returns (gradient round, parameter round)."""
    averager = optimizer.state_averager
    averager.step(averaging_round=True, delay_averaging=True, averaging_opts=dict(timeout=120.0))
    wait_until(lambda: averager.last_round is not None)  # begun in hivemind's executor thread
    parameter_round = averager.last_round
    model(torch.randn(4, 8)).square().sum().backward()
    optimizer.grad_averager.accumulate_grads_(batch_size=4)
    gradient_round = optimizer.scheduled_grads = optimizer.grad_averager.schedule_step(timeout=120.0)
    with optimizer.tracker.pause_updates():
        optimizer.tracker.global_progress.num_peers = 2
        assert optimizer._begin_averaging_gradients(None)
    return gradient_round, parameter_round


def partner_in(dht: DHT, config, optimizer) -> ProgressTracker:
    """Another trainer's progress tracker (no averager: no group can form), once the optimizer's DHT reads its
    record and the optimizer's own."""
    partner = ProgressTracker(dht, prefix="lonely", target_batch_size=config.averaging.target_batch_size,
                              min_refresh_period=0.2, default_refresh_period=0.2, private_key=RSAPrivateKey(),
                              start=True)
    partner.report_local_progress(local_epoch=0, samples_accumulated=8)

    def both_seen() -> bool:
        others, seen_own, _ = optimizer._other_progress()
        return len(others) == 1 and seen_own

    wait_until(both_seen)
    assert both_seen(), optimizer._other_progress()
    return partner


def test_a_trainer_whose_partners_left_calls_off_its_rounds():
    """The gradient round a step waits on and the background parameter round, still without a group, are called
    off once every other trainer's progress record is withdrawn (hivemind's tracker withdraws it as its trainer
    shuts down): hivemind would look for the trainers that had just left until averaging_timeout, one round after
    the other. While a partner's record is live, they are left alone."""
    config = load_config(TINY)
    config = config.model_copy(update=dict(timeouts=config.timeouts.model_copy(update=dict(matchmaking=1.0))))
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    partner_dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht.get_visible_maddrs())
    optimizer = partner = None
    try:
        model = torch.nn.Linear(8, 8)
        optimizer = lonely_optimizer(dht, config, model)
        partner = partner_in(partner_dht, config, optimizer)
        gradient_round, parameter_round = begin_rounds(optimizer, model)
        latest = max(gradient_round.scheduled_time, parameter_round.scheduled_time)
        wait_until(lambda: get_dht_time() > latest + 3 * config.timeouts.matchmaking)
        assert not gradient_round.done() and not parameter_round.done()  # the partner may still come: left alone
        partner.shutdown()  # its record is withdrawn
        partner = None
        wait_until(lambda: gradient_round.done() and parameter_round.done(), timeout=30)  # (their timeouts: 120 s)
        assert gradient_round.cancelled() and parameter_round.cancelled(), (gradient_round, parameter_round)
        optimizer._average_gradients_and_load_into_optimizer(gradient_round)
        assert optimizer.round_log.rounds[-1].outcome == "failed"
    finally:
        for peer in optimizer, partner:
            if peer is not None:
                peer.shutdown()
        partner_dht.shutdown()
        dht.shutdown()
