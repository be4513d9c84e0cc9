import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import ddim
from ddim import NoiseSchedule, check_timesteps
from ddim.timesteps import SPACINGS, register_spacing

T = 1000
SIZES = [1, 2, 3, 7, 10, 50, 99, 100, 999, 1000]


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.linear(T)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "quadratic"])
@pytest.mark.parametrize("S", SIZES)
def test_exact_count_unique_descending_in_range(sched, spacing, S):
    t = ddim.timesteps(sched, S, spacing)
    assert t.dtype == torch.int64 and t.shape == (S,)
    assert torch.unique(t).numel() == S
    assert (t[1:] < t[:-1]).all()
    assert 0 <= int(t.min()) and int(t.max()) <= T - 1


@pytest.mark.parametrize("S", SIZES)
def test_leading_is_the_papers_uniform_stride(sched, S):
    expected = torch.tensor([i * T // S for i in reversed(range(S))])  # τ_i = ⌊i·T/S⌋
    assert torch.equal(ddim.timesteps(sched, S, "leading"), expected)
    if T % S == 0:  # = ermongroup/ddim's range(0, T, T//S) and diffusers' k·(T//S)
        assert torch.equal(expected, torch.arange(S - 1, -1, -1) * (T // S))


@pytest.mark.parametrize("T_", [1000, 999, 37])
def test_leading_starts_near_the_top_for_every_step_count(T_):
    # x_T ~ N(0, I) must enter close to T-1 whatever S: at or above T - 2⌈T/S⌉ (k·(T//S) truncated to S
    # values started at 500 for S = 501)
    sched = NoiseSchedule.linear(T_)
    for S in range(1, T_ + 1):
        t = ddim.timesteps(sched, S, "leading")
        assert int(t[0]) >= T_ - 2 * -(-T_ // S), (S, int(t[0]))
        assert int(t[-1]) == 0 and torch.unique(t).numel() == S


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("S", SIZES)
def test_equals_diffusers_set_timesteps(sched, spacing, S):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(S)
    if spacing == "leading" and T % S:
        pytest.skip("diffusers' leading k·(T//S) departs from the paper's ⌊i·T/S⌋ where S does not divide T")
    assert torch.equal(ddim.timesteps(sched, S, spacing), ref.timesteps.to(torch.int64))


def test_trailing_fixes_diffusers_extra_minus_one(sched):
    # diffusers' float arange gives S+1 values ending in -1 for some S (e.g. 61); ours gives exactly S.
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    ours = ddim.timesteps(sched, 61, "trailing")
    assert ours.numel() == 61 and torch.equal(ours, ref.timesteps[:61])


def test_trailing_and_linspace_ends(sched):
    assert int(ddim.timesteps(sched, 7, "trailing")[0]) == T - 1
    lin = ddim.timesteps(sched, 7, "linspace")
    assert int(lin[0]) == T - 1 and int(lin[-1]) == 0


def test_quadratic_matches_paper_rule_where_distinct(sched):
    # int(linspace(0, sqrt(0.8T), S)**2) is already distinct for S=10: unchanged.
    raw = (np.linspace(0, np.sqrt(0.8 * T), 10) ** 2).astype(int)
    assert torch.equal(ddim.timesteps(sched, 10, "quadratic"), torch.as_tensor(raw[::-1].copy()))
    # S=50 repeats one value in the paper's rule; we bump it to the next free integer.
    raw50 = (np.linspace(0, np.sqrt(0.8 * T), 50) ** 2).astype(int)
    assert len(set(raw50.tolist())) == 49
    ours = ddim.timesteps(sched, 50, "quadratic").flip(0)
    assert ours.numel() == 50 and (ours >= torch.as_tensor(raw50)).all()


def test_small_T(sched):
    for T_small in [1, 2, 3, 5]:
        s = NoiseSchedule.linear(T_small)
        for spacing in SPACINGS:
            for S in range(1, T_small + 1):
                t = ddim.timesteps(s, S, spacing)
                assert t.numel() == S and torch.unique(t).numel() == S and int(t.max()) <= T_small - 1


def test_registry_accepts_new_spacing(sched):
    @register_spacing("_test_every_other")
    def every_other(schedule, steps):
        return [2 * k for k in range(steps)]

    try:
        assert ddim.timesteps(sched, 3, "_test_every_other").tolist() == [4, 2, 0]
    finally:
        del SPACINGS["_test_every_other"]


def test_check_timesteps_accepts_good_lists():
    assert check_timesteps([900, 500, 3], 1000).tolist() == [900, 500, 3]
    assert check_timesteps(np.array([9.0, 2.0]), 10).dtype == torch.int64
    assert check_timesteps(torch.tensor([5]), 10).tolist() == [5]
