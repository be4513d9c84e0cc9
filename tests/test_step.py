import math

import pytest
import torch

import ddim
from ddim import ddim_coefficients, ddim_step, ddpm_coefficients, to_x0_eps


def test_worked_jump_from_the_seeds():
    # x_t = 0.90 at ᾱ_t = 0.36 (√ = 0.6, √(1-ᾱ) = 0.8), ε̂ = 0.50, to ᾱ_s = 0.64 (√ = 0.8, √(1-ᾱ) = 0.6).
    x_t, eps = torch.tensor([0.90], dtype=torch.float64), torch.tensor([0.50], dtype=torch.float64)
    x_s, x0 = ddim_step(x_t, eps, 0.36, 0.64)
    assert x0.item() == pytest.approx(0.8333333333333334, abs=1e-12)
    assert x_s.item() == pytest.approx(0.9666666666666667, abs=1e-12)


def test_worked_jump_all_parameterisations_agree():
    ab = 0.36
    x_t = torch.tensor([0.90], dtype=torch.float64)
    eps = torch.tensor([0.50], dtype=torch.float64)
    x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0
    for out, pred in [(eps, "epsilon"), (x0, "sample"), (v, "v_prediction")]:
        x_s, x0_hat = ddim_step(x_t, out, ab, 0.64, prediction=pred)
        assert x_s.item() == pytest.approx(0.9666666666666667, abs=1e-12)
        assert x0_hat.item() == pytest.approx(0.8333333333333334, abs=1e-12)


def test_tensor_alpha_bars_broadcast_per_sample():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = torch.randn_like(x)
    ab_t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64).reshape(3, 1, 1, 1)
    ab_s = torch.tensor([0.4, 0.6, 0.9], dtype=torch.float64).reshape(3, 1, 1, 1)
    batched, _ = ddim_step(x, out, ab_t, ab_s)
    for i in range(3):
        single, _ = ddim_step(x[i : i + 1], out[i : i + 1], float(ab_t[i]), float(ab_s[i]))
        torch.testing.assert_close(batched[i : i + 1], single)


def test_eta_one_is_ddpm_posterior_analytically():
    # DDPM posterior q(x_s | x_t, x0): mean = √ᾱ_s β/(1-ᾱ_t) x0 + √α (1-ᾱ_s)/(1-ᾱ_t) x_t, var = β (1-ᾱ_s)/(1-ᾱ_t)
    for ab_t, ab_s in [(0.36, 0.64), (0.01, 0.2), (0.9, 0.95), (0.0, 0.3)]:
        alpha = ab_t / ab_s
        beta = 1 - alpha
        mean_x0 = math.sqrt(ab_s) * beta / (1 - ab_t)
        mean_xt = math.sqrt(alpha) * (1 - ab_s) / (1 - ab_t)
        var = beta * (1 - ab_s) / (1 - ab_t)
        x_t = torch.tensor([0.7, -1.3], dtype=torch.float64)
        x0 = torch.tensor([0.2, 0.9], dtype=torch.float64)
        x_s, _ = ddim_step(x_t, x0, ab_t, ab_s, eta=1.0, noise=torch.zeros(2, dtype=torch.float64), prediction="sample")
        torch.testing.assert_close(x_s, mean_x0 * x0 + mean_xt * x_t, rtol=0, atol=1e-12)
        _, _, sigma = ddim_coefficients(ab_t, ab_s, 1.0)
        assert sigma.item() ** 2 == pytest.approx(var, abs=1e-14)
        c_x0, c_xt, s2 = ddpm_coefficients(ab_t, ab_s)
        assert (c_x0.item(), c_xt.item(), s2.item() ** 2) == pytest.approx((mean_x0, mean_xt, var), abs=1e-12)


def test_eta_one_is_ddpm_posterior_empirically():
    ab_t, ab_s = 0.3, 0.55
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x_t = torch.full((n,), 0.4, dtype=torch.float64)
    x0 = torch.full((n,), -0.6, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    x_s, _ = ddim_step(x_t, x0, ab_t, ab_s, eta=1.0, noise=z, prediction="sample")
    alpha, beta = ab_t / ab_s, 1 - ab_t / ab_s
    mean = math.sqrt(ab_s) * beta / (1 - ab_t) * -0.6 + math.sqrt(alpha) * (1 - ab_s) / (1 - ab_t) * 0.4
    var = beta * (1 - ab_s) / (1 - ab_t)
    assert x_s.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / n))
    assert x_s.var().item() == pytest.approx(var, rel=0.01)


def _reference_ddpm_noisy_step(x, e, at, atm1, z):
    """One step of the DDIM paper's σ̂ sampler as its reference code writes it (ermongroup/ddim,
    ``ddpm_steps``: x̂₀ from ε̂, clamped to [-1, 1], posterior mean from x̂₀ and x_t, log-variance log β_t
    with β_t = 1 - ᾱ_t/ᾱ_{t-1} between the listed levels)."""
    beta_t = 1 - at / atm1
    x0_from_e = ((1.0 / at) ** 0.5 * x - (1.0 / at - 1) ** 0.5 * e).clamp(-1, 1)
    mean = (atm1**0.5 * beta_t * x0_from_e + (1 - beta_t) ** 0.5 * (1 - atm1) * x) / (1.0 - at)
    return mean + math.exp(0.5 * math.log(beta_t)) * z


@pytest.mark.parametrize("at, atm1", [(0.36, 0.64), (0.5, 0.52), (0.02, 0.9)])
def test_sigma_hat_is_the_papers_ddpm_step(at, atm1):
    g = torch.Generator().manual_seed(0)
    x, e, z = (torch.randn(1, 64, generator=g, dtype=torch.float64) for _ in range(3))
    x = x * 0.3  # a point whose x̂₀ stays inside [-1, 1] for the unclipped comparisons
    ref = _reference_ddpm_noisy_step(x, e, at, atm1, z)
    assert ((1.0 / at) ** 0.5 * x - (1.0 / at - 1) ** 0.5 * e).abs().max() > 1  # the clamp bites here
    # sampler="ddpm", variance="large": the reference step exactly, clipping included
    c_x0, c_xt, sigma = ddpm_coefficients(at, atm1, "large")
    x0, _ = to_x0_eps(x, e, at, clip_sample=True)
    torch.testing.assert_close(c_x0 * x0 + c_xt * x + sigma * z, ref)
    assert sigma.item() ** 2 == pytest.approx(1 - at / atm1)
    # DDIM with η = 1 and variance "large": the same mean and noise σ̂ wherever ε̂ agrees with x_t
    # (no clipping, or ε̂ recomputed from the clipped x̂₀) — never a shrunken direction term
    for clip, recompute in ((True, True), (False, False)):
        out, _ = ddim_step(x, e, at, atm1, eta=1.0, noise=z, variance="large") if not clip else (None, None)
        x0c, ec = to_x0_eps(x, e, at, clip_sample=clip, use_clipped_model_output=recompute)
        c0, ce, s = ddim_coefficients(at, atm1, 1.0, "large")
        step = c0 * x0c + ce * ec + s * z
        if clip:
            torch.testing.assert_close(step, ref)
        else:
            torch.testing.assert_close(step, out)
            beta_t = 1 - at / atm1
            x0u = (1.0 / at) ** 0.5 * x - (1.0 / at - 1) ** 0.5 * e
            mean = (atm1**0.5 * beta_t * x0u + (1 - beta_t) ** 0.5 * (1 - atm1) * x) / (1.0 - at)
            torch.testing.assert_close(out, mean + beta_t**0.5 * z)
    # the mean's direction term is η's, not 0: here σ̂² = 0.4375 > 1 - ᾱ_prev = 0.36 and it stays > 0
    _, c_eps, _ = ddim_coefficients(0.36, 0.64, 1.0, variance="large")
    assert c_eps.item() > 0


def test_eta_zero_is_deterministic_and_ignores_noise():
    x = torch.randn(2, 5)
    out = torch.randn(2, 5)
    a, _ = ddim_step(x, out, 0.3, 0.6)
    b, _ = ddim_step(x, out, 0.3, 0.6, eta=0.0, noise=torch.randn(2, 5))
    assert torch.equal(a, b)


def test_zero_snr_coefficients_finite():
    for eta in (0.0, 0.5, 1.0, 2.0):
        for variance in ("eta", "large"):
            coefs = ddim_coefficients(0.0, 0.1, eta, variance)
            assert all(torch.isfinite(c).all() for c in coefs)
    assert all(torch.isfinite(c).all() for c in ddpm_coefficients(0.0, 0.1))
    # degenerate steps: ᾱ_t = ᾱ_s = 1 and = 0
    for ab in (0.0, 1.0):
        assert all(torch.isfinite(c).all() for c in ddim_coefficients(ab, ab, 1.0))
        assert all(torch.isfinite(c).all() for c in ddpm_coefficients(ab, ab))


def test_v_prediction_at_zero_snr():
    x = torch.randn(4, 3)
    v = torch.randn(4, 3)
    x0, eps = to_x0_eps(x, v, 0.0, "v_prediction")
    torch.testing.assert_close(x0, -v)
    torch.testing.assert_close(eps, x)
    for eta in (0.0, 0.5, 1.0):
        x_s, _ = ddim_step(x, v, 0.0, 0.2, eta=eta, noise=torch.randn(4, 3), prediction="v_prediction")
        assert torch.isfinite(x_s).all()


def test_clipping_keeps_the_models_eps_unless_asked_to_recompute_it():
    x = torch.tensor([[3.0, -0.2]], dtype=torch.float64)
    out = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    ab = 0.5
    # default, as diffusers' DDIMScheduler.step: x̂₀ clipped, ε̂ the model's own
    x0, eps = to_x0_eps(x, out, ab, clip_sample=True)
    assert x0.abs().max() <= 1.0
    torch.testing.assert_close(eps, out)
    # use_clipped_model_output=True: ε̂ recomputed so that (x̂₀, ε̂) describe x_t again
    x0c, epsc = to_x0_eps(x, out, ab, clip_sample=True, use_clipped_model_output=True)
    torch.testing.assert_close(x0c, x0)
    torch.testing.assert_close(x, math.sqrt(ab) * x0c + math.sqrt(1 - ab) * epsc)
    assert not torch.allclose(epsc, out)
    # v-prediction: ε̂ from the unclipped x̂₀ (diffusers computes it before clipping)
    _, eps_v = to_x0_eps(x, out, ab, "v_prediction", clip_sample=True)
    torch.testing.assert_close(eps_v, math.sqrt(ab) * out + math.sqrt(1 - ab) * x)
    with pytest.raises(TypeError, match="use_clipped_model_output"):
        to_x0_eps(x, out, ab, clip_sample=True, use_clipped_model_output=1)


def test_dynamic_thresholding_per_sample():
    x0 = torch.stack([torch.linspace(-3, 3, 1000), torch.linspace(-0.5, 0.5, 1000)])
    th = ddim.dynamic_threshold(x0, 0.995, sample_max_value := 2.0)
    assert th[0].abs().max() <= 1.0 + 1e-6  # s clamped to 2: clamp to ±2 then divide by 2
    torch.testing.assert_close(th[0, 500], x0[0, 500] / sample_max_value)
    torch.testing.assert_close(th[1], x0[1])  # s < 1 -> s = 1: plain clipping, no change here
