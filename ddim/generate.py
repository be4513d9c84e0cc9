"""Generating, inverting and interpolating images with a loaded model: what ``ddim sample``,
``ddim invert``, ``ddim interpolate`` and ``ddim compare`` do, as library functions.

Image i of a request uses seed ``seed + i``: its x_T is ``ddim.randn`` of that seed and any
step noise comes from the same seed, so image i does not depend on the batch it is drawn in.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim.checkpoint import atomic_write
from ddim.images import from_uint8, make_grid, save_png, to_8bit, to_uint8
from ddim.interpolate import slerp
from ddim.noise import check_seed_range, check_seeds, randn
from ddim.sampling import SAMPLERS, nfe, sample
from ddim.schedule import NoiseSchedule

__all__ = [
    "KEEP",
    "SampleResult",
    "seed_chunks",
    "check_labels",
    "check_guidance",
    "parse_classes",
    "generate",
    "sample_shape",
    "invert_images",
    "interpolate_seeds",
    "write_images",
    "write_uint8",
    "save_npz",
    "load_images",
]


#: What :func:`generate` keeps of the images it made: "float" (float32 in model space), "uint8" (only
#: the 8-bit images that are written to files, a quarter of the memory) or "none" (nothing: every chunk
#: went to ``on_batch``).
KEEP = ("float", "uint8", "none")


@dataclass
class SampleResult:
    """Images made by :func:`generate`.

    Attributes:
        images: float32 [N, C, H, W] in model space (about [-1, 1]); with ``keep="uint8"`` or ``"none"``
            an empty [0, C, H, W] tensor.
        labels: int64 [N]; -1 = unconditional.
        seeds: the seed of each image.
        nfe: network evaluations per batch (the same for every batch).
        seconds: wall time of the sampling.
        uint8: with ``keep="uint8"``, the images as written to files: uint8 [N, H, W, C]
            (:func:`~ddim.images.to_uint8`); else None.
        calls: with adaptive steps (``rtol``), the network calls each image used; else None (every
            image used ``nfe``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    seeds: list[int]
    nfe: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    uint8: np.ndarray | None = None
    calls: list[int] | None = None


def parse_classes(spec: str | int | Sequence[int] | None, n: int, num_classes: int) -> torch.Tensor:
    """Labels for ``n`` images from a class spec; int64 [n], -1 meaning unconditional.

    ``None`` -> all unconditional; an int C -> all class C; a comma list "1,2,3" -> cycled over
    the images; "all" -> image i gets class i mod num_classes.
    """
    if spec is None:
        return torch.full((n,), -1, dtype=torch.long)
    if num_classes == 0:
        raise ValueError("class: this model is unconditional (it has no classes)")
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return torch.arange(n, dtype=torch.long) % num_classes
        try:
            values = [int(v) for v in s.split(",") if v.strip() != ""]
        except ValueError:
            raise ValueError(f"class must be an int, a comma list of ints or 'all', got {spec!r}") from None
    elif isinstance(spec, int):
        values = [spec]
    else:
        values = [int(v) for v in spec]
    if not values:
        raise ValueError(f"class must name at least one class, got {spec!r}")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    return torch.tensor([values[i % len(values)] for i in range(n)], dtype=torch.long)


def seed_chunks(seeds: Sequence[int], batch: int) -> list[slice]:
    """Split ``seeds`` into the batches :func:`generate` runs: consecutive runs of seeds that share
    ``seed // batch`` (fixed chunks aligned in seed space, the first and last of a range possibly short).

    Returns slices into ``seeds``. A chunk never holds more than ``batch`` seeds, and which seeds share
    a batch is a function of the seeds alone: a run over seeds 0..9 with batch 4 runs {0..3}, {4..7},
    {8, 9}, whether one process does them all or two processes take whole chunks each.
    """
    out: list[slice] = []
    start = 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or i - start >= batch or seeds[i] // batch != seeds[start] // batch:
            out.append(slice(start, i))
            start = i
    return out


def check_labels(model: object, labels: torch.Tensor | Sequence[int] | None, n: int) -> torch.Tensor:
    """Class labels for ``n`` images as int64 [n]: -1 (unconditional) or a class of ``model`` (0..K-1).

    Raises ValueError naming ``labels`` for a wrong shape, a label outside [-1, K) or any label but -1
    on an unconditional model (K = ``model.config.num_classes``, 0 when absent). Label K itself is the
    null class the network was trained with; ask for it with -1.
    """
    if labels is None:
        return torch.full((n,), -1, dtype=torch.long)
    t = torch.as_tensor(labels)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"labels must be ints, got dtype {t.dtype}")
    t = t.to(torch.long)
    if t.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(t.shape)}")
    k = int(getattr(getattr(model, "config", None), "num_classes", 0) or 0)
    bad = t[(t < -1) | (t >= k)] if n else t
    if bad.numel():
        valid = f"-1 (unconditional) or a class 0..{k - 1}" if k else "-1 (this model is unconditional)"
        raise ValueError(f"labels must be {valid}, got {int(bad[0])}")
    return t


def check_guidance(guidance: object) -> float:
    """``guidance`` as a float; raises ValueError unless it is a finite number (TypeError for a non-number)."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"guidance must be a number, got {guidance!r}")
    g = float(guidance)
    if not math.isfinite(g):
        raise ValueError(f"guidance must be a finite number (1 = no guidance), got {g}")
    return g


def _class_kwargs(model: torch.nn.Module, labels: torch.Tensor, device: torch.device) -> tuple[dict, dict | None]:
    k = getattr(getattr(model, "config", None), "num_classes", 0)
    if not k:
        return {}, None
    y = torch.where(labels < 0, torch.full_like(labels, k), labels).to(device)
    return {"y": y}, {"y": torch.full_like(y, k)}


def sample_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """The shape of one sample of ``model`` from its config: ``config.sample_shape`` when it has one
    (:class:`~ddim.unet.UNetConfig`: (C, L), (C, H, W) or (C, F, H, W)), else (C, S, S) from
    ``in_channels`` and ``image_size``."""
    cfg = model.config
    shape = getattr(cfg, "sample_shape", None)
    return tuple(shape) if shape is not None else (cfg.in_channels, cfg.image_size, cfg.image_size)


def generate(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    *,
    n: int = 16,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    sampler: str = "ddim",
    timesteps: Sequence[int] | None = None,
    prediction: str = "epsilon",
    clip_sample: bool = False,
    variance: str = "eta",
    batch: int = 256,
    image_shape: Sequence[int] | None = None,
    progress: bool = False,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    keep: str = "float",
    device: str | torch.device = "cpu",
    sample_kwargs: dict[str, Any] | None = None,
    conditioning: Callable[[Sequence[int], torch.device], tuple[dict, dict | None]] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> SampleResult:
    """Sample ``n`` images, image i from seed ``seed + i``, in chunks of ``batch``.

    Args:
        seeds: explicit seeds, one per image (overrides ``n`` and ``seed``); an empty list gives an
            empty result (a rank with nothing left to do).
        model: a :class:`~ddim.unet.UNet` (or any model callable ``model(x, t, y=...)``).
        labels: int64 [n] class per image, -1 = unconditional (the null class); None = all -1.
        guidance: classifier-free guidance weight (1 = none) for the conditional images.
        steps, eta, spacing, sampler, timesteps, prediction, clip_sample: see :func:`ddim.sample`.
        variance: the noise scale of stochastic DDIM/DDPM steps, see :func:`ddim.sample`: "eta"
            (default, σ of Eq. 16 times η) or "large" (η·σ̂ with σ̂² = 1 - ᾱ_t/ᾱ_prev: at η = 1 the
            σ̂ row of Table 1 of Song et al.).
        batch: images per network batch. Batches are fixed chunks of seed space (see
            :func:`seed_chunks`): the seeds ``k·batch .. (k+1)·batch - 1`` that are asked for run together,
            so a seed's batch depends on the seeds alone, never on how a request was split (ranks, resumed
            folders, sub-ranges). Mathematically the images do not depend on ``batch``; in floating point a
            kernel may round differently for another batch size, changing a pixel by one level. Memory: one
            chunk in flight, plus what ``keep`` keeps.
        image_shape: [C, H, W] (or [C, L], [C, F, H, W], any shape the model takes); default from
            ``model.config`` (:func:`sample_shape`).
        on_batch: called as ``on_batch(first_index, images_chunk)`` after each chunk (float32
            [b, C, H, W] on the CPU), e.g. to write it out (streaming).
        keep: what the result holds (:data:`KEEP`): "float" (default) every image in float32;
            "uint8" only the 8-bit images that files store, filled in chunk by chunk (4× less memory
            than float32, and the same bytes as converting the float images at the end: the
            conversion is per pixel); "none" nothing (the chunks went to ``on_batch``).
        device: where x_T, the labels and the sampling live (the model must be there).
        sample_kwargs: further :func:`ddim.sample` arguments (e.g. ``set_alpha_to_one``,
            ``clip_sample_range``, thresholding: what :func:`ddim.diffusers_io.sampling_kwargs` reads
            from a model's config).
        conditioning: ``conditioning(seeds, device) -> (model_kwargs, uncond_kwargs)`` for the images of
            a chunk, replacing the class labels (e.g. a :class:`ddim.stable_diffusion.PromptConditioning`:
            text embeddings). Guidance applies when ``guidance != 1`` and uncond_kwargs is not None.
        decode: ``decode(x0) -> images`` applied to each sampled chunk (a latent model's VAE decoder,
            e.g. ``model.decode``); ``image_shape`` is then the shape sampled (the latents) and the
            results hold the decoded images.
        rtol, atol: give ``rtol`` for adaptive steps instead of a step count
            (:func:`ddim.adaptive.sample_adaptive`: DPM-Solver's order-1/2 pair, each image its own steps);
            ``atol`` defaults to 0.0078 (half a uint8 level of [-1, 1]). ``steps`` and ``spacing`` are
            then unused; ``sampler`` must stay "ddim", ``eta`` 0 and ``timesteps`` None.

    Returns:
        A :class:`SampleResult` (images on the CPU); with ``rtol``, ``calls`` holds each image's calls
        and ``nfe`` the most any image used.
    """
    if seeds is not None:
        n = len(seeds)
    if not isinstance(n, int) or n < (0 if seeds is not None else 1):
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    sample_kwargs = dict(sample_kwargs or {})
    given = sample_kwargs.pop("variance", None)  # the way to ask for it before generate(variance=...)
    if given is not None:
        if variance not in ("eta", given):
            raise ValueError(f"variance={variance!r} and sample_kwargs['variance']={given!r} disagree")
        variance = given
    adaptive = _check_tolerance(rtol, atol, sampler, eta, timesteps)
    labels = check_labels(model, labels, n)
    guidance = check_guidance(guidance)
    if image_shape is None:
        image_shape = sample_shape(model)
    image_shape = tuple(int(d) for d in image_shape)
    if keep == "uint8" and len(image_shape) != 3:
        raise ValueError(f"keep='uint8' needs images [C, H, W]; these samples are {list(image_shape)}: keep 'float'")
    if seeds is None:
        check_seed_range(seed, n)
        seeds = [seed + i for i in range(n)]
    else:
        seeds = check_seeds(seeds, n)
    device = torch.device(device)
    chunks: list[torch.Tensor] = []
    u8 = np.empty((n, *image_shape[1:], image_shape[0]), dtype=np.uint8) if keep == "uint8" and decode is None else None
    calls = nfe(sampler, len(timesteps) if timesteps is not None else steps)
    per_image: list[int] = []
    bar = None
    if progress:
        from tqdm import tqdm

        desc = f"adaptive rtol {adaptive[0]:g}" if adaptive else f"{sampler} {calls} NFE"
        bar = tqdm(total=n, unit="img", desc=desc)
    tic = time.perf_counter()
    with torch.inference_mode():
        for sl in seed_chunks(seeds, batch):
            x_T = randn((sl.stop - sl.start, *image_shape), seeds[sl], device=device)
            if conditioning is None:
                kwargs, uncond = _class_kwargs(model, labels[sl], device)
                guided = guidance != 1.0 and uncond is not None and bool((labels[sl] >= 0).any())
            else:
                kwargs, uncond = conditioning(seeds[sl], device)
                guided = guidance != 1.0 and uncond is not None
            if adaptive:
                from ddim.adaptive import sample_adaptive

                stats: dict[str, Any] = {}
                x0 = sample_adaptive(
                    model,
                    x_T,
                    schedule,
                    rtol=adaptive[0],
                    atol=adaptive[1],
                    prediction=prediction,
                    clip_sample=clip_sample,
                    model_kwargs=kwargs,
                    guidance_scale=guidance if guided else 1.0,
                    uncond_kwargs=uncond if guided else None,
                    stats=stats,
                    **sample_kwargs,
                )
                per_image.extend(stats["calls"])
            else:
                x0 = sample(
                    model,
                    x_T,
                    schedule,
                    steps=steps,
                    eta=eta,
                    spacing=spacing,
                    timesteps=timesteps,
                    prediction=prediction,
                    clip_sample=clip_sample,
                    variance=variance,
                    seeds=seeds[sl],
                    sampler=sampler,
                    model_kwargs=kwargs,
                    guidance_scale=guidance if guided else 1.0,
                    uncond_kwargs=uncond if guided else None,
                    **sample_kwargs,
                )
            if decode is not None:
                x0 = decode(x0)  # on the device, before the images come to the CPU
            x0 = x0.float().cpu()
            if decode is not None:
                if u8 is None and keep == "uint8":
                    u8 = np.empty((n, *x0.shape[2:], x0.shape[1]), dtype=np.uint8)
            if keep == "float":
                chunks.append(x0)
            elif u8 is not None:
                u8[sl] = to_uint8(x0)
            if on_batch is not None:
                on_batch(sl.start, x0)
            if bar is not None:
                bar.update(x0.shape[0])
            del x0
    if bar is not None:
        bar.close()
    if adaptive:
        info = {"sampler": "adaptive", "rtol": adaptive[0], "atol": adaptive[1], "guidance": guidance}
        calls = max(per_image, default=0)
    else:
        info = {
            "sampler": sampler,
            "steps": steps,
            "eta": eta,
            "spacing": spacing,
            "guidance": guidance,
            "variance": variance,
        }
    return SampleResult(
        torch.cat(chunks) if chunks else torch.empty((0, *image_shape)),
        labels,
        seeds,
        calls,
        time.perf_counter() - tic,
        info,
        u8,
        per_image if adaptive else None,
    )


def _check_tolerance(
    rtol: float | None, atol: float | None, sampler: str, eta: float, timesteps: Sequence[int] | None
) -> tuple[float, float] | None:
    """(rtol, atol) of an adaptive run, or None for a fixed step count; ValueError for a bad mix."""
    if rtol is None:
        if atol is not None:
            raise ValueError("atol is the absolute part of an adaptive run's tolerance: give rtol with it")
        return None
    from ddim.adaptive import DEFAULT_ATOL, check_positive

    rtol = check_positive(rtol, "rtol", allow_zero=True)
    atol = check_positive(DEFAULT_ATOL if atol is None else atol, "atol", allow_zero=True)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    if sampler != "ddim" or eta != 0 or timesteps is not None:
        raise ValueError(
            "rtol runs the adaptive order-1/2 solver, which picks its own timesteps: it takes no other "
            f"sampler (got {sampler!r}), no eta > 0 (got {eta}) and no explicit timesteps"
        )
    return rtol, atol


# ------------------------------------------------------------------ output
def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` but byte-identical for identical arrays (fixed zip timestamps), atomic."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    data = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_images(result: SampleResult, out: str | os.PathLike, nrow: int | None = None) -> list[Path]:
    """Write images by the form of ``out``: ``*.png`` one grid; ``*.npz`` arrays ``images`` (uint8
    [N, H, W, C]) and ``labels`` (int64, -1 = unconditional) and ``seeds``; otherwise a folder with one
    PNG per image named by its seed (``seed_000042.png``). Returns the paths written.

    Takes ``result.uint8`` when :func:`generate` kept only that (``keep="uint8"``), else converts
    ``result.images``: the files are the same either way.

    Samples that are not images ([N, C, L] signals, [N, C, F, H, W] video) go to ``*.npz`` only, as
    ``samples`` float32 [N, C, ...] in model space ([-1, 1]), with ``labels`` and ``seeds``."""
    if result.uint8 is None and result.images.ndim not in (0, 4) and result.images.shape[0] == len(result.seeds):
        out = Path(out)
        if out.suffix.lower() != ".npz":
            raise ValueError(
                f"samples shaped {list(result.images.shape[1:])} are not images: out must end in .npz, got {str(out)!r}"
            )
        save_npz(
            out,
            samples=result.images.float().numpy(),
            labels=torch.as_tensor(result.labels).numpy().astype(np.int64),
            seeds=np.asarray(result.seeds, dtype=np.int64),
        )
        return [out]
    if result.uint8 is not None:
        u8 = result.uint8
    elif result.images.shape[0] == len(result.seeds):
        u8 = to_uint8(result.images)
    else:
        raise ValueError("this result holds no images (generate(keep='none') passed them to on_batch)")
    return write_uint8(u8, result.labels, result.seeds, out, nrow)


def write_uint8(
    u8: np.ndarray, labels: torch.Tensor, seeds: Sequence[int], out: str | os.PathLike, nrow: int | None = None
) -> list[Path]:
    """:func:`write_images` for images already in uint8 [N, H, W, C] (e.g. gathered from several ranks)."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        n = u8.shape[0]
        save_png(make_grid(u8, nrow=nrow or int(np.ceil(np.sqrt(n)))), out)
        return [out]
    if out.suffix.lower() == ".npz":
        save_npz(
            out,
            images=u8,
            labels=torch.as_tensor(labels).numpy().astype(np.int64),
            seeds=np.asarray(seeds, dtype=np.int64),
        )
        return [out]
    if out.suffix:
        raise ValueError(f"out must end in .png or .npz, or be a folder; got {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, s in zip(u8, seeds, strict=True):
        p = out / f"seed_{s:06d}.png"
        save_png(img, p)
        paths.append(p)
    return paths


# ------------------------------------------------------------------ inversion and interpolation
def load_images(paths: Sequence[str | os.PathLike], channels: int, size: int | tuple[int, int]) -> torch.Tensor:
    """Read image files as float32 [N, channels, H, W] in [-1, 1] (converted to 8 bits with their
    full range kept, see :func:`ddim.images.to_8bit`; resized if needed, bicubic); ``size`` is H = W or (H, W)."""
    from PIL import Image, UnidentifiedImageError

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    arrs = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = to_8bit(im, channels, p)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BICUBIC)
                a = np.asarray(im)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from e
        arrs.append(a[..., None] if a.ndim == 2 else a)
    return from_uint8(np.stack(arrs))


def invert_images(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    steps: int = 50,
    spacing: str = "leading",
    labels: torch.Tensor | None = None,
    prediction: str = "epsilon",
    method: str = "ddim",
    tol: float = 1e-6,
    max_iter: int = 4,
    budget: str = "uniform",
    guidance: float = 1.0,
) -> dict[str, Any]:
    """Invert images [N, C, H, W] in [-1, 1] and decode the latents again on the same timesteps.

    ``method``: "ddim" (default), "fixed_point" (exact inversion, decoded by DDIM) or "bdia" (BDIA's
    exact inversion, decoded by its own sampler), see :func:`ddim.inversion.round_trip`. ``tol``,
    ``max_iter``, ``budget``: the fixed-point iteration's tolerance and calls; ``budget="uniform"``
    (default) caps every step at ``max_iter`` calls, ``"front"`` spends the same total,
    ``max_iter·steps``, front-loaded (:func:`ddim.inversion.front_loaded`). ``guidance``: classifier-free
    guidance weight of both directions (the class ``labels`` against the null class; default 1 = off;
    needs labels). Neither direction clips x̂₀ (clipping makes the step non-invertible).

    Returns a dict: ``latents`` [N, C, H, W] (x_T), ``x_next`` (BDIA's second latent, else None),
    ``reconstruction`` [N, C, H, W], ``mse`` [N] (per-dimension MSE on [0, 1], as in the paper's
    Table 2), ``nfe`` (the inversion's network calls; decoding makes ``steps`` more), ``seconds``.
    """
    from ddim.inversion import INVERSIONS, front_loaded, round_trip

    n = images.shape[0]
    labels = check_labels(model, labels, n)
    guidance = check_guidance(guidance)
    if method not in INVERSIONS:
        raise ValueError(f"unknown inversion method {method!r}; valid: {', '.join(INVERSIONS)}")
    if budget not in ("uniform", "front"):
        raise ValueError(f"budget must be 'uniform' or 'front', got {budget!r}")
    kwargs, uncond = _class_kwargs(model, labels, images.device)
    if guidance != 1.0 and (uncond is None or bool((labels < 0).any())):
        raise ValueError("guidance needs a class-conditional model and a class for every image")
    caps: int | list[int] = max_iter
    if method == "fixed_point" and budget == "front":
        caps = front_loaded(steps, max_iter * steps)
    tic = time.perf_counter()
    with torch.inference_mode():
        res = round_trip(
            model,
            images,
            schedule,
            method=method,
            steps=steps,
            spacing=spacing,
            prediction=prediction,
            model_kwargs=kwargs,
            guidance_scale=guidance,
            uncond_kwargs=uncond,
            tol=tol,
            max_iter=caps,
        )
    rec = res["reconstruction"]
    mse = (((rec.clamp(-1, 1) - images) / 2) ** 2).flatten(1).mean(1)
    return {
        "latents": res["latents"],
        "x_next": res["x_next"],
        "reconstruction": rec,
        "mse": mse,
        "nfe": res["nfe"],
        "seconds": time.perf_counter() - tic,
    }


def interpolate_seeds(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    seed_a: int,
    seed_b: int,
    *,
    frames: int = 9,
    label: int = -1,
    guidance: float = 1.0,
    steps: int = 50,
    spacing: str = "leading",
    prediction: str = "epsilon",
    device: str | torch.device = "cpu",
    batch: int = 256,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    keep: bool = True,
    timesteps: Sequence[int] | None = None,
    clip_sample: bool = False,
    sample_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Decode a slerp strip between the noises of two seeds (DDIM η = 0): float32 [frames, C, H, W] on the CPU.

    ``timesteps``, ``clip_sample`` and ``sample_kwargs`` are :func:`ddim.sample`'s (what
    :func:`ddim.diffusers_io.sampling_kwargs` reads from a model's config, as ``ddim sample`` uses them).

    The noises are drawn on the CPU (as :func:`generate` does, so a seed gives the same x_T on any
    device), interpolated there, and the strip is sampled on ``device``, where the model must be, in
    batches of at most ``batch`` frames (memory stays bounded however many frames are asked for).
    ``on_batch(first_frame, frames_chunk)`` is called after each batch (float32 on the CPU); with
    ``keep=False`` the frames are not kept and an empty [0, C, H, W] tensor is returned.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    check_seed_range(seed_a, name="seed_a")
    check_seed_range(seed_b, name="seed_b")
    guidance = check_guidance(guidance)
    labels = check_labels(model, [label] * frames, frames)
    cfg = model.config
    shape = (1, cfg.in_channels, cfg.image_size, cfg.image_size)
    za, zb = randn(shape, [seed_a])[0], randn(shape, [seed_b])[0]
    device = torch.device(device)
    alphas = torch.linspace(0, 1, frames)
    chunks = []
    for start in range(0, frames, batch):
        sl = slice(start, min(frames, start + batch))
        x_T = slerp(za, zb, alphas[sl]).to(device)
        kwargs, uncond = _class_kwargs(model, labels[sl], device)
        guided = guidance != 1.0 and uncond is not None and label >= 0
        with torch.inference_mode():
            x = sample(
                model,
                x_T,
                schedule,
                steps=steps,
                spacing=spacing,
                timesteps=timesteps,
                prediction=prediction,
                clip_sample=clip_sample,
                model_kwargs=kwargs,
                guidance_scale=guidance if guided else 1.0,
                uncond_kwargs=uncond if guided else None,
                **(sample_kwargs or {}),
            )
        x = x.float().cpu()
        if on_batch is not None:
            on_batch(start, x)
        if keep:
            chunks.append(x)
    return torch.cat(chunks) if chunks else torch.empty((0, *shape[1:]))
