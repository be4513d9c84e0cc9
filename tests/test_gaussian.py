"""Closed-form checks with Gaussian data x₀ ~ N(μ, s²) per dimension, where the optimal ε* is exact."""

import math

import numpy as np
import pytest
import torch

import ddim

SIZES = [10, 20, 40, 80, 160]


def _x_at(schedule, t: int, n: int, seed: int, data) -> torch.Tensor:
    """Samples of the exact marginal q(x_t) = N(√ᾱ μ, ᾱ s² + 1 - ᾱ), float64 [4, n]."""
    ab = schedule.alphas_cumprod[t].item()
    z = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return math.sqrt(ab) * data.mu + math.sqrt(ab * data.s**2 + 1 - ab) * z


def test_exact_eps_is_the_posterior_mean_noise(gaussian, linear):
    # ε*(x_t) = E[ε | x_t]; check by regression on samples of (x₀, ε) at one t.
    t, n = 400, 400_000
    ab = linear.alphas_cumprod[t].item()
    g = torch.Generator().manual_seed(0)
    x0 = gaussian.mu + gaussian.s * torch.randn(n, dtype=torch.float64, generator=g)
    eps = torch.randn(n, dtype=torch.float64, generator=g)
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    pred = gaussian.eps(x_t[:, None], torch.full((n,), t))[:, 0]
    resid = eps - pred  # uncorrelated with x_t and zero-mean if pred = E[ε | x_t]
    assert abs(resid.mean().item()) < 5e-3
    assert abs(torch.corrcoef(torch.stack([resid, x_t]))[0, 1].item()) < 5e-3


def test_probability_flow_invariant_is_kept_as_steps_refine(gaussian, linear):
    # Along every DDIM trajectory the invariant drifts only by the (first-order) discretisation error.
    x = _x_at(linear, 999, 16, 1, gaussian)
    ab = linear.alphas_cumprod
    z0 = gaussian.invariant(x, ab[999].item())
    drifts = []
    for S in (100, 1000):
        seen = []
        ddim.sample(
            gaussian.eps,
            x,
            linear,
            steps=S,
            spacing="trailing",
            callback=lambda i, t, x_t, x0, seen=seen: seen.append((t, x_t)),
        )
        drifts.append(max((gaussian.invariant(x_t, ab[t].item()) - z0).abs().max().item() for t, x_t in seen))
    assert drifts[1] < 0.02 and drifts[1] < drifts[0] / 5


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddim_converges_first_order(gaussian, linear, spacing):
    # All lists start at t = T-1 and end on ᾱ = 1; the exact ODE solution maps the invariant across.
    x = _x_at(linear, 999, 64, 0, gaussian)
    exact = gaussian.ode_solution(x, linear.alphas_cumprod[999].item(), 1.0)
    errors = []
    for S in SIZES:
        ts = ddim.timesteps(linear, S, spacing)
        assert int(ts[0]) == 999
        errors.append((ddim.sample(gaussian.eps, x, linear, steps=S, spacing=spacing) - exact).abs().max().item())
    slope = -np.polyfit(np.log(SIZES), np.log(errors), 1)[0]
    print(f"\n[gaussian] DDIM (eta=0, {spacing}) max error vs S={SIZES}: {[f'{e:.3g}' for e in errors]}")
    print(f"[gaussian] DDIM convergence slope ({spacing}): {slope:.3f}")
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert 0.8 < slope < 1.3


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_invert_then_sample_error_falls_with_steps(gaussian, linear, spacing):
    x0 = gaussian.mu + gaussian.s * torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    errors = []
    for S in SIZES:
        x_T = ddim.invert(gaussian.eps, x0, linear, steps=S, spacing=spacing)
        back = ddim.sample(gaussian.eps, x_T, linear, steps=S, spacing=spacing)
        errors.append(((back - x0) ** 2).mean().item())
    print(f"\n[gaussian] invert->sample MSE ({spacing}) for S={SIZES}: {[f'{e:.2e}' for e in errors]}")
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0] / 50


def test_inverted_latent_is_standard_normal_like(gaussian, linear):
    # Inverting exact data at fine steps recovers the invariant, which is N(0, 1) for x₀ ~ N(μ, s²).
    x0 = gaussian.mu + gaussian.s * torch.randn(
        2, 20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    x_T = ddim.invert(gaussian.eps, x0, linear, steps=200, spacing="linspace")
    z = gaussian.invariant(x_T, linear.alphas_cumprod[999].item())
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert (z - (x0 - gaussian.mu) / gaussian.s).abs().max().item() < 0.15


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_samples_have_the_data_distribution(gaussian, linear, sampler, eta):
    x_T = torch.randn(8, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # All T steps: the std falls short by O(1/S) (0.014 at S=100 for DDIM, 0.027 for DDPM).
    x0 = ddim.sample(gaussian.eps, x_T, linear, steps=1000, sampler=sampler, eta=eta, seeds=range(8))
    assert x0.mean().item() == pytest.approx(gaussian.mu, abs=0.005)
    assert x0.std().item() == pytest.approx(gaussian.s, abs=0.008)
