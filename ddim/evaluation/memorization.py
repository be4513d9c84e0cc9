"""Does the model copy its training data? Nearest training image of each sample, against held-out images.

For ``n`` samples (image i from seed i, cached like Table 1's cells) the nearest training image is
found in pixels (RMS difference per pixel on [0, 1]) and in features (Euclidean distance between
feature vectors), and so is the nearest held-out image (real images the model never saw).

A sample that copies a training image lies much nearer to it than to any held-out image. How near
"near" is depends on the sizes of the sets searched (the nearest of 4,500 images is nearer than the
nearest of 250), so the fraction of samples "closer to a training image than to any held-out image"
is read beside a control: the held-out images are split in two halves, the comparison half ``B`` and
the control half ``A``, and both the samples and the real images of ``A`` (which the model never
saw) are asked the same question against the whole training set and ``B``. The control's fraction is
what a model that does not copy scores; a sample fraction well above it is the warning sign, and a
sample that equals a training image is counted as an exact copy.

Written to ``out``: ``memorization.csv`` (a row per sample: nearest training and held-out image and
distances), ``memorization.md`` / ``memorization.json`` (the summary), ``memorization.png`` (the
closest pairs: sample, nearest training image, nearest held-out image) and
``memorization_hist.png`` (distance ratios of samples and of the control).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim.data import ImageData
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
from ddim.evaluation.extractors import FeatureExtractor, quantize

__all__ = ["nearest", "split_heldout", "closer_fraction", "training_data", "run_memorization", "write_memorization"]

COLUMNS = (
    "index",
    "label",
    "train_index",
    "train_px",
    "heldout_index",
    "heldout_px",
    "px_ratio",
    "train_feat",
    "heldout_feat",
    "feat_ratio",
)


def training_data(model: torch.nn.Module, config: dict[str, Any], spec: str | None = None) -> tuple[ImageData, str]:
    """(data, name) of the images the model trained on.

    ``spec`` as for :func:`ddim.data.load_data`; None: the 4,500 MNIST-5k training digits for models
    trained on that split (the embedded default), else ``config["train"]["data"]`` when it still loads.
    """
    from ddim.data import load_data, mnist5k_split
    from ddim.evaluation.sources import _check_shape

    size = model.config.image_size
    data_cfg = config.get("data", {})
    if spec is not None:
        return _check_shape(load_data(spec, image_size=size), model, "training"), spec
    if data_cfg.get("name") == "mnist5k" and data_cfg.get("subset") in (None, "train"):
        return mnist5k_split("train"), "MNIST-5k training digits"
    train_spec = config.get("train", {}).get("data")
    if train_spec:
        try:
            return _check_shape(load_data(train_spec, image_size=size), model, "training"), str(train_spec)
        except (ValueError, RuntimeError, OSError):
            pass
    raise ValueError("the model's training images cannot be found: pass --train-data (a .npz, a folder, 'mnist')")


def _flat01(images: torch.Tensor) -> torch.Tensor:
    """Model-space images [N, C, H, W] -> float32 [N, D] on [0, 1], on the 8-bit grid."""
    return ((quantize(images) + 1) / 2).reshape(images.shape[0], -1).float()


def nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance float64 [Nq], index int64 [Nq]) of each query row's nearest row of ``ref`` (Euclidean)."""
    if query.ndim != 2 or ref.ndim != 2 or query.shape[1] != ref.shape[1] or ref.shape[0] == 0:
        raise ValueError(f"nearest needs [Nq, D] and [Nr >= 1, D], got {tuple(query.shape)} and {tuple(ref.shape)}")
    ds, idx = [], []
    r = ref.double()
    for q in query.double().split(chunk):
        d = torch.cdist(q, r)
        m = d.min(1)
        ds.append(m.values)
        idx.append(m.indices)
    return torch.cat(ds), torch.cat(idx)


def pixel_distance(query: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest ``ref`` image of each ``query`` image (both model space [N, C, H, W]): (RMS difference per
    pixel on [0, 1], index)."""
    q, r = _flat01(query), _flat01(ref)
    d, i = nearest(q, r)
    return d / np.sqrt(q.shape[1]), i


def split_heldout(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (A, B) of a held-out set of ``n``: A (odd positions) the control queries, B (even) the comparison
    set. Alternating keeps both halves spread over a set sorted by class."""
    if n < 4:
        raise ValueError(f"the held-out set needs at least 4 images (two halves of >= 2), got {n}")
    idx = np.arange(n)
    return idx[1::2], idx[0::2]


def closer_fraction(d_train: torch.Tensor, d_heldout: torch.Tensor) -> float:
    """Share of queries strictly nearer to a training image than to any held-out image (ties count half)."""
    return float(((d_train < d_heldout).double() + 0.5 * (d_train == d_heldout).double()).mean())


def run_memorization(
    setup: EvalSetup,
    out: str | os.PathLike,
    extractor: FeatureExtractor,
    train: torch.Tensor,
    heldout: torch.Tensor,
    *,
    n: int = 500,
    steps: int = 50,
    eta: float = 0.0,
    sampler: str = "ddim",
    pairs: int = 8,
    train_name: str = "training images",
    heldout_name: str = "held-out images",
    cells: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample (or read) ``n`` images and measure how near they lie to the training set (see the module).

    ``train``, ``heldout``: model-space images [N, C, H, W] (the model trained on ``train`` and never saw
    ``heldout``). ``pairs``: closest pairs shown in the figure (at most ``n``). Returns the summary (also
    ``memorization.json``): fractions and median distances for samples and control, in pixels and
    features, and the closest pairs. ``cells``: where samples are cached (default ``out/cells``). Raises
    ValueError for too few images or image shapes that differ.
    """
    shape = tuple(train.shape[1:])
    if train.ndim != 4 or len(train) < 2:
        raise ValueError(f"training images must be [N >= 2, C, H, W], got {tuple(train.shape)}")
    if tuple(heldout.shape[1:]) != shape:
        raise ValueError(f"held-out images are {tuple(heldout.shape[1:])}, training images {shape}")
    if not 1 <= pairs <= n:
        raise ValueError(f"pairs must be in [1, n = {n}], got {pairs}")
    a_idx, b_idx = split_heldout(len(heldout))
    out = Path(out)
    cells_dir = Path(cells) if cells is not None else out / "cells"
    work = cell_work(sampler, steps, n)
    done = cached_work(setup, cells_dir, n=n, steps=steps, eta=eta, sampler=sampler)
    bar = Progress(work, done, "memorization", enabled=progress)
    try:
        cell = sample_cell(setup, cells_dir, n=n, steps=steps, eta=eta, sampler=sampler, progress=bar)
    finally:
        bar.close()
    samples = images_of(cell)
    if tuple(samples.shape[1:]) != shape:
        raise ValueError(f"the model makes {tuple(samples.shape[1:])} images, the training images are {shape}")
    held_a, held_b = heldout[torch.as_tensor(a_idx)], heldout[torch.as_tensor(b_idx)]
    a_t, b_t = torch.as_tensor(a_idx), torch.as_tensor(b_idx)

    # pixels: nearest training image (whole set), nearest held-out image (whole set: the table and figure;
    # comparison half B: the fractions, for the samples and for the control half A)
    tr_px, tr_i = pixel_distance(samples, train)
    ho_px, ho_i = pixel_distance(samples, heldout)
    s_ho, _ = pixel_distance(samples, held_b)
    c_tr, _ = pixel_distance(held_a, train)
    c_ho, _ = pixel_distance(held_a, held_b)
    # features
    f_samples = extractor(samples)
    f_train, f_held = extractor(train), extractor(heldout)
    tr_f, _ = nearest(f_samples, f_train)
    ho_f, _ = nearest(f_samples, f_held)
    fs_ho, _ = nearest(f_samples, f_held[b_t])
    fc_tr, _ = nearest(f_held[a_t], f_train)
    fc_ho, _ = nearest(f_held[a_t], f_held[b_t])
    s_tr, fs_tr = tr_px, tr_f

    labels = cell["labels"]
    rows = [
        {
            "index": i,
            "label": int(labels[i]),
            "train_index": int(tr_i[i]),
            "train_px": float(tr_px[i]),
            "heldout_index": int(ho_i[i]),
            "heldout_px": float(ho_px[i]),
            "px_ratio": float(tr_px[i] / ho_px[i]) if ho_px[i] > 0 else None,
            "train_feat": float(tr_f[i]),
            "heldout_feat": float(ho_f[i]),
            "feat_ratio": float(tr_f[i] / ho_f[i]) if ho_f[i] > 0 else None,
        }
        for i in range(n)
    ]
    closest = [int(i) for i in torch.argsort(tr_px)[:pairs]]
    summary = {
        "setup": setup.describe(),
        "n": n,
        "steps": steps,
        "eta": eta,
        "sampler": sampler,
        "extractor": extractor.name,
        "train": {"name": train_name, "n": len(train)},
        "heldout": {"name": heldout_name, "n": len(heldout), "control": len(a_idx), "comparison": len(b_idx)},
        "fraction": {
            "samples_px": closer_fraction(s_tr, s_ho),
            "control_px": closer_fraction(c_tr, c_ho),
            "samples_feat": closer_fraction(fs_tr, fs_ho),
            "control_feat": closer_fraction(fc_tr, fc_ho),
        },
        "median": {
            "samples_train_px": float(tr_px.median()),
            "samples_heldout_px": float(ho_px.median()),
            "samples_train_feat": float(tr_f.median()),
            "samples_heldout_feat": float(ho_f.median()),
            "control_train_px": float(c_tr.median()),
            "control_heldout_px": float(c_ho.median()),
            "control_train_feat": float(fc_tr.median()),
            "control_heldout_feat": float(fc_ho.median()),
        },
        "min_train_px": float(tr_px.min()),
        "exact_copies": int((tr_px == 0).sum()),
        "control_min_train_px": float(c_tr.min()),
        "near_copies": int((tr_px < c_tr.min()).sum()),
        "closest": [rows[i] for i in closest],
        "samples": os.path.relpath(cell["path"], out),
    }
    ratios = {
        "samples": (s_tr / s_ho.clamp_min(1e-12)).numpy(),
        "control": (c_tr / c_ho.clamp_min(1e-12)).numpy(),
    }
    write_memorization(rows, summary, out, samples, train, heldout, ratios)
    return summary


def verdict(summary: dict[str, Any]) -> str:
    """Plain sentences from the fractions (with their standard error) and the copy counts."""
    f, n = summary["fraction"], summary["n"]
    m = summary["heldout"]["control"]
    gap = f["samples_px"] - f["control_px"]
    se = float(np.sqrt(f["samples_px"] * (1 - f["samples_px"]) / n + f["control_px"] * (1 - f["control_px"]) / m))
    text = (
        f"{f['samples_px']:.1%} of the samples are closer (in pixels) to a training image than to any image of the "
        f"held-out comparison half, against {f['control_px']:.1%} for real images the model never saw "
        f"({gap:+.1%} ± {se:.1%} standard error); in features {f['samples_feat']:.1%} against "
        f"{f['control_feat']:.1%}. "
    )
    if gap > 2 * se:
        text += "The samples lean towards the training images beyond sampling noise. "
    else:
        text += "The difference is within sampling noise. "
    copies, near = summary["exact_copies"], summary["near_copies"]
    text += (
        f"{copies} sample(s) equal a training image exactly. "
        if copies
        else f"No sample equals a training image (the nearest lies {summary['min_train_px']:.3f} RMS away on [0, 1]). "
    )
    text += (
        f"{near} sample(s) lie nearer a training image than any unseen real image does "
        f"({summary['control_min_train_px']:.3f}): look at the closest pairs."
        if near
        else f"None lies nearer a training image than the nearest unseen real image does "
        f"({summary['control_min_train_px']:.3f})."
    )
    return text


def markdown_memorization(summary: dict[str, Any]) -> str:
    s, f, m = summary["setup"], summary["fraction"], summary["median"]
    lines = [
        "# Memorization: nearest training image against held-out images",
        "",
        f"Model `{s.get('model')}` (weights {s.get('model_id')}), {summary['n']} samples ({summary['sampler']}, "
        f"S = {summary['steps']}, η = {summary['eta']:g}, class `{s.get('class')}`, guidance {s.get('guidance')}), "
        f"training images: {summary['train']['name']} ({summary['train']['n']}), held-out images: "
        f"{summary['heldout']['name']} ({summary['heldout']['n']}; control half {summary['heldout']['control']}, "
        f"comparison half {summary['heldout']['comparison']}). "
        f"Features: {summary['extractor']}.",
        "",
        verdict(summary),
        "",
        markdown_table(
            ["share closer to a training image than to any image of the comparison half", "pixels", "features"],
            [
                ["samples", f["samples_px"], f["samples_feat"]],
                ["control: real held-out images (never trained on)", f["control_px"], f["control_feat"]],
            ],
        ),
        markdown_table(
            ["median distance to the nearest …", "training image", "held-out image"],
            [
                ["samples, pixels (RMS on [0, 1]; all held-out)", m["samples_train_px"], m["samples_heldout_px"]],
                ["samples, features (all held-out)", m["samples_train_feat"], m["samples_heldout_feat"]],
                ["control, pixels (comparison half)", m["control_train_px"], m["control_heldout_px"]],
                ["control, features (comparison half)", m["control_train_feat"], m["control_heldout_feat"]],
            ],
        ),
        "## The closest pairs (pixels)",
        "",
        markdown_table(
            ["sample", "class", "nearest training image", "distance", "nearest held-out", "distance"],
            [
                [r["index"], r["label"], r["train_index"], r["train_px"], r["heldout_index"], r["heldout_px"]]
                for r in summary["closest"]
            ],
        ),
    ]
    return "\n".join(lines)


def plot_pairs(
    summary: dict[str, Any],
    samples: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor,
    path: str | os.PathLike | None = None,
) -> bytes:
    """The closest pairs: a column per pair (sample over nearest training image over nearest held-out)."""
    from ddim.images import to_uint8

    plt = pyplot()
    pairs = summary["closest"]
    fig, axes = plt.subplots(3, len(pairs), figsize=(1.25 * len(pairs) + 0.9, 4.1), squeeze=False)
    for j, r in enumerate(pairs):
        shown = (
            (samples[r["index"]], f"#{r['index']}"),
            (train[r["train_index"]], f"{r['train_px']:.3f}"),
            (heldout[r["heldout_index"]], f"{r['heldout_px']:.3f}"),
        )
        for i, (img, title) in enumerate(shown):
            u8 = to_uint8(img[None])[0]
            axes[i][j].imshow(u8[..., 0] if u8.shape[-1] == 1 else u8, cmap="gray", vmin=0, vmax=255)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
            axes[i][j].set_title(title, fontsize=7)
    for i, name in enumerate(("sample", "nearest\ntraining", "nearest\nheld-out")):
        axes[i][0].set_ylabel(name, fontsize=8)
    fig.suptitle("Samples closest to a training image (RMS pixel distance on [0, 1])", fontsize=9)
    fig.tight_layout()
    return fig_png(fig, path)


def plot_ratios(ratios: dict[str, np.ndarray], path: str | os.PathLike | None = None) -> bytes:
    """Histogram of d(nearest training) / d(nearest image of the comparison half), samples against control."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    hi = max(float(np.percentile(np.concatenate(list(ratios.values())), 99)), 1.5)
    bins = np.linspace(0, hi, 40)
    for name, r in ratios.items():
        ax.hist(r, bins=bins, density=True, alpha=0.55, label=f"{name} (n = {len(r)})")
    ax.axvline(1.0, color="k", lw=1, ls="--")
    ax.set_xlabel("distance to nearest training / nearest held-out (comparison half) image, pixels")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig_png(fig, path)


def write_memorization(
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    out: str | os.PathLike,
    samples: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor,
    ratios: dict[str, np.ndarray],
) -> list[Path]:
    """memorization.csv, .md, .json, .png and memorization_hist.png in ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["memorization.csv", "memorization.md", "memorization.json", "memorization.png", "memorization_hist.png"]
    paths = [out / p for p in names]
    write_csv(paths[0], rows, COLUMNS)
    write_text(paths[1], markdown_memorization(summary))
    write_json(paths[2], summary)
    plot_pairs(summary, samples, train, heldout, paths[3])
    plot_ratios(ratios, paths[4])
    return paths
