"""The stepping engine: a sampler is a table and a declaration (docs/engine.md), and the engine runs it."""

import pathlib

import pytest
import torch
from conftest import dummy_model

import ddim
from ddim.engine import table_sampler
from ddim.solvers.ddim import ddim_coefficients

FAR = {"clip_sample": True, "clip_sample_range": 1e9}  # a non-linear denoiser: the general path, same math


@pytest.fixture
def registered():
    """Names registered by a test, removed afterwards."""
    names = []
    yield names
    for name in names:
        ddim.SAMPLERS.pop(name, None)


def test_a_new_table_sampler_runs_fused_and_general(linear, registered):
    # DDIM again, written as the docs' walk-through writes a sampler: the table and one registration
    @table_sampler("test_ddim_again")
    def table(levels, eta, variance):
        ab = levels.alpha_bars
        c_x0, c_eps, _ = ddim_coefficients(ab[:-1], ab[1:])
        zero = torch.zeros_like(c_x0)
        return torch.stack([zero, c_x0, c_eps, zero], dim=1)  # (a, b, c, σ)

    registered.append("test_ddim_again")
    x = ddim.randn((3, 2, 8), [1, 2, 3], dtype=torch.float64)
    ref = ddim.sample(dummy_model, x, linear, steps=7)
    assert ddim.nfe("test_ddim_again", 7) == 7
    torch.testing.assert_close(ddim.sample(dummy_model, x, linear, steps=7, sampler="test_ddim_again"), ref)
    torch.testing.assert_close(ddim.sample(dummy_model, x, linear, steps=7, sampler="test_ddim_again", **FAR), ref)
    with pytest.raises(ValueError, match="deterministic"):  # the default check of an ODE sampler
        ddim.sample(dummy_model, x, linear, steps=7, sampler="test_ddim_again", eta=0.5)


def test_a_history_table_on_eps_matches_its_hand_written_loop(linear, registered):
    # x_{i+1} = √ᾱ_{i+1} x̂₀_i + √(1-ᾱ_{i+1}) (ε̂_i + ε̂_{i-1}) / 2 (ε̂_{i-1} = ε̂_i at step 0): history 1 on ε̂
    @table_sampler("test_mean_eps", history=1, past="eps", final_x0=False)
    def table(levels, eta, variance):
        ab = levels.alpha_bars
        a, s = ab[1:].sqrt(), (1 - ab[1:]).sqrt()
        c = s / 2
        c[0] = s[0]
        w = s / 2
        w[0] = 0.0
        return torch.stack([torch.zeros_like(a), a, c, w, torch.zeros_like(a)], dim=1)

    registered.append("test_mean_eps")
    x = ddim.randn((2, 5), [4, 5], dtype=torch.float64)
    ts = ddim.timesteps(linear, 6, "trailing")
    ab = torch.cat([linear.alphas_cumprod[ts], torch.ones(1, dtype=torch.float64)])
    ref, prev = x, None
    for i, t in enumerate(ts.tolist()):
        x0, eps = ddim.to_x0_eps(ref, dummy_model(ref, torch.full((2,), t)), ab[i])
        mean = eps if prev is None else (eps + prev) / 2
        ref, prev = ab[i + 1].sqrt() * x0 + (1 - ab[i + 1]).sqrt() * mean, eps
    for kw in ({}, FAR):
        got = ddim.sample(dummy_model, x, linear, timesteps=ts, sampler="test_mean_eps", **kw)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_a_table_of_the_wrong_shape_is_refused_before_any_call(linear, registered):
    @table_sampler("test_bad_table", history=1)
    def table(levels, eta, variance):
        return torch.zeros(levels.timesteps.numel(), 4, dtype=torch.float64)  # 4 + H = 5 columns expected

    registered.append("test_bad_table")

    def never(x, t):
        raise AssertionError("the network was called")

    for kw in ({}, FAR):
        with pytest.raises(ValueError, match=r"test_bad_table.*float64 \[5, 5\]"):
            ddim.sample(never, torch.zeros(2, 3), linear, steps=5, sampler="test_bad_table", **kw)


def test_noisy_samplers_need_a_noise_source(linear):
    denoise = ddim.Denoiser(dummy_model, linear)
    levels = ddim.arguments.run_levels(linear, 4, "leading", None, True)
    with pytest.raises(ValueError, match="noise source"):
        ddim.SAMPLERS["ddpm"].fn(denoise, torch.zeros(2, 3), levels, eta=1.0)


def test_no_solver_module_calls_the_network_or_loops_over_steps():
    # a solver declares a table (and Heun a step): the engine alone calls the network and loops over steps
    for path in (pathlib.Path(ddim.__file__).parent / "solvers").glob("*.py"):
        text = path.read_text()
        for word in ("denoise.", ".output(", "callback(", "progress_bar(", "bar.update(", "finish(plan)"):
            assert word not in text, (path.name, word)
