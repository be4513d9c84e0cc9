"""The public entry point :func:`sample`, and the names around it re-exported for compatibility.

Notation: a run visits the listed timesteps t_0 > t_1 > … > t_{N-1} (see :mod:`ddim.timesteps`)
and then makes one last step to ᾱ_final = 1 (or ᾱ_0 with ``set_alpha_to_one=False``, as latent
diffusion and diffusers do). Step i goes from level ᾱ_{t_i} to the NEXT LISTED level — never to
t - T//S — so every spacing and every explicit timestep list is sampled exactly.

Where the rest lives: the registry of samplers and the run's :class:`Levels` in :mod:`ddim.registry`;
the loops that run every sampler in :mod:`ddim.engine`; each sampler's table in :mod:`ddim.solvers`
(DDIM and DDPM in :mod:`ddim.solvers.ddim`); :func:`invert` in :mod:`ddim.inversion`; argument checks
in :mod:`ddim.arguments`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ddim.arguments import check_bool, check_x, in_model_dtype, no_grad, run_levels, zero_snr
from ddim.inversion import INVERSIONS, invert
from ddim.noise import StepNoise, check_seeds
from ddim.prediction import Denoiser, Model, check_prediction, check_zero_snr
from ddim.registry import SAMPLERS, Callback, Levels, SamplerSpec, check_sampler, nfe, progress_bar, register_sampler
from ddim.schedule import NoiseSchedule
from ddim.solvers.ddim import VARIANCES, check_eta, ddim_coefficients, ddim_step, ddpm_coefficients

__all__ = [
    "INVERSIONS",
    "SAMPLERS",
    "VARIANCES",
    "Callback",
    "Levels",
    "SamplerSpec",
    "ddim_coefficients",
    "ddim_step",
    "ddpm_coefficients",
    "invert",
    "nfe",
    "register_sampler",
    "sample",
]

#: compatibility: the progress bar of sampler loops (now :func:`ddim.registry.progress_bar`)
_bar = progress_bar


@no_grad
def sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    timesteps: Sequence[int] | torch.Tensor | None = None,
    prediction: str = "epsilon",
    clip_sample: bool = False,
    seeds: Sequence[int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    sampler: str = "ddim",
    set_alpha_to_one: bool = True,
    guidance_scale: float = 1.0,
    uncond_kwargs: Mapping[str, Any] | None = None,
    thresholding: bool = False,
    variance: str = "eta",
    clip_sample_range: float = 1.0,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    stats: dict[str, Any] | None = None,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Sample x_0 from x_T with DDIM (default) or DDPM ancestral steps.

    Args:
        model: ``model(x_t, t, **model_kwargs)``; x_t [B, ...], t int64 [B] on x_T's device; returns a
            tensor shaped like x_t (or an object with ``.sample``).
        x_T: [B, ...] floating tensor at level ᾱ of the first listed timestep (usually N(0, I), e.g.
            ``ddim.randn(shape, seeds)``). Output has its shape, dtype and device; x_T is not modified.
            The run itself is in the dtype of the model's weights (a float64 or float16 x_T on a
            float32 model runs in float32 and comes back in x_T's dtype).
        schedule: the model's training :class:`~ddim.schedule.NoiseSchedule`.
        steps: number of listed timesteps S in [1, T] (default 50) = number of network evaluations.
            For sampler="ddpm", steps=T (with any spacing) is the original T-step DDPM chain and fewer
            steps give the respaced chain. Ignored when ``timesteps`` is given.
        eta: η ≥ 0 (default 0: deterministic DDIM; 1: DDPM posterior noise). For "ddpm" leave 0 or 1.
        spacing: "leading" (default), "trailing", "linspace", "quadratic" (see :func:`ddim.timesteps`).
        timesteps: an explicit strictly descending list of ints in [0, T-1]; overrides steps/spacing.
        prediction: "epsilon" (default), "sample", "v_prediction" or "flow" (a velocity model on
            :meth:`NoiseSchedule.flow`, see :class:`~ddim.prediction.Denoiser`).
        clip_sample, clip_sample_range: clamp x̂₀ to ±range (default off, range 1.0).
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic thresholding of x̂₀
            (default off, 0.995, 1.0).
        use_clipped_model_output: after clipping/thresholding, recompute ε̂ from the clipped x̂₀ (True,
            guided-diffusion's convention) or keep the model's ε̂ (False, default: diffusers'
            ``DDIMScheduler``/``DDIMPipeline``). Samplers that step on x̂₀ and x_t only ("ddpm", whose
            posterior mean uses the clipped x̂₀ as diffusers' ``DDPMScheduler`` does, "dpmpp_*", "unipc")
            give the same result either way. No effect without clipping or thresholding.
        seeds: one int per sample for the step noise (η > 0 or "ddpm"): sample i's noise comes from
            ``torch.Generator("cpu").manual_seed(seeds[i])`` (after skipping one draw, the x_T that
            ``ddim.randn`` makes from the same seed), drawn in float32 on CPU, so a batch of 8 equals 8
            batches of 1. None (default): torch's global CPU RNG, one draw per sample per step.
        model_kwargs: extra network kwargs (e.g. class labels), default none.
        callback: ``callback(i, t, x_t, x0_pred)`` at every step i = 0 … N-1, with t the int timestep,
            x_t the sample the network saw and x0_pred its x̂₀ (after clipping).
        progress: show a tqdm bar (default False).
        sampler: a key of :data:`SAMPLERS`: "ddim" (default) or "ddpm".
        set_alpha_to_one: the last step lands on ᾱ = 1, returning x̂₀ (default True); False lands on
            ᾱ_0 = alphas_cumprod[0] (latent diffusion / diffusers' set_alpha_to_one=False).
        guidance_scale, uncond_kwargs, guidance_rescale: classifier-free guidance and Lin et al.'s
            rescale φ (default 0), see :class:`~ddim.prediction.Denoiser`.
        variance: "eta" (default, Eq. 16) or "large": DDPM's larger variance σ̂² = 1 - ᾱ_t/ᾱ_prev (β of the
            respaced chain). ``sampler="ddpm", variance="large"`` is the paper's σ̂ row of Table 1 (the
            reference code's DDPM step: posterior mean from x_t and x̂₀, noise σ̂); "ddim" with η keeps
            η's mean and draws noise η·σ̂ (the same step at η = 1 when ε̂ agrees with x_t).
        stats: if a dict is given it is filled with "nfe" (network evaluations made, equal to
            :func:`nfe` ``(sampler, steps)``), "timesteps" (the listed timesteps) and "sampler".

    Every step goes from one listed timestep to the next listed one; the last step is noise-free.
    All arguments are validated before the first network call (errors name the argument). ε-prediction
    with a listed ᾱ_t = 0 (zero terminal SNR) is refused: use v-prediction. A model output with NaN/Inf
    raises FloatingPointError naming the step i and timestep t. The loop never waits for the device:
    "ddim"/"ddpm" without clipping or thresholding check only the result (a NaN/Inf output always
    reaches it) and, if it is not finite, run again checking every call to name the step; otherwise
    every call is checked (on CPU at once; on accelerators after the loop). Runs under
    ``torch.no_grad()``; to differentiate through sampling, loop over :func:`ddim_step` yourself.

    Returns:
        x_0, shaped like x_T.
    """
    check_x(x_T, "x_T")
    x_T, out_dtype = in_model_dtype(model, x_T)
    spec = check_sampler(sampler)
    eta = check_eta(eta)
    if sampler == "ddpm" and eta not in (0.0, 1.0):
        raise ValueError(f"eta is fixed at 1 by sampler='ddpm' (leave it at 0 or pass 1), got {eta}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    check_prediction(prediction)
    check_bool(set_alpha_to_one, "set_alpha_to_one")
    check_bool(clip_sample, "clip_sample")
    check_bool(thresholding, "thresholding")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    levels = run_levels(schedule, steps, spacing, timesteps, set_alpha_to_one)
    ts = levels.timesteps
    if seeds is not None:
        seeds = check_seeds(seeds, x_T.shape[0])
    if prediction == "epsilon" and zero_snr(levels):
        check_zero_snr(prediction, levels.alpha_bars[:-1], ts)
    denoise = Denoiser(
        model,
        schedule,
        prediction,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value,
        use_clipped_model_output=use_clipped_model_output,
        guidance_scale=guidance_scale,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
        guidance_rescale=guidance_rescale,
    )
    # a deterministic run makes no noise source (building one costs more than a step's arithmetic)
    noise = (
        StepNoise(x_T.shape, seeds, device=x_T.device, dtype=x_T.dtype, block=ts.numel()) if spec.noisy(eta) else None
    )
    x = spec.fn(denoise, x_T, levels, eta=eta, variance=variance, noise=noise, callback=callback, progress=progress)
    if stats is not None:
        stats.update(nfe=denoise.nfe, timesteps=ts.tolist(), sampler=sampler)
    return x if out_dtype is None else x.to(out_dtype)
