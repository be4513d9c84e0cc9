"""Editing real images with a diffusion model: DDIM inversion and what is built on it.

- :func:`class_swap`: invert an image with its source condition (class or prompt), regenerate the same
  x_T with a target condition (deterministic DDIM, η = 0, on the same timesteps).
- :func:`sdedit`: SDEdit (Meng et al. 2022): noise the image to the level that ``strength`` selects and
  sample from there; low strength keeps the layout, high strength keeps little.
- :func:`inpaint`: regenerate inside a mask only; outside it the known image, noised to the current
  level with the run's own noise, is put back before every network call (the replacement method of
  Song et al. 2021, Sec. 5; RePaint's resampling as an option), and the known pixels exactly at the end.
- :func:`class_mean_latents`, :func:`latent_arithmetic`: x_T of an image plus the difference of two
  classes' mean inverted latents, decoded.

Every function takes the network's keyword arguments the way :func:`ddim.sample` does
(``model_kwargs``, ``uncond_kwargs`` for guidance), so they serve class labels and prompts alike; the
inversion is plain DDIM (:func:`ddim.invert`). All are deterministic given ``seed``: the noise is
``ddim.randn`` of that seed, the step noise (η > 0) continues the same stream, as in :func:`ddim.sample`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ddim.images import from_uint8, to_8bit, to_uint8
from ddim.noise import StepNoise, randn
from ddim.prediction import Denoiser, Model
from ddim.sampling import ddim_coefficients, invert, sample
from ddim.schedule import NoiseSchedule
from ddim.timesteps import timesteps as make_timesteps

__all__ = [
    "check_mask",
    "check_strength",
    "class_mean_latents",
    "class_swap",
    "composite",
    "fit_image",
    "inpaint",
    "latent_arithmetic",
    "prompt_edit",
    "read_image",
    "read_mask",
    "sdedit",
    "strength_timesteps",
    "to_input_size",
]


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
    method: str = "ddim",
    max_iter: int | list[int] = 4,
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
        method: the inversion, "ddim" (default: plain) or "fixed_point" (exact: with the target equal to
            the source the edit returns x_0; ``max_iter`` calls a step, an int or a per-step list, see
            :func:`ddim.invert`). Both regenerate with :func:`ddim.sample`.
        sample_kwargs: further :func:`ddim.sample` arguments of the regeneration (clipping, ...).

    Returns:
        (edited image [B, C, H, W], latents x_T [B, C, H, W]). With the target equal to the source and no
        guidance the edit is the DDIM reconstruction.
    """
    _check_images(x_0)
    if method not in ("ddim", "fixed_point"):
        raise ValueError(f"method must be 'ddim' or 'fixed_point', got {method!r}")
    if latents is None:
        latents = invert(
            model, x_0, schedule, steps=steps, spacing=spacing, prediction=prediction, model_kwargs=source_kwargs,
            method=method, max_iter=max_iter,
        )  # fmt: skip
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


def check_strength(strength: object) -> float:
    """``strength`` as a float in (0, 1]; ValueError naming it otherwise."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def strength_timesteps(schedule: NoiseSchedule, steps: int, spacing: str, strength: float) -> list[int]:
    """The ``steps`` timesteps (descending) of an SDEdit run of ``strength`` in (0, 1]: exactly ``steps``.

    Strength s selects the first T' = max(1, round(s·T)) timesteps 0 … T'-1 of the schedule, and the
    run visits ``steps`` of them placed by ``spacing`` as :func:`ddim.timesteps` places S steps on T'
    timesteps (so s = 1 is the ordinary ``steps``-step run). Unlike diffusers' img2img, which runs
    int(s·steps) of the ``steps``-step list, the step count is the one asked for. ValueError when
    ``steps`` > T' (e.g. 10 steps at s = 0.005 of T = 1000) or strength is outside (0, 1].
    """
    strength = check_strength(strength)
    T = schedule.T
    T_s = max(1, round(strength * T))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if steps > T_s:
        raise ValueError(
            f"strength {strength:g} keeps {T_s} of the {T} timesteps: at most {T_s} steps, got steps={steps}"
        )
    short = NoiseSchedule(schedule.alphas_cumprod[:T_s])
    return make_timesteps(short, steps, spacing).tolist()


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
    """SDEdit (Meng et al. 2022): noise ``x_0`` to the level ``strength`` selects, then sample ``steps`` steps.

    With ts = :func:`strength_timesteps` (exactly ``steps`` timesteps in the first round(strength·T)) and
    ᾱ = ᾱ_{ts[0]}: x = √ᾱ x_0 + √(1 - ᾱ) z, z = ``ddim.randn`` of ``seeds`` (one per image), then
    ``ddim.sample(..., timesteps=ts)`` (step noise, if any, continues each seed's stream): ``steps``
    network calls.

    Args:
        x_0: float [B, C, H, W] in model space.
        strength: in (0, 1]: how far into the noise the image is taken (1: pure noise at t = T-1 for
            trailing/linspace spacing).
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


def check_mask(mask: object, x_0: torch.Tensor) -> torch.Tensor:
    """``mask`` as a float tensor broadcastable to x_0 [B, C, H, W] with values in [0, 1] (1 = regenerate),
    neither empty nor full. ValueError naming the problem otherwise."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != x_0.ndim:
        raise ValueError(f"mask must be a tensor [B, 1, H, W] like x_0 {tuple(x_0.shape)}")
    m = mask.to(device=x_0.device, dtype=x_0.dtype)
    try:
        torch.broadcast_shapes(m.shape, x_0.shape)
    except RuntimeError:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit x_0 shape {tuple(x_0.shape)}") from None
    if not bool(((m >= 0) & (m <= 1)).all()):
        raise ValueError("mask values must be in [0, 1] (1 = regenerate)")
    return m


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
    resample: int = 1,
) -> torch.Tensor:
    """Regenerate ``x_0`` inside ``mask`` with DDIM (η-family), keeping the rest.

    The run starts from z = ``ddim.randn(seeds)`` as :func:`ddim.sample` does. Before each network call at
    level ᾱ_t the known region is replaced by √ᾱ_t x_0 + √(1 - ᾱ_t) z (the known image at the run's own
    noise, so with η = 0 both regions follow one deterministic path); the step is Eq. 12 of Song et al.
    (2021) with σ from Eq. 16. Where the mask is 0 the result is x_0 itself, bit for bit.

    ``resample`` = r > 1 is RePaint's resampling (Lugmayr et al. 2022, jump length 1): each step but the
    last is taken r times, and between two takes the sample goes back up to the step's level by the
    forward process, x_t = √(ᾱ_t/ᾱ_s) x_s + √(1 - ᾱ_t/ᾱ_s) n with fresh noise n from each seed's step
    stream, which lets the generated region agree with the known one. Network calls: (N-1)·r + 1.

    Args:
        x_0: float [B, C, H, W] in model space, the known image.
        mask: [B or 1, 1 or C, H, W], 1 (or True) = regenerate, 0 = keep; values in [0, 1] blend.
        seeds: one int per image.
        steps, spacing, eta, model_kwargs, uncond_kwargs, guidance_scale, prediction, clip_sample,
            use_clipped_model_output: as :func:`ddim.sample`.
        resample: int ≥ 1 (default 1: no resampling).

    Returns:
        float [B, C, H, W], x_0's dtype and device.
    """
    _check_images(x_0)
    m = check_mask(mask, x_0)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an int >= 1, got {resample!r}")
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
    noisy = eta > 0 or resample > 1
    noise = StepNoise(x_0.shape, seeds, device=x_0.device, dtype=x_0.dtype) if noisy else None
    keep = 1.0 - m
    x = z
    N = ts.numel()
    for i in range(N):
        last = i == N - 1
        a = float(ab[i])
        takes = 1 if last else resample
        for r in range(takes):
            x = m * x + keep * (a**0.5 * x_0 + (1.0 - a) ** 0.5 * z)  # re-impose the known region at ᾱ_t
            x0_hat, eps_hat = denoise(x, int(ts[i]), step=i)
            c_x0, c_eps, sigma = ddim_coefficients(ab[i], ab[i + 1], 0.0 if last else eta)
            x = float(c_x0) * x0_hat + float(c_eps) * eps_hat
            if eta > 0 and not last:
                x = x + float(sigma) * noise()
            if r < takes - 1:  # RePaint: back up to ᾱ_t by the forward process, then take the step again
                ratio = a / float(ab[i + 1])
                x = ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise()
    return torch.where(m == 0, x_0, m * x + keep * x_0)


# ============================================================================ latent arithmetic
def _expand(v: Any, n: int) -> Any:
    """A kwarg tensor with batch dimension 1 repeated to n rows; anything else as it is."""
    return v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 1 else v


@torch.no_grad()
def class_mean_latents(
    model: Model,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[int],
    *,
    steps: int = 50,
    spacing: str = "leading",
    prediction: str = "epsilon",
    model_kwargs: Mapping[str, Any] | None = None,
    method: str = "fixed_point",
    max_iter: int | list[int] = 4,
    per_class: int = 20,
    batch: int = 64,
) -> dict[int, torch.Tensor]:
    """The mean inverted latent of each class: for c in ``classes``, the mean over the first
    ``per_class`` images of ``images`` [N, C, H, W] labelled c (``labels`` int [N]) of their inversions
    x_T (:func:`ddim.invert`, ``method``; under ``model_kwargs``, e.g. ``{"y": tensor([null])}``: tensors
    with a batch dimension of 1 are repeated for every image). Returns {c: float [C, H, W]}. ValueError
    when a class has no image."""
    out = {}
    for c in classes:
        idx = (labels == c).nonzero().flatten()[:per_class]
        if idx.numel() == 0:
            raise ValueError(f"no image of class {c} to average (classes present: {sorted(set(labels.tolist()))})")
        zs = []
        for start in range(0, idx.numel(), batch):
            sel = idx[start : start + batch]
            kw = {k: _expand(v, sel.numel()) for k, v in (model_kwargs or {}).items()}
            zs.append(
                invert(
                    model,
                    images[sel],
                    schedule,
                    steps=steps,
                    spacing=spacing,
                    prediction=prediction,
                    model_kwargs=kw,
                    method=method,
                    max_iter=max_iter,
                )  # fmt: skip
            )
        out[int(c)] = torch.cat(zs).mean(0)
    return out


@torch.no_grad()
def latent_arithmetic(
    model: Model,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    add: torch.Tensor,
    subtract: torch.Tensor,
    *,
    steps: int = 50,
    spacing: str = "leading",
    prediction: str = "epsilon",
    model_kwargs: Mapping[str, Any] | None = None,
    method: str = "fixed_point",
    max_iter: int | list[int] = 4,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent arithmetic on inverted latents: x_T = invert(x_0) + scale·(add - subtract), decoded.

    ``add`` and ``subtract`` are latents [C, H, W] (e.g. :func:`class_mean_latents` of classes A and B);
    inversion and decoding run under ``model_kwargs`` (e.g. the null class) on the same timesteps.
    Returns (edited image [B, C, H, W], the edited latents).
    """
    _check_images(x_0)
    if add.shape != x_0.shape[1:] or subtract.shape != x_0.shape[1:]:
        raise ValueError(f"add/subtract latents must be shaped {tuple(x_0.shape[1:])}")
    common = {"steps": steps, "spacing": spacing, "prediction": prediction, "model_kwargs": model_kwargs}
    z = invert(model, x_0, schedule, method=method, max_iter=max_iter, **common)
    z = z + scale * (add - subtract).to(z)
    return sample(model, z, schedule, **common), z


# ============================================================================ files: images and masks
def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
    """One image file as uint8 [H, W, channels] at its own size (grey or RGB, the full range of 16-bit
    images kept, :func:`ddim.images.to_8bit`). ValueError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            a = np.asarray(to_8bit(im, channels, path))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return a[..., None] if a.ndim == 2 else a


def read_mask(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """A mask file as bool [H, W] (True = regenerate: grey value > 127 after conversion to grey; alpha is
    dropped). Refuses (ValueError) a mask whose (H, W) differs from ``size`` (it is not resized: a
    resampled mask would move the border that stays bit-identical), an empty mask (nothing to do) and a
    full one (nothing kept: use SDEdit at strength 1 or sampling)."""
    a = read_image(path, 1)[..., 0] > 127
    if a.shape != tuple(size):
        raise ValueError(
            f"mask {path} is {a.shape[1]}×{a.shape[0]} (W×H) but the image is {size[1]}×{size[0]}; "
            "give a mask of the image's size"
        )
    if not a.any():
        raise ValueError(f"mask {path} is empty (no pixel > 127): nothing to regenerate")
    if a.all():
        raise ValueError(f"mask {path} covers the whole image: nothing is kept (use --strength 1 for a new image)")
    return a


def fit_image(u8: np.ndarray, size: tuple[int, int], name: object = "image") -> torch.Tensor:
    """uint8 [H, W, C] -> float [1, C, h, w] in [-1, 1] at the model's ``size`` = (h, w), resized
    (bicubic) when needed. ValueError when the aspect ratio differs from the model's (it would be
    distorted) — crop or pad it first."""
    from PIL import Image

    H, W = u8.shape[:2]
    h, w = size
    if H * w != W * h:
        raise ValueError(f"{name} is {W}×{H} (W×H); the model makes {w}×{h} images: crop or pad it to that shape")
    if (H, W) != (h, w):
        im = Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)
        u8 = np.asarray(im.resize((w, h), Image.Resampling.BICUBIC))
        u8 = u8[..., None] if u8.ndim == 2 else u8
    return from_uint8(u8[None])


def to_input_size(x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """float [1, C, h, w] in [-1, 1] -> uint8 [H, W, C] at the input's ``size`` = (H, W) (bicubic)."""
    from PIL import Image

    u8 = to_uint8(x.float().cpu())[0]
    if u8.shape[:2] == tuple(size):
        return u8
    im = Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)
    out = np.asarray(im.resize((size[1], size[0]), Image.Resampling.BICUBIC))
    return out[..., None] if out.ndim == 2 else out


def composite(edited: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C]: ``edited`` where ``mask`` (bool [H, W]) is True, ``original`` (the same pixels,
    bit for bit) elsewhere."""
    return np.where(mask[..., None], edited, original)


# ============================================================================ text models (latent space)
@torch.no_grad()
def prompt_edit(
    model: Any,
    schedule: NoiseSchedule,
    config: Mapping[str, Any],
    images: torch.Tensor,
    source_prompt: str,
    prompt: str,
    *,
    steps: int = 50,
    guidance: float = 1.0,
    method: str = "fixed_point",
    max_iter: int | list[int] | None = None,
    spacing: str | None = None,
) -> dict[str, Any]:
    """Edit images with a Stable Diffusion folder's model (:func:`ddim.load` of a pipeline folder): encode
    with the VAE, invert the latents under ``source_prompt`` (unguided, ``method``: "fixed_point" by
    default with 4 calls a step front-loaded, or "ddim"), regenerate the same z_T under ``prompt`` with
    guidance ``guidance`` against the empty prompt, decode. Latent-space counterpart of :func:`class_swap`.

    Args:
        images: float32 [N, 3, H, W] in [-1, 1], sides multiples of the VAE factor.
        steps, spacing: as :func:`ddim.stable_diffusion.invert_text_images` (default: the folder
            scheduler's timesteps).

    Returns: {"images": edited [N, 3, H, W], "latents": z_T, "encoded": z_0, "edited": the edited latents}.
    """
    from ddim.inversion import front_loaded
    from ddim.stable_diffusion import PromptConditioning, pipeline_sampling_kwargs

    if method not in ("ddim", "fixed_point"):
        raise ValueError(f"method must be 'ddim' or 'fixed_point', got {method!r}")
    n = images.shape[0]
    z0 = model.encode(images)
    kw = pipeline_sampling_kwargs(config, schedule, steps, spacing)
    ts = kw["timesteps"] if kw["timesteps"] is not None else make_timesteps(schedule, steps, kw["spacing"]).tolist()
    pred = config["prediction"]
    src, _ = PromptConditioning.from_prompts(model, [source_prompt])(range(n), z0.device)
    tgt, unc = PromptConditioning.from_prompts(model, [prompt])(range(n), z0.device)
    caps = max_iter if max_iter is not None else front_loaded(len(ts), 4 * len(ts))
    zT = invert(model, z0, schedule, timesteps=ts, prediction=pred, model_kwargs=src, method=method, max_iter=caps)
    g = {"guidance_scale": guidance, "uncond_kwargs": unc} if guidance != 1.0 else {}
    z = sample(model, zT, schedule, timesteps=ts, prediction=pred, model_kwargs=tgt, **g)
    return {"images": model.decode(z), "latents": zT, "encoded": z0, "edited": z}
