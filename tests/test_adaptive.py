"""Adaptive step size (DPM-Solver's order-1/2 pair): tolerance -> error on closed-form data, per-sample steps."""

from __future__ import annotations

import pytest
import torch

from ddim import GaussianMixture, NoiseSchedule
from ddim.adaptive import sample_adaptive
from ddim.noise import randn


@pytest.fixture(scope="module")
def problem():
    sched = NoiseSchedule.linear(1000)
    mix = GaussianMixture.random(sched, dim=8, components=3, seed=0)
    x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return sched, mix, x, mix.ode_solve(x, sched.alphas_cumprod[999].item(), 1.0, 1000)


def test_a_tighter_tolerance_costs_more_calls_and_lands_closer(problem):
    sched, mix, x, exact = problem
    errors, calls = [], []
    for tol in (0.1, 0.02, 0.005):
        stats: dict = {}
        out = sample_adaptive(mix, x, sched, rtol=tol, atol=tol / 6, stats=stats)
        errors.append((out - exact).pow(2).mean().sqrt().item())
        calls.append(sum(stats["calls"]) / len(stats["calls"]))
        assert len(stats["calls"]) == 32 and stats["nfe"] >= max(stats["calls"])
        assert all(a >= 1 for a in stats["accepted"])
    print(f"\n[8-D mixture] adaptive: tolerance 0.1/0.02/0.005 -> RMS error {errors}, mean calls {calls}")
    # measured: 9.6e-2 / 4.5e-3 / 1.2e-3 at 17 / 38 / 70 calls a sample: the error follows the tolerance
    assert errors[0] > 5 * errors[1] > 5 * 2 * errors[2]
    assert errors[0] < 2 * 0.1 and errors[1] < 2 * 0.02 and errors[2] < 2 * 0.005
    assert calls[0] < calls[1] < calls[2]


def test_each_sample_takes_its_own_steps(problem):
    sched, mix, x, _ = problem
    stats: dict = {}
    whole = sample_adaptive(mix, x[:6], sched, rtol=0.05, atol=0.01, stats=stats)
    assert len(set(stats["calls"])) > 1  # samples differ in how many calls they needed
    for i in (0, 3):
        one_stats: dict = {}
        one = sample_adaptive(mix, x[i : i + 1], sched, rtol=0.05, atol=0.01, stats=one_stats)
        torch.testing.assert_close(one[0], whole[i], rtol=0, atol=1e-12)
        assert one_stats["calls"] == [stats["calls"][i]]
    again = sample_adaptive(mix, x[:6], sched, rtol=0.05, atol=0.01)
    assert torch.equal(again, whole)  # deterministic


def test_runs_a_network_with_guidance(linear):
    from ddim.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_levels=(), num_classes=3
        )
    ).eval()
    y = torch.tensor([0, 2])
    stats: dict = {}
    out = sample_adaptive(
        net,
        randn((2, 1, 8, 8), [0, 1]),
        linear,
        rtol=0.1,
        model_kwargs={"y": y},
        guidance_scale=2.0,
        uncond_kwargs={"y": torch.full_like(y, 3)},
        clip_sample=True,
        stats=stats,
    )
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 1
    assert stats["nfe"] >= 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"rtol": -1}, "rtol"),
        ({"rtol": 0, "atol": 0}, "both be 0"),
        ({"h_init": 0}, "h_init"),
        ({"max_rounds": 0}, "max_rounds"),
    ],
)
def test_bad_arguments_are_refused(problem, kw, match):
    sched, mix, x, _ = problem
    with pytest.raises(ValueError, match=match):
        sample_adaptive(mix, x[:1], sched, **kw)


def test_too_few_rounds_is_an_error(problem):
    sched, mix, x, _ = problem
    with pytest.raises(RuntimeError, match="max_rounds"):
        sample_adaptive(mix, x[:2], sched, rtol=1e-4, atol=1e-5, max_rounds=3)
