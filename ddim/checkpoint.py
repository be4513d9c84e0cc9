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

__all__ = ["load", "save_model", "default_model_path", "shipped_models", "atomic_write", "build_unet", "FORMAT"]

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


def shipped_models() -> dict[str, Path]:
    """The models shipped inside the package, by name: ``{"default": …, "pd4": …, "cd": …}`` (each a folder
    under ``ddim/weights/`` with a ``config.json``), sorted by name with "default" first."""
    root = Path(__file__).parent / "weights"
    found = {p.name: p for p in root.iterdir() if p.is_dir() and (p / CONFIG).is_file()} if root.is_dir() else {}
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "default", kv[0])))


def _shipped_name(path: str | os.PathLike) -> Path | None:
    """The folder of a shipped model when ``path`` is a bare name that is not an existing path, else None.
    A bare name that is no shipped model raises FileNotFoundError listing the shipped ones."""
    text = os.fspath(path)
    if Path(text).exists() or not text or os.sep in text or "/" in text or Path(text).suffix:
        return None
    shipped = shipped_models()
    if text in shipped:
        return shipped[text]
    raise FileNotFoundError(
        f"model {text} is neither a path nor a shipped model; shipped models: {', '.join(shipped) or 'none'} "
        "(see `ddim models`)"
    )


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
    if path is None:
        folder = default_model_path()
        return folder / WEIGHTS, folder / CONFIG
    p = _shipped_name(path) or Path(path)
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
        hint = ""
        if path is not None and str(path) in shipped_models() and Path(path).exists():
            hint = (
                f" (a path here shadows the shipped model {str(path)!r}: run from another folder or give "
                f"its folder, {shipped_models()[str(path)]})"
            )
        raise FileNotFoundError(f"model config {cfg_path} is missing{hint}")
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
            pipeline folder (see :mod:`ddim.stable_diffusion`, needs diffusers and transformers), the name
            of a model shipped in the package (:func:`shipped_models`: "default", "pd4", "cd", "reflow"; a
            name that is not an existing path), or ``None`` for the embedded default model. A config with a
            ``"consistency"`` entry gives a :class:`~ddim.consistency.ConsistencyModel`.
        device, dtype: where and in which precision to put the weights (default CPU float32).

    Raises:
        FileNotFoundError: a file is missing. ValueError: a corrupt file, or weights that do
        not match the architecture in the config (the message names the first mismatches).
    """
    from ddim.diffusers_io import is_pipeline_folder, load_pipeline
    from ddim.stable_diffusion import is_stable_diffusion_folder, load_stable_diffusion

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
    _attach_solver_stats(model, weights_path)
    schedule = _schedule(config, path)
    if "consistency" in config:  # a consistency model: the network wrapped as f (ddim.consistency)
        from ddim.consistency import ConsistencyModel

        c = config["consistency"]
        model = ConsistencyModel(model, schedule, c.get("prediction", "v_prediction"), c.get("sigma_data", 0.5))
    return model, schedule, config


def _attach_solver_stats(model: torch.nn.Module, weights_path: Path) -> None:
    """DPM-Solver-v3's statistics file beside the weights, if there is one (read on first use)."""
    from ddim.model_stats import attach_stats, stats_path

    found = stats_path(weights_path)
    if found.is_file():
        attach_stats(model, found)


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


def model_summaries() -> list[dict[str, Any]]:
    """One summary per shipped model (:func:`shipped_models`): ``{"name", "description", "parameters",
    "megabytes", "sampler", "steps", "guidance"}``, read from each folder's config (no weights are loaded;
    ``parameters`` counts the tensors in the safetensors header)."""
    import math

    rows = []
    for name, folder in shipped_models().items():
        config = read_config(folder)
        s = config.get("sampling", {})
        weights = folder / WEIGHTS
        n = 0
        if weights.is_file():
            with weights.open("rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            n = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        unet = config["unet"]
        classes = unet.get("num_classes", 0)
        default_desc = (
            f"{'class-conditional ' if classes else ''}{config['prediction']}-prediction U-Net, "
            f"{unet.get('image_size')}x{unet.get('image_size')}"
        )
        rows.append(
            {
                "name": name,
                "description": config.get("description", default_desc),
                "parameters": n,
                "megabytes": weights.stat().st_size / 1e6 if weights.is_file() else 0.0,
                "sampler": s.get("sampler", "ddim"),
                "steps": s.get("steps"),
                "guidance": float(s.get("guidance", 1.0)),
            }
        )
    return rows
