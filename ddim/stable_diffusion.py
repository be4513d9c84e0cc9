"""Stable Diffusion pipeline folders: text-conditioned latent diffusion sampled with these samplers.

A folder as ``StableDiffusionPipeline.save_pretrained`` writes it (SD 1.x and 2.x, ε or v prediction)::

    model_index.json                   names the components and their classes
    unet/          UNet2DConditionModel (the denoiser, in latent space, cross-attending to text)
    vae/           AutoencoderKL        (images <-> latents, with ``scaling_factor``)
    text_encoder/  CLIPTextModel        (prompt tokens -> embeddings [L, D])
    tokenizer/     CLIPTokenizer        (vocab.json + merges.txt, or tokenizer.json)
    scheduler/     scheduler_config.json (schedule, prediction type, spacing, offset, clipping, zero SNR)

:func:`load_stable_diffusion` (reached through :func:`ddim.load`) turns it into the usual
``(model, schedule, config)``. The model is a :class:`StableDiffusionModel`: called as
``model(x, t, encoder_hidden_states=e)`` it is the UNet, so every sampler runs it unchanged, and the
text embeddings travel as ``model_kwargs`` through the one model adapter (:class:`ddim.Denoiser`),
which batches the conditional and unconditional halves of classifier-free guidance into one forward.
It also holds the text encoder (:meth:`~StableDiffusionModel.encode_prompt`) and the VAE
(:meth:`~StableDiffusionModel.decode`, :meth:`~StableDiffusionModel.encode`).

Text-to-image in Python::

    model, schedule, config = ddim.load("path/to/stable-diffusion-v1-5")
    cond = model.encode_prompt(["a photograph of an astronaut riding a horse"])      # [1, 77, 768]
    uncond = model.encode_prompt([""])
    z = ddim.randn((1, *model.latent_shape(512, 512)), seeds=[0])                      # [1, 4, 64, 64]
    z0 = ddim.sample(model, z, schedule, steps=50, prediction=config["prediction"],
                     **pipeline_sampling_kwargs(config, schedule, 50),  # the folder scheduler's timesteps
                     model_kwargs={"encoder_hidden_states": cond},
                     uncond_kwargs={"encoder_hidden_states": uncond}, guidance_scale=7.5)
    images = model.decode(z0)                                                          # [1, 3, 512, 512]

(:func:`text_to_image` does all of it, and ``ddim sample --model PATH --prompt "..."`` calls that.)
The latents of image i are ``ddim.randn`` of its seed: the same latents as ``StableDiffusionPipeline``
given one CPU generator per image. SDXL (two text encoders, pooled embeddings and size/crop
conditioning) is refused with a message saying so. diffusers and transformers are imported only here,
and only when such a folder is loaded (``pip install 'ddim[diffusers]'``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddim.diffusers_io import INDEX, SCHEDULER_CONFIG, _read_json, _sampling_config, schedule_from_scheduler_config
from ddim.schedule import NoiseSchedule

__all__ = [
    "FORMAT",
    "invert_text_images",
    "LatentConfig",
    "PromptConditioning",
    "StableDiffusionModel",
    "is_stable_diffusion_folder",
    "load_stable_diffusion",
    "pipeline_sampling_kwargs",
    "read_prompts",
    "scheduler_timesteps",
    "text_to_image",
]

FORMAT = "stable-diffusion-pipeline"
#: The component classes this module reads (model_index.json's second entries).
COMPONENTS = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
}
#: SD's default guidance weight (``StableDiffusionPipeline``'s ``guidance_scale``).
DEFAULT_GUIDANCE = 7.5


def _entry_class(index: dict[str, Any], name: str) -> str | None:
    e = index.get(name)
    return e[1] if isinstance(e, (list, tuple)) and len(e) == 2 and e[1] is not None else None


def is_stable_diffusion_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` holds a diffusers ``model_index.json`` whose unet is a ``UNet2DConditionModel``
    (a text-conditioned latent pipeline: SD 1.x/2.x, or SDXL, which :func:`load_stable_diffusion` refuses)."""
    if path is None or not (Path(path) / INDEX).is_file():
        return False
    try:
        index = _read_json(Path(path) / INDEX)
    except ValueError:
        return False
    return _entry_class(index, "unet") == "UNet2DConditionModel"


@dataclass
class LatentConfig:
    """What :mod:`ddim.generate` reads from ``model.config``, plus the latent geometry.

    Attributes:
        image_size: the UNet's default latent size (h = w; ``unet.config.sample_size``).
        in_channels: latent channels (4 for SD).
        num_classes: 0 (text, not classes, conditions the model).
        vae_scale_factor: pixels per latent along each side (8 for SD: 2 ** (VAE levels - 1)).
        scaling_factor: the VAE's latent scale (0.18215 for SD 1.x/2.x): z = scaling_factor · E(x).
        height, width: the default image size in pixels (the latent size times ``vae_scale_factor``).
        image_channels: channels of the decoded images (3).
    """

    image_size: int
    in_channels: int
    num_classes: int
    vae_scale_factor: int
    scaling_factor: float
    height: int
    width: int
    image_channels: int = 3


class StableDiffusionModel(torch.nn.Module):
    """A Stable Diffusion pipeline as a ddim model: the UNet as ``forward``, plus text encoder and VAE.

    ``forward(x [B,4,h,w], t [B] int64, encoder_hidden_states [B,L,D]) -> [B,4,h,w]`` (ε or v, as the
    scheduler config says). The embeddings are cast to the UNet's dtype, so the model runs under
    ``ddim.perf.prepare`` in fp16/bf16 with float32 embeddings.

    Attributes:
        unet, vae, text_encoder: the diffusers / transformers modules. tokenizer: the CLIP tokenizer.
        config: a :class:`LatentConfig`.
        vae_batch: images per VAE decode/encode call (default 1: memory bounded by one image however
            large the batch). vae_tiling: decode in overlapping tiles (diffusers' ``enable_tiling``,
            for images too large to decode whole; blends tile seams, so results differ slightly).
    """

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: Any):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.config = LatentConfig(
            image_size=int(h),
            in_channels=int(unet.config.in_channels),
            num_classes=0,
            vae_scale_factor=factor,
            scaling_factor=float(vae.config.scaling_factor),
            height=int(h) * factor,
            width=int(w) * factor,
            image_channels=int(vae.config.out_channels),
        )
        self.vae_batch = 1
        self.vae_tiling = False

    # ----------------------------------------------------------------- the denoiser
    def forward(
        self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **_: Any
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError(
                "a Stable Diffusion model needs text embeddings: pass model_kwargs={'encoder_hidden_states': "
                "model.encode_prompt([...])}"
            )
        e = encoder_hidden_states
        dtype = next(self.unet.parameters()).dtype  # (unet.dtype walks every parameter: ~3 ms a call)
        if e.dtype != dtype or e.device != x.device:
            e = e.to(device=x.device, dtype=dtype)
        return self.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]

    # ----------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings of ``prompts``: [P, L, D] in the text encoder's dtype, on its device.

        As ``StableDiffusionPipeline.encode_prompt``: each prompt padded/truncated to the tokenizer's
        ``model_max_length`` (77 for SD), the last hidden state of the CLIP text model (with the
        attention mask only where the encoder's config asks for it). "" is the unconditional prompt.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        mask = tok.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]

    # ----------------------------------------------------------------- the VAE
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """The latent shape [C, h, w] of an image of ``height`` × ``width`` pixels (default: the model's).

        Raises ValueError naming height/width when a size is not a positive multiple of the VAE factor.
        """
        f = self.config.vae_scale_factor
        height = self.config.height if height is None else height
        width = self.config.width if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
                raise ValueError(
                    f"{name} {v!r}: the VAE takes images whose sides are positive multiples of {f} pixels "
                    f"(e.g. {self.config.height})"
                )
        return (self.config.in_channels, height // f, width // f)

    def _vae_dtype(self) -> torch.dtype:
        dtype = next(self.vae.parameters()).dtype
        if dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)  # as diffusers' upcast_vae: SD 1.x/2.x VAEs overflow in fp16
            return torch.float32
        return dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] (as sampled, i.e. scaled) -> float32 images [B, 3, H, W] about [-1, 1].

        Runs ``vae.decode(z / scaling_factor)`` in slices of :attr:`vae_batch` images (tiled when
        :attr:`vae_tiling`), so memory is bounded by one slice; results are returned on ``latents``'
        device. Not clamped (``ddim.images.to_uint8`` clamps).
        """
        dtype = self._vae_dtype()
        device = next(self.vae.parameters()).device
        if self.vae_tiling:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()
        outs = []
        for z in latents.split(max(1, int(self.vae_batch))):
            z = z.to(device=device, dtype=dtype) / self.config.scaling_factor
            outs.append(self.vae.decode(z, return_dict=False)[0].float().to(latents.device))
        return torch.cat(outs)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f] = scaling_factor · mode of q(z|x).

        The posterior's mode (its mean), not a sample, so encoding is deterministic; float32 on the
        images' device, in slices of :attr:`vae_batch`.
        """
        self.latent_shape(int(images.shape[-2]), int(images.shape[-1]))
        dtype = self._vae_dtype()
        device = next(self.vae.parameters()).device
        outs = []
        for x in images.split(max(1, int(self.vae_batch))):
            dist = self.vae.encode(x.to(device=device, dtype=dtype), return_dict=False)[0]
            outs.append((dist.mode() * self.config.scaling_factor).float().to(images.device))
        return torch.cat(outs)


# --------------------------------------------------------------------------- loading
def _require() -> tuple[Any, Any]:
    try:
        import diffusers
        import transformers
    except ImportError as e:  # pragma: no cover - both are test dependencies
        raise ImportError(
            "reading a Stable Diffusion pipeline folder needs diffusers and transformers: pip install 'ddim[diffusers]'"
        ) from e
    return diffusers, transformers


def _load_component(folder: Path, index: dict[str, Any], name: str, libs: dict[str, Any]) -> Any:
    lib_name, allowed = COMPONENTS[name]
    cls_name = _entry_class(index, name)
    sub = folder / name
    if cls_name is None:
        raise ValueError(f"{folder}: the Stable Diffusion pipeline has no {name} (model_index.json names none)")
    if cls_name not in allowed:
        raise ValueError(f"{folder}: {name} must be a {' or '.join(allowed)}, model_index.json names {cls_name!r}")
    if not sub.is_dir():
        raise FileNotFoundError(f"{folder}: the {name} folder {sub} is missing")
    cls = getattr(libs[lib_name], cls_name)
    kw: dict[str, Any] = {"local_files_only": True}
    if lib_name == "diffusers" and importlib.util.find_spec("accelerate") is None:
        kw["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, without its warning
    try:
        if name == "tokenizer":
            return cls.from_pretrained(sub, **kw)
        return cls.from_pretrained(sub, **kw).eval()
    except Exception as e:  # noqa: BLE001 - any failure to read a component is reported as that component's
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{folder}: cannot read the {name} ({cls_name}) in {sub}: {msg[:300]}") from e


def load_stable_diffusion(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[StableDiffusionModel, NoiseSchedule, dict[str, Any]]:
    """Load a Stable Diffusion pipeline folder (SD 1.x/2.x): ``(model, schedule, config)`` like :func:`ddim.load`.

    Args:
        path: the folder with ``model_index.json`` and the unet, vae, text_encoder, tokenizer and
            scheduler subfolders.
        device, dtype: where and in which precision to put the weights (default CPU float32).

    Returns:
        ``model``: a :class:`StableDiffusionModel` in eval mode; ``schedule``: from the scheduler config;
        ``config``: ``{"format": "stable-diffusion-pipeline", "unet": <unet config>, "schedule": ...,
        "prediction": ..., "sampling": {... "guidance": 7.5}, "scheduler": <class name>,
        "scheduler_config": <the scheduler config>, "path": ...}``.

    Raises:
        ImportError without diffusers/transformers; FileNotFoundError for a missing file or folder;
        ValueError for SDXL, a missing or unreadable component (the message names it) or a scheduler
        config this package cannot express.
    """
    folder = Path(path)
    index = _read_json(folder / INDEX)
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ValueError(
            f"{folder}: SDXL pipelines (two text encoders, pooled text embeddings and size/crop conditioning) "
            "are not supported; use an SD 1.x or 2.x pipeline"
        )
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if name not in index or index[name] is None or _entry_class(index, name) is None:
            raise ValueError(
                f"{folder}: the Stable Diffusion pipeline has no {name} (model_index.json names none); "
                "supported are pipelines with a pixel-space UNet2DModel, and SD 1.x/2.x pipelines with "
                "unet, vae, text_encoder, tokenizer and scheduler"
            )
    sched_cfg = _read_json(folder / SCHEDULER_CONFIG)
    schedule = schedule_from_scheduler_config(sched_cfg)
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"{folder}: unsupported diffusers prediction_type {prediction!r}")
    sampling = _sampling_config(sched_cfg)
    sampling["guidance"] = DEFAULT_GUIDANCE
    diffusers, transformers = _require()
    libs = {"diffusers": diffusers, "transformers": transformers}
    tlog = transformers.utils.logging
    bars = not tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()  # no "Loading weights" bar on stderr
    try:
        parts = {name: _load_component(folder, index, name, libs) for name in COMPONENTS}
    finally:
        if not bars:
            tlog.enable_progress_bar()
    ucfg, vcfg = parts["unet"].config, parts["vae"].config
    if getattr(ucfg, "addition_embed_type", None) is not None:
        raise ValueError(
            f"{folder}: the unet takes added conditioning ({ucfg.addition_embed_type!r}, as SDXL's): not supported"
        )
    if int(ucfg.in_channels) != int(vcfg.latent_channels) or int(ucfg.out_channels) != int(vcfg.latent_channels):
        raise ValueError(
            f"{folder}: the unet has {ucfg.in_channels} input / {ucfg.out_channels} output channels but the vae "
            f"{vcfg.latent_channels} latent channels (inpainting and depth pipelines are not supported)"
        )
    model = StableDiffusionModel(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"])
    model = model.to(device=device, dtype=dtype).eval()
    config = {
        "format": FORMAT,
        "unet": {k: v for k, v in dict(parts["unet"].config).items() if not k.startswith("_")},
        "schedule": schedule.to_dict(),
        "prediction": prediction,
        "sampling": sampling,
        "scheduler": _entry_class(index, "scheduler"),
        "scheduler_config": {k: v for k, v in sched_cfg.items() if not k.startswith("_")},
        "path": str(folder),
    }
    return model, schedule, config


# --------------------------------------------------------------------------- timesteps of the folder's scheduler
#: Schedulers whose own timestep list is the list a sampler visits (one network call per listed
#: timestep), and how each ends: "config" = ``set_alpha_to_one`` of the config; "sigmas" = at ᾱ = 1
#: unless ``final_sigmas_type`` is "sigma_min" (then at ᾱ_0).
_SCHEDULER_END = {
    "DDIMScheduler": "config",
    "DPMSolverMultistepScheduler": "sigmas",
    "UniPCMultistepScheduler": "sigmas",
    "EulerDiscreteScheduler": "sigmas",
}


def scheduler_timesteps(config: dict[str, Any], steps: int) -> dict[str, Any] | None:
    """The timesteps and final level the folder's own diffusers scheduler uses for ``steps`` steps.

    For a folder whose scheduler is DDIM, DPM-Solver multistep, UniPC or Euler, instantiates it from the
    saved config and calls ``set_timesteps(steps)``: returns ``{"timesteps": [...], "set_alpha_to_one":
    bool}`` for :func:`ddim.sample` (so that e.g. ``sampler="dpmpp_2m"`` visits exactly the timesteps
    ``StableDiffusionPipeline`` with that scheduler visits). None for other schedulers (PNDM, …),
    for non-integer timesteps (Euler with "linspace" spacing interpolates σ between integers) or
    Karras/exponential σ's: the caller then keeps :func:`ddim.diffusers_io.sampling_kwargs`.
    """
    name = config.get("scheduler")
    sched_cfg = config.get("scheduler_config")
    if name not in _SCHEDULER_END or not isinstance(sched_cfg, dict):
        return None
    if any(sched_cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        return None
    diffusers, _ = _require()
    sch = getattr(diffusers, name).from_config(sched_cfg)
    sch.set_timesteps(steps)
    ts = torch.as_tensor(sch.timesteps).double()
    if (ts != ts.round()).any() or ts.numel() != steps or (ts[1:] >= ts[:-1]).any():
        return None
    if _SCHEDULER_END[name] == "config":
        one = bool(sched_cfg.get("set_alpha_to_one", True))
    else:
        one = sched_cfg.get("final_sigmas_type", "zero") != "sigma_min"
    return {"timesteps": [int(t) for t in ts.tolist()], "set_alpha_to_one": one}


# --------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts in a text file, one per line (blank lines skipped). ValueError if none or unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the prompts file {path}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"the prompts file {path} holds no prompt (one per line)")
    return prompts


@dataclass
class PromptConditioning:
    """Per-image text conditioning for :func:`ddim.generate.generate`: image i (seed ``first_seed + i``)
    uses prompt ``i mod P``.

    Attributes:
        cond: [P, L, D] embeddings of the P prompts. uncond: [1, L, D] or [P, L, D] embeddings of the
            negative prompt(s) ("" when none is given). first_seed: the seed of image 0.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    first_seed: int = 0

    @classmethod
    def from_prompts(
        cls,
        model: StableDiffusionModel,
        prompts: Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        first_seed: int = 0,
    ) -> PromptConditioning:
        """Encode ``prompts`` and the negative prompt ("" if None; one string, or one per prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        neg = (
            [""]
            if negative_prompt is None
            else [negative_prompt]
            if isinstance(negative_prompt, str)
            else list(negative_prompt)
        )
        if len(neg) not in (1, len(prompts)):
            raise ValueError(f"give one negative prompt or one per prompt ({len(prompts)}), got {len(neg)}")
        return cls(model.encode_prompt(prompts), model.encode_prompt(neg), int(first_seed))

    def __call__(self, seeds: Sequence[int], device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(model_kwargs, uncond_kwargs)`` for the images of ``seeds``."""
        idx = (torch.as_tensor(list(seeds), dtype=torch.long) - self.first_seed) % self.cond.shape[0]
        cond = self.cond[idx.to(self.cond.device)].to(device)
        u = self.uncond if self.uncond.shape[0] == 1 else self.uncond[idx.to(self.uncond.device)]
        uncond = u.to(device).expand(len(idx), *u.shape[1:])
        return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}


# --------------------------------------------------------------------------- text to image
def pipeline_sampling_kwargs(
    config: dict[str, Any],
    schedule: NoiseSchedule,
    steps: int,
    spacing: str | None = None,
    timesteps: Sequence[int] | None = None,
) -> dict[str, Any]:
    """:func:`ddim.diffusers_io.sampling_kwargs`, then (with neither ``spacing`` nor ``timesteps``
    given) the timesteps and final level of the folder's own scheduler (:func:`scheduler_timesteps`)."""
    from ddim.diffusers_io import FORMAT as PIPELINE
    from ddim.diffusers_io import sampling_kwargs

    # an SD folder is a diffusers pipeline folder: its "leading" timesteps are diffusers' k·(T//S) + offset
    kw = sampling_kwargs({**config, "format": PIPELINE}, schedule, steps, spacing, timesteps)
    if spacing is None and timesteps is None:
        own = scheduler_timesteps(config, steps)
        if own is not None:
            kw.update(own)
    return kw


def text_to_image(
    model: StableDiffusionModel,
    schedule: NoiseSchedule,
    config: dict[str, Any],
    prompts: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    n: int | None = None,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    guidance: float | None = None,
    guidance_rescale: float = 0.0,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    spacing: str | None = None,
    timesteps: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    batch: int = 8,
    device: str | torch.device = "cpu",
    denoiser: Callable[..., Any] | None = None,
    **generate_kwargs: Any,
) -> Any:
    """Text to image with a loaded Stable Diffusion pipeline: :func:`ddim.generate.generate` with prompts.

    Image i uses seed ``seed + i`` (its latents are ``ddim.randn`` of that seed) and prompt ``i mod P``.

    Args:
        model, schedule, config: from :func:`ddim.load` of a Stable Diffusion folder.
        prompts: one prompt or P prompts. negative_prompt: one, or one per prompt (default "").
        n: number of images (default P). seeds: explicit seeds (overrides n and seed).
        guidance: classifier-free guidance weight (default the config's, 7.5); 1 turns it off.
        guidance_rescale: φ of Lin et al. 2023 (default 0).
        steps, sampler, eta: as :func:`ddim.sample`. spacing, timesteps: default the folder's scheduler's
            (:func:`pipeline_sampling_kwargs`).
        height, width: image size in pixels, multiples of the VAE factor (default the model's).
        batch: images per network batch (default 8). device: where the model is.
        denoiser: the network to sample with (default ``model``; e.g. ``ddim.perf.prepare(model, ...)``).
        generate_kwargs: further :func:`~ddim.generate.generate` arguments (keep, on_batch, progress).

    Returns:
        A :class:`ddim.generate.SampleResult` whose images are float32 [N, 3, H, W] in about [-1, 1].
    """
    from ddim.generate import generate

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    if seeds is None:
        n = len(prompts) if n is None else n
        seeds = [seed + i for i in range(n)]
    shape = model.latent_shape(height, width)
    kw = pipeline_sampling_kwargs(config, schedule, steps, spacing, timesteps)
    kw["guidance_rescale"] = guidance_rescale
    cond = PromptConditioning.from_prompts(model, prompts, negative_prompt, first_seed=seed)
    return generate(
        model if denoiser is None else denoiser,
        schedule,
        seeds=seeds,
        guidance=float(config["sampling"].get("guidance", DEFAULT_GUIDANCE)) if guidance is None else guidance,
        steps=steps,
        eta=eta,
        spacing=kw.pop("spacing"),
        sampler=sampler,
        timesteps=kw.pop("timesteps"),
        prediction=config["prediction"],
        clip_sample=kw.pop("clip_sample"),
        batch=batch,
        image_shape=shape,
        device=device,
        sample_kwargs=kw,
        conditioning=cond,
        decode=model.decode,
        **generate_kwargs,
    )


# --------------------------------------------------------------------------- inversion
def invert_text_images(
    model: StableDiffusionModel,
    schedule: NoiseSchedule,
    config: dict[str, Any],
    images: torch.Tensor,
    prompt: str = "",
    *,
    steps: int = 50,
    guidance: float = 1.0,
    spacing: str | None = None,
) -> dict[str, Any]:
    """DDIM inversion in latent space: encode ``images`` with the VAE, invert the latents to z_T under
    ``prompt``, sample them back on the same timesteps and decode.

    Args:
        images: float32 [N, 3, H, W] in [-1, 1], sides multiples of the VAE factor.
        prompt: the text the inversion conditions on ("" = unconditional).
        steps: S. guidance: classifier-free guidance during inversion and reconstruction (default 1:
            none; large weights make inversion drift, see Mokady et al. 2023).
        spacing: default the folder scheduler's timesteps (:func:`pipeline_sampling_kwargs`).

    Returns:
        ``{"latents": z_T [N, C, h, w], "encoded": z_0 = VAE latents, "reconstruction": decoded
        images [N, 3, H, W], "latent_mse": per-image MSE between z_0 and the sampled-back latents
        (the inversion's own error, falling with S), "mse": per-image MSE between images and
        reconstruction on the [0, 1] scale (includes the VAE's error), "timesteps", "seconds"}``.
    """
    import time

    from ddim.sampling import invert, sample
    from ddim.timesteps import timesteps as make_timesteps

    tic = time.perf_counter()
    n = images.shape[0]
    with torch.inference_mode():
        z0 = model.encode(images)
        kw = pipeline_sampling_kwargs(config, schedule, steps, spacing)
        ts = kw["timesteps"] if kw["timesteps"] is not None else make_timesteps(schedule, steps, kw["spacing"]).tolist()
        mk, uk = PromptConditioning.from_prompts(model, [prompt])(range(n), z0.device)
        g = dict(guidance_scale=guidance, uncond_kwargs=uk) if guidance != 1.0 else {}
        pred = config["prediction"]
        zT = invert(model, z0, schedule, timesteps=ts, prediction=pred, model_kwargs=mk, **g)
        z0_back = sample(model, zT, schedule, timesteps=ts, prediction=pred, model_kwargs=mk, **g)
        rec = model.decode(z0_back)
    return {
        "latents": zT,
        "encoded": z0,
        "reconstruction": rec,
        "latent_mse": ((z0_back - z0) ** 2).flatten(1).mean(1),
        "mse": (((rec.clamp(-1, 1) - images.to(rec.device)) / 2) ** 2).flatten(1).mean(1),
        "timesteps": list(ts),
        "seconds": time.perf_counter() - tic,
    }
