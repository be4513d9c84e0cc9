"""The samplers past first order (ddim.solvers): parity with diffusers, call counts, per-sample seeds,
spacings, zero terminal SNR, and bad names and combinations refused before any network call."""

from __future__ import annotations

import pytest
import torch
from conftest import dummy_model, dummy_sample_deter

import ddim
from ddim import NoiseSchedule
from ddim.sampling import Levels, ddim_coefficients
from ddim.solvers.dpmpp import dpmpp_coefficients
from ddim.solvers.karras import heun_timesteps

NEW = ["plms", "plms4", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "euler", "heun"]
DETERMINISTIC = ["plms", "plms4", "dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun"]
BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


class Counting:
    def __init__(self, fn):
        self.fn, self.ts = fn, []

    def __call__(self, x, t, **kw):
        self.ts.append(int(t[0]))
        return self.fn(x, t, **kw)


class Never:
    def __call__(self, x, t, **kw):
        raise AssertionError("model called before validation finished")


def _x() -> torch.Tensor:
    return (dummy_sample_deter() * 2 - 1) * 3


# ----------------------------------------------------------------------------- registry and counts
def test_registered_on_import_and_in_the_cli_choices():
    from ddim.cli.options import sampling_options

    assert set(NEW) <= set(ddim.SAMPLERS)

    @sampling_options
    def f(**kw):
        pass

    choices = next(p for p in f.__click_params__ if p.name == "sampler").type.choices
    assert set(NEW) <= set(choices)


@pytest.mark.parametrize("sampler", NEW)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 12])
def test_calls_are_known_before_and_reported(linear, sampler, steps):
    model, stats, seen = Counting(dummy_model), {}, []
    ddim.sample(
        model,
        torch.randn(2, 3, dtype=torch.float64),
        linear,
        steps=steps,
        spacing="logsnr",
        sampler=sampler,
        seeds=[0, 1],
        stats=stats,
        callback=lambda i, t, x, x0: seen.append((i, t)),
    )
    ts = ddim.timesteps(linear, steps, "logsnr").tolist()
    expected = 2 * steps - 1 if sampler == "heun" else steps
    assert ddim.nfe(sampler, steps) == stats["nfe"] == len(model.ts) == expected
    assert seen == list(enumerate(ts)) and stats["timesteps"] == ts
    # Every call is at a listed timestep; heun's second call of step i is at t_{i+1}.
    assert model.ts == (heun_timesteps(torch.tensor(ts)).tolist() if sampler == "heun" else ts)


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_guided_calls_count_once(linear, sampler):
    model, stats = Counting(lambda x, t, y: dummy_model(x, t) * (1 + y[:, None])), {}
    y = torch.tensor([0.0, 1.0])
    ddim.sample(
        model,
        torch.randn(2, 3),
        linear,
        steps=6,
        sampler=sampler,
        spacing="logsnr",
        guidance_scale=3.0,
        model_kwargs={"y": y},
        uncond_kwargs={"y": torch.zeros(2)},
        stats=stats,
    )
    assert stats["nfe"] == len(model.ts) == ddim.nfe(sampler, 6)


# ----------------------------------------------------------------------------- parity with diffusers
def _diffusers_run(sch, x, steps, spacing, noises=None):
    sch.set_timesteps(steps)
    ts = sch.timesteps.clone()
    for i, t in enumerate(sch.timesteps):
        out = dummy_model(x, t.reshape(1).expand(x.shape[0]))
        kw = {} if noises is None else {"variance_noise": noises[i]}
        x = sch.step(out, t, x, **kw).prev_sample
    return x, ts


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("steps", [4, 10, 20])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize(
    "sampler, cls, cfg",
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"solver_order": 2}),
        ("dpmpp_3m", "DPMSolverMultistepScheduler", {"solver_order": 3}),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 2}),
    ],
)
def test_multistep_parity_with_diffusers(sampler, cls, cfg, spacing, steps, final):
    import diffusers

    sch = getattr(diffusers, cls)(**BASE, timestep_spacing=spacing, final_sigmas_type=final, **cfg)
    x = _x()
    ref, ts = _diffusers_run(sch, x, steps, spacing)
    schedule = NoiseSchedule.from_alphas_cumprod(sch.alphas_cumprod.double())
    ours = ddim.sample(dummy_model, x, schedule, timesteps=ts, sampler=sampler, set_alpha_to_one=final == "zero")
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("linear_path", [True, False])
@pytest.mark.parametrize("steps", [4, 10])
def test_dpmpp_2m_sde_parity_with_diffusers_given_the_same_noise(steps, linear_path, final):
    # diffusers draws noise at every step, the last included: into σ = 0 ("zero", ᾱ = 1) it is multiplied
    # by 0; into σ_min ("sigma_min", ᾱ_0) it adds σ_N sqrt(1 - e^{-2h}) z, and so must we
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(
        **BASE, algorithm_type="sde-dpmsolver++", timestep_spacing="linspace", final_sigmas_type=final
    )
    x, seeds = _x(), [3, 4, 5, 6]
    draw = ddim.StepNoise(x.shape, seeds)
    noises = [draw().clone() for _ in range(steps)]
    ref, ts = _diffusers_run(sch, x, steps, "linspace", noises)
    schedule = NoiseSchedule.from_alphas_cumprod(sch.alphas_cumprod.double())
    # clipping at a range nothing reaches takes the general (non-fused) path with the same result
    kw = {} if linear_path else {"clip_sample": True, "clip_sample_range": 1e6}
    ours = ddim.sample(
        dummy_model,
        x,
        schedule,
        timesteps=ts,
        sampler="dpmpp_2m_sde",
        seeds=seeds,
        set_alpha_to_one=final == "zero",
        **kw,
    )
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    if final == "sigma_min":  # the last step's noise is there: without it the result differs
        noises[-1] = torch.zeros_like(x)
        without, _ = _diffusers_run(sch, x, steps, "linspace", noises)
        assert (ours - without).abs().max().item() > 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("sampler, cls", [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
@pytest.mark.parametrize("steps", [3, 10])
def test_karras_parity_with_diffusers(sampler, cls, steps):
    import diffusers

    sch = getattr(diffusers, cls)(**BASE)
    schedule = NoiseSchedule.from_alphas_cumprod(sch.alphas_cumprod.double())
    ab = schedule.alphas_cumprod
    ts = ddim.timesteps(schedule, steps, "logsnr")
    sch.set_timesteps(timesteps=ts.tolist())
    # diffusers keeps σ in float32; give it the float64 σ of the same listed timesteps (Heun: repeated).
    sigma = ((1 - ab[ts]) / ab[ts]).sqrt()
    sigma = torch.cat([sigma[:1], sigma[1:].repeat_interleave(2)]) if sampler == "heun" else sigma
    assert sch.sigmas.shape == (sigma.numel() + 1,)
    sch.sigmas = torch.cat([sigma, torch.zeros(1, dtype=torch.float64)])
    x = _x().double()
    y = x / ab[ts[0]].sqrt()  # diffusers' state is x/√ᾱ
    for t in sch.timesteps:
        out = dummy_model(sch.scale_model_input(y, t), t.reshape(1).expand(x.shape[0]).long())
        y = sch.step(out, t, y).prev_sample
    ours = ddim.sample(dummy_model, x, schedule, timesteps=ts, sampler=sampler)
    # Euler's step computes in float32 inside diffusers, Heun's in the sample's dtype.
    tol = 1e-5 if sampler == "euler" else 1e-10
    assert (ours - y).abs().max().item() < tol * y.abs().max().item()


# ----------------------------------------------------------------------------- identities
def test_euler_is_ddim(linear, gaussian):
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for spacing in ("logsnr", "trailing"):
        for one in (True, False):
            kw = dict(steps=9, spacing=spacing, set_alpha_to_one=one)
            a = ddim.sample(gaussian.eps, x, linear, sampler="euler", **kw)
            torch.testing.assert_close(
                a, ddim.sample(gaussian.eps, x, linear, sampler="ddim", **kw), rtol=0, atol=1e-12
            )


def test_first_order_steps_are_ddim(linear):
    # DPM-Solver++(1) is DDIM (η = 0), and its SDE form is the DDPM posterior (DDIM with η = 1).
    ts = ddim.timesteps(linear, 6, "logsnr")
    ab = torch.cat([linear.alphas_cumprod[ts], torch.ones(1, dtype=torch.float64)])
    levels = Levels(ts, ab)
    x, x0 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for sde, eta in ((False, 0.0), (True, 1.0)):
        table, _ = dpmpp_coefficients(levels, 1, sde=sde)
        for i in range(5):
            a, k0, _, _, c_z = table[i].tolist()
            c_x0, c_eps, sigma = (float(c) for c in ddim_coefficients(ab[i], ab[i + 1], eta))
            eps = (x - ab[i].sqrt() * x0) / (1 - ab[i]).sqrt()
            torch.testing.assert_close(a * x + k0 * x0, c_x0 * x0 + c_eps * eps)
            assert c_z == pytest.approx(sigma, rel=1e-12)


def test_plms_first_step_is_ddim(linear):
    x = torch.randn(3, 4, dtype=torch.float64)
    for one in (True, False):
        kw = dict(timesteps=[999], set_alpha_to_one=one)
        torch.testing.assert_close(
            ddim.sample(dummy_model, x, linear, sampler="plms", **kw), ddim.sample(dummy_model, x, linear, **kw)
        )


def test_plms_order_rule_and_the_papers_method(linear):
    from ddim.solvers.plms import ADAMS_BASHFORTH, MAX_ORDER, plms_coefficients, plms_order

    assert MAX_ORDER == 3 and {plms_order(s) for s in (1, 10, 20, 50, 1000)} == {3}
    x = torch.randn(3, 4, dtype=torch.float64)
    for steps in (3, 10, 30):
        ts = ddim.timesteps(linear, steps, "leading").tolist()
        plms = ddim.sample(dummy_model, x, linear, timesteps=ts, sampler="plms")
        paper = ddim.sample(dummy_model, x, linear, timesteps=ts, sampler="plms4")
        # the general path (clipping at a range nothing reaches) gives the same runs
        far = {"clip_sample": True, "clip_sample_range": 1e6}
        torch.testing.assert_close(ddim.sample(dummy_model, x, linear, timesteps=ts, sampler="plms4", **far), paper)
        torch.testing.assert_close(ddim.sample(dummy_model, x, linear, timesteps=ts, sampler="plms", **far), plms)
        # identical until a fourth step exists; then order 3 against 4
        if steps <= 3:
            torch.testing.assert_close(plms, paper)
        else:
            assert (plms - paper).abs().max() > 1e-6
    # plms4 is the paper's Eq. 12 from the fourth step on: ε' = (55 ε̂_i - 59 ε̂_{i-1} + 37 ε̂_{i-2} - 9 ε̂_{i-3})/24
    levels = ddim.arguments.run_levels(linear, 8, "leading", None, True)
    table, orders = plms_coefficients(levels, 4)
    assert orders == [1, 2, 3, 4, 4, 4, 4, 4]
    ab = levels.alpha_bars
    i = 5
    s_next, s_i = (1 - ab[i + 1]).sqrt(), (1 - ab[i]).sqrt()
    c = ab[i + 1].sqrt() * s_i / ab[i].sqrt()
    w = [(s_next - c) * b for b in ADAMS_BASHFORTH[3]]
    w[0] += c
    torch.testing.assert_close(table[i, 1:], torch.stack(w))
    assert plms_coefficients(levels, 3)[1] == [1, 2, 3, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="max_order"):
        plms_coefficients(levels, 5)


# ----------------------------------------------------------------------------- the stochastic one
def test_dpmpp_2m_sde_seeded_per_sample(linear, gaussian):
    x_T = ddim.randn((6, 32), range(6), dtype=torch.float64)
    kw = dict(steps=12, sampler="dpmpp_2m_sde", spacing="logsnr")
    full = ddim.sample(gaussian.eps, x_T, linear, seeds=range(6), **kw)
    for i in range(6):
        one = ddim.sample(gaussian.eps, x_T[i : i + 1], linear, seeds=[i], **kw)
        torch.testing.assert_close(one, full[i : i + 1])
    other = ddim.sample(gaussian.eps, x_T, linear, seeds=range(10, 16), **kw)
    assert (other - full).abs().max() > 0.01
    torch.testing.assert_close(ddim.sample(gaussian.eps, x_T, linear, seeds=range(6), eta=1.0, **kw), full)


def test_dpmpp_2m_sde_samples_the_data_distribution(linear, gaussian):
    x_T = torch.randn(4, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x0 = ddim.sample(gaussian.eps, x_T, linear, steps=100, spacing="logsnr", sampler="dpmpp_2m_sde", seeds=range(4))
    assert x0.mean().item() == pytest.approx(gaussian.mu, abs=0.01)
    assert x0.std().item() == pytest.approx(gaussian.s, abs=0.01)


# ----------------------------------------------------------------------------- spacings
@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
@pytest.mark.parametrize("S", [1, 2, 3, 5, 10, 20, 50, 100, 500, 999, 1000])
def test_new_spacings_give_exactly_S_unique_timesteps(linear, spacing, S):
    for sched in (linear, NoiseSchedule.cosine(1000), linear.rescale_zero_terminal_snr()):
        t = ddim.timesteps(sched, S, spacing)
        assert t.shape == (S,) and torch.unique(t).numel() == S and (t[1:] < t[:-1]).all()
        assert int(t[0]) == 999 and int(t.min()) >= 0
        if S >= 2:
            assert int(t[-1]) == 0


def test_logsnr_is_uniform_in_log_snr_and_karras_in_sigma_to_the_one_seventh(linear):
    lam = linear.log_snr()
    t = ddim.timesteps(linear, 8, "logsnr")
    gaps = (lam[t][1:] - lam[t][:-1]).tolist()
    # Uniform up to rounding to integer t, except near t = 0 where λ jumps between neighbours.
    assert max(gaps[:-2]) / min(gaps[:-2]) < 1.05
    sigma = ((1 - linear.alphas_cumprod) / linear.alphas_cumprod).sqrt() ** (1 / 7)
    t = ddim.timesteps(linear, 8, "karras")
    gaps = (sigma[t][:-1] - sigma[t][1:]).tolist()
    assert max(gaps[:-1]) / min(gaps[:-1]) < 1.05


# ----------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("sampler", ["plms", "dpmpp_2m", "dpmpp_3m", "unipc", "dpmpp_2m_sde"])
def test_zero_terminal_snr_with_v_prediction(sampler):
    zsnr = NoiseSchedule.linear(1000).rescale_zero_terminal_snr()
    ts = ddim.timesteps(zsnr, 10, "trailing")
    assert float(zsnr.alphas_cumprod[ts[0]]) == 0.0
    out = ddim.sample(
        dummy_model,
        _x(),
        zsnr,
        steps=10,
        spacing="trailing",
        prediction="v_prediction",
        sampler=sampler,
        seeds=range(4),
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sigma_space_samplers_refuse_zero_terminal_snr(sampler):
    zsnr = NoiseSchedule.linear(1000).rescale_zero_terminal_snr()
    with pytest.raises(ValueError, match="t=999"):
        ddim.sample(Never(), _x(), zsnr, steps=10, spacing="trailing", prediction="v_prediction", sampler=sampler)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"sampler": "dpmpp"}, "valid samplers"),
        ({"sampler": "DDIM"}, "valid samplers"),
        ({"sampler": "unipc", "eta": 0.5}, "eta"),
        ({"sampler": "heun", "eta": 1.0}, "eta"),
        ({"sampler": "plms", "variance": "large"}, "variance"),
        ({"sampler": "dpmpp_2m_sde", "eta": 0.5}, "eta"),
        ({"sampler": "dpmpp_2m_sde", "variance": "large"}, "variance"),
        ({"sampler": "dpmpp_3m", "spacing": "log-snr"}, "spacing"),
    ],
)
def test_bad_names_and_combinations_refused(linear, kwargs, word):
    with pytest.raises(ValueError, match=word):
        ddim.sample(Never(), torch.zeros(2, 3), linear, **kwargs)
    if "sampler" in kwargs and kwargs["sampler"] not in ddim.SAMPLERS:
        with pytest.raises(ValueError, match="unknown sampler"):
            ddim.nfe(kwargs["sampler"], 10)


# ----------------------------------------------------------------------------- dtypes and clipping
@pytest.mark.parametrize("sampler", NEW)
def test_float32_in_float32_out_and_clipping(linear, sampler):
    x = _x()
    out = ddim.sample(dummy_model, x, linear, steps=8, spacing="logsnr", sampler=sampler, seeds=range(4))
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    clipped = ddim.sample(
        dummy_model, x * 10, linear, steps=8, spacing="logsnr", sampler=sampler, seeds=range(4), clip_sample=True
    )
    assert torch.isfinite(clipped).all()
    if sampler not in ("plms", "plms4"):  # the others end on the (clipped) x̂₀ of their last call; PLMS on x̂₀' of ε'
        assert clipped.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("sampler", NEW)
def test_equal_levels_give_no_division_by_zero(sampler):
    # β_t = 0 for t in 400..599: listed timesteps there share one ᾱ (a step of length h = 0).
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    betas[400:600] = 0.0
    sched = NoiseSchedule.from_betas(betas)
    ts = [999, 800, 590, 500, 410, 300, 100, 0]
    for one in (True, False):
        out = ddim.sample(dummy_model, _x(), sched, timesteps=ts, sampler=sampler, seeds=range(4), set_alpha_to_one=one)
        assert torch.isfinite(out).all()
