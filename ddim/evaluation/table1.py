"""The paper's Table 1 on any model: sample quality against the number of steps S and η.

One cell per (sampler, S, η), η a number or :data:`SIGMA_HAT` ("hat": the paper's σ̂ row, η = 1 with
DDPM's larger variance σ̂_t² = 1 − ᾱ_t/ᾱ_prev): ``n`` images sampled with :func:`ddim.generate.generate` (image i from
seed i, so cells are reproducible and comparable image by image), their features, and the Fréchet
distance, KID, precision and recall against a reference data set, plus the sampling time. Cells are
cached (:func:`ddim.evaluation.common.sample_cell`), so a killed run resumes where it stopped.

Written to the output folder: ``table1.csv`` (a row per cell), ``table1.md`` (the paper's layout:
η down, S across, one table per metric), ``table1.png`` (each metric against S, log x, a line per η),
``table1.json`` (rows and settings, for ``ddim report``) and ``cells/`` (the samples).
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
from ddim.evaluation.extractors import FeatureExtractor
from ddim.evaluation.metrics import Reference, floor_metrics, quality_metrics

__all__ = [
    "COLUMNS",
    "SIGMA_HAT",
    "eta_label",
    "metric_names",
    "parse_etas",
    "table1_cells",
    "run_table1",
    "write_table1",
    "plot_table1",
]

COLUMNS = (
    "sampler",
    "steps",
    "eta",
    "nfe",
    "n",
    "fd",
    "kid",
    "kid_std",
    "precision",
    "recall",
    "accuracy",
    "seconds",
    "images_per_s",
)
METRIC_LABELS = {
    "fd": "Fréchet distance ↓",
    "kid": "KID ↓",
    "precision": "precision ↑",
    "recall": "recall ↑",
    "accuracy": "class accuracy ↑",
}
ETA_SAMPLERS = ("ddim",)  # samplers whose output depends on η; the others get one cell per S
#: The η entry of the paper's σ̂ row: η = 1 with the DDPM "large" variance (``variance="large"``).
SIGMA_HAT = "hat"
Eta = float | str  # a number, or SIGMA_HAT


def parse_etas(text: str | Sequence[Eta]) -> list[Eta]:
    """ "0,0.2,0.5,1,hat" -> [0.0, 0.2, 0.5, 1.0, "hat"]; raises ValueError naming what is wrong."""
    items = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    out: list[Eta] = []
    for v in items:
        if v in ("", None):
            continue
        if isinstance(v, str) and v.lower() in (SIGMA_HAT, "σ̂", "sigma_hat"):
            out.append(SIGMA_HAT)
            continue
        try:
            e = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"η values must be numbers >= 0 or {SIGMA_HAT!r} (σ̂), got {v!r}") from None
        if not e >= 0:
            raise ValueError(f"η values must be >= 0, got {v!r}")
        out.append(e)
    if not out:
        raise ValueError("name at least one η")
    return out


def _eta_and_variance(eta: Eta | None) -> tuple[float, str]:
    """The (eta, variance) arguments of :func:`ddim.sample` for a Table 1 η entry."""
    if eta == SIGMA_HAT:
        return 1.0, "large"
    return float(eta or 0.0), "eta"


def _cell_run(sampler: str, eta: Eta | None) -> dict[str, Any]:
    """The sampler, η and variance a cell is sampled with. The σ̂ row is the reference code's DDPM step
    (ermongroup/ddim ``ddpm_steps``: the posterior mean from x_t and the clipped x̂₀, variance
    σ̂² = 1 - ᾱ_t/ᾱ_prev between the listed levels, no noise on the last step): ``sampler="ddpm",
    variance="large"``, whatever the model's ε̂ setting."""
    e, variance = _eta_and_variance(eta)
    if eta == SIGMA_HAT and sampler == "ddim":
        sampler = "ddpm"
    return {"sampler": sampler, "eta": e, "variance": variance}


def table1_cells(
    steps: Sequence[int], etas: Sequence[Eta], samplers: Sequence[str] = ("ddim",)
) -> list[tuple[str, int, Eta | None]]:
    """The (sampler, S, η) cells, in the order they are run (η None for samplers that ignore it)."""
    cells = []
    for sampler in samplers:
        for eta in etas if sampler in ETA_SAMPLERS else [None]:
            for s in steps:
                cells.append((sampler, int(s), None if eta is None else eta if eta == SIGMA_HAT else float(eta)))
    return cells


def run_table1(
    setup: EvalSetup,
    out: str | os.PathLike,
    extractor: FeatureExtractor,
    reference: Reference,
    *,
    steps: Sequence[int] = (10, 20, 50, 100, 1000),
    etas: Sequence[Eta] = (0.0, 0.2, 0.5, 1.0),
    samplers: Sequence[str] = ("ddim",),
    n: int = 1000,
    floor: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) every cell and write the table files into ``out``; returns the rows.

    ``etas`` may hold :data:`SIGMA_HAT` for the paper's σ̂ row. Each row: sampler, steps, eta (a
    number, "hat", or None if the sampler ignores η), nfe, n, fd, kid, kid_std,
    precision, recall, accuracy (share of conditional samples the extractor's classifier assigns to
    their class; None when unconditional or the extractor has no classifier), seconds (sampling
    only), images_per_s, and ``samples`` (the cell's file, relative to ``out``). With ``floor``, a
    last row (sampler "data") scores ``n`` images of the reference set itself.
    """
    out = Path(out)
    cells_dir = out / "cells"
    cells = table1_cells(steps, etas, samplers)
    if not cells:
        raise ValueError("table1 needs at least one step count and one η")
    work = [cell_work(s, st, n) for s, st, _ in cells]
    done = sum(cached_work(setup, cells_dir, n=n, steps=st, **_cell_run(s, e)) for s, st, e in cells)
    bar = Progress(sum(work), done, desc="table1", enabled=progress)
    rows = []
    try:
        for sampler, s, eta in cells:
            bar.describe(f"{sampler} S={s}" + ("" if eta is None else f" {eta_label('ddim', eta)}"))
            cell = sample_cell(setup, cells_dir, n=n, steps=s, progress=bar, **_cell_run(sampler, eta))
            feats, preds = extractor.features_and_predictions(images_of(cell))
            row: dict[str, Any] = {"sampler": sampler, "steps": s, "eta": eta, "nfe": cell["nfe"], "n": n}
            row.update(quality_metrics(feats, reference, seed=setup.seed))
            row["accuracy"] = _accuracy(preds, cell["labels"])
            row["seconds"] = cell["seconds"]
            row["images_per_s"] = n / cell["seconds"] if cell["seconds"] > 0 else None
            row["samples"] = str(cell["path"].relative_to(out))
            rows.append(row)
    finally:
        bar.close()
    if floor:
        row = {"sampler": "data", "steps": None, "eta": None, "nfe": 0, "n": min(n, len(reference.features))}
        row.update(floor_metrics(reference, n, seed=setup.seed))
        row.update({"accuracy": None, "seconds": None, "images_per_s": None})
        rows.append(row)
    meta = {
        "setup": setup.describe(),
        "extractor": extractor.name,
        "extractor_key": extractor.key,
        "reference": reference.info | {"key": reference.key},
        "steps": [int(s) for s in steps],
        "etas": [e if e == SIGMA_HAT else float(e) for e in etas],
        "samplers": list(samplers),
        "n": n,
    }
    write_table1(rows, out, meta)
    return rows


def metric_names(cells: list[dict[str, Any]]) -> list[str]:
    """The metric columns to show: accuracy only when some cell has it."""
    extra = ["accuracy"] if any(r.get("accuracy") is not None for r in cells) else []
    return ["fd", "kid", "precision", "recall", *extra]


def _accuracy(preds: torch.Tensor | None, labels: np.ndarray) -> float | None:
    labels = torch.as_tensor(labels)
    if preds is None or not bool((labels >= 0).any()):
        return None
    cond = labels >= 0
    return float((preds[cond] == labels[cond]).double().mean())


def _cell_eta(eta: Eta | None) -> dict[str, Any]:
    """The (eta, variance) keyword arguments of a cell for a Table 1 η entry (sampler unchanged; see
    :func:`_cell_run` for the σ̂ row's sampler)."""
    e, variance = _eta_and_variance(eta)
    return {"eta": e, "variance": variance}


def eta_label(sampler: str, eta: Eta | None) -> str:
    """The row label of a (sampler, η) group: "η = 0.5", "σ̂", or the sampler's name."""
    if eta is None:
        return sampler
    text = "σ̂" if eta == SIGMA_HAT else f"η = {eta:g}"
    return text if sampler == "ddim" else f"{sampler} {text}"


def markdown_table1(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The paper's layout: for each metric, a row per η (or sampler), a column per S."""
    cells = [r for r in rows if r["sampler"] != "data"]
    floor = next((r for r in rows if r["sampler"] == "data"), None)
    steps = sorted({r["steps"] for r in cells})
    lines = ["# Table 1: sample quality against steps S and η", ""]
    s = meta.get("setup", {})
    ref = meta.get("reference", {})
    lines.append(
        f"Model `{s.get('model')}` (weights {s.get('model_id')}), {meta.get('n')} samples per cell "
        f"(image i from seed {s.get('seed', 0)}+i), class `{s.get('class')}`, guidance {s.get('guidance')}, "
        f"{s.get('spacing')} timesteps. Features: {meta.get('extractor')}; reference: {ref.get('data')} "
        f"({ref.get('n')} images)."
    )
    lines.append("")
    groups = list(dict.fromkeys((r["sampler"], r["eta"]) for r in cells))
    metrics = metric_names(cells)
    for m in metrics:
        lines.append(f"## {METRIC_LABELS[m]}")
        lines.append("")
        body = []
        for sampler, eta in groups:
            by_s = {r["steps"]: r for r in cells if r["sampler"] == sampler and r["eta"] == eta}
            body.append([eta_label(sampler, eta)] + [by_s[st][m] if st in by_s else None for st in steps])
        if floor is not None and m != "accuracy":
            body.append([f"data ({floor['n']} real images)"] + [floor[m]] * len(steps))
        lines.append(markdown_table(["", *[f"S = {st}" for st in steps]], body))
    lines.append("## Speed")
    lines.append("")
    body = []
    for sampler, eta in groups:
        by_s = {r["steps"]: r for r in cells if r["sampler"] == sampler and r["eta"] == eta}
        body.append([eta_label(sampler, eta)] + [by_s[st]["images_per_s"] if st in by_s else None for st in steps])
    lines.append("Images per second (sampling only, this machine):")
    lines.append("")
    lines.append(markdown_table(["", *[f"S = {st}" for st in steps]], body))
    return "\n".join(lines)


def plot_table1(rows: list[dict[str, Any]], meta: dict[str, Any], path: str | os.PathLike | None = None) -> bytes:
    """Each metric against S (log x), a line per η / sampler, the data floor dashed. Returns PNG bytes."""
    plt = pyplot()
    cells = [r for r in rows if r["sampler"] != "data"]
    floor = next((r for r in rows if r["sampler"] == "data"), None)
    metrics = metric_names(cells)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.0), squeeze=False)
    groups = list(dict.fromkeys((r["sampler"], r["eta"]) for r in cells))
    cmap = plt.get_cmap("viridis")
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, (sampler, eta) in enumerate(groups):
            pts = sorted((r["steps"], r[m]) for r in cells if r["sampler"] == sampler and r["eta"] == eta)
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o-", color=cmap(i / max(1, len(groups) - 1) * 0.85), label=eta_label(sampler, eta), ms=4)
        if floor is not None and m in floor and floor[m] is not None:
            ax.axhline(floor[m], color="gray", ls="--", lw=1, label="real data")
        ax.set_xscale("log")
        ax.set_xlabel("steps S")
        ax.set_title(METRIC_LABELS[m], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        steps = sorted({r["steps"] for r in cells})
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps], fontsize=8)
        ax.minorticks_off()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Sample quality against S ({meta.get('extractor')} features, n = {meta.get('n')})", fontsize=10)
    fig.tight_layout()
    return fig_png(fig, path)


def write_table1(rows: list[dict[str, Any]], out: str | os.PathLike, meta: dict[str, Any]) -> list[Path]:
    """table1.csv, table1.md, table1.png and table1.json in ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table1.csv", out / "table1.md", out / "table1.png", out / "table1.json"]
    write_csv(paths[0], rows, COLUMNS)
    write_text(paths[1], markdown_table1(rows, meta))
    plot_table1(rows, meta, paths[2])
    write_json(paths[3], {"meta": meta, "rows": rows})
    return paths
