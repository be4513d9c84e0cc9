"""Reflow (Liu et al. 2023, "Flow Straight and Fast"): straighten a model's ODE by training a flow on its own pairs.

Two steps, each resumable:

1. :func:`make_pairs`: draw N noises x_T (pair i: seed ``seed + i``, class i mod K for a class-conditional
   teacher), solve the teacher's probability-flow ODE from the DDPM's last level t = T-1 with a
   good few-call solver (default DPM-Solver++ 2M, 12 trailing steps, the teacher's own guidance and
   x̂₀ clipping) and store the (x_T, x₀) pairs in shards of ``shard_size`` under ``DIR/pairs/``, with a
   manifest ``DIR/pairs.json`` naming the teacher (its weights' digest) and the solver. A shard is
   written atomically once complete, so a stopped run resumes at the first missing shard; under
   ``torchrun`` the missing shards are dealt to the ranks.
2. :func:`reflow`: train a flow-matching student (``prediction="flow"`` on ``NoiseSchedule.flow``) on
   those pairs: z_τ = (1 - τ) x₀ + τ x_T with the pair's own x_T as the noise, target x_T - x₀, through
   :func:`ddim.train.train` (same checkpoints, exact resume, torchrun), initialised from the teacher's
   weights when its architecture fits. The pairs already carry the teacher's guidance, so the student
   is trained without label dropout and samples at guidance 1 (one network call per step).

For the DDPM teacher x_T at t = T-1 has ᾱ ≈ 4·10⁻⁵ (√ᾱ ≈ 0.006): it is the noise end τ = 1 of the
student's path up to that level, so the student's z at τ = 1 is exactly the teacher's starting x_T.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddim import distributed as ddist
from ddim.checkpoint import atomic_write, write_json
from ddim.data import ImageData
from ddim.outputs import check_folder

__all__ = ["PairSettings", "make_pairs", "load_pairs", "pair_shards", "reflow", "load_teacher", "PAIRS", "MANIFEST"]

PAIRS = "pairs"
MANIFEST = "pairs.json"


@dataclass
class PairSettings:
    """How the teacher's ODE is solved for the pairs (saved in ``pairs.json``).

    Attributes:
        n: number of pairs N.
        sampler, steps, spacing: the ODE solver (any deterministic key of :data:`ddim.SAMPLERS`; default
            "dpmpp_2m", 12 steps, "trailing" spacing, whose first level is t = T-1).
        guidance: classifier-free guidance scale; None (default) takes the teacher's config ("sampling":
            "guidance"), 1.0 without one.
        seed: pair i is drawn from seed ``seed + i`` (``ddim.randn``), class i mod K.
        shard_size: pairs per shard file (the unit of resumption and of the work dealt to ranks).
        batch: images per network batch (≤ shard_size).
    """

    n: int = 10000
    sampler: str = "dpmpp_2m"
    steps: int = 12
    spacing: str = "trailing"
    guidance: float | None = None
    seed: int = 0
    shard_size: int = 256
    batch: int = 64

    def validate(self) -> None:
        from ddim.sampling import SAMPLERS

        for name in ("n", "steps", "shard_size", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if self.sampler in ("ddpm",) or self.sampler.endswith("_sde"):
            raise ValueError(f"sampler {self.sampler!r} is stochastic: reflow pairs need a deterministic ODE solver")
        if self.guidance is not None and (
            isinstance(self.guidance, bool)
            or not isinstance(self.guidance, (int, float))
            or not math.isfinite(self.guidance)
        ):
            raise ValueError(f"guidance must be a finite number, got {self.guidance!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32 - self.n:
            raise ValueError(f"seed must be an int with seed + n < 2^32, got {self.seed!r}")


def load_teacher(teacher: str | os.PathLike | None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``ddim.load(teacher)`` (None: the embedded default), or ValueError "teacher ... is not a model: ..."."""
    from ddim.checkpoint import load

    try:
        return load(teacher)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"teacher {teacher} is not a model ddim.load reads: {e}") from None


def _teacher_kwargs(model: torch.nn.Module, schedule: Any, config: dict[str, Any], s: PairSettings) -> dict[str, Any]:
    """The :func:`ddim.sample` settings of the teacher's ODE (its clipping; guidance per ``s``)."""
    from ddim.diffusers_io import sampling_kwargs

    base = sampling_kwargs(config, schedule, s.steps, s.spacing)
    kw: dict[str, Any] = {"prediction": config["prediction"], "sampler": s.sampler, "steps": s.steps, **base}
    guidance = s.guidance if s.guidance is not None else float((config.get("sampling") or {}).get("guidance", 1.0))
    kw["guidance_scale"] = float(guidance)
    return kw


def pair_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """The [start, stop) index ranges of the shards of n pairs."""
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def _shard_path(folder: Path, k: int) -> Path:
    return folder / PAIRS / f"shard_{k:05d}.safetensors"


def _manifest(teacher: str | None, model: torch.nn.Module, config: dict[str, Any], kw: dict, s: PairSettings) -> dict:
    from ddim.shard import model_digest

    cfg = model.config
    return {
        "format": "ddim-reflow-pairs",
        "teacher": None if teacher is None else str(teacher),
        "teacher_digest": model_digest(model),
        "teacher_prediction": config["prediction"],
        "shape": list(cfg.sample_shape),
        "num_classes": int(cfg.num_classes),
        "class_names": list((config.get("data") or {}).get("class_names") or [str(i) for i in range(cfg.num_classes)]),
        "settings": asdict(s),
        "guidance": kw["guidance_scale"],
        "clip_sample": bool(kw.get("clip_sample", False)),
    }


def make_pairs(
    teacher: str | os.PathLike | None,
    out: str | os.PathLike,
    settings: PairSettings | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Solve the teacher's ODE from N noises and store the (x_T, x₀) pairs under ``out``; returns ``out``.

    Args:
        teacher: any model folder :func:`ddim.load` takes (None: the embedded default model).
        out: the folder (``pairs.json`` and ``pairs/shard_XXXXX.safetensors``, each holding float32 "noise"
            [B, C, H, W], float32 "images" [B, C, H, W] in the model's space, int64 "seeds" [B] and "labels" [B],
            -1 for an unconditional teacher). Complete shards already there are kept (resume) when the
            manifest agrees; a different teacher or settings is refused (ValueError), but a different
            ``n`` is not: the pairs are extended (or cut) to n, keeping the complete shards of [0, n).
        settings: :class:`PairSettings` (default: 10,000 pairs, DPM-Solver++ 2M with 12 trailing steps).
        device: where the teacher runs (under torchrun each rank uses its local device of that kind).

    Raises:
        ValueError: the teacher is not a model, bad settings, or a folder holding other pairs.
    """
    from ddim import randn
    from ddim.sampling import sample

    s = settings or PairSettings()
    s.validate()
    out = check_folder(out, flag="out")
    model, schedule, config = load_teacher(teacher)
    cfg = model.config
    kw = _teacher_kwargs(model, schedule, config, s)
    manifest = _manifest(None if teacher is None else str(teacher), model, config, kw, s)
    ctx = ddist.init(device)
    dev = ddist.local_device(device)
    model.to(dev)
    error = None
    if ctx.is_main:
        try:
            _write_or_check_manifest(out, manifest)
        except (ValueError, OSError) as e:
            error = e
    ddist.check(error, ctx)
    shards = pair_shards(s.n, s.shard_size)
    todo = [k for k, (a, b) in enumerate(shards) if not _shard_ok(_shard_path(out, k), s.seed + a, s.seed + b)]
    mine = ddist.shard(todo, ctx)
    k_classes = int(cfg.num_classes)
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(shards), initial=len(shards) - len(todo), unit="shard", dynamic_ncols=True)
    for k in mine:
        a, b = shards[k]
        seeds = list(range(s.seed + a, s.seed + b))
        idx = torch.arange(a, b)
        labels = idx % k_classes if k_classes else torch.full((b - a,), -1)
        noise = randn((b - a, *cfg.sample_shape), seeds)
        images = []
        for c in range(0, b - a, s.batch):
            x_T = noise[c : c + s.batch].to(dev)
            extra: dict[str, Any] = {}
            if k_classes:
                y = labels[c : c + s.batch].to(dev)
                extra["model_kwargs"] = {"y": y}
                if kw["guidance_scale"] != 1.0:
                    extra["uncond_kwargs"] = {"y": torch.full_like(y, k_classes)}
            with torch.inference_mode():
                images.append(sample(model, x_T, schedule, seeds=seeds[c : c + s.batch], **kw, **extra).float().cpu())
        tensors = {
            "noise": noise.contiguous(),
            "images": torch.cat(images).contiguous(),
            "seeds": torch.tensor(seeds, dtype=torch.int64),
            "labels": labels.to(torch.int64).contiguous(),
        }
        path = _shard_path(out, k)
        meta = {"range": f"{a}:{b}"}
        atomic_write(path, lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
        if bar is not None:
            bar.update(ctx.world_size if ctx.distributed else 1)
    if bar is not None:
        bar.close()
    ddist.check(None, ctx)
    return out


def _write_or_check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); remove the folder or use another --out") from None
        # the number of pairs may change (more pairs later, or fewer): the shards of [0, n) stay valid
        same_n = {**manifest, "settings": {**manifest["settings"], "n": (old.get("settings") or {}).get("n")}}
        diff = [k for k in manifest if old.get(k) != same_n[k]]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {manifest[k]!r} now" for k in diff)
            raise ValueError(f"{out} holds pairs of another teacher or settings ({shown}); use another --out")
        if old != manifest:
            write_json(path, manifest)
        return
    if (out / PAIRS).is_dir() and any((out / PAIRS).iterdir()):
        raise ValueError(f"{out / PAIRS} holds files but {path} is missing; use another --out")
    write_json(path, manifest)


def _shard_ok(path: Path, first: int, stop: int) -> bool:
    """Whether a shard file is complete: readable, the pairs of seeds ``first`` … ``stop - 1``."""
    if not path.is_file():
        return False
    try:
        t = load_file(path)
    except (SafetensorError, OSError, ValueError):
        return False
    if not all(k in t for k in ("noise", "images", "seeds", "labels")):
        return False
    return torch.equal(t["seeds"], torch.arange(first, stop, dtype=torch.int64))


def load_pairs(folder: str | os.PathLike) -> tuple[ImageData, torch.Tensor, dict[str, Any]]:
    """The pairs of a :func:`make_pairs` folder: ``(data, noise, manifest)``.

    ``data.images`` are the teacher's x₀ [N, C, H, W] (float32), ``data.labels`` int64 [N] (None for an
    unconditional teacher), ``noise`` the matching x_T [N, C, H, W]. Raises ValueError for a folder that is
    not a pairs folder or whose shards are incomplete (finish them with :func:`make_pairs`).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"pairs {folder}: {MANIFEST} is missing (make pairs with `ddim reflow` first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"pairs {path} is not valid JSON: {e}") from None
    if manifest.get("format") != "ddim-reflow-pairs":
        raise ValueError(f"{path} is not a reflow pairs manifest")
    s = manifest["settings"]
    noise, images, labels = [], [], []
    for k, (a, b) in enumerate(pair_shards(int(s["n"]), int(s["shard_size"]))):
        p = _shard_path(folder, k)
        if not _shard_ok(p, int(s["seed"]) + a, int(s["seed"]) + b):
            raise ValueError(f"pairs {folder}: shard {p.name} is missing or incomplete; resume `ddim reflow` to finish")
        t = load_file(p)
        noise.append(t["noise"])
        images.append(t["images"])
        labels.append(t["labels"])
    lab = torch.cat(labels)
    k_classes = int(manifest["num_classes"])
    data = ImageData(
        torch.cat(images),
        lab if k_classes else None,
        list(manifest["class_names"]) if k_classes else [],
        {"name": "reflow-pairs", "path": str(folder), "teacher": manifest["teacher"], "n": int(s["n"])},
    )
    return data, torch.cat(noise), manifest


def reflow(
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 3e-4,
    warmup: int = 100,
    lr_decay_start: int | None = None,
    ema_decay: float = 0.999,
    init: bool = True,
    checkpoint_every: int = 250,
    sample_every: int = 0,
    seed: int = 0,
    threads: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train the flow student on the pairs of ``pairs`` into the run folder ``out``; returns ``out``.

    The student is a :class:`~ddim.unet.UNet` of the teacher's architecture, ``prediction="flow"`` on
    ``NoiseSchedule.flow(T)`` with the teacher's T, initialised from the teacher's weights (``init=True``;
    the network's output changes meaning from the teacher's target to the velocity, so it is fine-tuned
    from there) or from random weights. Its config samples at guidance 1 (the pairs carry the teacher's
    guidance). Checkpoints, logs and exact resume are those of :func:`ddim.train.train`.
    """
    from ddim.train import TrainConfig, train

    data, noise, manifest = load_pairs(pairs)
    teacher = manifest["teacher"]
    T = _teacher_T(teacher)
    cfg = TrainConfig(
        data=str(pairs),
        out=str(out),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        lr_decay_start=lr_decay_start,
        ema_decay=ema_decay,
        prediction="flow",
        schedule="flow",
        T=T,
        class_cond=bool(manifest["num_classes"]),
        label_dropout=0.0,
        checkpoint_every=checkpoint_every,
        sample_every=sample_every,
        seed=seed,
        threads=threads,
        guidance=1.0,
        init=(teacher if teacher is not None else str(_default_path())) if init else None,
        pairs=str(pairs),
    )
    return train(cfg, resume=resume, progress=progress, data=data, noise=noise)


def _default_path() -> Path:
    from ddim.checkpoint import default_model_path

    return default_model_path()


def _teacher_T(teacher: str | None) -> int:
    from ddim.checkpoint import read_config
    from ddim.schedule import NoiseSchedule

    try:
        return NoiseSchedule.from_dict(read_config(teacher)["schedule"]).T
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ValueError(f"teacher {teacher} of the pairs cannot be read: {e}") from None
