"""η and diversity: how much the step noise η changes what a model draws, against how good it is.

One cell per (sampler, η) at one step count S, η a grid for DDIM (the samplers that ignore η get one
cell each: DDPM and the SDE solver at their own noise, the ODE solvers at none). Every cell draws the
same seeds (image i from seed i, the same x_T and class in every cell). Per cell:

- ``diversity``: mean pairwise distance between the feature vectors of samples of the same class,
  averaged over the classes (over all samples when unconditional); the ``data`` row gives the same
  for real images, the diversity the model should reach.
- ``recall`` (coverage of the real data), ``precision`` (share of samples on the data manifold), the
  Fréchet distance ``fd`` and the class ``accuracy`` of the extractor's classifier (quality).
- ``spread_px`` / ``spread_feat``: how far each seed's image moved from the anchor cell's image of the
  same seed (DDIM at the smallest η of the grid): mean |Δ| per pixel on [0, 1] and feature distance;
  ``spread_ratio`` divides ``spread_feat`` by the mean feature distance between *different* seeds of
  the same class in the anchor cell (1: η changes an image as much as drawing another x_T does), and
  ``spread_px_ratio`` does the same in pixels.

Written to ``out``: ``diversity.csv``, ``diversity.md``, ``diversity.json``, ``diversity.png``
(diversity, recall, precision and spread against η) and ``diversity_seeds.png`` (the same x_T across
η: a row per seed), plus the cached samples in ``cells/``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim.evaluation.common import (
    EvalSetup,
    Progress,
    cached_work,
    cell_work,
    fig_png,
    images_of,
    markdown_table,
    pyplot,
    sample_cell,
    write_csv,
    write_json,
    write_text,
)
from ddim.evaluation.cost import check_grid, check_samplers
from ddim.evaluation.extractors import FeatureExtractor
from ddim.evaluation.metrics import Reference, quality_metrics
from ddim.evaluation.table1 import _accuracy, _cell_eta, eta_label, table1_cells

__all__ = ["COLUMNS", "within_class_distance", "run_diversity", "write_diversity"]

COLUMNS = (
    "sampler",
    "eta",
    "steps",
    "n",
    "diversity",
    "recall",
    "precision",
    "fd",
    "accuracy",
    "spread_px",
    "spread_feat",
    "spread_ratio",
    "spread_px_ratio",
)


def within_class_distance(features: torch.Tensor, labels: torch.Tensor | np.ndarray | None) -> float:
    """Mean Euclidean distance between distinct pairs of feature rows [N, D] of the same class, averaged
    over the classes with >= 2 rows (all rows as one class when ``labels`` is None or all -1)."""
    f = features.double()
    lab = torch.full((len(f),), -1) if labels is None else torch.as_tensor(np.asarray(labels)).long()
    if lab.shape != (len(f),):
        raise ValueError(f"labels must have shape [{len(f)}], got {tuple(lab.shape)}")
    means = []
    for c in lab.unique().tolist():
        g = f[lab == c]
        if len(g) < 2:
            continue
        d = torch.cdist(g, g)
        means.append(float(d.sum() / (len(g) * (len(g) - 1))))
    if not means:
        raise ValueError("within-class distance needs a class with at least two samples")
    return float(np.mean(means))


def _within_class_pixels(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean |Δ| per pixel on [0, 1] between distinct pairs of images of the same class (averaged over classes)."""
    flat = images.reshape(len(images), -1).double() / 2
    means = []
    for c in labels.unique().tolist():
        g = flat[labels == c]
        if len(g) >= 2:
            d = torch.cdist(g, g, p=1) / g.shape[1]
            means.append(float(d.sum() / (len(g) * (len(g) - 1))))
    return float(np.mean(means)) if means else 0.0


def run_diversity(
    setup: EvalSetup,
    out: str | os.PathLike,
    extractor: FeatureExtractor,
    reference: Reference,
    *,
    reference_labels: torch.Tensor | None = None,
    etas: Sequence[float] = (0.0, 0.2, 0.5, 1.0),
    samplers: Sequence[str] = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde"),
    steps: int = 50,
    n: int = 500,
    seeds_shown: int = 6,
    cells: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) every cell and write the diversity files into ``out``; returns the rows.

    ``reference_labels``: int64 [N] classes of the reference images, for the data row's within-class
    diversity (None: over all of them). ``cells``: where samples are cached (default ``out/cells``; another
    evaluation's folder shares its cells). Raises ValueError for repeated or negative η, unknown or repeated
    samplers, ``n`` above the reference set's size, or ``seeds_shown`` above ``n``.
    """
    etas = [float(e) for e in check_grid(etas, "η values", minimum=0.0)]
    samplers = check_samplers(samplers)
    n_ref = len(reference.features)
    if not 4 <= n <= n_ref:
        raise ValueError(f"n must be in [4, {n_ref}] (the reference set holds {n_ref} images), got {n}")
    if not 1 <= seeds_shown <= n:
        raise ValueError(f"seeds shown must be in [1, n = {n}], got {seeds_shown}")
    out = Path(out)
    cells_dir = Path(cells) if cells is not None else out / "cells"
    cells = table1_cells([steps], etas, samplers)
    work = sum(cell_work(s, st, n) for s, st, _ in cells)
    done = sum(cached_work(setup, cells_dir, n=n, steps=st, sampler=s, **_cell_eta(e)) for s, st, e in cells)
    bar = Progress(work, done, desc="diversity", enabled=progress)
    results = []
    try:
        for sampler, s, eta in cells:
            bar.describe(eta_label(sampler, eta))
            cell = sample_cell(setup, cells_dir, n=n, steps=s, sampler=sampler, progress=bar, **_cell_eta(eta))
            results.append((sampler, eta, cell))
    finally:
        bar.close()
    anchor = next(((sa, e, c) for sa, e, c in results if sa == "ddim"), results[0])
    a_imgs = images_of(anchor[2])
    a_feats, _ = extractor.features_and_predictions(a_imgs)
    labels = torch.as_tensor(anchor[2]["labels"])
    between = within_class_distance(a_feats, labels)  # different seeds, same class, anchor cell
    between_px = _within_class_pixels(a_imgs, labels)
    rows = []
    for sampler, eta, cell in results:
        imgs = images_of(cell)
        feats, preds = extractor.features_and_predictions(imgs)
        row: dict[str, Any] = {"sampler": sampler, "eta": eta, "steps": steps, "n": n}
        row["diversity"] = within_class_distance(feats, cell["labels"])
        q = quality_metrics(feats, reference, seed=setup.seed)
        row.update(recall=q["recall"], precision=q["precision"], fd=q["fd"])
        row["accuracy"] = _accuracy(preds, cell["labels"])
        row["spread_px"] = float(((imgs - a_imgs).abs() / 2).mean())
        row["spread_feat"] = float((feats.double() - a_feats.double()).norm(dim=1).mean())
        row["spread_ratio"] = row["spread_feat"] / between if between > 0 else None
        row["spread_px_ratio"] = row["spread_px"] / between_px if between_px > 0 else None
        row["samples"] = os.path.relpath(cell["path"], out)
        rows.append(row)
    g = torch.Generator().manual_seed(setup.seed + 1)
    idx = torch.randperm(n_ref, generator=g)[:n]
    ref_labels = None if reference_labels is None else torch.as_tensor(reference_labels)[idx]
    q = quality_metrics(reference.features[idx], reference, seed=setup.seed)
    rows.append(
        {
            "sampler": "data",
            "eta": None,
            "steps": None,
            "n": n,
            "diversity": within_class_distance(reference.features[idx], ref_labels),
            "recall": q["recall"],
            "precision": q["precision"],
            "fd": q["fd"],
            "accuracy": None,
            "spread_px": None,
            "spread_feat": None,
            "spread_ratio": None,
            "spread_px_ratio": None,
        }
    )
    meta = {
        "setup": setup.describe(),
        "extractor": extractor.name,
        "reference": reference.info | {"key": reference.key},
        "etas": etas,
        "samplers": samplers,
        "steps": steps,
        "n": n,
        "anchor": eta_label(anchor[0], anchor[1]),
        "between_seeds_feat": between,
        "between_seeds_px": between_px,
        "seeds_shown": seeds_shown,
    }
    write_diversity(rows, out, meta)
    return rows


def _label(r: dict[str, Any]) -> str:
    return f"real data (n = {r['n']})" if r["sampler"] == "data" else eta_label(r["sampler"], r["eta"])


def findings(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Sentences read off the numbers: does diversity and recall rise with η, at what cost in quality?"""
    ddim = sorted((r for r in rows if r["sampler"] == "ddim"), key=lambda r: r["eta"])
    data = next((r for r in rows if r["sampler"] == "data"), None)
    out = []
    if len(ddim) >= 2:
        lo, hi = ddim[0], ddim[-1]

        def move(key: str) -> str:
            a, b = lo[key], hi[key]
            return f"{'rises' if b > a else 'falls' if b < a else 'stays'} from {a:.3g} to {b:.3g}"

        out.append(
            f"DDIM from η = {lo['eta']:g} to η = {hi['eta']:g} (S = {meta['steps']}): within-class diversity "
            f"{move('diversity')}, recall {move('recall')}, precision {move('precision')}, Fréchet distance "
            f"{move('fd')}."
        )
        out.append(
            f"The same x_T: at η = {hi['eta']:g} an image lies {hi['spread_feat']:.3g} from its η = {lo['eta']:g} "
            f"version in features, {hi['spread_ratio']:.2f}× the distance between different seeds of a class "
            f"({hi['spread_px']:.3f} mean |Δ| per pixel, {hi['spread_px_ratio']:.2f}× the distance between different "
            "seeds in pixels)."
        )
    if data is not None and ddim:
        best = max(ddim, key=lambda r: r["diversity"])
        out.append(
            f"Real images of a class lie {data['diversity']:.3g} apart on average; the most diverse DDIM cell "
            f"(η = {best['eta']:g}) reaches {best['diversity']:.3g}."
        )
    return out


def markdown_diversity(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta.get("setup", {})
    ref = meta.get("reference", {})
    lines = [
        "# η and diversity",
        "",
        f"Model `{s.get('model')}` (weights {s.get('model_id')}), {meta['n']} samples per cell, S = {meta['steps']}, "
        f"class `{s.get('class')}`, guidance {s.get('guidance')}; the same seeds (x_T) in every cell. Features: "
        f"{meta['extractor']}; reference {ref.get('data')} ({ref.get('n')} images). Spread: distance of each "
        f"seed's image to its image in the anchor cell ({meta['anchor']}); ratio to the mean distance between "
        f"different seeds of a class there ({meta['between_seeds_feat']:.3g} in features, "
        f"{meta.get('between_seeds_px', float('nan')):.3g} mean |Δ| per pixel).",
        "",
    ]
    lines += [f"- {t}" for t in findings(rows, meta)]
    lines.append("")
    header = ["", "diversity ↑", "recall ↑", "precision ↑", "Fréchet distance ↓", "accuracy ↑", "spread (pixels)"]
    header += ["spread / between seeds (pixels)", "spread (features)", "spread / between seeds (features)"]
    body = [
        [_label(r), r["diversity"], r["recall"], r["precision"], r["fd"], r["accuracy"], r["spread_px"]]
        + [r.get("spread_px_ratio"), r["spread_feat"], r["spread_ratio"]]
        for r in rows
    ]
    lines.append(markdown_table(header, body))
    return "\n".join(lines)


def plot_diversity(rows: list[dict[str, Any]], path: str | os.PathLike | None = None) -> bytes:
    """Diversity, recall, precision and spread against η (DDIM line; other samplers as points at their η)."""
    plt = pyplot()
    metrics = [("diversity", "within-class diversity ↑"), ("recall", "recall ↑"), ("precision", "precision ↑")]
    metrics.append(("spread_ratio", "spread / between seeds"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.1 * len(metrics), 2.9), squeeze=False)
    ddim = sorted((r for r in rows if r["sampler"] == "ddim"), key=lambda r: r["eta"])
    others = [r for r in rows if r["sampler"] not in ("ddim", "data")]
    data = next((r for r in rows if r["sampler"] == "data"), None)
    natural = {"ddpm": 1.0, "dpmpp_2m_sde": 1.0}
    for ax, (m, title) in zip(axes[0], metrics, strict=True):
        if ddim:
            ax.plot([r["eta"] for r in ddim], [r[m] for r in ddim], "o-", ms=4, label="ddim")
        for k, r in enumerate(others):
            ax.plot([natural.get(r["sampler"], 0.0)], [r[m]], "sv^D<>"[k % 6], ms=6, label=r["sampler"])
        if data is not None and data.get(m) is not None:
            ax.axhline(data[m], color="gray", ls="--", lw=1, label="real data")
        ax.set_xlabel("η")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig_png(fig, path)


def plot_seeds(rows: list[dict[str, Any]], out: Path, seeds_shown: int, path: str | os.PathLike | None = None) -> bytes:
    """The same x_T in every cell: a row per seed, a column per cell."""
    plt = pyplot()
    cells = [r for r in rows if r["sampler"] != "data"]
    fig, axes = plt.subplots(
        seeds_shown, len(cells), figsize=(1.1 * len(cells) + 0.6, 1.1 * seeds_shown + 0.5), squeeze=False
    )
    for j, r in enumerate(cells):
        with np.load(out / r["samples"]) as z:
            imgs = z["images"][:seeds_shown]
        for i in range(seeds_shown):
            ax = axes[i][j]
            ax.imshow(imgs[i][..., 0] if imgs.shape[-1] == 1 else imgs[i], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_label(r), fontsize=7)
        axes[0][0].set_ylabel("seed 0", fontsize=7)
    fig.suptitle("The same x_T (a row per seed) in every cell", fontsize=9)
    fig.tight_layout()
    return fig_png(fig, path)


def write_diversity(rows: list[dict[str, Any]], out: str | os.PathLike, meta: dict[str, Any]) -> list[Path]:
    """diversity.csv, .md, .json, .png and diversity_seeds.png in ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"diversity{x}" for x in (".csv", ".md", ".json", ".png", "_seeds.png")]
    write_csv(paths[0], rows, COLUMNS)
    write_text(paths[1], markdown_diversity(rows, meta))
    write_json(paths[2], {"meta": meta, "rows": rows})
    plot_diversity(rows, paths[3])
    plot_seeds(rows, out, meta["seeds_shown"], paths[4])
    return paths
