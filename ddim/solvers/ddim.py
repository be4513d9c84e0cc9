"""DDIM (Song, Meng & Ermon, ICLR 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502) and
DDPM ancestral sampling (Ho, Jain & Abbeel, NeurIPS 2020, arXiv 2006.11239): "ddim", "ddpm".

Both are one-step methods: step i goes from level ᾱ_{t_i} to the NEXT LISTED level (never to
t - T//S, so every spacing and every explicit timestep list is sampled exactly) with float64
coefficients on (x̂₀, ε̂) or (x̂₀, x_t) (:func:`ddim_coefficients`, :func:`ddpm_coefficients`), and
:mod:`ddim.engine` runs their tables: two fused ops per step for a linear denoiser. :func:`ddim_step`
is the same DDIM step as a pure function, for loops of one's own (e.g. to differentiate through).
"""

from __future__ import annotations

import torch

from ddim.engine import table_sampler
from ddim.prediction import to_x0_eps
from ddim.registry import Levels

__all__ = ["VARIANCES", "check_eta", "ddim_coefficients", "ddim_step", "ddpm_coefficients", "ddim_table", "ddpm_table"]

#: Noise-scale rules: "eta" = η · Eq. 16's σ; "large" = η · σ̂ with σ̂² = 1 - ᾱ_t/ᾱ_prev (the mean stays η's).
VARIANCES = ("eta", "large")


# ============================================================================ coefficients (float64)
def _f64(v: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


def _ratio(ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """α_{t|s} = ᾱ_t / ᾱ_s (1 where ᾱ_s = 0, i.e. a step between two pure-noise levels)."""
    return torch.where(ab_s > 0, ab_t / torch.where(ab_s > 0, ab_s, torch.ones_like(ab_s)), torch.ones_like(ab_s))


def _noise_ratio(ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """(1 - ᾱ_s) / (1 - ᾱ_t) (1 where ᾱ_t = 1, which forces ᾱ_s = 1)."""
    den = 1.0 - ab_t
    return torch.where(den > 0, (1.0 - ab_s) / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))


def ddim_coefficients(
    alpha_bar_t: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    eta: float | torch.Tensor = 0.0,
    variance: str = "eta",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients of Eq. 12 of Song et al. (2021): x_prev = c_x0·x̂₀ + c_eps·ε̂ + σ·z.

    Args:
        alpha_bar_t, alpha_bar_prev: ᾱ of the current and the next (less noisy) level; floats or
            tensors, broadcast together.
        eta: η ≥ 0 (float or tensor broadcastable with the ᾱ's).
        variance: "eta" (default): σ = σ_η = η·sqrt((1-ᾱ_prev)/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_prev) (Eq. 16; η = 1
            is the DDPM posterior, η = 0 deterministic DDIM). "large": the same mean (c_x0, c_eps of η) with
            the noise of DDPM's larger variance, σ = η·σ̂, σ̂ = sqrt(1-ᾱ_t/ᾱ_prev). At η = 1 that is the
            paper's σ̂ step (Table 1; the reference code's ``ddpm_steps``): the posterior mean and variance
            σ̂² = β_t between the two levels, whenever ε̂ agrees with x_t (no clipping, or
            ``use_clipped_model_output``); ``sampler="ddpm", variance="large"`` is that step in every case.

    Returns:
        float64 tensors (c_x0, c_eps, σ): c_x0 = √ᾱ_prev and c_eps = sqrt(1-ᾱ_prev-σ_η²), clamped at 0
        where σ_η² exceeds 1-ᾱ_prev (η > 1). All finite for ᾱ in [0, 1], including ᾱ_t = 0 (zero
        terminal SNR) and ᾱ_t = ᾱ_prev.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    ab_t, ab_s, eta_t = _f64(alpha_bar_t), _f64(alpha_bar_prev), _f64(eta)
    one_minus_ratio = 1.0 - _ratio(ab_t, ab_s)  # 1 - ᾱ_t/ᾱ_prev = σ̂²
    sigma2 = (eta_t**2 * _noise_ratio(ab_t, ab_s) * one_minus_ratio).clamp(min=0.0)  # Eq. 16, squared
    c_x0 = ab_s.sqrt()
    c_eps = (1.0 - ab_s - sigma2).clamp(min=0.0).sqrt()
    if variance == "large":  # the mean of η, the noise of DDPM's larger variance: σ = η·σ̂
        sigma2 = (eta_t**2 * one_minus_ratio).clamp(min=0.0)
    c_x0, c_eps, sigma = torch.broadcast_tensors(c_x0, c_eps, sigma2.sqrt())
    return c_x0, c_eps, sigma


def ddpm_coefficients(
    alpha_bar_t: float | torch.Tensor, alpha_bar_prev: float | torch.Tensor, variance: str = "eta"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ho et al. (2020), Eq. 6–7, between any two levels: q(x_s | x_t, x̂₀) = N(c_x0·x̂₀ + c_xt·x_t, σ²I).

    With α = ᾱ_t/ᾱ_s and β = 1 - α: c_x0 = √ᾱ_s β/(1-ᾱ_t), c_xt = √α (1-ᾱ_s)/(1-ᾱ_t), and σ² = β̃ =
    β (1-ᾱ_s)/(1-ᾱ_t) (variance="eta": the posterior, identical to DDIM with η = 1) or σ² = β
    (variance="large": Ho et al.'s σ_t² = β_t). Returns float64 tensors (c_x0, c_xt, σ).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    ab_t, ab_s = _f64(alpha_bar_t), _f64(alpha_bar_prev)
    alpha = _ratio(ab_t, ab_s)
    beta = 1.0 - alpha
    frac = _noise_ratio(ab_t, ab_s)  # (1-ᾱ_s)/(1-ᾱ_t)
    # β/(1-ᾱ_t) = (1 - frac)/ᾱ_s; written this way it stays finite at ᾱ_t = 1 and ᾱ_t = 0.
    c_x0 = torch.where(ab_s > 0, (1.0 - frac) / ab_s.clamp(min=1e-300).sqrt(), torch.zeros_like(ab_s))
    c_xt = alpha.sqrt() * frac
    sigma2 = beta * frac if variance == "eta" else beta
    c_x0, c_xt, sigma = torch.broadcast_tensors(c_x0, c_xt, sigma2.clamp(min=0.0).sqrt())
    return c_x0, c_xt, sigma


# ============================================================================ the pure step
def check_eta(eta: object) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float, got {type(eta).__name__}")
    if not eta >= 0 or eta == float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    return float(eta)


def ddim_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar_t: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction: str = "epsilon",
    variance: str = "eta",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One generalized DDIM step (Song, Meng & Ermon 2021, Eq. 12, σ from Eq. 16). Pure.

    x_prev = √ᾱ_prev · x̂₀ + sqrt(1 - ᾱ_prev - σ²) · ε̂ + σ · noise

    Args:
        x_t: [B, ...] floating tensor at level ᾱ_t.
        model_output: the network's raw output at x_t (same shape), interpreted per ``prediction``.
        alpha_bar_t, alpha_bar_prev: ᾱ of x_t and of the target level (python floats or tensors
            broadcastable to x_t, e.g. [B, 1, 1, 1]); coefficients are computed in float64.
        eta: η ≥ 0. 0 (default) is deterministic DDIM; 1 is exactly the DDPM posterior q(x_prev | x_t, x̂₀)
            (mean and variance); values above 1 are allowed (the direction term is then clamped at 0).
        noise: z ~ N(0, I) shaped like x_t; required when η > 0.
        prediction: "epsilon" (default), "sample", "v_prediction" or "flow" (then ``model_output`` is the
            velocity at the flow state :func:`ddim.prediction.input_scale` · x_t).
        variance: "eta" (default, Eq. 16) or "large": the mean of η with noise σ = η·sqrt(1 - ᾱ_t/ᾱ_prev),
            the DDPM "large variance" σ̂ (η = 1 gives the paper's σ̂ step); see :func:`ddim_coefficients`.

    Returns:
        (x_prev, x̂₀), both shaped like x_t in its dtype.

    Example (the worked jump): x_t = 0.90, ᾱ_t = 0.36, ᾱ_prev = 0.64, ε̂ = 0.50 gives
    x̂₀ = (0.90 - 0.8·0.5)/0.6 = 0.8333… and x_prev = 0.8·0.8333… + 0.6·0.5 = 0.9666….
    """
    eta = check_eta(eta)
    if eta > 0 and noise is None:
        raise ValueError("noise is required when eta > 0 (pass z ~ N(0, I) shaped like x_t)")
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_t shape {tuple(x_t.shape)}")
    x0, eps = to_x0_eps(x_t, model_output, alpha_bar_t, prediction)
    c_x0, c_eps, sigma = (
        c.to(device=x_t.device, dtype=x_t.dtype) for c in ddim_coefficients(alpha_bar_t, alpha_bar_prev, eta, variance)
    )
    x_prev = torch.mul(x0, c_x0).addcmul_(eps, c_eps)
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


# ============================================================================ the engine's tables
def _check_variance(eta: float, variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")


@table_sampler("ddim", noisy=lambda eta: eta > 0, check=_check_variance)
def ddim_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """DDIM, Song, Meng & Ermon (2021), Eq. 12 with σ from Eq. 16, over ``levels``.

    Step i (i < N-1): x_{t_{i+1}} = √ᾱ_{t_{i+1}} x̂₀ + sqrt(1 - ᾱ_{t_{i+1}} - σ_i²) ε̂ + σ_i z_i.
    Last step: x = √ᾱ_final x̂₀ + sqrt(1 - ᾱ_final) ε̂ (= x̂₀ when ᾱ_final = 1), always noise-free.
    The engine's table: (0, c_x0, c_eps, σ) of :func:`ddim_coefficients`, η = 0 on the last step.
    """
    ab = levels.alpha_bars
    etas = torch.full((ab.numel() - 1,), eta, dtype=torch.float64)
    etas[-1] = 0.0  # the last step is noise-free
    c_x0, c_eps, sigma = ddim_coefficients(ab[:-1], ab[1:], etas, variance)
    return torch.stack([torch.zeros_like(c_x0), c_x0, c_eps, sigma], dim=1)


@table_sampler("ddpm", noisy=lambda eta: True, check=_check_variance)
def ddpm_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """Ancestral sampling, Ho et al. (2020), between the listed levels.

    Step i: x_{t_{i+1}} = c_x0 x̂₀ + c_xt x_t + σ z, the posterior q(x_{t_{i+1}} | x_t, x̂₀) of
    :func:`ddpm_coefficients` (variance "eta": β̃, the same distribution as DDIM with η = 1;
    "large": β). With all T timesteps listed this is the original DDPM chain; with fewer it is the
    respaced chain (as guided-diffusion's respacing). ``eta`` is unused (the posterior fixes the noise).
    The last step returns the posterior mean without noise (Ho et al. Alg. 2: z = 0 at t = 1). The
    engine's table: (c_xt, c_x0, 0, σ).
    """
    ab = levels.alpha_bars
    c_x0, c_xt, sigma = ddpm_coefficients(ab[:-1], ab[1:], variance)
    sigma = sigma.clone()
    sigma[-1] = 0.0  # the last step never adds noise
    return torch.stack([c_xt, c_x0, torch.zeros_like(c_x0), sigma], dim=1)
