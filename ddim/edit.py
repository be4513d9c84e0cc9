"""Editing real images with a diffusion model: DDIM inversion and what is built on it.

- :func:`class_swap`: invert an image with its source condition (class or prompt), regenerate the same
  x_T with a target condition (deterministic DDIM, η = 0, on the same timesteps).
- :func:`sdedit`: SDEdit (Meng et al. 2022): noise the image to the level that ``strength`` selects and
  sample from there; low strength keeps the layout, high strength keeps little.
- :func:`inpaint`: regenerate inside a mask only; outside it the known image, noised to the current
  level with the run's own noise, is put back before every network call (the replacement method of
  Song et al. 2021, Sec. 5 / RePaint without resampling), and the known pixels exactly at the end.

Every function takes the network's keyword arguments the way :func:`ddim.sample` does
(``model_kwargs``, ``uncond_kwargs`` for guidance), so they serve class labels and prompts alike; the
inversion is plain DDIM (:func:`ddim.invert`). All are deterministic given ``seed``: the noise is
``ddim.randn`` of that seed, the step noise (η > 0) continues the same stream, as in :func:`ddim.sample`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ddim.noise import StepNoise, randn
from ddim.prediction import Denoiser, Model
from ddim.sampling import ddim_coefficients, invert, sample
from ddim.schedule import NoiseSchedule
from ddim.timesteps import timesteps as make_timesteps

__all__ = ["class_swap", "sdedit", "inpaint", "strength_timesteps"]


def _check_images(x: object, name: str = "x_0") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a floating tensor [B, C, H, W] in [-1, 1]")
    return x


def class_swap(
    model: Model,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    *,
    source_kwargs: Mapping[str, Any],
    target_kwargs: Mapping[str, Any],
    uncond_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    steps: int = 50,
    spacing: str = "leading",
    prediction: str = "epsilon",
    latents: torch.Tensor | None = None,
    **sample_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``x_0`` under the source condition and regenerate it under the target one.

    Args:
        x_0: float [B, C, H, W] in model space ([-1, 1]).
        source_kwargs: network kwargs of the image's own condition (e.g. ``{"y": source_labels}``);
            the inversion runs unguided under them.
        target_kwargs: network kwargs of the wanted condition, same keys.
        uncond_kwargs, guidance_scale: classifier-free guidance of the regeneration (default off).
        steps, spacing, prediction: the timesteps of both runs (see :func:`ddim.sample`).
        latents: x_T of an earlier inversion of ``x_0`` with the same source kwargs and timesteps, to
            skip the inversion (e.g. a cached one).
        sample_kwargs: further :func:`ddim.sample` arguments of the regeneration (clipping, ...).

    Returns:
        (edited image [B, C, H, W], latents x_T [B, C, H, W]). With the target equal to the source and no
        guidance the edit is the DDIM reconstruction.
    """
    _check_images(x_0)
    if latents is None:
        latents = invert(
            model, x_0, schedule, steps=steps, spacing=spacing, prediction=prediction, model_kwargs=source_kwargs
        )
    out = sample(
        model,
        latents,
        schedule,
        steps=steps,
        spacing=spacing,
        prediction=prediction,
        model_kwargs=target_kwargs,
        guidance_scale=guidance_scale,
        uncond_kwargs=uncond_kwargs if guidance_scale != 1.0 else None,
        **sample_kwargs,
    )
    return out, latents


def strength_timesteps(schedule: NoiseSchedule, steps: int, spacing: str, strength: float) -> list[int]:
    """The tail of the ``steps``-step list that an SDEdit run of ``strength`` in (0, 1] visits.

    The last ``max(1, round(strength · steps))`` timesteps of :func:`ddim.timesteps` (descending):
    strength 1 runs them all, a small strength only the last few (least noisy) steps.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    ts = make_timesteps(schedule, steps, spacing).tolist()
    keep = max(1, round(float(strength) * len(ts)))
    return ts[len(ts) - keep :]


def sdedit(
    model: Model,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    strength: float,
    *,
    seeds: list[int],
    steps: int = 50,
    spacing: str = "leading",
    eta: float = 0.0,
    sampler: str = "ddim",
    model_kwargs: Mapping[str, Any] | None = None,
    uncond_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    prediction: str = "epsilon",
    **sample_kwargs: Any,
) -> torch.Tensor:
    """SDEdit: noise ``x_0`` to the level of the first timestep ``strength`` selects, then sample from there.

    With ts = :func:`strength_timesteps` and ᾱ = ᾱ_{ts[0]}: x = √ᾱ x_0 + √(1 - ᾱ) z, z = ``ddim.randn`` of
    ``seeds`` (one per image), then ``ddim.sample(..., timesteps=ts)`` (step noise, if any, continues
    each seed's stream).

    Args:
        x_0: float [B, C, H, W] in model space.
        strength: in (0, 1]: the fraction of the ``steps``-step run that is redone.
        seeds: one int per image.
        steps, spacing, eta, sampler, model_kwargs, uncond_kwargs, guidance_scale, prediction,
            sample_kwargs: as :func:`ddim.sample`.

    Returns:
        float [B, C, H, W], x_0's dtype and device.
    """
    _check_images(x_0)
    ts = strength_timesteps(schedule, steps, spacing, strength)
    ab = schedule.alphas_cumprod[ts[0]].item()
    z = randn(x_0.shape, seeds, device=x_0.device, dtype=x_0.dtype)
    x_t = ab**0.5 * x_0 + (1.0 - ab) ** 0.5 * z
    return sample(
        model,
        x_t,
        schedule,
        timesteps=ts,
        eta=eta,
        sampler=sampler,
        seeds=seeds,
        prediction=prediction,
        model_kwargs=model_kwargs,
        guidance_scale=guidance_scale,
        uncond_kwargs=uncond_kwargs if guidance_scale != 1.0 else None,
        **sample_kwargs,
    )


@torch.no_grad()
def inpaint(
    model: Model,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    mask: torch.Tensor,
    *,
    seeds: list[int],
    steps: int = 50,
    spacing: str = "leading",
    eta: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    uncond_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    prediction: str = "epsilon",
    clip_sample: bool = False,
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """Regenerate ``x_0`` inside ``mask`` with DDIM (η-family), keeping the rest.

    The run starts from z = ``ddim.randn(seeds)`` as :func:`ddim.sample` does. Before each network call at
    level ᾱ_t the known region is replaced by √ᾱ_t x_0 + √(1 - ᾱ_t) z (the known image at the run's own
    noise, so with η = 0 both regions follow one deterministic path); the step is Eq. 12 of Song et al.
    (2021) with σ from Eq. 16; the result has the known pixels exactly outside the mask.

    Args:
        x_0: float [B, C, H, W] in model space, the known image.
        mask: [B or 1, 1 or C, H, W], 1 (or True) = regenerate, 0 = keep; values in [0, 1] blend.
        seeds: one int per image.
        steps, spacing, eta, model_kwargs, uncond_kwargs, guidance_scale, prediction, clip_sample,
            use_clipped_model_output: as :func:`ddim.sample`.

    Returns:
        float [B, C, H, W], x_0's dtype and device.
    """
    _check_images(x_0)
    if not isinstance(mask, torch.Tensor) or mask.ndim != x_0.ndim:
        raise ValueError(f"mask must be a tensor [B, 1, H, W] like x_0 {tuple(x_0.shape)}")
    m = mask.to(device=x_0.device, dtype=x_0.dtype)
    try:
        torch.broadcast_shapes(m.shape, x_0.shape)
    except RuntimeError:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit x_0 shape {tuple(x_0.shape)}") from None
    if not bool(((m >= 0) & (m <= 1)).all()):
        raise ValueError("mask values must be in [0, 1] (1 = regenerate)")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    ts = make_timesteps(schedule, steps, spacing)
    ab = torch.cat([schedule.alphas_cumprod[ts], torch.ones(1, dtype=torch.float64)])
    denoise = Denoiser(
        model,
        schedule,
        prediction,
        clip_sample=clip_sample,
        use_clipped_model_output=use_clipped_model_output,
        guidance_scale=guidance_scale,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs if guidance_scale != 1.0 else None,
    )
    z = randn(x_0.shape, seeds, device=x_0.device, dtype=x_0.dtype)
    noise = StepNoise(x_0.shape, seeds, device=x_0.device, dtype=x_0.dtype) if eta > 0 else None
    keep = 1.0 - m
    x = z
    N = ts.numel()
    for i in range(N):
        a = float(ab[i])
        x = m * x + keep * (a**0.5 * x_0 + (1.0 - a) ** 0.5 * z)  # re-impose the known region at ᾱ_t
        x0_hat, eps_hat = denoise(x, int(ts[i]), step=i)
        last = i == N - 1
        c_x0, c_eps, sigma = ddim_coefficients(ab[i], ab[i + 1], 0.0 if last else eta)
        x = float(c_x0) * x0_hat + float(c_eps) * eps_hat
        if noise is not None and not last:
            x = x + float(sigma) * noise()
    return m * x + keep * x_0
