"""The paper's Table 2 on any model: DDIM inversion then decoding, reconstruction error against S.

Real images the model did not train on (for the default model: the 500 held-out MNIST-5k digits)
are inverted to x_T with S steps (:func:`ddim.invert`) and decoded back on the same S timesteps;
the error is the per-dimension MSE on [0, 1], as in the paper. Each S is a cached cell (by batch,
so a killed run resumes). Written: ``table2.csv``, ``table2.md``, ``table2.png`` (MSE against S,
log-log), ``table2_examples.png`` (originals, reconstructions and error maps) and ``table2.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim.evaluation.common import (
    EvalSetup,
    Progress,
    _digest,
    fig_png,
    markdown_table,
    pyplot,
    scalar,
    write_csv,
    write_json,
    write_text,
)
from ddim.evaluation.metrics import images_hash
from ddim.generate import invert_images, save_npz
from ddim.images import to_uint8

__all__ = ["COLUMNS", "evenly_spaced", "run_table2", "write_table2", "plot_table2", "plot_examples"]

COLUMNS = ("steps", "nfe", "n", "mse", "mse_sem", "mse_median", "seconds", "images_per_s")


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices spread evenly over ``range(n)`` (first and last included)."""
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(k, n))})


def _cell_path(setup: EvalSetup, folder: Path, key: dict[str, Any], steps: int, n: int) -> Path:
    return folder / f"invert-S{steps}-n{n}-{_digest({**key, 'steps': steps})}.npz"


def run_table2(
    setup: EvalSetup,
    images: torch.Tensor,
    out: str | os.PathLike,
    *,
    steps: Sequence[int] = (10, 20, 50, 100),
    labels: torch.Tensor | None = None,
    data_name: str = "data",
    examples: int = 8,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Invert and decode ``images`` [n, C, H, W] in [-1, 1] at each S; write the table into ``out``.

    ``labels``: condition on these classes (int64 [n]); None = the null class (unconditional, as
    the paper's model). The example figure shows ``examples`` images spread evenly over the n.
    Uses ``setup``'s model, schedule, prediction, spacing and batch (not its class or guidance:
    guidance would make the ODE irreversible). Returns a row per S: steps, nfe (inversion plus
    decoding), n, mse (mean), mse_sem (standard error), mse_median, seconds, images_per_s.
    """
    out = Path(out)
    folder = out / "cells"
    n = images.shape[0]
    if n < 1:
        raise ValueError("table2 needs at least one image")
    model_shape = (setup.model.config.in_channels, setup.model.config.image_size, setup.model.config.image_size)
    if tuple(images.shape[1:]) != model_shape:
        raise ValueError(f"images are {tuple(images.shape[1:])} but the model makes {model_shape} images")
    key = {
        "model_id": setup.model_id,
        "prediction": setup.prediction,
        "spacing": setup.spacing,
        "data": images_hash(images),
        "labels": None if labels is None else _digest([int(v) for v in labels]),
    }
    steps = [int(s) for s in steps]
    shown = evenly_spaced(n, examples)  # the images in the example figure
    key["shown"] = shown
    total = sum(2 * s * n for s in steps)
    done = 0
    for s in steps:
        p = _cell_path(setup, folder, key, s, n)
        if p.is_file():
            done += 2 * s * n
        elif p.with_suffix(".partial").is_dir():
            done += 2 * s * sum(int(c.stem.split("-")[1]) for c in p.with_suffix(".partial").glob("*.npz"))
    bar = Progress(total, done, desc="table2", enabled=progress)
    rows, example_recs = [], {}
    try:
        for s in steps:
            bar.describe(f"S={s}")
            cell = _invert_cell(setup, images, labels, _cell_path(setup, folder, key, s, n), s, shown, bar)
            mse = cell["mse"]
            rows.append(
                {
                    "steps": s,
                    "nfe": 2 * s,
                    "n": n,
                    "mse": float(mse.mean()),
                    "mse_sem": float(mse.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
                    "mse_median": float(np.median(mse)),
                    "seconds": cell["seconds"],
                    "images_per_s": n / cell["seconds"] if cell["seconds"] > 0 else None,
                }
            )
            example_recs[s] = cell["reconstruction"]
    finally:
        bar.close()
    meta = {
        "setup": setup.describe() | {"class": None if labels is None else "data labels", "guidance": 1.0},
        "data": data_name,
        "n": n,
        "steps": steps,
    }
    originals = to_uint8(images[shown])
    write_table2(rows, out, meta, originals, example_recs)
    return rows


def _invert_cell(
    setup: EvalSetup,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    path: Path,
    steps: int,
    shown: list[int],
    bar: Progress,
) -> dict[str, Any]:
    if path.is_file():
        with np.load(path) as z:
            return {"mse": z["mse"], "seconds": float(scalar(z["seconds"])), "reconstruction": z["reconstruction"]}
    partial = path.with_suffix(".partial")
    partial.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    mses, recs, seconds = [], [], 0.0
    for start in range(0, n, setup.batch):
        m = min(setup.batch, n - start)
        chunk = partial / f"{start:08d}-{m}.npz"
        if chunk.is_file():
            with np.load(chunk) as z:
                mses.append(z["mse"])
                recs.append(z["reconstruction"])
                seconds += float(scalar(z["seconds"]))
            continue
        res = invert_images(
            setup.model,
            setup.schedule,
            images[start : start + m].to(setup.device),
            steps=steps,
            spacing=setup.spacing,
            labels=None if labels is None else labels[start : start + m].to(setup.device),
            prediction=setup.prediction,
        )
        mse = res["mse"].double().cpu().numpy()
        rec = to_uint8(res["reconstruction"][[i - start for i in shown if start <= i < start + m]].cpu())
        save_npz(chunk, mse=mse, reconstruction=rec, seconds=np.array(res["seconds"]))
        mses.append(mse)
        recs.append(rec)
        seconds += res["seconds"]
        bar.update(2 * steps * m)
    cell = {"mse": np.concatenate(mses), "seconds": seconds, "reconstruction": np.concatenate(recs)}
    save_npz(path, **{k: np.asarray(v) for k, v in cell.items()}, info=np.array(json.dumps({"steps": steps})))
    shutil.rmtree(partial, ignore_errors=True)
    return cell


def markdown_table2(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta.get("setup", {})
    head = (
        "# Table 2: reconstruction error of DDIM inversion against S\n\n"
        f"Model `{s.get('model')}` (weights {s.get('model_id')}); {meta.get('n')} real images the model did not "
        f"train on ({meta.get('data')}), inverted to x_T with S steps and decoded back with the same S "
        f"({s.get('spacing')} timesteps, class: {s.get('class') or 'null (unconditional)'}). "
        "Error: per-dimension MSE on [0, 1].\n\n"
    )
    body = [[r["steps"], r["nfe"], r["mse"], r["mse_sem"], r["mse_median"], r["images_per_s"]] for r in rows]
    return head + markdown_table(["S", "NFE", "MSE", "± s.e.", "median", "images/s"], body)


def plot_table2(rows: list[dict[str, Any]], path: str | os.PathLike | None = None) -> bytes:
    """Reconstruction MSE against S, log-log, with standard-error bars. Returns PNG bytes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    xs = [r["steps"] for r in rows]
    ax.errorbar(xs, [r["mse"] for r in rows], yerr=[r["mse_sem"] or 0 for r in rows], fmt="o-", ms=4, capsize=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("steps S")
    ax.set_ylabel("MSE per dimension on [0, 1]")
    ax.set_title("DDIM inversion → decoding", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig_png(fig, path)


def plot_examples(originals: np.ndarray, recs: dict[int, np.ndarray], path: str | os.PathLike | None = None) -> bytes:
    """Originals on top, then for each S a row of reconstructions and a row of |error| maps."""
    plt = pyplot()
    k = originals.shape[0]
    rows = 1 + 2 * len(recs)
    fig, axes = plt.subplots(rows, k, figsize=(0.95 * k + 1.6, 0.95 * rows), squeeze=False)

    def show(ax, img, cmap="gray", vmax=255):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap=cmap, vmin=0, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])

    for j in range(k):
        show(axes[0][j], originals[j])
    axes[0][0].set_ylabel("original", rotation=0, ha="right", va="center", fontsize=8)
    im = None
    for i, (s, rec) in enumerate(sorted(recs.items())):
        diff = (rec.astype(np.float32) - originals[: rec.shape[0]].astype(np.float32)) / 255
        err = np.abs(diff).mean(-1, keepdims=True)
        for j in range(k):
            show(axes[1 + 2 * i][j], rec[j])
            im = axes[2 + 2 * i][j].imshow(err[j, ..., 0], cmap="magma", vmin=0, vmax=0.5)
            axes[2 + 2 * i][j].set_xticks([])
            axes[2 + 2 * i][j].set_yticks([])
        mse = float((diff**2).mean())
        axes[1 + 2 * i][0].set_ylabel(f"S = {s}", rotation=0, ha="right", va="center", fontsize=8)
        axes[2 + 2 * i][0].set_ylabel(f"|error|\nMSE {mse:.2g}", rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.14, right=0.88, wspace=0.08, hspace=0.12)
    if im is not None:
        cax = fig.add_axes([0.9, 0.2, 0.02, 0.6])
        fig.colorbar(im, cax=cax, label="|error| on [0, 1]")
    fig.suptitle("Inversion then decoding: originals, reconstructions, error maps", fontsize=9)
    return fig_png(fig, path)


def write_table2(
    rows: list[dict[str, Any]],
    out: str | os.PathLike,
    meta: dict[str, Any],
    originals: np.ndarray | None = None,
    recs: dict[int, np.ndarray] | None = None,
) -> list[Path]:
    """table2.csv, table2.md, table2.png, table2_examples.png (when examples are given), table2.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table2.csv", out / "table2.md", out / "table2.png", out / "table2.json"]
    write_csv(paths[0], rows, COLUMNS)
    write_text(paths[1], markdown_table2(rows, meta))
    plot_table2(rows, paths[2])
    write_json(paths[3], {"meta": meta, "rows": rows})
    if originals is not None and recs:
        paths.append(out / "table2_examples.png")
        plot_examples(originals, recs, paths[-1])
    return paths
