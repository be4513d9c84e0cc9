"""DPM-Solver-v3 ("dpmv3") and its empirical model statistics, on closed-form data.

- Gaussian data: the exact statistics are closed form (l = σ²/v, s = 0, b = 2μα²σ²s²/v², v = α²s² + σ²), and
  with them f is predicted exactly, so the solver is exact up to its quadrature at any number of steps;
  the statistics estimated by :func:`compute_stats` match them.
- A Gaussian mixture: with smooth statistics (any l, s, b: the method is an exact change of variables) and
  without them (l = 1, s = b = 0) the solver converges at its order; with statistics estimated from
  samples it beats UniPC and DPM-Solver++ at 5 and 10 calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddim
from ddim import GaussianMixture, NoiseSchedule
from ddim.cli import run
from ddim.model_stats import (
    ModelStats,
    attach_stats,
    compute_stats,
    degenerate_stats,
    load_stats,
    save_stats,
    stats_for,
    stats_path,
)
from ddim.solvers.dpmv3 import dpmv3_coefficients

SIZES = [16, 23, 32, 45, 64]


class Wrapped:
    """A callable that can carry statistics (a bound method cannot be weakly referenced for long)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *a, **k):
        return self.fn(*a, **k)


def gaussian_stats(mu: float, s: float, K: int = 2001) -> ModelStats:
    lam = torch.linspace(-6, 6, K, dtype=torch.float64)
    a2 = torch.sigmoid(2 * lam)
    s2 = 1 - a2
    v = a2 * s * s + s2
    return ModelStats(lam, s2 / v, torch.zeros_like(lam), 2 * mu * a2 * s2 * s * s / v**2)


def smooth_stats(K: int = 4001) -> ModelStats:
    """Arbitrary smooth statistics: the solver must keep its order with any of them. (l → 1 at low SNR as
    every model's: there f = (σ ε̂ - l x)/α divides by α ≈ 0, and l ≠ 1 makes the problem stiff.)"""
    lam = torch.linspace(-7, 7, K, dtype=torch.float64)
    return ModelStats(lam, 1 - 0.3 * torch.sigmoid(lam), 0.1 * torch.tanh(lam / 2), 0.02 * torch.sin(lam))


def _rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(1000)


@pytest.fixture(scope="module")
def mixture(sched):
    means = torch.tensor([[-0.5, 0.3], [0.6, -0.2], [0.1, 0.8]])
    m = GaussianMixture(sched, means, torch.tensor([0.3, 0.4, 0.5]), torch.tensor([1.0, 2.0, 1.5]))
    x = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ab = sched.alphas_cumprod
    return m, x, m.ode_solve(x, ab[999].item(), ab[0].item(), 1000)


def test_exact_statistics_solve_gaussian_data_exactly(gaussian, sched):
    model = Wrapped(gaussian.eps)
    attach_stats(model, gaussian_stats(gaussian.mu, gaussian.s))
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ab = sched.alphas_cumprod
    exact = gaussian.ode_solution(x, ab[999].item(), ab[0].item())
    for steps in (2, 5, 10):
        out = ddim.sample(model, x, sched, steps=steps, spacing="logsnr", sampler="dpmv3", set_alpha_to_one=False)
        assert _rms(out, exact) < 2e-5, steps  # quadrature only; DPM-Solver++ 3M at 5 steps: 2.5e-2
    plain = ddim.sample(gaussian.eps, x, sched, steps=5, spacing="logsnr", sampler="dpmv3", set_alpha_to_one=False)
    assert _rms(plain, exact) > 1e-3  # without statistics it is an ordinary solver


def test_estimated_statistics_match_the_exact_ones_on_gaussian_data(gaussian, sched):
    g = torch.Generator().manual_seed(5)
    data = gaussian.mu + gaussian.s * torch.randn(256, 4, dtype=torch.float64, generator=g)
    est = compute_stats(Wrapped(gaussian.eps), sched, data, levels=60, batch=100)
    assert est.shape == (4,) and est.lam.numel() == 60
    l, s, b = (v[:, None] for v in gaussian_stats(gaussian.mu, gaussian.s).at(est.lam))
    assert (est.l - l).abs().max() < 1e-4  # Hutchinson's estimate is exact for a diagonal Jacobian
    assert est.s.abs().max() < 1e-2  # f does not vary: nothing to regress on
    assert (est.b - b).abs().max() < 1e-2 and b.max() > 0.2  # a centred difference of f along the ODE, smoothed


@pytest.mark.parametrize("stats", ["smooth", "none"])
def test_convergence_order_on_a_mixture(mixture, sched, stats):
    m, x, exact0 = mixture
    model = Wrapped(m)
    attach_stats(model, smooth_stats() if stats == "smooth" else None)
    errors = [
        _rms(ddim.sample(model, x, sched, steps=S, spacing="logsnr", sampler="dpmv3", set_alpha_to_one=False), exact0)
        for S in SIZES
    ]
    slope = -np.polyfit(np.log(SIZES), np.log(errors), 1)[0]
    shown = [f"{e:.2e}" for e in errors]
    print(f"\n[mixture] dpmv3 ({stats} statistics) RMS error at S={SIZES}: {shown}, order {slope:.2f}")
    assert 2.8 <= slope <= 5.0, (stats, slope, errors)
    assert errors[-1] < 1e-4


def test_estimated_statistics_beat_unipc_and_dpmpp_at_5_and_10_calls(sched):
    mix = GaussianMixture.random(sched, dim=8, components=3, seed=0)
    x = torch.randn(128, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = mix.ode_solve(x, sched.alphas_cumprod[999].item(), 1.0, 1000)
    model = Wrapped(mix)
    attach_stats(model, compute_stats(mix, sched, mix.sample_data(1024, seed=7), levels=100, batch=1024))
    for calls in (5, 10):
        err = {
            s: _rms(ddim.sample(model, x, sched, steps=calls, spacing="logsnr", sampler=s), exact)
            for s in ("dpmv3", "unipc", "dpmpp_2m", "dpmpp_3m")
        }
        print(f"\n[8-D mixture] RMS error at {calls} calls: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
        assert err["dpmv3"] < 0.85 * min(err["unipc"], err["dpmpp_2m"], err["dpmpp_3m"]), err


def test_degenerate_table_first_order_is_ddim(sched):
    levels = ddim.arguments.run_levels(sched, 6, "logsnr", None, True)
    f_coef, pred, corr, orders = dpmv3_coefficients(levels, degenerate_stats(), order=1, corrector=False)
    assert len(pred) == 5 and all(c is None for c in corr) and orders[:5] == [1] * 5
    ab = levels.alpha_bars
    for i, row in enumerate(pred):
        # DDIM in data prediction: x_t = (σ_t/σ_s) x_s + α_t (1 - σ_t α_s/(σ_s α_t)) x̂₀, and f = -x̂₀
        a_s, a_t, s_s, s_t = ab[i].sqrt(), ab[i + 1].sqrt(), (1 - ab[i]).sqrt(), (1 - ab[i + 1]).sqrt()
        assert torch.allclose(row.a, s_t / s_s, rtol=1e-9)
        assert torch.allclose(-row.w[0], a_t - s_t * a_s / s_s, rtol=1e-4)  # the trapezoids: O((h/256)²)
        assert float(row.c) == 0.0 and torch.all(f_coef[i] == 0)


def test_stats_file_round_trip_and_shape_check(tmp_path, sched, gaussian):
    st = smooth_stats(11)
    path = save_stats(st, tmp_path / "m.ems.safetensors", dtype=torch.float64)
    back = load_stats(path)
    for k in ("lam", "l", "s", "b"):
        assert torch.equal(getattr(back, k), getattr(st, k))
    assert stats_path(tmp_path / "model.safetensors") == tmp_path / "model.ems.safetensors"
    assert stats_path(tmp_path) == tmp_path / "model.ems.safetensors"
    with pytest.raises(FileNotFoundError, match="ddim stats"):
        load_stats(tmp_path / "none.ems.safetensors")
    (tmp_path / "bad.ems.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="corrupt"):
        load_stats(tmp_path / "bad.ems.safetensors")
    model = Wrapped(gaussian.eps)
    per_element = ModelStats(st.lam, *(v[:, None].expand(11, 3).clone() for v in (st.l, st.s, st.b)))
    attach_stats(model, per_element)
    with pytest.raises(ValueError, match=r"statistics are for samples shaped \[3\]"):
        ddim.sample(model, torch.zeros(2, 4), sched, steps=3, sampler="dpmv3")
    attach_stats(model, path)  # a file is read on first use
    assert stats_for(model).lam.numel() == 11


def test_the_embedded_model_ships_its_statistics():
    model, schedule, config = ddim.load()
    st = stats_for(model)
    assert st is not None and st.shape == (1, 28, 28) and st.lam.numel() >= 20
    assert float(st.meta["guidance_scale"]) == config["sampling"]["guidance"]
    assert (st.l > -1).all() and (st.l < 2).all()


def test_cli_stats_writes_a_file_that_sampling_uses(tmp_path):
    out = tmp_path / "x.ems.safetensors"
    assert run(["stats", "--n", "2", "--levels", "2", "--batch", "2", "--out", str(out), "--no-progress"]) == 0
    st = load_stats(out)
    assert st.shape == (1, 28, 28) and st.meta["n"] == "2"
    assert run(["stats", "--n", "2", "--out", str(tmp_path / "x.npz")]) == 2
    assert run(["stats", "--n", "100000", "--out", str(out)]) == 2
