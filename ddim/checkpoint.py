"""Checkpoints: a safetensors file of weights beside a small JSON config, written atomically.

A model directory holds ``model.safetensors`` (the weights to sample with: the EMA weights
after training) and ``config.json`` (architecture, schedule, prediction type, data, step).
``ddim.load()`` with no path returns the default model embedded in the package; a shipped name
(:data:`SHIPPED`, e.g. ``ddim.load("reflow")``) returns that shipped model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddim.schedule import NoiseSchedule
from ddim.unet import UNet, UNetConfig

__all__ = [
    "load",
    "save_model",
    "default_model_path",
    "shipped_model_path",
    "atomic_write",
    "build_unet",
    "FORMAT",
    "SHIPPED",
]

FORMAT = "ddim-unet"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")


#: Shipped models by name -> their folder under ddim/weights/ (see ddim/weights/MODEL_CARD.md).
SHIPPED = {
    "default": "default",  # the class-conditional MNIST ε-prediction U-Net
    "reflow": "reflow",  # the default model reflowed into a straight flow (ddim reflow)
}


def default_model_path() -> Path:
    """Folder of the embedded default model (a class-conditional MNIST U-Net)."""
    return Path(__file__).parent / "weights" / "default"


def shipped_model_path(name: str) -> Path:
    """Folder of the shipped model ``name`` (a key of :data:`SHIPPED`); KeyError for another name."""
    return Path(__file__).parent / "weights" / SHIPPED[name]


def _shipped(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """A shipped name that is not an existing path -> its folder; anything else unchanged."""
    if isinstance(path, str) and path in SHIPPED and not Path(path).exists():
        return shipped_model_path(path)
    return path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_model(
    folder: str | os.PathLike,
    model: UNet,
    schedule: NoiseSchedule,
    prediction: str,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save ``model`` (its weights cast to ``dtype``) and its config into ``folder``; returns the folder."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    folder = Path(folder)
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    config = {
        "format": FORMAT,
        "unet": model.config.to_dict(),
        "schedule": schedule.to_dict(),
        "prediction": prediction,
        **(extra or {}),
    }
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    write_json(folder / CONFIG, config)
    return folder


def _resolve(path: str | os.PathLike | None) -> tuple[Path, Path]:
    path = _shipped(path)
    if path is None:
        folder = default_model_path()
        return folder / WEIGHTS, folder / CONFIG
    p = Path(path)
    if p.is_dir():
        return p / WEIGHTS, p / CONFIG
    if p.suffix == ".safetensors":
        cfg = p.with_suffix(".json")
        return p, cfg if cfg.is_file() else p.parent / CONFIG
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist")
    raise ValueError(f"model {p} is neither a model folder nor a .safetensors file")


def read_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON config of a model folder or shipped name (``None``: the embedded default)."""
    _, cfg_path = _resolve(path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model config {cfg_path} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {cfg_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f'{cfg_path} is not a ddim model config (expected "format": "{FORMAT}")')
    for key in ("unet", "schedule", "prediction"):
        if key not in config:
            raise ValueError(f"model config {cfg_path} lacks the key {key!r}")
    if config["prediction"] not in PREDICTIONS:
        raise ValueError(
            f"model config {cfg_path}: prediction must be one of {PREDICTIONS}, got {config['prediction']!r}"
        )
    return config


def _check_pipeline_weights(folder: Path) -> None:
    """A diffusers pipeline folder must hold its network's weights (``unet/`` with a weights file)."""
    unet = folder / "unet"
    if not unet.is_dir():
        raise FileNotFoundError(f"diffusers pipeline {folder} has no unet/ folder")
    found = [p for p in unet.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json"))]
    if not found:
        raise FileNotFoundError(
            f"diffusers pipeline {folder}: unet/ holds no weights (diffusion_pytorch_model.safetensors or .bin)"
        )


def build_unet(arch: object, where: str = "unet config") -> UNet:
    """A :class:`~ddim.unet.UNet` from a config dict; ValueError naming ``where`` for an unknown or
    wrongly typed field or an architecture that cannot be built (e.g. channels GroupNorm cannot split)."""
    try:
        return UNet(UNetConfig.from_dict(arch))
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{where}: {e}") from None


def load(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[UNet, NoiseSchedule, dict[str, Any]]:
    """Load a model for sampling: ``(model, schedule, config)``, the model in eval mode.

    Args:
        path: a model folder (``model.safetensors`` + ``config.json``), a ``.safetensors``
            file with its ``.json`` beside it, a diffusers pipeline folder (``model_index.json``,
            ``unet/``, ``scheduler/``; see :mod:`ddim.diffusers_io`, needs diffusers), a Stable Diffusion
            pipeline folder (see :mod:`ddim.stable_diffusion`, needs diffusers and transformers), a
            shipped name (:data:`SHIPPED`: "default", "reflow"; an existing path of that name wins), or
            ``None`` for the embedded default model.
        device, dtype: where and in which precision to put the weights (default CPU float32).

    Raises:
        FileNotFoundError: a file is missing. ValueError: a corrupt file, or weights that do
        not match the architecture in the config (the message names the first mismatches).
    """
    from ddim.diffusers_io import is_pipeline_folder, load_pipeline
    from ddim.stable_diffusion import is_stable_diffusion_folder, load_stable_diffusion

    path = _shipped(path)
    if is_stable_diffusion_folder(path):
        return load_stable_diffusion(path, device, dtype)
    if is_pipeline_folder(path):
        _check_pipeline_weights(Path(path))
        return load_pipeline(path, device, dtype)
    weights_path, _ = _resolve(path)
    config = read_config(path)
    _schedule(config, path)  # a bad config fails before the weights are read
    if not weights_path.is_file():
        raise FileNotFoundError(f"model weights {weights_path} are missing")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"model weights {weights_path} are corrupt or not safetensors: {e}") from e
    model = build_unet(config["unet"], f"model config {_resolve(path)[1]}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
        raise ValueError(f"weights {weights_path} do not match the architecture in its config: " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.to(device=device, dtype=dtype).eval()
    return model, _schedule(config, path), config


def _schedule(config: dict[str, Any], path: str | os.PathLike | None) -> NoiseSchedule:
    try:
        schedule = NoiseSchedule.from_dict(config["schedule"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"model config {_resolve(path)[1]}: bad schedule ({type(e).__name__}: {e})") from None
    if config.get("prediction") == "flow" and not schedule.is_flow:
        raise ValueError(
            f"model config {_resolve(path)[1]}: prediction 'flow' needs the flow time grid (schedule name 'flow'), "
            f"got {schedule!r}, which cannot express a flow model's times"
        )
    return schedule
