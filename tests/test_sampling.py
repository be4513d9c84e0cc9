import math

import pytest
import torch
from conftest import GaussianData, dummy_model

import ddim
from ddim import Denoiser, NoiseSchedule
from ddim.sampling import SAMPLERS


class Counting:
    """Wrap a model, counting calls and recording the batch size and t it was given."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, **kw):
        self.calls.append((x.shape[0], t.clone(), dict(kw)))
        return self.fn(x, t, **kw)


def test_callback_sees_every_step_and_nfe_equals_steps(linear):
    for sampler in ("ddim", "ddpm"):
        model = Counting(dummy_model)
        seen, stats = [], {}
        ts = ddim.timesteps(linear, 12, "trailing")
        ddim.sample(
            model,
            torch.randn(2, 3),
            linear,
            steps=12,
            spacing="trailing",
            sampler=sampler,
            callback=lambda i, t, x, x0, seen=seen: seen.append((i, t)),
            stats=stats,
        )
        assert seen == list(enumerate(ts.tolist()))
        assert stats["nfe"] == len(model.calls) == ddim.nfe(sampler, 12) == 12
        assert stats["timesteps"] == ts.tolist()
        for (B, t, _), expected in zip(model.calls, ts.tolist(), strict=True):
            assert B == 2 and t.dtype == torch.int64 and t.shape == (2,) and (t == expected).all()


def test_model_output_with_sample_attribute_and_tuple(linear):
    class Out:
        def __init__(self, sample):
            self.sample = sample

    x = torch.randn(2, 4)
    ref = ddim.sample(dummy_model, x, linear, steps=5)
    torch.testing.assert_close(ddim.sample(lambda x, t: Out(dummy_model(x, t)), x, linear, steps=5), ref)
    torch.testing.assert_close(ddim.sample(lambda x, t: (dummy_model(x, t),), x, linear, steps=5), ref)


def test_real_diffusers_unet_runs():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    schedule = NoiseSchedule.linear(1000)
    with torch.no_grad():
        out = ddim.sample(unet, ddim.randn((2, 1, 8, 8), [0, 1]), schedule, steps=3, eta=0.3, seeds=[0, 1])
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.5), ("ddpm", 0.0), ("ddim", 1.0)])
def test_batch_of_8_equals_8_batches_of_1(gaussian, linear, sampler, eta):
    seeds = [3, 1, 4, 1, 5, 9, 2, 6]
    x_T = ddim.randn((8, 2, 5), seeds, dtype=torch.float64)
    kw = dict(steps=20, sampler=sampler, eta=eta, spacing="trailing")
    batched = ddim.sample(gaussian.eps, x_T, linear, seeds=seeds, **kw)
    for i, s in enumerate(seeds):
        single = ddim.sample(gaussian.eps, ddim.randn((1, 2, 5), [s], dtype=torch.float64), linear, seeds=[s], **kw)
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=1e-12)


def test_randn_matches_per_sample_generators():
    z = ddim.randn((3, 2, 4), [7, 8, 9], dtype=torch.float64)
    for i, s in enumerate([7, 8, 9]):
        ref = torch.randn(2, 4, generator=torch.Generator("cpu").manual_seed(s))
        assert torch.equal(z[i], ref.double())
    assert z.dtype == torch.float64 and z.device.type == "cpu"


def test_ddim_eta_one_equals_ddpm_sampler(gaussian, linear):
    # The η = 1 DDIM step and the DDPM posterior are the same distribution; with the same noise, the same chain.
    x_T = ddim.randn((4, 6), [0, 1, 2, 3], dtype=torch.float64)
    a = ddim.sample(gaussian.eps, x_T, linear, steps=30, eta=1.0, seeds=[0, 1, 2, 3], sampler="ddim")
    b = ddim.sample(gaussian.eps, x_T, linear, steps=30, seeds=[0, 1, 2, 3], sampler="ddpm")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_stochastic_noise_differs_from_x_T_and_global_rng_reproducible(linear):
    # With seeds, step noise continues each generator after x_T (it never reuses x_T).
    seen = []
    x_T = ddim.randn((2, 5), [0, 1])
    ddim.sample(
        lambda x, t: torch.zeros_like(x),
        x_T,
        linear,
        steps=3,
        eta=1.0,
        seeds=[0, 1],
        callback=lambda *a: seen.append(a[2]),
    )
    assert not torch.allclose(seen[1], seen[0])
    torch.manual_seed(123)
    a = ddim.sample(dummy_model, x_T, linear, steps=5, eta=0.7)
    torch.manual_seed(123)
    b = ddim.sample(dummy_model, x_T, linear, steps=5, eta=0.7)
    assert torch.equal(a, b)


def test_explicit_timesteps_equal_spacing(linear):
    x = torch.randn(3, 4)
    ts = ddim.timesteps(linear, 8, "linspace")
    a = ddim.sample(dummy_model, x, linear, steps=8, spacing="linspace")
    b = ddim.sample(dummy_model, x, linear, timesteps=ts.tolist())
    assert torch.equal(a, b)


def test_inputs_untouched_and_dtype_kept(linear):
    x = torch.randn(2, 3, dtype=torch.float64)
    x_copy = x.clone()
    identity_x0 = lambda x, t: x  # noqa: E731 - returns its input: in-place work would corrupt x_T
    out = ddim.sample(identity_x0, x, linear, steps=4, prediction="sample", clip_sample=True, eta=0.5, seeds=[0, 1])
    assert torch.equal(x, x_copy) and out.dtype == torch.float64


def test_set_alpha_to_one_false_ends_on_alpha_0(linear):
    # Last step lands on ᾱ_0: compare with an explicit ddim_step chain ending there.
    x = torch.randn(2, 3, dtype=torch.float64)
    ts = ddim.timesteps(linear, 5, "trailing")
    ab = linear.alphas_cumprod
    levels = [*ab[ts].tolist(), ab[0].item()]
    y = x
    for i, t in enumerate(ts.tolist()):
        y, _ = ddim.ddim_step(y, dummy_model(y, torch.full((2,), t)), levels[i], levels[i + 1])
    out = ddim.sample(dummy_model, x, linear, steps=5, spacing="trailing", set_alpha_to_one=False)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)


def test_thresholding_matches_explicit_chain(linear):
    x = 3 * torch.randn(2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = ddim.timesteps(linear, 6, "leading")
    ab = [*linear.alphas_cumprod[ts].tolist(), 1.0]
    y = x
    for i, t in enumerate(ts.tolist()):
        out = dummy_model(y, torch.full((2,), t))
        x0, eps = ddim.to_x0_eps(y, out, ab[i], "v_prediction", thresholding=True, sample_max_value=1.5)
        y = math.sqrt(ab[i + 1]) * x0 + math.sqrt(1 - ab[i + 1]) * eps
    got = ddim.sample(
        dummy_model, x, linear, steps=6, prediction="v_prediction", thresholding=True, sample_max_value=1.5
    )
    torch.testing.assert_close(got, y, rtol=0, atol=1e-12)


def test_classifier_free_guidance_one_forward_per_step(linear):
    def cond_model(x, t, y, scale):
        return dummy_model(x, t) + scale * y[:, None].to(x.dtype)

    model = Counting(cond_model)
    x = torch.randn(3, 4, dtype=torch.float64)
    y, null = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    stats = {}
    out = ddim.sample(
        model,
        x,
        linear,
        steps=6,
        guidance_scale=4.0,
        model_kwargs={"y": y, "scale": 0.1},
        uncond_kwargs={"y": null, "scale": 0.1},
        stats=stats,
    )
    assert stats["nfe"] == 6 == len(model.calls)
    B, t, kw = model.calls[0]
    assert B == 6 and t.shape == (6,) and torch.equal(kw["y"], torch.cat([y, null])) and kw["scale"] == 0.1

    def guided(x, t):  # u + s (c - u), by hand
        u, c = cond_model(x, t, null, 0.1), cond_model(x, t, y, 0.1)
        return u + 4.0 * (c - u)

    torch.testing.assert_close(out, ddim.sample(guided, x, linear, steps=6), rtol=0, atol=1e-12)
    # guidance_scale = 1 is off: only the conditional model runs
    plain = ddim.sample(cond_model, x, linear, steps=6, model_kwargs={"y": y, "scale": 0.1})
    torch.testing.assert_close(
        plain, ddim.sample(cond_model, x, linear, steps=6, model_kwargs={"y": y, "scale": 0.1}, guidance_scale=1.0)
    )


def test_invert_nfe_callback_and_first_step(linear):
    g = GaussianData(linear)
    model = Counting(g.eps)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    seen, stats = [], {}
    x_T = ddim.invert(
        model, x0, linear, steps=5, spacing="leading", callback=lambda i, t, x, p: seen.append((i, t)), stats=stats
    )
    asc = ddim.timesteps(linear, 5, "leading").flip(0).tolist()  # [0, 200, 400, 600, 800]
    assert [t for _, t in seen] == [asc[0], *asc[:-1]]  # first step uses the smallest listed t
    assert stats["nfe"] == 5 == len(model.calls)
    # first step by hand: x̂₀ = x_0 exactly, ε̂ from the network at (x_0, t_0)
    ab0 = linear.alphas_cumprod[asc[0]].item()
    eps0 = g.eps(x0, torch.full((2,), asc[0]))
    x1 = math.sqrt(ab0) * x0 + math.sqrt(1 - ab0) * eps0
    one = ddim.invert(g.eps, x0, linear, timesteps=[asc[0]])
    torch.testing.assert_close(one, x1, rtol=0, atol=1e-12)
    assert x_T.shape == x0.shape


def test_zero_snr_v_prediction_finite_all_eta():
    sched = NoiseSchedule.linear(1000).rescale_zero_terminal_snr()

    def v_model(x, t):  # a smooth v-model; at ᾱ = 0, x̂₀ = -v
        return 0.5 * x - 0.1 * dummy_model(x, t)

    x_T = ddim.randn((2, 3, 4), [0, 1])
    for eta in (0.0, 0.5, 1.0):
        out = ddim.sample(
            v_model, x_T, sched, steps=10, spacing="trailing", prediction="v_prediction", eta=eta, seeds=[0, 1]
        )
        assert torch.isfinite(out).all()
    out = ddim.sample(
        v_model, x_T, sched, steps=10, spacing="trailing", prediction="v_prediction", sampler="ddpm", seeds=[0, 1]
    )
    assert torch.isfinite(out).all()


def test_large_variance_runs_and_last_step_is_noise_free(linear, gaussian):
    x_T = ddim.randn((2, 8), [0, 1], dtype=torch.float64)
    for sampler in ("ddim", "ddpm"):
        kw = dict(steps=10, sampler=sampler, variance="large", eta=1.0, seeds=[0, 1])
        a = ddim.sample(gaussian.eps, x_T, linear, **kw)
        assert torch.isfinite(a).all()
    # with one step only the (noise-free) last step runs: stochastic settings change nothing
    one = ddim.sample(gaussian.eps, x_T, linear, steps=1, eta=1.0, seeds=[5, 6], variance="large")
    torch.testing.assert_close(one, ddim.sample(gaussian.eps, x_T, linear, steps=1))


def test_denoiser_call_per_sample_timesteps(linear):
    d = Denoiser(dummy_model, linear, "v_prediction")
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    x0, eps = d(x, t)
    for i in range(3):
        xi0, ei = ddim.to_x0_eps(
            x[i : i + 1], dummy_model(x[i : i + 1], t[i : i + 1]), linear.alphas_cumprod[t[i]], "v_prediction"
        )
        torch.testing.assert_close(x0[i : i + 1], xi0)
        torch.testing.assert_close(eps[i : i + 1], ei)
    assert d.nfe == 1


def test_custom_sampler_registry(linear):
    @ddim.register_sampler("_test_two_calls", nfe=lambda steps: 2 * steps)
    def two_calls(denoise, x, levels, *, eta, variance, noise, callback, progress):
        plan = denoise.plan(levels.timesteps.repeat_interleave(2), x)
        for i in range(2 * levels.timesteps.numel()):
            x0, _ = denoise.predict(x, plan, i)
        return x0

    try:
        stats = {}
        ddim.sample(dummy_model, torch.randn(1, 2), linear, steps=3, sampler="_test_two_calls", stats=stats)
        assert stats["nfe"] == ddim.nfe("_test_two_calls", 3) == 6
    finally:
        del SAMPLERS["_test_two_calls"]


def test_noise_source_only_for_runs_that_draw(linear, monkeypatch):
    """A sampler registered with noisy(eta) False is passed noise=None; others get the seeded source."""
    from ddim.noise import StepNoise

    seen = []

    @ddim.register_sampler("_test_maybe_noisy", noisy=lambda eta: eta > 0.5)
    def maybe_noisy(denoise, x, levels, *, eta, variance, noise, callback, progress):
        seen.append(noise)
        return x

    @ddim.register_sampler("_test_default")
    def default(denoise, x, levels, *, eta, variance, noise, callback, progress):
        seen.append(noise)
        return x

    try:
        x = torch.randn(2, 2)
        ddim.sample(dummy_model, x, linear, steps=3, sampler="_test_maybe_noisy", eta=0.2)
        ddim.sample(dummy_model, x, linear, steps=3, sampler="_test_maybe_noisy", eta=1.0, seeds=[4, 5])
        ddim.sample(dummy_model, x, linear, steps=3, sampler="_test_default")
        assert seen[0] is None
        assert isinstance(seen[1], StepNoise) and seen[1].seeds == [4, 5]
        assert isinstance(seen[2], StepNoise)
    finally:
        del SAMPLERS["_test_maybe_noisy"], SAMPLERS["_test_default"]
    # the built-in ODE samplers and η = 0 DDIM draw nothing; DDPM and the SDE solver always do
    assert not any(SAMPLERS[s].noisy(0.0) for s in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "plms", "euler", "heun"))
    assert SAMPLERS["ddim"].noisy(0.3) and SAMPLERS["ddpm"].noisy(0.0) and SAMPLERS["dpmpp_2m_sde"].noisy(0.0)


def test_progress_bar(linear, capsys):
    ddim.sample(dummy_model, torch.randn(1, 2), linear, steps=3, progress=True)
    assert "ddim" in capsys.readouterr().err  # tqdm wrote its bar to stderr


def test_slerp():
    z0 = torch.tensor([1.0, 0.0])
    z1 = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(ddim.slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(ddim.slerp(z0, z1, 1.0), z1)
    mid = ddim.slerp(z0, z1, 0.5)
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    stack = ddim.slerp(z0, z1, torch.linspace(0, 1, 5))
    assert stack.shape == (5, 2)
    torch.testing.assert_close(stack.norm(dim=1), torch.ones(5))
    # (nearly) parallel: falls back to lerp
    torch.testing.assert_close(ddim.slerp(z0, 2 * z0, 0.5), 1.5 * z0)
    # images: shape kept, dtype kept
    a, b = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, dtype=torch.float64)
    assert ddim.slerp(a, b, torch.tensor([0.1, 0.9])).shape == (2, 3, 4, 4)
    assert ddim.slerp(a, b, 0.3).dtype == torch.float64
