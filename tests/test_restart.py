"""Restart sampling ("restart"): per-sample seeding, its plan, and its output distribution on Gaussian data."""

from __future__ import annotations

import pytest
import torch

import ddim
import ddim.solvers.restart as restart
from ddim.noise import randn
from ddim.solvers.restart import restart_plan


def test_plan_restarts_from_a_listed_level_and_counts_its_calls(linear):
    ts = ddim.timesteps(linear, 10, "logsnr").tolist()
    plan = restart_plan(linear.alphas_cumprod, ts, restarts=2, restart_steps=3)
    assert plan.before + plan.after == ts and plan.t_min == plan.after[0] and len(plan.before) >= 1
    assert plan.restart[0] == plan.t_max > plan.restart[1] > plan.restart[2] > plan.t_min
    assert plan.nfe == 10 + 2 * 3 and ddim.nfe("restart", 10) == 10 + restart.RESTARTS * restart.RESTART_STEPS
    ab = linear.alphas_cumprod.double()
    assert plan.gain**2 == pytest.approx(float(ab[plan.t_max] / ab[plan.t_min]))  # q(x_max | x_min)
    assert plan.gain**2 + plan.noise**2 == pytest.approx(1.0)
    s = lambda t: float(((1 - ab[t]) / ab[t]).sqrt())  # noqa: E731
    assert 0.04 < s(plan.t_min) < 0.09 and 0.25 < s(plan.t_max) < 0.35  # the interval [0.06, 0.30] in σ
    with pytest.raises(ValueError, match="at least 2 steps"):
        restart_plan(linear.alphas_cumprod, [999])


def test_a_seed_gives_the_same_sample_in_any_batch(gaussian, linear):
    seeds = [3, 4, 5, 6]
    stats: dict = {}
    whole = ddim.sample(
        gaussian.eps, randn((4, 2, 8), seeds), linear, steps=6, sampler="restart", seeds=seeds, stats=stats
    )
    assert stats["nfe"] == ddim.nfe("restart", 6)
    for i, s in enumerate(seeds):
        one = ddim.sample(gaussian.eps, randn((1, 2, 8), [s]), linear, steps=6, sampler="restart", seeds=[s])
        torch.testing.assert_close(one[0], whole[i], rtol=0, atol=1e-6)
    other = ddim.sample(gaussian.eps, randn((4, 2, 8), seeds), linear, steps=6, sampler="restart", seeds=[7, 8, 9, 10])
    assert not torch.allclose(other, whole)  # the restart noise comes from the seeds
    ode = ddim.sample(gaussian.eps, randn((4, 2, 8), seeds), linear, steps=6, sampler="dpmpp_2m")
    assert not torch.allclose(ode, whole)
    with pytest.raises(ValueError, match="eta must be 0"):
        ddim.sample(gaussian.eps, randn((4, 2, 8), seeds), linear, steps=6, sampler="restart", eta=0.5, seeds=seeds)


def test_restart_keeps_the_data_distribution(gaussian, linear, monkeypatch):
    # N(μ, s²) data with the exact ε*: the restarted run's samples keep mean μ and std s once its
    # restart segment has enough steps (3 steps: std 0.292; 8: 0.296; the ODE at 30 steps: 0.304).
    monkeypatch.setattr(restart, "RESTART_STEPS", 8)
    n = 4000
    out = ddim.sample(
        gaussian.eps,
        randn((n, 1), range(n)).double(),
        linear,
        steps=30,
        spacing="logsnr",
        sampler="restart",
        seeds=range(n),
    )
    assert abs(out.mean().item() - gaussian.mu) < 0.01
    assert abs(out.std().item() - gaussian.s) < 0.012
