"""Empirical convergence orders of every ODE sampler against the exact probability-flow ODE solution,
on closed-form data: a Gaussian (exact solution in closed form) and a Gaussian mixture (exact ε*, and
the ODE solved by RK4 on 1,000 steps of a ρ = 7 σ-grid in float64, checked below to ~1e-8, far below the
errors measured here).

The orders are measured with log-SNR steps for S = 16 … 64 listed timesteps, landing on ᾱ_0 (the last
listed timestep is t = 0, so the run ends there exactly): with ᾱ_final = 1 every run also pays the same
last step t = 0 -> ᾱ = 1, whose error does not shrink with S and would flatten the slope of the most
accurate samplers. Run ``pytest -s tests/test_convergence.py`` to see the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddim
from ddim import GaussianMixture, NoiseSchedule

SIZES = [16, 23, 32, 45, 64]
#: sampler -> (lowest, highest) accepted slope of log error against log steps.
ORDERS = {
    "ddim": (0.85, 1.2),
    "euler": (0.85, 1.2),
    "plms": (1.8, 3.5),
    "plms4": (1.8, 3.5),  # the paper's fixed fourth order
    "dpmpp_2m": (1.8, 3.5),
    "dpmpp_3m": (1.8, 4.0),
    "unipc": (1.8, 4.0),
    "heun": (1.8, 2.6),
}


def _mixture(schedule: NoiseSchedule) -> GaussianMixture:
    means = torch.tensor([[-0.5, 0.3], [0.6, -0.2], [0.1, 0.8]])
    return GaussianMixture(schedule, means, torch.tensor([0.3, 0.4, 0.5]), torch.tensor([1.0, 2.0, 1.5]))


@pytest.fixture(scope="module")
def problems():
    """(name, model, x_T, exact x at ᾱ_0, exact x at ᾱ = 1) for the Gaussian and the mixture."""
    from conftest import GaussianData

    sched = NoiseSchedule.linear(1000)
    ab = sched.alphas_cumprod
    out = []
    g = GaussianData(sched)
    x = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out.append(
        ("gaussian", g.eps, x, g.ode_solution(x, ab[999].item(), ab[0].item()), g.ode_solution(x, ab[999].item(), 1.0))
    )
    m = _mixture(sched)
    x = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.append(
        ("mixture", m, x, m.ode_solve(x, ab[999].item(), ab[0].item(), 1000), m.ode_solve(x, ab[999].item(), 1.0, 1000))
    )
    return sched, out


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def test_reference_solution_is_exact_enough():
    sched = NoiseSchedule.linear(1000)
    a0, a1 = sched.alphas_cumprod[999].item(), sched.alphas_cumprod[0].item()
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    one = GaussianMixture(sched, torch.full((1, 3), 0.5), torch.tensor([0.3]))
    closed = 0.5 * a1**0.5 + (a1 * 0.09 + 1 - a1) ** 0.5 * (x - a0**0.5 * 0.5) / (a0 * 0.09 + 1 - a0) ** 0.5
    assert _rms(one.ode_solve(x, a0, a1, 1000), closed) < 1e-7
    m = _mixture(sched)
    x = x[:, :2]
    assert _rms(m.ode_solve(x, a0, 1.0, 1000), m.ode_solve(x, a0, 1.0, 2000)) < 1e-7
    # ε* is E[ε | x_t]: regress on exact draws of (x₀, ε) at one t.
    x0 = m.sample_data(200_000, seed=3)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ab = sched.alphas_cumprod[300].item()
    x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * eps
    resid = eps - m(x_t, torch.full((x_t.shape[0],), 300))
    assert resid.mean(0).abs().max() < 5e-3
    assert (resid * x_t).mean(0).abs().max() < 5e-3


@pytest.mark.parametrize("sampler", list(ORDERS))
def test_convergence_order(problems, sampler):
    sched, cases = problems
    lo, hi = ORDERS[sampler]
    for name, model, x, exact0, _ in cases:
        errors = [
            _rms(
                ddim.sample(model, x, sched, steps=S, spacing="logsnr", sampler=sampler, set_alpha_to_one=False), exact0
            )
            for S in SIZES
        ]
        slope = -np.polyfit(np.log(SIZES), np.log(errors), 1)[0]
        print(f"\n[{name}] {sampler:9s} RMS error at S={SIZES}: {[f'{e:.2e}' for e in errors]}, order {slope:.2f}")
        assert lo <= slope <= hi, (name, sampler, slope, errors)
        assert errors[-1] < errors[0]


def test_higher_order_beat_ddim_at_10_calls(problems):
    """Default settings (ᾱ_final = 1), log-SNR steps, 10 network calls (heun: 5 steps = 9 calls)."""
    sched, cases = problems
    for name, model, x, _, exact1 in cases:
        err = {}
        for sampler in ("ddim", "plms", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"):
            steps = 5 if sampler == "heun" else 10
            stats: dict = {}
            out = ddim.sample(model, x, sched, steps=steps, spacing="logsnr", sampler=sampler, stats=stats)
            assert stats["nfe"] == (9 if sampler == "heun" else 10)
            err[sampler] = _rms(out, exact1)
        print(f"\n[{name}] RMS error at 10 calls: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
        for sampler in ("plms", "dpmpp_2m", "unipc"):
            assert err[sampler] < err["ddim"] / 3, (name, sampler, err)
        # Third order pays off from ~15 steps; at 10 its log-SNR steps (h ≈ 2.1) are too long for it.
        assert err["dpmpp_3m"] < err["ddim"] / 1.5, (name, err)
        # (Heun spends two calls per step: at 9 calls its 5 steps are too few; it is printed, not asserted.)


def test_dpmpp_and_unipc_at_10_calls_match_ddim_at_50(problems):
    sched, cases = problems
    for name, model, x, _, exact1 in cases:
        ddim50 = _rms(ddim.sample(model, x, sched, steps=50, spacing="logsnr"), exact1)
        for sampler in ("dpmpp_2m", "unipc"):
            e = _rms(ddim.sample(model, x, sched, steps=10, spacing="logsnr", sampler=sampler), exact1)
            assert e < 1.5 * ddim50, (name, sampler, e, ddim50)
