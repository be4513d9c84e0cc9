"""diffusers pipeline folders in: sample a diffusers ``UNet2DModel`` with these samplers, no conversion.

A pipeline folder (what ``DDPMPipeline.save_pretrained`` / ``DDIMPipeline.save_pretrained`` write)::

    model_index.json
    unet/config.json + unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json

:func:`load_pipeline` turns it into the ``(model, schedule, config)`` triple of :func:`ddim.load`: the
schedule, prediction type, clipping/thresholding and timestep spacing come from the scheduler config,
and the network is wrapped so that ``model(x, t)`` returns a tensor and ``model.config`` describes the
images (as :class:`ddim.unet.UNetConfig` does). diffusers is an optional extra
(``pip install 'ddim[diffusers]'``), imported only here and only when such a folder is loaded.

How the scheduler config maps onto this package:

- ``num_train_timesteps``, ``beta_schedule`` ("linear", "scaled_linear", "squaredcos_cap_v2",
  "sigmoid"), ``beta_start``, ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr`` ->
  :class:`~ddim.schedule.NoiseSchedule` (in float64; diffusers keeps float32).
- ``prediction_type`` -> ``config["prediction"]``.
- ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample``, ``clip_sample_range``,
  ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value`` -> ``config["sampling"]``,
  read back by :func:`sampling_kwargs`. A DDPM scheduler's ``variance_type`` "fixed_large" is
  recorded as ``config["sampling"]["variance"] = "large"`` (for ``sampler="ddpm"``; not applied by
  default, as diffusers' DDIM pipeline ignores it too).

After clipping, ε̂ is the model's own, as in ``DDIMPipeline`` (diffusers' ``use_clipped_model_output`` is a
``step`` argument, not a scheduler setting, and the pipelines leave it off): ``config["sampling"]`` gets
``use_clipped_model_output: False``. A ddim model folder may set it to true (the embedded model does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddim.schedule import NoiseSchedule

__all__ = [
    "DiffusersModel",
    "DiffusersModelConfig",
    "is_pipeline_folder",
    "load_pipeline",
    "model_spacing",
    "sampling_kwargs",
    "schedule_from_scheduler_config",
]

FORMAT = "diffusers-pipeline"
INDEX = "model_index.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
#: Keys of ``config["sampling"]`` that are passed straight to :func:`ddim.sample`.
_PASSED = (
    "set_alpha_to_one",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "use_clipped_model_output",
)


def is_pipeline_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder holding a diffusers ``model_index.json``."""
    return path is not None and (Path(path) / INDEX).is_file()


@dataclass
class DiffusersModelConfig:
    """What :mod:`ddim.generate` reads from ``model.config``: the image shape, and no classes."""

    image_size: int
    in_channels: int
    num_classes: int = 0


class DiffusersModel(torch.nn.Module):
    """A diffusers ``UNet2DModel`` as a ddim model: ``forward(x [B,C,H,W], t [B] int64) -> [B,C,H,W]``.

    The wrapped network is ``self.unet``. A network with twice the image channels out (a learned
    variance, as in improved DDPM) returns its first half, the ε/x₀/v prediction. Class labels are not
    supported (``config.num_classes == 0``); a ``y`` keyword is ignored.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        cfg = unet.config
        size = cfg.sample_size
        if not isinstance(size, int):
            h, w = size
            if h != w:
                raise ValueError(f"only square images are supported, got sample_size={list(size)}")
            size = int(h)
        self.config = DiffusersModelConfig(image_size=int(size), in_channels=int(cfg.in_channels))
        out_ch = int(getattr(cfg, "out_channels", cfg.in_channels))
        self._split = out_ch == 2 * int(cfg.in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        out = self.unet(x, t, return_dict=False)[0]
        return out[:, : x.shape[1]] if self._split else out


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a test dependency
        raise ImportError(
            "reading a diffusers pipeline folder needs the diffusers package: pip install 'ddim[diffusers]'"
        ) from e
    return diffusers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"diffusers pipeline file {path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def schedule_from_scheduler_config(cfg: dict[str, Any]) -> NoiseSchedule:
    """The :class:`NoiseSchedule` a diffusers scheduler config describes (float64 ᾱ_t).

    Supports ``trained_betas`` and ``beta_schedule`` "linear", "scaled_linear", "squaredcos_cap_v2"
    (the cosine schedule, max β 0.999) and "sigmoid", then ``rescale_betas_zero_snr``.
    """
    T = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        schedule = NoiseSchedule.from_betas(cfg["trained_betas"])
    elif kind == "linear":
        schedule = NoiseSchedule.linear(T, start, end)
    elif kind == "scaled_linear":
        schedule = NoiseSchedule.scaled_linear(T, start, end)
    elif kind == "squaredcos_cap_v2":
        schedule = NoiseSchedule.cosine(T)
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
        schedule = NoiseSchedule.from_betas(betas)
    else:
        raise ValueError(f"unsupported diffusers beta_schedule {kind!r}")
    return schedule.rescale_zero_terminal_snr() if cfg.get("rescale_betas_zero_snr") else schedule


def _sampling_config(cfg: dict[str, Any]) -> dict[str, Any]:
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"unsupported diffusers timestep_spacing {spacing!r}")
    out = {
        "guidance": 1.0,
        "spacing": spacing,
        "steps_offset": int(cfg.get("steps_offset", 0) or 0),
        "clip_sample": bool(cfg.get("clip_sample", False)),
        "clip_sample_range": float(cfg.get("clip_sample_range", 1.0)),
        "set_alpha_to_one": bool(cfg.get("set_alpha_to_one", True)),
        "thresholding": bool(cfg.get("thresholding", False)),
        "dynamic_thresholding_ratio": float(cfg.get("dynamic_thresholding_ratio", 0.995)),
        "sample_max_value": float(cfg.get("sample_max_value", 1.0)),
        "use_clipped_model_output": False,
    }
    if cfg.get("variance_type") == "fixed_large":
        out["variance"] = "large"
    return out


def load_pipeline(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[DiffusersModel, NoiseSchedule, dict[str, Any]]:
    """Load a diffusers pipeline folder: ``(model, schedule, config)`` like :func:`ddim.load`.

    Args:
        path: the folder with ``model_index.json``, ``unet/`` and ``scheduler/``.
        device, dtype: where and in which precision to put the weights (default CPU float32).

    Returns:
        ``model``: a :class:`DiffusersModel` in eval mode; ``schedule``: from the scheduler config;
        ``config``: ``{"format": "diffusers-pipeline", "unet": <unet config>, "schedule": ...,
        "prediction": ..., "sampling": {...}, "scheduler": <class name>, "path": ...}``.

    Raises:
        ImportError without diffusers; FileNotFoundError for a missing file; ValueError for a pipeline
        whose network is not a ``UNet2DModel`` (e.g. text-conditioned latent diffusion) or whose
        scheduler config this package cannot express.
    """
    folder = Path(path)
    index = _read_json(folder / INDEX)
    unet_entry = index.get("unet")
    unet_class = unet_entry[1] if isinstance(unet_entry, (list, tuple)) and len(unet_entry) == 2 else None
    if unet_class != "UNet2DModel":
        raise ValueError(
            f"{folder}: only pipelines with a pixel-space UNet2DModel are supported, got unet={unet_entry!r}"
        )
    sched_cfg = _read_json(folder / SCHEDULER_CONFIG)
    schedule = schedule_from_scheduler_config(sched_cfg)
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"unsupported diffusers prediction_type {prediction!r}")
    sampling = _sampling_config(sched_cfg)
    diffusers = _require_diffusers()
    unet_dir = folder / "unet"
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"diffusers pipeline file {unet_dir / 'config.json'} is missing")
    unet = diffusers.UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    model = DiffusersModel(unet).to(device=device, dtype=dtype).eval()
    config = {
        "format": FORMAT,
        "unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "schedule": schedule.to_dict(),
        "prediction": prediction,
        "sampling": sampling,
        "scheduler": (index.get("scheduler") or [None, None])[1],
        "path": str(folder),
    }
    return model, schedule, config


def model_spacing(config: dict[str, Any], steps: int) -> str:
    """The model's own spacing for ``steps`` steps: ``config["sampling"]["spacing"]`` (default "leading"); a
    model whose spacing is "optimized" (``ddim.load("cd")``) gets its ``fallback_spacing`` (default
    "trailing") at step counts it ships no optimised list for."""
    s = dict(config.get("sampling") or {})
    spacing = str(s.get("spacing", "leading"))
    if spacing == "optimized" and str(steps) not in (s.get("optimized_timesteps") or {}):
        spacing = str(s.get("fallback_spacing", "trailing"))
    return spacing


def sampling_kwargs(
    config: dict[str, Any],
    schedule: NoiseSchedule,
    steps: int,
    spacing: str | None = None,
    timesteps: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for :func:`ddim.sample` / :func:`ddim.generate.generate` from a model config.

    Args:
        config: the config of :func:`ddim.load` (its ``"sampling"`` entry; absent keys keep the
            package defaults, so a ddim model folder gives ``{"spacing": "leading", "clip_sample": ...}``).
        schedule: the model's schedule (for ``steps_offset``).
        steps: the number of steps asked for.
        spacing: an explicit spacing (e.g. a command-line flag); None takes the model's. "optimized" is the
            model's own list for ``steps`` (``sampling.optimized_timesteps``, :func:`ddim.ays.optimized_timesteps`;
            ValueError where it has none); a model whose DEFAULT spacing is "optimized" (``ddim.load("cd")``)
            falls back to ``sampling.fallback_spacing`` (default "trailing") at step counts it has no list for.
        timesteps: an explicit list; it overrides spacing and offset.

    Returns:
        ``{"spacing", "timesteps", "clip_sample", ...}``: with "leading" spacing, a diffusers pipeline
        folder (or any ``steps_offset`` k > 0) gets diffusers' own ``[j·(T//S) + k]`` given explicitly
        (this package's "leading" is the paper's ⌊i·T/S⌋, which differs where S does not divide T);
        ``set_alpha_to_one``, ``clip_sample_range``, the thresholding settings and
        ``use_clipped_model_output`` are included when the config sets them.
    """
    s = dict(config.get("sampling") or {})
    spacing = spacing or model_spacing(config, steps)
    if spacing == "optimized" and timesteps is None:  # the model's own optimised lists (ddim.ays)
        from ddim.ays import optimized_timesteps

        spacing, timesteps = "logsnr", optimized_timesteps(config, steps)
    kw: dict[str, Any] = {"spacing": spacing, "timesteps": timesteps, "clip_sample": bool(s.get("clip_sample", False))}
    offset = int(s.get("steps_offset", 0) or 0)
    # diffusers' "leading" is k·(T//S) + offset: equal to this package's ⌊i·T/S⌋ only where S divides T
    # and the offset is 0, so a pipeline folder gets diffusers' exact list (DDIMPipeline parity at every S)
    if timesteps is None and spacing == "leading" and (offset or config.get("format") == FORMAT):
        T = schedule.T
        ts = [j * (T // steps) + offset for j in reversed(range(steps))]
        if ts[0] > T - 1:
            raise ValueError(
                f"steps={steps} with the model's steps_offset={offset} reaches t={ts[0]} > T-1={T - 1}; "
                "use fewer steps or another spacing"
            )
        kw["timesteps"] = ts
    kw.update({k: s[k] for k in _PASSED if k in s})
    return kw
