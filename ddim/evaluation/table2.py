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

COLUMNS = ("method", "guidance", "steps", "nfe", "n", "mse", "mse_sem", "mse_median", "seconds", "images_per_s")


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices spread evenly over ``range(n)`` (first and last included)."""
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(k, n))})


def _cell_path(setup: EvalSetup, folder: Path, key: dict[str, Any], steps: int, n: int, inv: dict[str, Any]) -> Path:
    """A cell's file; plain unguided "ddim" cells keep the name they had before methods existed."""
    if inv["method"] == "ddim" and inv.get("guidance", 1.0) == 1.0:
        return folder / f"invert-S{steps}-n{n}-{_digest({**key, 'steps': steps})}.npz"
    return folder / f"invert-{inv['method']}-S{steps}-n{n}-{_digest({**key, **inv, 'steps': steps})}.npz"


def _inversions(
    methods: Sequence[str], max_iter: int, tol: float, budget: str = "uniform", guidance: Sequence[float] = (1.0,)
) -> list[dict[str, Any]]:
    """The inversion settings of each method and guidance weight, validated (errors name the argument)."""
    from ddim.inversion import INVERSIONS, _check_iteration

    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of {', '.join(INVERSIONS)}, got {methods!r}")
    for m in methods:
        if m not in INVERSIONS:
            raise ValueError(f"unknown inversion method {m!r}; valid: {', '.join(INVERSIONS)}")
    if budget not in ("uniform", "front"):
        raise ValueError(f"budget must be 'uniform' or 'front', got {budget!r}")
    tol, max_iter = _check_iteration(tol, max_iter)
    ws = [float(w) for w in guidance]
    if not ws or len(set(ws)) != len(ws):
        raise ValueError(f"guidance must list distinct weights, got {list(guidance)!r}")
    out = []
    for w in ws:
        for m in methods:
            inv: dict[str, Any] = {"method": m}
            if m == "fixed_point":
                inv |= {"max_iter": max_iter, "tol": tol} | ({"budget": budget} if budget != "uniform" else {})
            if w != 1.0:
                inv["guidance"] = w
            out.append(inv)
    return out


def _cell_calls(inv: dict[str, Any], steps: int) -> int:
    """Network calls of one image's cell at most: the inversion's plus the decoding's S."""
    return steps + (steps * inv["max_iter"] if inv["method"] == "fixed_point" else steps)


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
    methods: Sequence[str] = ("ddim",),
    max_iter: int = 4,
    tol: float = 1e-6,
    budget: str = "uniform",
    guidance: Sequence[float] = (1.0,),
) -> list[dict[str, Any]]:
    """Invert and decode ``images`` [n, C, H, W] in [-1, 1] at each S; write the table into ``out``.

    ``methods``: the inversion methods of :func:`ddim.inversion.round_trip`, a row per method, guidance
    weight and S ("ddim", default; "fixed_point": exact inversion with at most ``max_iter`` calls a step
    on average, spread by ``budget`` ("uniform" or "front", :func:`ddim.inversion.front_loaded`), and
    tolerance ``tol``; "bdia": BDIA's exact inversion, decoded by its own sampler). ``guidance``: the
    classifier-free guidance weights of both directions (w ≠ 1 needs ``labels``: the condition, against
    the null class).

    ``labels``: condition on these classes (int64 [n]); None = the null class (unconditional, as
    the paper's model). The example figure shows ``examples`` images spread evenly over the n.
    Uses ``setup``'s model, schedule, prediction, spacing and batch (not its class or guidance).
    Returns a row per method, guidance and S: method, guidance, steps, nfe
    (network calls per image: inversion plus decoding), n, mse (mean), mse_sem (standard error),
    mse_median, seconds, images_per_s.
    """
    out = Path(out)
    folder = out / "cells"
    n = images.shape[0]
    invs = _inversions(methods, max_iter, tol, budget, guidance)
    if any(inv.get("guidance", 1.0) != 1.0 for inv in invs) and labels is None:
        raise ValueError("guidance other than 1 needs labels (the condition guided against the null class)")
    if n < 1:
        raise ValueError("table2 needs at least one image")
    model_shape = (setup.model.config.in_channels, setup.model.config.image_size, setup.model.config.image_size)
    if tuple(images.shape[1:]) != model_shape:
        raise ValueError(f"images are {tuple(images.shape[1:])} but the model makes {model_shape} images")
    key = {
        "model_id": setup.model_id,
        "prediction": setup.prediction,
        "spacing": setup.named_spacing("table 2 (inversion)"),  # before any work
        "data": images_hash(images),
        "labels": None if labels is None else _digest([int(v) for v in labels]),
    }
    steps = [int(s) for s in steps]
    shown = evenly_spaced(n, examples)  # the images in the example figure
    key["shown"] = shown
    cells = [(inv, s) for inv in invs for s in steps]
    total = sum(_cell_calls(inv, s) * n for inv, s in cells)
    done = 0
    for inv, s in cells:
        p = _cell_path(setup, folder, key, s, n, inv)
        if p.is_file():
            done += _cell_calls(inv, s) * n
        elif p.with_suffix(".partial").is_dir():
            part = sum(int(c.stem.split("-")[1]) for c in p.with_suffix(".partial").glob("*.npz"))
            done += _cell_calls(inv, s) * part
    bar = Progress(total, done, desc="table2", enabled=progress)
    rows, example_recs = [], {}
    try:
        for inv, s in cells:
            bar.describe(f"{inv['method']} S={s}")
            path = _cell_path(setup, folder, key, s, n, inv)
            cell = _invert_cell(setup, images, labels, path, s, shown, bar, inv)
            mse = cell["mse"]
            rows.append(
                {
                    "method": inv["method"],
                    "guidance": inv.get("guidance", 1.0),
                    "steps": s,
                    "nfe": cell["nfe"],
                    "n": n,
                    "mse": float(mse.mean()),
                    "mse_sem": float(mse.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
                    "mse_median": float(np.median(mse)),
                    "seconds": cell["seconds"],
                    "images_per_s": n / cell["seconds"] if cell["seconds"] > 0 else None,
                }
            )
            example_recs[s if len(invs) == 1 else f"{_label(inv)}\nS = {s}"] = cell["reconstruction"]
    finally:
        bar.close()
    meta = {
        "setup": setup.describe() | {"class": None if labels is None else "data labels", "guidance": list(guidance)},
        "data": data_name,
        "n": n,
        "steps": steps,
        "methods": invs,
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
    inv: dict[str, Any],
) -> dict[str, Any]:
    """One (method, S) cell: per-image MSE, seconds, shown reconstructions and nfe (per image: the
    inversion's calls, the most any batch made, plus the decoding's S). Cached by batch."""
    if path.is_file():
        with np.load(path) as z:
            nfe = int(scalar(z["nfe"])) if "nfe" in z else 2 * steps  # cells from before methods: plain DDIM
            return {
                "mse": z["mse"],
                "seconds": float(scalar(z["seconds"])),
                "reconstruction": z["reconstruction"],
                "nfe": nfe,
            }
    partial = path.with_suffix(".partial")
    partial.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    mses, recs, seconds, nfe = [], [], 0.0, 0
    for start in range(0, n, setup.batch):
        m = min(setup.batch, n - start)
        chunk = partial / f"{start:08d}-{m}.npz"
        if chunk.is_file():
            with np.load(chunk) as z:
                mses.append(z["mse"])
                recs.append(z["reconstruction"])
                seconds += float(scalar(z["seconds"]))
                nfe = max(nfe, int(scalar(z["nfe"])) if "nfe" in z else 2 * steps)
            continue
        res = invert_images(
            setup.model,
            setup.schedule,
            images[start : start + m].to(setup.device),
            steps=steps,
            spacing=setup.named_spacing("table 2 (inversion)"),
            labels=None if labels is None else labels[start : start + m].to(setup.device),
            prediction=setup.prediction,
            **inv,
        )
        mse = res["mse"].double().cpu().numpy()
        rec = to_uint8(res["reconstruction"][[i - start for i in shown if start <= i < start + m]].cpu())
        calls = res["nfe"] + steps
        save_npz(chunk, mse=mse, reconstruction=rec, seconds=np.array(res["seconds"]), nfe=np.array(calls))
        mses.append(mse)
        recs.append(rec)
        seconds += res["seconds"]
        nfe = max(nfe, calls)
        bar.update(_cell_calls(inv, steps) * m)
    cell = {"mse": np.concatenate(mses), "seconds": seconds, "reconstruction": np.concatenate(recs), "nfe": nfe}
    info = np.array(json.dumps({"steps": steps, **inv}))
    save_npz(path, **{k: np.asarray(v) for k, v in cell.items()}, info=info)
    shutil.rmtree(partial, ignore_errors=True)
    return cell


def _label(inv: dict[str, Any]) -> str:
    """A method's name in figures: "fixed_point", "bdia w=2", …"""
    w = inv.get("guidance", 1.0)
    return inv["method"] if w == 1.0 else f"{inv['method']} w={w:g}"


def markdown_table2(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta.get("setup", {})
    head = (
        "# Table 2: reconstruction error of DDIM inversion against S\n\n"
        f"Model `{s.get('model')}` (weights {s.get('model_id')}); {meta.get('n')} real images the model did not "
        f"train on ({meta.get('data')}), inverted to x_T with S steps and decoded back with the same S "
        f"({s.get('spacing')} timesteps, class: {s.get('class') or 'null (unconditional)'}). "
        "Error: per-dimension MSE on [0, 1].\n\n"
    )
    body = [
        [r.get("method", "ddim"), r.get("guidance", 1.0), r["steps"], r["nfe"], r["mse"], r["mse_sem"],
         r["mse_median"], r["images_per_s"]]
        for r in rows
    ]  # fmt: skip
    head += _methods_note(meta)
    cols = ["inversion", "guidance w", "S", "NFE", "MSE", "± s.e.", "median", "images/s"]
    return head + markdown_table(cols, body)


def _methods_note(meta: dict[str, Any]) -> str:
    """The fixed-point settings, when a method has any (NFE per image: inversion plus decoding)."""
    notes = list(
        dict.fromkeys(
            f"{m['method']}: at most {m['max_iter']} calls a step"
            + (" on average, front-loaded" if m.get("budget") == "front" else "")
            + f", tol {m['tol']:g}"
            for m in meta.get("methods", [])
            if "max_iter" in m
        )
    )
    return ("Inversion " + "; ".join(notes) + ". NFE per image: inversion plus decoding.\n\n") if notes else ""


def plot_table2(rows: list[dict[str, Any]], path: str | os.PathLike | None = None) -> bytes:
    """Reconstruction MSE against S, log-log, with standard-error bars. Returns PNG bytes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    xs = sorted({r["steps"] for r in rows})
    methods = list(dict.fromkeys((r.get("method", "ddim"), r.get("guidance", 1.0)) for r in rows))
    for method, w in methods:
        mine = [r for r in rows if (r.get("method", "ddim"), r.get("guidance", 1.0)) == (method, w)]
        ax.errorbar(
            [r["steps"] for r in mine],
            [r["mse"] for r in mine],
            yerr=[r["mse_sem"] or 0 for r in mine],
            fmt="o-",
            ms=4,
            capsize=3,
            label=_label({"method": method, "guidance": w}),
        )
    if len(methods) > 1:
        ax.legend(fontsize=7)
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


def plot_examples(
    originals: np.ndarray, recs: dict[int | str, np.ndarray], path: str | os.PathLike | None = None
) -> bytes:
    """Originals on top, then for each S (int key; a str key is its own label, kept in order) a row of
    reconstructions and a row of |error| maps."""
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
    items = list(recs.items()) if any(isinstance(k, str) for k in recs) else sorted(recs.items())
    for i, (s, rec) in enumerate(items):
        diff = (rec.astype(np.float32) - originals[: rec.shape[0]].astype(np.float32)) / 255
        err = np.abs(diff).mean(-1, keepdims=True)
        for j in range(k):
            show(axes[1 + 2 * i][j], rec[j])
            im = axes[2 + 2 * i][j].imshow(err[j, ..., 0], cmap="magma", vmin=0, vmax=0.5)
            axes[2 + 2 * i][j].set_xticks([])
            axes[2 + 2 * i][j].set_yticks([])
        mse = float((diff**2).mean())
        axes[1 + 2 * i][0].set_ylabel(
            s if isinstance(s, str) else f"S = {s}", rotation=0, ha="right", va="center", fontsize=8
        )
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
    recs: dict[int | str, np.ndarray] | None = None,
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
