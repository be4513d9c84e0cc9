"""Evidence for editing real images (``ddim eval edit``): does an edit reach the target class, and how
much of the source does it keep?

For n held-out digits with labels, each is given a target class other than its own (image i: label +
1 + i mod 9, mod 10). Measured by the shipped digit classifier (:mod:`ddim.classifier`):

- **class edits**: the inversion edit (:func:`ddim.edit.class_swap`: exact fixed-point inversion
  under the source class, regeneration under the target, optional guidance) and SDEdit
  (:func:`ddim.edit.sdedit`) at several strengths, each a point (distance to the source, target-class
  accuracy): the trade-off curve. Distance: per-dimension MSE on [0, 1] to the source image.
- **inpainting** (:func:`ddim.edit.inpaint`, the right half regenerated under the target class, with
  and without RePaint resampling): target accuracy, and the seam: the mean |horizontal gradient| across
  the mask's border column, against the same on the sources (a visible seam raises it).

Written: ``edit.csv``, ``edit.md``, ``edit.png`` (the trade-off), ``edit_examples.png``, ``edit.json``.
Not cached (n is meant to be small: every edit is at most a few hundred network calls per batch).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ddim.evaluation.common import fig_png, markdown_table, pyplot, write_csv, write_json, write_text
from ddim.images import to_uint8

__all__ = ["EDIT_COLUMNS", "plot_edit_tradeoff", "render_edit_section", "run_edit_eval", "seam", "targets_for"]

EDIT_COLUMNS = ("edit", "strength", "guidance", "n", "accuracy", "distance", "seam", "nfe", "seconds")


def targets_for(labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """A target class other than each label: image i gets (label_i + 1 + i mod (K-1)) mod K."""
    i = torch.arange(labels.numel())
    return (labels + 1 + i % (num_classes - 1)) % num_classes


def seam(x: torch.Tensor, column: int) -> float:
    """Mean |x[..., column] - x[..., column - 1]| on [0, 1] (the horizontal gradient across a vertical
    border between columns ``column - 1`` and ``column``), over images, channels and rows."""
    return float(((x[..., column] - x[..., column - 1]).abs() / 2).mean())


def _accuracy(classifier: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.inference_mode():
        pred = classifier(x.clamp(-1, 1).float().cpu()).argmax(1)
    return float((pred == target.cpu()).float().mean())


def _distance(x: torch.Tensor, source: torch.Tensor) -> float:
    return float((((x.clamp(-1, 1) - source) / 2) ** 2).mean())


def run_edit_eval(
    model: torch.nn.Module,
    schedule: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.nn.Module,
    out: str | os.PathLike,
    *,
    steps: int = 20,
    strengths: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
    guidance: float = 1.0,
    prediction: str = "epsilon",
    spacing: str = "leading",
    seed: int = 0,
    examples: int = 8,
) -> list[dict[str, Any]]:
    """Run the class-edit and inpainting measurements on ``images`` [n, C, H, W] in [-1, 1] with
    ``labels`` int [n]; write the files into ``out``; return a row per edit (see :data:`EDIT_COLUMNS`).

    Args:
        model, schedule: a class-conditional model (``model.config.num_classes`` = K, null class K).
        classifier: logits [B, K] from images in [-1, 1] (the shipped digit classifier for MNIST).
        steps: S of every edit (SDEdit: exactly S steps from the strength's level).
        strengths: the SDEdit strengths, each in (0, 1].
        guidance: classifier-free guidance weight of the regeneration (all edits; 1 = off).
        seed: image i's SDEdit/inpainting noise comes from seed + i.
    """
    from ddim.edit import check_strength, class_swap, inpaint, sdedit
    from ddim.inversion import front_loaded

    k = int(getattr(model.config, "num_classes", 0) or 0)
    if k < 2:
        raise ValueError("the edit evaluation needs a class-conditional model")
    strengths = [check_strength(s) for s in strengths]
    n = images.shape[0]
    if n < 1 or labels.shape != (n,):
        raise ValueError(f"need n >= 1 images and one label each, got {n} images and labels {tuple(labels.shape)}")
    out = Path(out)
    target = targets_for(labels, k)
    y = {"y": target}
    src = {"y": labels}
    guide = {"guidance_scale": guidance, "uncond_kwargs": {"y": torch.full_like(labels, k)}} if guidance != 1 else {}
    seeds = list(range(seed, seed + n))
    common = {"steps": steps, "spacing": spacing, "prediction": prediction}
    rows, shown = [], {}

    def add(name: str, x: torch.Tensor, tic: float, nfe: int, strength: float | None = None, s: float | None = None):
        rows.append(
            {
                "edit": name,
                "strength": strength,
                "guidance": guidance,
                "n": n,
                "accuracy": _accuracy(classifier, x, target),
                "distance": _distance(x, images),
                "seam": s,
                "nfe": nfe,
                "seconds": time.perf_counter() - tic,
            }
        )
        shown[name if strength is None else f"{name} {strength:g}"] = x[:examples]

    with torch.inference_mode():
        tic = time.perf_counter()
        caps = front_loaded(steps, 4 * steps)
        x, _ = class_swap(model, schedule, images, source_kwargs=src, target_kwargs=y, method="fixed_point",
                          max_iter=caps, **common, **guide)  # fmt: skip
        add("inversion", x, tic, sum(caps) + steps)
        for s in strengths:
            tic = time.perf_counter()
            x = sdedit(model, schedule, images, s, seeds=seeds, model_kwargs=y, **common, **guide)
            add("sdedit", x, tic, steps, strength=s)
        W = images.shape[-1]
        mask = torch.zeros(1, 1, *images.shape[-2:])
        mask[..., W // 2 :] = 1
        for r in (1, 3):
            tic = time.perf_counter()
            x = inpaint(model, schedule, images, mask, seeds=seeds, model_kwargs=y, resample=r, **common, **guide)
            add("inpaint" if r == 1 else f"inpaint r={r}", x, tic, (steps - 1) * r + 1, s=seam(x, W // 2))
    reference_seam = seam(images, W // 2)
    meta = {"n": n, "steps": steps, "guidance": guidance, "spacing": spacing, "seed": seed,
            "source_seam": reference_seam}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "edit.csv", rows, EDIT_COLUMNS)
    write_text(out / "edit.md", markdown_edit(rows, meta))
    write_json(out / "edit.json", {"meta": meta, "rows": rows})
    plot_edit_tradeoff(rows, out / "edit.png")
    _plot_examples(images[:examples], shown, target[:examples], out / "edit_examples.png")
    return rows


def markdown_edit(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (
        "# Editing real images: target-class accuracy against distance to the source\n\n"
        f"{meta['n']} held-out digits, each edited to a class other than its own; S = {meta['steps']}, "
        f"guidance w = {meta['guidance']:g}. Accuracy: the digit classifier's on the target class. Distance: "
        "per-dimension MSE on [0, 1] to the source. Seam: mean |horizontal gradient| across the mask border "
        f"(the sources: {meta['source_seam']:.4f}). NFE: network calls per batch.\n\n"
    )
    body = [[r["edit"], r["strength"] if r["strength"] is not None else "-", r["accuracy"], r["distance"],
             r["seam"] if r["seam"] is not None else "-", r["nfe"], r["seconds"]] for r in rows]  # fmt: skip
    return head + markdown_table(["edit", "strength", "accuracy", "distance", "seam", "NFE", "s"], body)


def plot_edit_tradeoff(rows: list[dict[str, Any]], path: str | os.PathLike | None = None) -> bytes:
    """Target-class accuracy against distance to the source: SDEdit's curve over strengths, the
    inversion edit and inpainting as points. Returns PNG bytes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.2))
    sd = [r for r in rows if r["edit"] == "sdedit"]
    ax.plot([r["distance"] for r in sd], [r["accuracy"] for r in sd], "o-", label="SDEdit")
    for r in sd:
        ax.annotate(f"s={r['strength']:g}", (r["distance"], r["accuracy"]), fontsize=7, xytext=(3, -8),
                    textcoords="offset points")  # fmt: skip
    for r, m in zip([r for r in rows if r["edit"] != "sdedit"], "s^v", strict=False):
        ax.plot([r["distance"]], [r["accuracy"]], m, ms=7, label=r["edit"])
    ax.set_xlabel("distance to the source (MSE on [0, 1])")
    ax.set_ylabel("target-class accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Class edits: reaching the target vs keeping the source", fontsize=9)
    fig.tight_layout()
    return fig_png(fig, path)


def _plot_examples(sources: torch.Tensor, shown: dict[str, torch.Tensor], target: torch.Tensor, path: Path) -> bytes:
    plt = pyplot()
    k = sources.shape[0]
    rows = [("source", sources), *shown.items()]
    fig, axes = plt.subplots(len(rows), k, figsize=(0.8 * k + 1.4, 0.8 * len(rows)), squeeze=False)
    for i, (name, x) in enumerate(rows):
        u8 = to_uint8(x.float().cpu())
        for j in range(k):
            ax = axes[i][j]
            ax.imshow(u8[j, ..., 0] if u8.shape[-1] == 1 else u8[j], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"→ {int(target[j])}", fontsize=7)
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.2, wspace=0.05, hspace=0.1)
    return fig_png(fig, path)


def render_edit_section(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """The report's editing section (HTML parts) from :func:`run_edit_eval`'s rows and its files in ``folder``."""
    import base64
    import html

    def img(name: str, alt: str, width: str) -> str:
        p = folder / name
        if not p.is_file():
            return ""
        data = base64.b64encode(p.read_bytes()).decode()
        return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt)}' style='width:{width}'>"

    def cell(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))

    n = rows[0]["n"] if rows else 0
    head = ["edit", "strength", "target accuracy", "distance to source", "seam", "NFE"]
    body = "".join(
        "<tr>"
        + "".join(f"<td>{cell(r[k])}</td>" for k in ("edit", "strength", "accuracy", "distance", "seam", "nfe"))
        + "</tr>"
        for r in rows
    )
    return [
        "<h2>Editing real images</h2>",
        f"<p>{n} held-out digits, each edited to another class: the exact-inversion edit (invert under the "
        "source class, regenerate under the target), SDEdit at several strengths, and inpainting of the right "
        "half (with and without RePaint resampling). Accuracy: the digit classifier's on the target class; "
        "distance: per-dimension MSE on [0, 1] to the source; seam: mean |horizontal gradient| across the mask "
        "border. <code>ddim eval edit</code>, docs/inversion.md.</p>",
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + body + "</table>",
        "<div class='flex'>"
        + img("edit.png", "accuracy against distance", "460px")
        + img("edit_examples.png", "edit examples", "560px")
        + "</div>",
    ]
