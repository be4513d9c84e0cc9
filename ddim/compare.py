"""The headline, shown: DDPM's full ancestral chain next to DDIM at a few step counts, same weights,
same x_T, with the time each took (``ddim compare``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ddim.generate import generate, parse_classes
from ddim.images import to_uint8
from ddim.schedule import NoiseSchedule

__all__ = ["compare_samplers", "plot_comparison"]


def compare_samplers(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    config: dict[str, Any],
    seeds: Sequence[int],
    steps: Sequence[int] = (10, 20, 50, 100),
    *,
    ddpm_steps: int | None = None,
    class_spec: str | None = None,
    guidance: float = 1.0,
) -> list[dict[str, Any]]:
    """Sample the same seeds with DDPM (``ddpm_steps``, default T) and DDIM (η = 0) at each of ``steps``, with
    the model's sampling settings (``config["sampling"]``: spacing, x̂₀ clipping, ...).

    Returns one dict per row: ``name``, ``nfe``, ``seconds``, ``images`` [N, C, H, W] and
    ``dist_to_first``: mean |x − x_DDIM,max S| on the [0, 1] scale, the distance of each row to the
    DDIM row with the most steps (the most accurate solution of the ODE that DDIM integrates).
    """
    from ddim.diffusers_io import sampling_kwargs

    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if not steps:
        raise ValueError("steps must name at least one step count")
    seeds = list(seeds)
    n = len(seeds)
    labels = parse_classes(class_spec, n, getattr(model.config, "num_classes", 0))
    common = dict(labels=labels, guidance=guidance, prediction=config["prediction"], batch=min(n, 256))
    plan = [("ddpm", ddpm_steps or schedule.T)] + [("ddim", int(s)) for s in steps]
    rows = []
    for sampler, s in plan:
        # the model's own sampling settings: spacing, x̂₀ clipping, set_alpha_to_one, thresholding...
        skw = sampling_kwargs(config, schedule, s)
        r = generate(
            model, schedule, seeds=seeds, steps=s, sampler=sampler, spacing=skw.pop("spacing"),
            timesteps=skw.pop("timesteps"), clip_sample=skw.pop("clip_sample"), sample_kwargs=skw, **common,
        )  # fmt: skip
        chunks, secs, nfe = [r.images], r.seconds, r.nfe
        name = f"DDPM {s}" if sampler == "ddpm" else f"DDIM {s}"
        rows.append(
            {"name": name, "sampler": sampler, "steps": s, "nfe": nfe, "seconds": secs, "images": torch.cat(chunks)}
        )
    ref = max((r for r in rows if r["sampler"] == "ddim"), key=lambda r: r["steps"])["images"]
    for r in rows:
        r["dist_to_first"] = float(((r["images"].clamp(-1, 1) - ref.clamp(-1, 1)).abs() / 2).mean())
    return rows


def plot_comparison(rows: list[dict[str, Any]], out: str | os.PathLike) -> None:
    """One figure: a row per sampler (label: name, NFE, seconds), a column per seed. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddim.checkpoint import atomic_write

    n = rows[0]["images"].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.8, 1.15 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        u8 = to_uint8(r["images"])
        for j in range(n):
            ax = axes[i][j]
            img = u8[j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(f"{r['name']}\n{r['seconds']:.2f} s", rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("Same weights, same x_T: DDPM's chain vs DDIM (η = 0) with fewer steps", fontsize=10)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
