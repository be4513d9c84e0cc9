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


class _CountingRows(torch.nn.Module):
    """A tiny network that counts the rows (samples) it is called on."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, t, **kw):
        self.rows += x.shape[0]
        return self.net(x, t, **kw)


def test_the_network_runs_only_on_samples_still_stepping(problem):
    sched, mix, x, _ = problem
    counted = _CountingRows(mix)
    stats: dict = {}
    sample_adaptive(counted, x[:8], sched, rtol=0.05, atol=0.01, stats=stats)
    assert len(set(stats["calls"])) > 1
    assert counted.rows == sum(stats["calls"])  # a finished sample costs nothing more


def test_set_alpha_to_one_false_returns_x_at_level_alpha_0_one_call_sooner(problem):
    sched, mix, x, _ = problem
    s1: dict = {}
    s0: dict = {}
    x0 = sample_adaptive(mix, x[:4], sched, rtol=0.05, atol=0.01, stats=s1)
    xa = sample_adaptive(mix, x[:4], sched, rtol=0.05, atol=0.01, set_alpha_to_one=False, stats=s0)
    assert s0["calls"] == [c - 1 for c in s1["calls"]]  # no x̂₀ call at t = 0
    # x at ᾱ_0 = sqrt(ᾱ_0) x̂₀ + sqrt(1 - ᾱ_0) ε̂: close to x̂₀ but not it
    ab0 = sched.alphas_cumprod[0].item()
    assert 0 < (xa - x0).abs().max().item() < 5 * (1 - ab0) ** 0.5


def test_generate_with_rtol_reports_each_images_calls_and_ignores_the_batch(tmp_path):
    from conftest import save_tiny_digit_model

    import ddim
    from ddim.generate import generate

    model, sched, config = ddim.load(save_tiny_digit_model(tmp_path / "m"))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    kw = dict(seed=5, n=6, labels=labels, guidance=2.0, clip_sample=True, rtol=0.1)
    a = generate(model, sched, batch=6, **kw)
    b = generate(model, sched, batch=4, **kw)
    assert a.calls is not None and len(a.calls) == 6 and a.nfe == max(a.calls)
    assert a.calls == b.calls and a.info["sampler"] == "adaptive"
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
    one = generate(model, sched, **{**kw, "seed": 8, "n": 1, "labels": labels[3:4]})  # image 3 alone
    torch.testing.assert_close(one.images[0], a.images[3], rtol=0, atol=1e-5)
    assert one.calls == [a.calls[3]]
    with pytest.raises(ValueError, match="no other sampler"):
        generate(model, sched, seed=0, n=2, rtol=0.1, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="give rtol"):
        generate(model, sched, seed=0, n=2, atol=0.1)


def test_cli_sample_with_rtol_and_its_bad_flags(tmp_path, capsys):
    from conftest import save_tiny_digit_model

    from ddim.cli import run

    tiny = save_tiny_digit_model(tmp_path / "m")
    out = tmp_path / "s.npz"
    base = ["sample", "--model", tiny, "-n", "4", "--class", "all", "--no-progress"]
    assert run([*base, "--rtol", "0.1", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "network evaluations per image on average" in said and "adaptive, rtol 0.1" in said, said
    import numpy as np

    assert np.load(out)["images"].shape[0] == 4
    for bad in (["--rtol", "0.1", "--steps", "10"], ["--rtol", "0.1", "--sampler", "unipc"], ["--atol", "0.1"],
                ["--rtol", "0", "--atol", "0"], ["--rtol", "-1"]):  # fmt: skip
        assert run([*base, *bad, "--out", str(tmp_path / "x.png")]) == 2, bad
        assert "--rtol" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
