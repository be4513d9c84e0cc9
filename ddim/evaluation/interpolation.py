"""§5.3 of the paper on any model: interpolating in x_T gives smooth changes in the image.

For each pair of seeds (2i, 2i+1) (offset by the setup's seed), the two noises are joined by
spherical interpolation (slerp) and every frame is decoded with deterministic DDIM (η = 0); a
conditional model keeps one class per strip. The number, per strip: the largest step between
neighbouring frames divided by the mean step (mean |Δ| per pixel on [0, 1]). 1 is perfectly even;
a large value means the strip jumps somewhere instead of morphing.

Written: ``interpolation.png`` (a strip per row), ``interpolation.csv``, ``interpolation.md`` and
``interpolation.json``; the strips are cached in ``cells/``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np

from ddim.evaluation.common import (
    EvalSetup,
    Progress,
    _digest,
    fig_png,
    markdown_table,
    pyplot,
    write_csv,
    write_json,
    write_text,
)
from ddim.generate import interpolate_seeds, save_npz
from ddim.images import to_uint8
from ddim.sampling import nfe as sampler_nfe

__all__ = ["COLUMNS", "run_interpolation", "smoothness", "plot_interpolation"]

COLUMNS = ("strip", "seed_a", "seed_b", "label", "max_step", "mean_step", "ratio")


def smoothness(frames: np.ndarray) -> tuple[float, float, float]:
    """(largest step, mean step, their ratio) between neighbouring frames of a uint8 strip [F, H, W, C]."""
    x = frames.astype(np.float64).reshape(frames.shape[0], -1) / 255
    steps = np.abs(np.diff(x, axis=0)).mean(1)
    mean = float(steps.mean())
    return float(steps.max()), mean, float(steps.max() / mean) if mean > 0 else float("nan")


def run_interpolation(
    setup: EvalSetup,
    out: str | os.PathLike,
    *,
    pairs: int = 4,
    frames: int = 9,
    steps: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode ``pairs`` slerp strips of ``frames`` frames with S = ``steps``; write figure and numbers.

    Returns ``{"rows": [...], "mean_ratio", "max_ratio", ...}``; a row per strip: strip, seed_a,
    seed_b, label (-1 = unconditional), max_step, mean_step, ratio.
    """
    if pairs < 1 or frames < 3:
        raise ValueError(f"interpolation needs pairs >= 1 and frames >= 3, got {pairs} and {frames}")
    out = Path(out)
    labels = setup.labels(pairs).tolist()
    spacing, timesteps = setup.step_times(steps)
    calls = sampler_nfe("ddim", steps)
    bar = Progress(pairs * frames * calls, 0, desc="interpolation", enabled=progress)
    strips, rows = [], []
    # interpolate_seeds draws x_T on the CPU, so it decodes with a CPU copy of the model (the strips are cheap).
    model = setup.model if setup.device == "cpu" else copy.deepcopy(setup.model).cpu()
    try:
        for i in range(pairs):
            a, b = setup.seed + 2 * i, setup.seed + 2 * i + 1
            key = {**setup.describe(), "a": a, "b": b, "label": labels[i], "frames": frames, "steps": steps}
            key.pop("model")
            path = out / "cells" / f"strip-{a}-{b}-S{steps}-f{frames}-{_digest(key)}.npz"
            if path.is_file():
                with np.load(path) as z:
                    u8 = z["frames"]
                bar.update(frames * calls)
            else:
                bar.describe(f"strip {i + 1}/{pairs}")
                x = interpolate_seeds(
                    model,
                    setup.schedule,
                    a,
                    b,
                    frames=frames,
                    label=labels[i],
                    guidance=setup.guidance,
                    steps=steps,
                    spacing=spacing,
                    timesteps=timesteps,
                    prediction=setup.prediction,
                )
                u8 = to_uint8(x)
                save_npz(path, frames=u8)
                bar.update(frames * calls)
            strips.append(u8)
            mx, mean, ratio = smoothness(u8)
            row = {"strip": i, "seed_a": a, "seed_b": b, "label": labels[i]}
            rows.append(row | {"max_step": mx, "mean_step": mean, "ratio": ratio})
    finally:
        bar.close()
    ratios = [r["ratio"] for r in rows]
    result = {
        "rows": rows,
        "mean_ratio": float(np.mean(ratios)),
        "max_ratio": float(np.max(ratios)),
        "frames": frames,
        "steps": steps,
        "setup": setup.describe(),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_interpolation(strips, rows, out / "interpolation.png")
    write_csv(out / "interpolation.csv", rows, COLUMNS)
    write_text(out / "interpolation.md", markdown_interpolation(result))
    write_json(out / "interpolation.json", result)
    return result


def plot_interpolation(strips: list[np.ndarray], rows: list[dict[str, Any]], path=None) -> bytes:
    """A strip per row, labelled with its seeds and smoothness ratio."""
    plt = pyplot()
    f = strips[0].shape[0]
    fig, axes = plt.subplots(len(strips), f, figsize=(0.9 * f + 1.9, 0.95 * len(strips) + 0.4), squeeze=False)
    for i, (u8, r) in enumerate(zip(strips, rows, strict=True)):
        for j in range(f):
            img = u8[j]
            axes[i][j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        label = f"seeds {r['seed_a']}→{r['seed_b']}" + (f"\nclass {r['label']}" if r["label"] >= 0 else "")
        axes[i][0].set_ylabel(f"{label}\nmax/mean {r['ratio']:.2f}", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("slerp(x_T(a), x_T(b), λ) for λ = 0 … 1, decoded with DDIM (η = 0)", fontsize=9)
    return fig_png(fig, path)


def markdown_interpolation(result: dict[str, Any]) -> str:
    head = (
        "# Interpolation in x_T (§5.3)\n\n"
        f"Slerp between the noises of two seeds, {result['frames']} frames, DDIM (η = 0) with S = {result['steps']}. "
        "Step: mean |Δ| per pixel on [0, 1] between neighbouring frames; ratio = largest step / mean step "
        "(1 = perfectly even).\n\n"
        f"Mean ratio {result['mean_ratio']:.3f}, worst {result['max_ratio']:.3f}.\n\n"
    )
    body = [[r["seed_a"], r["seed_b"], r["label"], r["max_step"], r["mean_step"], r["ratio"]] for r in result["rows"]]
    return head + markdown_table(["seed a", "seed b", "class", "largest step", "mean step", "ratio"], body)
