"""§5.2 of the paper on any model: the same x_T keeps its high-level features whatever the number
of steps S.

``n`` noises x_T (image i from seed i) are decoded with deterministic DDIM (η = 0) at every S in
the list. The number: the mean distance from each image at S to the image of the *same* x_T at the
largest S (the most accurate solution of the ODE), against the distance to the largest-S image of
an *independent* x_T of the same class (when the classes allow; otherwise of any other x_T). A ratio
well below 1 means x_T, not S, decides what the image shows. Distance: mean |Δ| per pixel on [0, 1].

Written: ``consistency.png`` (rows S, columns x_T), ``consistency.csv``, ``consistency.md`` and
``consistency.json``; the samples are cached cells as in Table 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddim.evaluation.common import (
    EvalSetup,
    Progress,
    cached_work,
    cell_work,
    fig_png,
    markdown_table,
    pyplot,
    sample_cell,
    write_csv,
    write_json,
    write_text,
)

__all__ = ["COLUMNS", "run_consistency", "consistency_numbers", "plot_consistency"]

COLUMNS = ("steps", "same_xT", "independent_xT", "ratio")


def consistency_numbers(images: dict[int, np.ndarray], labels: np.ndarray) -> tuple[list[dict[str, Any]], str]:
    """Distances to the largest-S images: a row per S (steps, same_xT, independent_xT, ratio), and
    which pairs made the baseline ("same class" or "any").

    ``images``: S -> uint8 [n, H, W, C], the same n noises decoded at each S; ``labels`` int [n].
    """
    ref_s = max(images)
    n = images[ref_s].shape[0]
    ref = images[ref_s].astype(np.float64).reshape(n, -1) / 255
    if n < 2:
        raise ValueError("consistency needs at least 2 noises (one to compare against)")
    labels = np.asarray(labels)
    same_class = labels[:, None] == labels[None, :]
    off = ~np.eye(n, dtype=bool)
    pairs = same_class & off
    kind = "same class"
    if not pairs.any(1).all():  # some image has no other x_T of its class: compare with any other
        pairs, kind = off, "any"
    rows = []
    for s in sorted(images):
        x = images[s].astype(np.float64).reshape(n, -1) / 255
        d = np.stack([np.abs(x[i] - ref).mean(1) for i in range(n)])  # d[i, j] = mean |x_S[i] - x_ref[j]|
        same = float(np.diag(d).mean())
        indep = float(d[pairs].mean())
        rows.append({"steps": s, "same_xT": same, "independent_xT": indep, "ratio": same / indep if indep else None})
    return rows, kind


def plot_consistency(images: dict[int, np.ndarray], rows: list[dict[str, Any]], columns: int = 8, path=None) -> bytes:
    """Rows: S (labelled with the distance to the largest S); columns: the first x_T's."""
    plt = pyplot()
    steps = sorted(images)
    k = min(columns, images[steps[0]].shape[0])
    by_s = {r["steps"]: r for r in rows}
    fig, axes = plt.subplots(len(steps), k, figsize=(0.95 * k + 1.7, 0.95 * len(steps) + 0.4), squeeze=False)
    for i, s in enumerate(steps):
        for j in range(k):
            img = images[s][j]
            axes[i][j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        label = f"S = {s}" + ("" if s == max(steps) else f"\nd = {by_s[s]['same_xT']:.3f}")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("One x_T per column, decoded with DDIM (η = 0) at each S", fontsize=9)
    return fig_png(fig, path)


def run_consistency(
    setup: EvalSetup,
    out: str | os.PathLike,
    *,
    steps: Sequence[int] = (10, 20, 50, 100, 200, 500, 1000),
    n: int = 20,
    columns: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode ``n`` noises at each S (DDIM, η = 0), write the grid and the numbers into ``out``.

    Returns ``{"rows": [...], "baseline": "same class" | "any", "reference_steps": max S, ...}``.
    """
    out = Path(out)
    steps = sorted({int(s) for s in steps})
    if len(steps) < 2:
        raise ValueError("consistency needs at least two step counts (the largest is the reference)")
    folder = out / "cells"
    total = sum(cell_work("ddim", s, n) for s in steps)
    done = sum(cached_work(setup, folder, n=n, steps=s, eta=0.0, sampler="ddim") for s in steps)
    bar = Progress(total, done, desc="consistency", enabled=progress)
    images, labels = {}, None
    try:
        for s in sorted(steps, reverse=True):
            bar.describe(f"S={s}")
            cell = sample_cell(setup, folder, n=n, steps=s, eta=0.0, sampler="ddim", progress=bar)
            images[s], labels = cell["images"], cell["labels"]
    finally:
        bar.close()
    rows, kind = consistency_numbers(images, labels)
    result = {
        "rows": rows,
        "baseline": kind,
        "reference_steps": max(steps),
        "n": n,
        "setup": setup.describe(),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_consistency(images, rows, columns, out / "consistency.png")
    write_csv(out / "consistency.csv", rows, COLUMNS)
    write_text(out / "consistency.md", markdown_consistency(result))
    write_json(out / "consistency.json", result)
    return result


def markdown_consistency(result: dict[str, Any]) -> str:
    ref = result["reference_steps"]
    head = (
        "# Consistency: the same x_T across S (§5.2)\n\n"
        f"{result['n']} noises x_T, each decoded with DDIM (η = 0) at every S. Mean |Δ| per pixel on [0, 1] "
        f"to the S = {ref} image of the same x_T, and to the S = {ref} image of an independent x_T "
        f"({result['baseline']}). Ratio < 1: x_T decides the image, whatever S.\n\n"
    )
    body = [[r["steps"], r["same_xT"], r["independent_xT"], r["ratio"]] for r in result["rows"] if r["steps"] != ref]
    return head + markdown_table(["S", "same x_T", "independent x_T", "ratio"], body)
