"""Adaptive step size (Lu, Zhou, Bao, Chen, Li & Zhu, NeurIPS 2022, "DPM-Solver", Sec. 3.3 and App. C, Alg. 5):
the user gives an error tolerance instead of a number of steps.

Each step from level s proposes a log-SNR length h and makes two estimates of x at λ_s + h from the
same x̂₀(x_s): the first-order one (DDIM in data prediction) and the second-order singlestep one
(DPM-Solver++(2S), one more call at the midpoint λ_s + h/2):

    x_l = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) x̂₀(x_s),
    u   = (σ_m/σ_s) x_s + α_m (1 - e^{-r h}) x̂₀(x_s),                      (λ_m = λ_s + r h)
    x_h = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) ((1 - 1/(2r)) x̂₀(x_s) + 1/(2r) x̂₀(u)).

The step is accepted when E = RMS((x_h - x_l)/δ) ≤ 1, δ = max(atol, rtol·max(|x_l|, |x_s|)) (per
element), and the next h is min(θ h E^{-1/2}, what is left), θ = 0.9, whether or not it was; a rejected
step is retried from the same x_s (x̂₀(x_s) is kept: one call per retry). Levels are the model's integer
timesteps: λ_s + h and the midpoint are rounded to the nearest ones (the formulas use the rounded
levels' exact α, σ, λ). The run ends at t = 0 and returns x̂₀ there (ᾱ = 1, as every sampler here).

Every sample has its own steps (its own error, its own h), computed side by side in one batched call
per round, so image i depends only on its own x_T (and class): the same with any batch. ``stats``
reports the calls each sample used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ddim.prediction import Denoiser, Model
from ddim.schedule import NoiseSchedule

__all__ = ["DEFAULT_ATOL", "sample_adaptive"]

DEFAULT_ATOL = 0.0078  # DPM-Solver's for images in [-1, 1]: half a uint8 level


def check_positive(v: object, name: str, allow_zero: bool = False) -> float:
    """``v`` as a float if it is a finite real number > 0 (>= 0 with ``allow_zero``); else a ValueError
    naming ``name``. Bools are refused."""
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < 0
        or (v == 0 and not allow_zero)
    ):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v!r}")
    return float(v)


@torch.no_grad()
def sample_adaptive(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    rtol: float = 0.05,
    atol: float = DEFAULT_ATOL,
    h_init: float = 0.5,
    theta: float = 0.9,
    max_rounds: int = 500,
    prediction: str = "epsilon",
    model_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    uncond_kwargs: Mapping[str, Any] | None = None,
    clip_sample: bool = False,
    use_clipped_model_output: bool = False,
    set_alpha_to_one: bool = True,
    stats: dict[str, Any] | None = None,
    **denoiser_kwargs: Any,
) -> torch.Tensor:
    """Solve the probability-flow ODE from t = T-1 to ᾱ = 1 with adaptive steps of order 1/2 (see the module).

    Args:
        model, schedule, prediction, model_kwargs, guidance_scale, uncond_kwargs, clip_sample,
            use_clipped_model_output: as :func:`ddim.sample`. Tensors in ``model_kwargs`` /
            ``uncond_kwargs`` whose first dimension is B are per sample: each network call takes only
            the rows of the samples that still step.
        set_alpha_to_one: True (default) returns x̂₀ at t = 0 (ᾱ = 1, one more call); False returns the
            sample at level ᾱ_0 (diffusers' ``set_alpha_to_one=False``).
        x_T: [B, ...] noise at level ᾱ_{T-1} (e.g. ``ddim.randn(shape, seeds)``).
        rtol, atol: the tolerance (default 0.05 and 0.0078, DPM-Solver's for images in [-1, 1]: 1/128,
            half a uint8 level). Smaller: more calls, a result closer to the exact ODE solution.
        h_init: the first step's log-SNR length (default 0.5).
        theta: the safety factor θ of the step-size update (default 0.9).
        max_rounds: at most this many rounds (two batched calls each); an error if a sample is not done.
        stats: filled with "nfe" (batched network calls made), "calls" (list of B ints: the calls each
            sample used, including the final one at t = 0), "accepted" and "rejected" (lists of B ints).
        denoiser_kwargs: the other settings of :class:`~ddim.prediction.Denoiser` (``clip_sample_range``,
            ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value``, ``guidance_rescale``).

    Returns:
        x̂₀ at t = 0 after the last step (or x at ᾱ_0, see ``set_alpha_to_one``), shaped like x_T.
    """
    rtol, atol = check_positive(rtol, "rtol", True), check_positive(atol, "atol", True)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    h_init, theta = check_positive(h_init, "h_init"), check_positive(theta, "theta")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
    if not isinstance(set_alpha_to_one, bool):
        raise ValueError(f"set_alpha_to_one must be a bool, got {set_alpha_to_one!r}")
    B = x_T.shape[0]

    def denoiser(rows: torch.Tensor | None) -> Denoiser:
        """The Denoiser for these rows of the batch (None: all), per-sample kwargs cut to them."""
        return Denoiser(
            model,
            schedule,
            prediction,
            clip_sample=clip_sample,
            use_clipped_model_output=use_clipped_model_output,
            guidance_scale=guidance_scale,
            model_kwargs=_rows(model_kwargs, rows, B),
            uncond_kwargs=_rows(uncond_kwargs, rows, B),
            **denoiser_kwargs,
        )

    denoise_all = denoiser(None)  # checks every setting before the first call
    ab = schedule.alphas_cumprod.double()
    if bool((ab <= 0).any()):
        raise ValueError("adaptive steps need 0 < ᾱ_t for every t (no zero terminal SNR)")
    lam = 0.5 * (ab.log() - torch.log1p(-ab))  # λ_t, decreasing in t
    T = ab.numel()
    dev, dt = x_T.device, x_T.dtype
    ones = [1] * (x_T.ndim - 1)

    def per(v: torch.Tensor) -> torch.Tensor:  # float64 [B] -> [B, 1, ...] in x's dtype and device
        return v.to(device=dev, dtype=dt).reshape(B, *ones)

    def nearest(target: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Per sample, the int t in [lo, hi] whose λ_t is closest to target (λ decreases in t)."""
        idx = torch.searchsorted(-lam, -target).clamp(1, T - 1)  # -λ increasing: λ_{idx-1} >= target > λ_idx
        pick = torch.where((lam[idx - 1] - target).abs() <= (lam[idx] - target).abs(), idx - 1, idx)
        return torch.minimum(torch.maximum(pick, lo), hi)

    t_cur = torch.full((B,), T - 1, dtype=torch.int64)
    h = torch.full((B,), h_init, dtype=torch.float64)
    x = x_T.clone()
    x0_cur = torch.zeros_like(x)
    fresh = torch.ones(B, dtype=torch.bool)  # x̂₀ at the current point still to be computed
    done = torch.zeros(B, dtype=torch.bool)
    calls = torch.zeros(B, dtype=torch.int64)
    accepted = torch.zeros(B, dtype=torch.int64)
    rejected = torch.zeros(B, dtype=torch.int64)
    nfe = 0

    def evaluate(x_in: torch.Tensor, t: torch.Tensor, who: torch.Tensor) -> torch.Tensor:
        """x̂₀ of the rows ``who`` (network run on them only); zeros in the other rows."""
        nonlocal nfe
        if not bool(who.any()):
            return torch.zeros_like(x_in)
        nfe += 1
        calls.add_(who.long())
        if bool(who.all()):
            return denoise_all(x_in, t.to(dev))[0]
        rows = who.nonzero().squeeze(1)
        out = torch.zeros_like(x_in)
        out[rows.to(dev)] = denoiser(rows)(x_in[rows.to(dev)], t[rows].to(dev))[0]
        return out

    for _ in range(max_rounds):
        if bool(done.all()):
            break
        active = ~done
        if not set_alpha_to_one:  # the result is x at level ᾱ_0: no call there
            done |= active & (t_cur == 0)
            active &= ~done
        if bool((fresh & active).any()):
            x0_cur = torch.where(per((fresh & active).double()).bool(), evaluate(x, t_cur, fresh & active), x0_cur)
            fresh &= ~active
        last = active & (t_cur == 0)  # at t = 0: x̂₀ there is the result (or x itself)
        done |= last
        active &= ~last
        if not bool(active.any()):
            continue
        # propose: t_t from λ_s + h, the midpoint strictly between (a one-timestep step is first order)
        lam_s = lam[t_cur]
        t_t = nearest(lam_s + h, torch.zeros_like(t_cur), (t_cur - 1).clamp(min=0))
        two = t_cur - t_t >= 2  # room for a midpoint
        t_m = torch.where(two, nearest(lam_s + h / 2, t_t + 1, (t_cur - 1).clamp(min=0)), t_t)
        lam_t, lam_m = lam[t_t], lam[t_m]
        hh = lam_t - lam_s
        r = torch.where(two, (lam_m - lam_s) / hh, torch.ones_like(hh))
        s_s = (1 - ab[t_cur]).sqrt()
        a_t, s_t = ab[t_t].sqrt(), (1 - ab[t_t]).sqrt()
        a_m, s_m = ab[t_m].sqrt(), (1 - ab[t_m]).sqrt()
        phi_t = -torch.expm1(-hh)  # 1 - e^{-h}
        x_l = per(s_t / s_s) * x + per(a_t * phi_t) * x0_cur
        u = per(s_m / s_s) * x + per(a_m * -torch.expm1(-r * hh)) * x0_cur
        x0_m = evaluate(u, t_m, active & two)
        w = 1 / (2 * r)
        x_h = per(s_t / s_s) * x + per(a_t * phi_t) * (per(1 - w) * x0_cur + per(w) * x0_m)
        x_h = torch.where(per(two.double()).bool(), x_h, x_l)
        delta = torch.maximum(torch.full_like(x, atol), rtol * torch.maximum(x_l.abs(), x.abs()))
        err = ((x_h - x_l) / delta).double().pow(2).flatten(1).mean(1).sqrt().cpu()  # [B]
        ok = active & (err <= 1.0)
        x = torch.where(per(ok.double()).bool(), x_h, x)
        t_cur = torch.where(ok, t_t, t_cur)
        fresh |= ok
        accepted += ok.long()
        rejected += (active & ~ok).long()
        left = lam[0] - lam[t_cur]
        h_new = theta * hh * err.clamp(min=1e-10).pow(-0.5)
        h = torch.where(active, torch.minimum(h_new, left).clamp(min=1e-4), h)
    else:
        if not bool(done.all()):
            raise RuntimeError(f"adaptive sampling did not finish in max_rounds={max_rounds} rounds (loosen rtol/atol)")
    if stats is not None:
        stats.update(nfe=nfe, calls=calls.tolist(), accepted=accepted.tolist(), rejected=rejected.tolist())
    return x0_cur if set_alpha_to_one else x


def _rows(kwargs: Mapping[str, Any] | None, rows: torch.Tensor | None, batch: int) -> Mapping[str, Any] | None:
    """``kwargs`` with every tensor whose first dimension is ``batch`` cut to ``rows`` (None: unchanged)."""
    if kwargs is None or rows is None:
        return kwargs
    return {
        k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch else v
        for k, v in kwargs.items()
    }
