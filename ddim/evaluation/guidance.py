"""Guidance × steps: which classifier-free guidance weight w is best at each step count, per sampler,
judged in more than one feature space.

One cell per (sampler, S, w): ``n`` class-conditional samples (image i from seed i and class i mod K,
the same in every cell), scored against the reference set in each feature space given: Fréchet
distance, precision, recall and the class accuracy of that space's classifier. For each (sampler, S,
feature space) the w with the lowest Fréchet distance is marked best.

:func:`choose_guidance` turns the grid into one default: in each feature space, the w whose Fréchet
distance is on average closest to the best of its (sampler, S) group (mean of FD / best FD), among the
w whose class accuracy (by the first feature space's classifier) stays at or above ``min_accuracy`` in
every cell. A second, independently
trained network (``ddim/weights/classifier_check.safetensors``: another architecture and seed) is the
check: a default chosen in one network's features should also do well in another's.

Written to ``out``: ``guidance.csv`` (a row per cell and feature space), ``guidance.md`` (FD, precision,
recall and accuracy tables, best w marked, and the choice), ``guidance.png`` (FD and accuracy against
w, a line per S, a panel per feature space) and ``guidance.json``; samples cached in ``cells/``.
"""

from __future__ import annotations

import dataclasses
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
    fmt,
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
from ddim.evaluation.metrics import Reference, fid, precision_recall
from ddim.evaluation.table1 import _accuracy

__all__ = ["COLUMNS", "run_guidance", "best_guidance", "choose_guidance", "write_guidance"]

COLUMNS = ("sampler", "steps", "guidance", "features", "nfe", "n", "fd", "precision", "recall", "accuracy", "best")


def run_guidance(
    setup: EvalSetup,
    out: str | os.PathLike,
    spaces: Sequence[tuple[FeatureExtractor, Reference]],
    *,
    guidances: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0),
    steps: Sequence[int] = (10, 20, 50),
    samplers: Sequence[str] = ("ddim",),
    n: int = 200,
    eta: float = 0.0,
    min_accuracy: float = 0.95,
    cells: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) every (sampler, S, w) cell, score it in every feature space of ``spaces``
    ((extractor, its reference features) pairs) and write the guidance files; returns the rows. ``cells``:
    where samples are cached (default ``out/cells``; Table 1's folder shares its cells).

    Raises ValueError for a model without classes or an unconditional ``setup``, repeated or invalid
    grid values (w must be >= 0), no feature space, or ``n`` above a reference set's size.
    """
    if not setup.num_classes or setup.class_spec is None:
        raise ValueError("guidance needs a class-conditional model sampled with classes (not --class none)")
    guidances = [float(w) for w in check_grid(guidances, "guidance values", minimum=0.0)]
    steps = [int(s) for s in check_grid(steps, "steps", minimum=1, integer=True)]
    samplers = check_samplers(samplers)
    if not spaces:
        raise ValueError("name at least one feature space")
    for ex, ref in spaces:
        if n > len(ref.features):
            raise ValueError(f"n ({n}) is larger than the reference set of {ex.name} ({len(ref.features)} images)")
    if n < 4:
        raise ValueError(f"n must be at least 4, got {n}")
    out = Path(out)
    cells_dir = Path(cells) if cells is not None else out / "cells"
    grid = [(sa, s, w) for sa in samplers for s in steps for w in guidances]
    setups = {w: dataclasses.replace(setup, guidance=w) for w in guidances}
    e = {sa: (eta if sa == "ddim" else 0.0) for sa in samplers}
    work = sum(cell_work(sa, s, n) for sa, s, _ in grid)
    done = sum(cached_work(setups[w], cells_dir, n=n, steps=s, eta=e[sa], sampler=sa) for sa, s, w in grid)
    bar = Progress(work, done, desc="guidance", enabled=progress)
    rows: list[dict[str, Any]] = []
    try:
        for sa, s, w in grid:
            bar.describe(f"{sa} S={s} w={w:g}")
            cell = sample_cell(setups[w], cells_dir, n=n, steps=s, eta=e[sa], sampler=sa, progress=bar)
            imgs = images_of(cell)
            for ex, ref in spaces:
                feats, preds = ex.features_and_predictions(imgs)
                p, r = precision_recall(feats, ref.features, seed=setup.seed)
                rows.append(
                    {
                        "sampler": sa,
                        "steps": s,
                        "guidance": w,
                        "features": ex.name,
                        "nfe": cell["nfe"],
                        "n": n,
                        "fd": fid(feats, ref.features),
                        "precision": p,
                        "recall": r,
                        "accuracy": _accuracy(preds, cell["labels"]),
                        "samples": os.path.relpath(cell["path"], out),
                    }
                )
    finally:
        bar.close()
    for r in rows:
        r["best"] = False
    for key, w in best_guidance(rows).items():
        for r in rows:
            if (r["sampler"], r["steps"], r["features"]) == key and r["guidance"] == w:
                r["best"] = True
    meta = {
        "setup": setup.describe(),
        "features": [ex.name for ex, _ in spaces],
        "references": [ref.info | {"key": ref.key} for _, ref in spaces],
        "guidances": guidances,
        "steps": steps,
        "samplers": samplers,
        "n": n,
        "eta": eta,
        "min_accuracy": min_accuracy,
        "choice": choose_guidance(rows, min_accuracy),
        "default": setup.guidance,
    }
    write_guidance(rows, out, meta)
    return rows


def best_guidance(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], float]:
    """{(sampler, steps, features): the guidance with the lowest Fréchet distance}."""
    best: dict[tuple[str, int, str], tuple[float, float]] = {}
    for r in rows:
        key = (r["sampler"], r["steps"], r["features"])
        if key not in best or r["fd"] < best[key][0]:
            best[key] = (r["fd"], r["guidance"])
    return {k: v[1] for k, v in best.items()}


def choose_guidance(rows: list[dict[str, Any]], min_accuracy: float = 0.95) -> dict[str, Any]:
    """One default guidance per feature space and overall (see the module).

    Returns {"per_space": {features: {"guidance", "score", "scores": {w: mean FD / best FD}}},
    "guidance": the overall choice (lowest score averaged over the spaces), "agree": whether every
    space picks the overall choice, "excluded": [w whose accuracy, by the first space's classifier (the
    main one; a checking network may be a weaker classifier), fell below ``min_accuracy`` in some cell]}.
    """
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["steps"], r["features"]), []).append(r)
    spaces = list(dict.fromkeys(r["features"] for r in rows))
    judge = spaces[0] if spaces else None  # the accuracy gate uses the first space's classifier only
    excluded = sorted(
        {
            r["guidance"]
            for r in rows
            if r["features"] == judge and r["accuracy"] is not None and r["accuracy"] < min_accuracy
        }
    )
    per_space: dict[str, dict[str, Any]] = {}
    for space in spaces:
        ratios: dict[float, list[float]] = {}
        for (_, _, f), cells in groups.items():
            if f != space:
                continue
            lo = min(c["fd"] for c in cells)
            for c in cells:
                ratios.setdefault(c["guidance"], []).append(c["fd"] / lo if lo > 0 else 1.0)
        scores = {w: float(np.mean(v)) for w, v in ratios.items()}
        allowed = {w: v for w, v in scores.items() if w not in excluded} or scores
        pick = min(allowed, key=lambda w: (allowed[w], w))
        per_space[space] = {"guidance": pick, "score": allowed[pick], "scores": scores}
    ws = sorted({r["guidance"] for r in rows})
    overall = {w: float(np.mean([per_space[s]["scores"][w] for s in spaces])) for w in ws}
    allowed = {w: v for w, v in overall.items() if w not in excluded} or overall
    pick = min(allowed, key=lambda w: (allowed[w], w))
    return {
        "per_space": per_space,
        "overall_scores": overall,
        "guidance": pick,
        "agree": all(per_space[s]["guidance"] == pick for s in spaces),
        "excluded": excluded,
        "min_accuracy": min_accuracy,
    }


def choice_sentences(choice: dict[str, Any], default: float | None = None) -> list[str]:
    """The choice in words."""
    lines = []
    for space, c in choice["per_space"].items():
        lines.append(
            f"In the features of the {space}, w = {c['guidance']:g} has the lowest Fréchet distance relative to "
            f"the best of each (sampler, S) (mean FD / best FD = {c['score']:.3f})."
        )
    if choice["excluded"]:
        lines.append(
            f"Excluded for class accuracy below {choice['min_accuracy']:.0%} in some cell (first space's classifier): "
            f"w = {', '.join(f'{w:g}' for w in choice['excluded'])}."
        )
    lines.append(
        f"Over all feature spaces: w = {choice['guidance']:g}"
        + (" (every space agrees)." if choice["agree"] else " (the spaces disagree: see their scores).")
    )
    if default is not None:
        s = choice["overall_scores"].get(default)
        lines.append(
            f"The model's default w = {default:g} "
            + (
                "is the choice."
                if default == choice["guidance"]
                else f"scores {s:.3f} against {choice['overall_scores'][choice['guidance']]:.3f} for the choice."
                if s is not None
                else "is not on the grid."
            )
        )
    return lines


def markdown_guidance(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta.get("setup", {})
    refs = meta.get("references", [])
    lines = [
        "# Guidance × steps",
        "",
        f"Model `{s.get('model')}` (weights {s.get('model_id')}), {meta['n']} samples per cell (image i from seed "
        f"{s.get('seed', 0)}+i, class `{s.get('class')}`), {s.get('spacing')} timesteps, η = {meta['eta']:g} (ddim). "
        f"Reference: {refs[0].get('data') if refs else '?'} ({refs[0].get('n') if refs else '?'} images). "
        "**Bold**: the lowest Fréchet distance of its row (best w for that sampler and S).",
        "",
    ]
    lines += [f"- {t}" for t in choice_sentences(meta["choice"], meta.get("default"))]
    lines.append("")
    ws = meta["guidances"]
    for space in meta["features"]:
        lines += [f"## Features: {space}", ""]
        for metric, label in (
            ("fd", "Fréchet distance ↓"),
            ("precision", "precision ↑"),
            ("recall", "recall ↑"),
            ("accuracy", "class accuracy ↑"),
        ):
            body = []
            for sa in meta["samplers"]:
                for st in meta["steps"]:
                    mine = [r for r in rows if (r["sampler"], r["steps"], r["features"]) == (sa, st, space)]
                    cells = {r["guidance"]: r for r in mine}
                    line = [f"{sa}, S = {st}"]
                    for w in ws:
                        r = cells.get(w)
                        v = None if r is None else r[metric]
                        line.append(f"**{fmt(v)}**" if r is not None and r["best"] and metric == "fd" else v)
                    body.append(line)
            lines += [f"### {label}", "", markdown_table(["", *[f"w = {w:g}" for w in ws]], body)]
    return "\n".join(lines)


def plot_guidance(rows: list[dict[str, Any]], meta: dict[str, Any], path: str | os.PathLike | None = None) -> bytes:
    """FD and accuracy against w (a line per sampler and S), a column per feature space; best w ringed."""
    plt = pyplot()
    spaces = meta["features"]
    fig, axes = plt.subplots(2, len(spaces), figsize=(4.0 * len(spaces), 5.4), squeeze=False)
    groups = [(sa, st) for sa in meta["samplers"] for st in meta["steps"]]
    cmap = plt.get_cmap("viridis")
    for j, space in enumerate(spaces):
        for k, (sa, st) in enumerate(groups):
            cells = sorted(
                (r for r in rows if (r["sampler"], r["steps"], r["features"]) == (sa, st, space)),
                key=lambda r: r["guidance"],
            )
            color = cmap(k / max(1, len(groups) - 1) * 0.85)
            label = f"S = {st}" if len(meta["samplers"]) == 1 else f"{sa} S = {st}"
            xs, fds = [r["guidance"] for r in cells], [r["fd"] for r in cells]
            axes[0][j].plot(xs, fds, "o-", ms=4, color=color, label=label)
            for r in cells:
                if r["best"]:
                    axes[0][j].plot([r["guidance"]], [r["fd"]], "o", ms=10, mfc="none", mec="red")
            acc = [(r["guidance"], r["accuracy"]) for r in cells if r["accuracy"] is not None]
            if acc:
                axes[1][j].plot(*zip(*acc, strict=True), "o-", ms=4, color=color, label=label)
        axes[0][j].set_title(space, fontsize=10)
        axes[0][j].set_ylabel("Fréchet distance ↓")
        axes[1][j].set_ylabel("class accuracy ↑")
        axes[1][j].set_xlabel("guidance w")
        for i in range(2):
            axes[i][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Guidance × steps (n = {meta['n']}; red ring: best w of its line)", fontsize=10)
    fig.tight_layout()
    return fig_png(fig, path)


def write_guidance(rows: list[dict[str, Any]], out: str | os.PathLike, meta: dict[str, Any]) -> list[Path]:
    """guidance.csv, .md, .png and .json in ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"guidance{x}" for x in (".csv", ".md", ".png", ".json")]
    write_csv(paths[0], rows, COLUMNS)
    write_text(paths[1], markdown_guidance(rows, meta))
    plot_guidance(rows, meta, paths[2])
    write_json(paths[3], {"meta": meta, "rows": rows})
    return paths
