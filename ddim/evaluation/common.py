"""What every evaluation shares: how to sample (:class:`EvalSetup`), sample cells cached on disk with
resume at batch granularity (:func:`sample_cell`), one progress bar over a whole run
(:class:`Progress`), and small writers (CSV, Markdown, JSON, PNG bytes).

A cell's images depend only on the model's weights and the sampling settings, never on the batch
they were drawn in (image i uses seed ``seed + i``); a cell is stored as the 8-bit images it made,
so a killed run resumes at the last finished batch and metrics can be recomputed without sampling.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim.checkpoint import atomic_write
from ddim.generate import generate, parse_classes, save_npz
from ddim.images import from_uint8, to_uint8
from ddim.sampling import nfe as sampler_nfe
from ddim.schedule import NoiseSchedule

__all__ = [
    "EvalSetup",
    "Progress",
    "model_hash",
    "sample_cell",
    "cell_work",
    "write_csv",
    "write_json",
    "fig_png",
    "parse_list",
]


def model_hash(model: torch.nn.Module, length: int = 12) -> str:
    """Hex digest of a model's weights (identifies cached samples)."""
    from ddim.evaluation.extractors import module_hash

    return module_hash(model, length)


@dataclass
class EvalSetup:
    """How an evaluation samples from a model (everything but steps, η and sampler).

    Attributes:
        model, schedule: as from :func:`ddim.checkpoint.load`.
        prediction: the model's parameterisation ("epsilon", "sample", "v_prediction").
        clip_sample: clip x̂₀ to [-1, 1] while sampling (the model's config).
        use_clipped_model_output: with clipping, recompute ε̂ from the clipped x̂₀ (the model's config).
        class_spec: class spec as in ``ddim sample --class`` (None: unconditional).
        guidance: classifier-free guidance weight for conditional images (1 = none).
        spacing: timestep spacing ("leading", "trailing", "linspace", "quadratic", ...), or "optimized": the
            model's own list per step count (``optimized_timesteps``, :meth:`step_times`).
        seed: image i uses seed ``seed + i``.
        batch: images per network batch (results do not depend on it).
        model_id: hash of the weights (cache key); computed when empty.
        model_name: how to name the model in reports.
        device: where the model runs ("cpu", "cuda", ...); the model must already be there.
        optimized_timesteps: with spacing "optimized", the model's lists by step count (its
            ``config["sampling"]["optimized_timesteps"]``: {"2": [999, 100], ...}).
        fallback_spacing: with spacing "optimized", the spacing of step counts without a list (None: those
            are an error; a model whose default spacing is "optimized" names one, see
            :func:`ddim.diffusers_io.sampling_kwargs`).
    """

    model: torch.nn.Module
    schedule: NoiseSchedule
    prediction: str = "epsilon"
    clip_sample: bool = False
    use_clipped_model_output: bool = False
    class_spec: str | None = None
    guidance: float = 1.0
    spacing: str = "leading"
    seed: int = 0
    batch: int = 100
    model_id: str = ""
    model_name: str = "model"
    device: str = "cpu"
    optimized_timesteps: dict[str, list[int]] | None = None
    fallback_spacing: str | None = None

    def __post_init__(self) -> None:
        self.device = str(self.device)
        if not self.model_id:
            self.model_id = model_hash(self.model)

    def step_times(self, steps: int) -> tuple[str, list[int] | None]:
        """(spacing, timesteps) of a run of ``steps`` steps: (spacing, None) for a named spacing; for
        "optimized", ("logsnr", the model's list), or (fallback_spacing, None) where it has no list and a
        fallback is set. Raises ValueError naming the step counts that have lists otherwise."""
        if self.spacing != "optimized":
            return self.spacing, None
        from ddim.ays import optimized_timesteps

        table = self.optimized_timesteps or {}
        if str(steps) not in table and self.fallback_spacing:
            return self.fallback_spacing, None
        return "logsnr", optimized_timesteps({"sampling": {"optimized_timesteps": table}}, steps)

    def named_spacing(self, what: str) -> str:
        """The spacing for work that takes a spacing name, not a list (inversion, editing): the spacing, or
        for "optimized" the fallback spacing; ValueError naming ``what`` where there is none."""
        if self.spacing != "optimized":
            return self.spacing
        if self.fallback_spacing:
            return self.fallback_spacing
        raise ValueError(f"{what} needs a named spacing (leading, trailing, ...), not 'optimized'")

    @classmethod
    def from_loaded(
        cls,
        model: torch.nn.Module,
        schedule: NoiseSchedule,
        config: dict[str, Any],
        *,
        class_spec: str | None = "default",
        guidance: float | None = None,
        **kwargs: Any,
    ) -> EvalSetup:
        """A setup with the model's own defaults: ``class_spec="default"`` gives "all" (image i gets
        class i mod K) for class-conditional models and unconditional ones otherwise ("none" forces
        unconditional); ``guidance=None`` takes ``config["sampling"]["guidance"]`` (else 1)."""
        k = getattr(getattr(model, "config", None), "num_classes", 0)
        if class_spec == "default":
            class_spec = "all" if k else None
        elif isinstance(class_spec, str) and class_spec.strip().lower() == "none":
            class_spec = None
        sampling = config.get("sampling", {})
        if guidance is None:
            guidance = float(sampling.get("guidance", 1.0)) if class_spec is not None else 1.0
        if kwargs.get("spacing") == "optimized":
            kwargs.setdefault("optimized_timesteps", dict(sampling.get("optimized_timesteps") or {}))
        return cls(
            model,
            schedule,
            prediction=config["prediction"],
            clip_sample=bool(sampling.get("clip_sample", False)),
            use_clipped_model_output=bool(sampling.get("use_clipped_model_output", False)),
            class_spec=class_spec,
            guidance=guidance,
            **kwargs,
        )

    @property
    def num_classes(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "num_classes", 0) or 0)

    def labels(self, n: int) -> torch.Tensor:
        """Class labels of images 0..n-1 (int64, -1 = unconditional)."""
        return parse_classes(self.class_spec, n, self.num_classes)

    def describe(self) -> dict[str, Any]:
        """The settings, JSON-able (for cache keys and reports)."""
        return {
            "model": self.model_name,
            "model_id": self.model_id,
            "prediction": self.prediction,
            "clip_sample": self.clip_sample,
            **({"use_clipped_model_output": True} if self.clip_sample and self.use_clipped_model_output else {}),
            "class": self.class_spec,
            "guidance": self.guidance,
            "spacing": self.spacing,
            **({"optimized_timesteps": self.optimized_timesteps or {}} if self.spacing == "optimized" else {}),
            **({"fallback_spacing": self.fallback_spacing} if self.spacing == "optimized" else {}),
            "seed": self.seed,
        }


def scalar(a: np.ndarray) -> Any:
    """The one value of a stored array (``save_npz`` keeps scalars as 1-element arrays)."""
    return np.asarray(a).reshape(-1)[0].item()


def _digest(obj: Any, length: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


def cell_work(sampler: str, steps: int, n: int) -> int:
    """Network evaluations × images of a sampling cell (the unit of the progress bars)."""
    return sampler_nfe(sampler, steps) * n


class Progress:
    """One tqdm bar over a whole evaluation, in network evaluations × images, with an ETA.

    ``total`` counts all the work, ``done`` what cached results already hold (shown as done).
    """

    def __init__(self, total: int, done: int = 0, desc: str = "eval", enabled: bool = True) -> None:
        self.bar = None
        if enabled and total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="img·NFE", unit_scale=True, smoothing=0.05)

    def update(self, work: int) -> None:
        if self.bar is not None:
            self.bar.update(work)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cell_settings(setup: EvalSetup, n: int, steps: int, eta: float, sampler: str, variance: str) -> dict[str, Any]:
    key = {**setup.describe(), "n": n, "steps": steps, "eta": eta, "sampler": sampler}
    if variance != "eta":  # only then, so that the names of earlier cells stay valid
        key["variance"] = variance
    return key


def cell_path(
    setup: EvalSetup,
    folder: str | os.PathLike,
    *,
    n: int,
    steps: int,
    eta: float,
    sampler: str,
    variance: str = "eta",
) -> Path:
    """Where the samples of one cell are stored (the name carries a hash of every setting)."""
    key = _cell_settings(setup, n, steps, eta, sampler, variance)
    key.pop("model")
    tag = "hat" if variance == "large" else f"{eta:g}"
    return Path(folder) / f"{sampler}-S{steps}-eta{tag}-n{n}-{_digest(key)}.npz"


def sample_cell(
    setup: EvalSetup,
    folder: str | os.PathLike,
    *,
    n: int,
    steps: int,
    eta: float = 0.0,
    sampler: str = "ddim",
    variance: str = "eta",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Sample ``n`` images (image i from seed ``setup.seed + i``) or read them from the cache.

    ``variance`` "large" is the DDPM σ̂ row of the paper's Table 1 (with ``eta`` 1; see :func:`ddim.sample`).

    Finished batches are kept in ``<cell>.partial/`` until the cell is complete, so an interrupted
    cell resumes at its last finished batch. Returns a dict: ``images`` uint8 [n, H, W, C],
    ``labels`` int64 [n], ``seconds`` (sampling time, summed over batches, excluding cache reads),
    ``nfe`` (network evaluations per image), ``path``, ``cached`` (True when nothing was sampled).
    """
    path = cell_path(setup, folder, n=n, steps=steps, eta=eta, sampler=sampler, variance=variance)
    calls = sampler_nfe(sampler, steps)
    if path.is_file():
        with np.load(path) as z:
            return {
                "images": z["images"],
                "labels": z["labels"],
                "seconds": float(scalar(z["seconds"])),
                "nfe": int(scalar(z["nfe"])),
                "path": path,
                "cached": True,
            }
    labels = setup.labels(n)
    partial = path.with_suffix(".partial")
    partial.mkdir(parents=True, exist_ok=True)
    images, seconds, sampled = [], 0.0, False
    for start in range(0, n, setup.batch):
        m = min(setup.batch, n - start)
        chunk = partial / f"{start:08d}-{m}.npz"
        if chunk.is_file():
            with np.load(chunk) as z:
                images.append(z["images"])
                seconds += float(scalar(z["seconds"]))
            continue
        spacing, timesteps = setup.step_times(steps)
        r = generate(
            setup.model,
            setup.schedule,
            n=m,
            seed=setup.seed + start,
            labels=labels[start : start + m],
            guidance=setup.guidance,
            steps=steps,
            eta=eta,
            variance=variance,
            spacing=spacing,
            timesteps=timesteps,
            sampler=sampler,
            prediction=setup.prediction,
            clip_sample=setup.clip_sample,
            batch=m,
            device=setup.device,
            sample_kwargs={"use_clipped_model_output": setup.use_clipped_model_output},
        )
        u8 = to_uint8(r.images)
        save_npz(chunk, images=u8, seconds=np.array(r.seconds))
        images.append(u8)
        seconds += r.seconds
        sampled = True
        if progress is not None:
            progress.update(m * calls)
    all_images = np.concatenate(images)
    save_npz(
        path,
        images=all_images,
        labels=labels.numpy(),
        seconds=np.array(seconds),
        nfe=np.array(calls),
        settings=np.array(json.dumps(_cell_settings(setup, n, steps, eta, sampler, variance))),
    )
    shutil.rmtree(partial, ignore_errors=True)
    return {
        "images": all_images,
        "labels": labels.numpy(),
        "seconds": seconds,
        "nfe": calls,
        "path": path,
        "cached": not sampled,
    }


def cached_work(
    setup: EvalSetup,
    folder: str | os.PathLike,
    *,
    n: int,
    steps: int,
    eta: float,
    sampler: str,
    variance: str = "eta",
) -> int:
    """The part of a cell's work already on disk (whole cell or finished batches)."""
    path = cell_path(setup, folder, n=n, steps=steps, eta=eta, sampler=sampler, variance=variance)
    calls = sampler_nfe(sampler, steps)
    if path.is_file():
        return n * calls
    partial = path.with_suffix(".partial")
    if not partial.is_dir():
        return 0
    return sum(int(p.stem.split("-")[1]) for p in partial.glob("*.npz")) * calls


def images_of(cell: dict[str, Any]) -> torch.Tensor:
    """A cell's images as float32 [n, C, H, W] in [-1, 1]."""
    return from_uint8(cell["images"])


# ------------------------------------------------------------------ writers
def parse_list(text: str | Sequence, kind: type = int, name: str = "list") -> list:
    """ "10,20,50" -> [10, 20, 50] (or floats); raises ValueError naming the option."""
    if not isinstance(text, str):
        return [kind(v) for v in text]
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must name at least one value")
    return values


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as CSV (blank for None; floats with 6 significant digits), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in columns])
    text = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def fig_png(fig, path: str | os.PathLike | None = None, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes (and write them to ``path`` atomically when given)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return data


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table: blank for None, ints as is, floats with ``digits`` significant digits."""
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
