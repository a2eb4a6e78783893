"""What a joiner refuses to load (swarm.state.StateCheck) and what the progress tracker refuses to believe
(swarm.tracker). The end-to-end cases, with a real malicious donor and liar in a swarm, are in
test_adversaries.py."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.state import DIGEST_TOLERANCE, StateCheck, digest_scales, second_moment_indices, state_digest


def make_state(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(64, 32, generator=generator) * 0.02, torch.ones(32)]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(p.clone()) for p in params])
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    from hivemind.optim.state_averager import dump_optimizer_state

    return params, optimizer, list(dump_optimizer_state(optimizer)[1])


def checker(params, optimizer, opt_tensors, *, bound=None, digests=None, initial=None):
    return StateCheck(num_parameters=len(params), local_tensors=lambda: params + opt_tensors,
                      second_moments=lambda: second_moment_indices(optimizer),
                      initial_digest=initial if initial is not None else state_digest(params),
                      scales=digest_scales(params),
                      swarm_view=lambda: (bound, digests or {}))


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


def test_a_foreign_model_is_refused():
    params, optimizer, opt = make_state(seed=0)
    foreign, _, _ = make_state(seed=1)
    trainers = {5: [state_digest(params)] * 3}
    problem = checker(params, optimizer, opt, bound=6, digests=trainers)({"epoch": 5}, foreign + opt)
    assert problem is not None and "differ" in problem and f"allowed {DIGEST_TOLERANCE}" in problem


def test_a_step_far_from_every_trainer_is_refused():
    params, optimizer, opt = make_state()
    problem = checker(params, optimizer, opt, digests={50: [state_digest(params)] * 2})({"epoch": 5}, params + opt)
    assert problem is not None and "near that step" in problem


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
