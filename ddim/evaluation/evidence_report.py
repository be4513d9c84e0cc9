"""The report's evidence sections: guidance × steps, η and diversity, memorization and cost.

:func:`run_evidence` runs (or resumes) the four parts into a work folder with the report's small
settings, sharing Table 1's sample cells where the settings coincide (the model's own guidance, the
same n and S), and :func:`render_evidence` turns their results into HTML for ``ddim report``.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import torch

from ddim.evaluation.common import EvalSetup
from ddim.evaluation.cost import run_cost, verdict_sentences
from ddim.evaluation.diversity import findings, run_diversity
from ddim.evaluation.extractors import FeatureExtractor
from ddim.evaluation.guidance import choice_sentences, run_guidance
from ddim.evaluation.memorization import run_memorization, verdict
from ddim.evaluation.metrics import Reference

__all__ = ["run_evidence", "render_evidence"]


def run_evidence(
    setup: EvalSetup,
    work: Path,
    settings: Any,
    extractor: FeatureExtractor,
    reference: Reference,
    *,
    heldout: torch.Tensor,
    heldout_name: str,
    train: torch.Tensor | None = None,
    train_name: str = "training images",
    reference_labels: torch.Tensor | None = None,
    extra_spaces: list[tuple[FeatureExtractor, Reference]] | None = None,
    memorization_heldout: torch.Tensor | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the four parts; returns ({part: result or {"skipped": why}}, {part: seconds}).

    ``settings``: a :class:`~ddim.evaluation.report.ReportSettings`. ``train``: the model's training
    images (memorization is skipped without them). ``extra_spaces``: further (extractor, reference)
    pairs judging the guidance grid (e.g. the checking classifier). ``memorization_heldout``: the held-out
    images for memorization (default ``heldout``, which the report cuts to Table 2's size).
    """
    s = settings
    cells = work / "table1" / "cells"  # shared with Table 1 where settings coincide
    steps = sorted(s.steps)
    mid = steps[len(steps) // 2]
    out: dict[str, Any] = {}
    timings: dict[str, float] = {}
    n = min(s.n, len(reference.features))

    tic = time.perf_counter()
    if setup.num_classes and setup.class_spec is not None:
        g_steps = s.guidance_steps or steps[:2]
        rows = run_guidance(
            setup, work / "guidance", [(extractor, reference), *(extra_spaces or [])], guidances=s.guidance_values,
            steps=g_steps, n=n, cells=cells, progress=progress,
        )  # fmt: skip
        meta = json.loads((work / "guidance" / "guidance.json").read_text())["meta"]
        out["guidance"] = {"rows": rows, "meta": meta}
    else:
        out["guidance"] = {"skipped": "the model is not class-conditional (or sampled unconditionally)"}
    timings["guidance"] = time.perf_counter() - tic

    tic = time.perf_counter()
    etas = [float(e) for e in s.etas if e != "hat"]
    rows = run_diversity(
        setup, work / "diversity", extractor, reference, reference_labels=reference_labels, etas=etas or [0.0],
        samplers=s.diversity_samplers, steps=mid, n=max(4, n), seeds_shown=min(6, n), cells=cells, progress=progress,
    )  # fmt: skip
    out["diversity"] = {"rows": rows, "steps": mid, "n": n}
    timings["diversity"] = time.perf_counter() - tic

    tic = time.perf_counter()
    memo_held = heldout if memorization_heldout is None else memorization_heldout
    if train is not None and len(memo_held) >= 4:
        summary = run_memorization(
            setup, work / "memorization", extractor, train, memo_held, n=n, steps=mid, pairs=min(8, n),
            train_name=train_name, heldout_name=heldout_name, cells=cells, progress=progress,
        )  # fmt: skip
        out["memorization"] = summary
    else:
        why = "the model's training images are unknown (pass --train-data)" if train is None else "too few held-out"
        out["memorization"] = {"skipped": why}
    timings["memorization"] = time.perf_counter() - tic

    tic = time.perf_counter()
    rows = run_cost(
        setup, work / "cost", steps=s.cost_steps or steps, batches=s.cost_batches, samplers=s.cost_samplers,
        progress=progress,
    )  # fmt: skip
    out["cost"] = {"rows": rows, "meta": json.loads((work / "cost" / "cost.json").read_text())["meta"]}
    timings["cost"] = time.perf_counter() - tic
    return out, timings


def render_evidence(results: dict[str, Any], work: Path) -> list[str]:
    """HTML parts (strings) of the four sections."""
    from ddim.evaluation.report import _file_img, _table

    esc = html.escape
    parts: list[str] = []

    def ul(lines: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{esc(t.replace('**', ''))}</li>" for t in lines) + "</ul>"

    # guidance
    g = results.get("guidance", {})
    parts.append("<h2>Guidance × steps</h2>")
    if "skipped" in g:
        parts.append(f"<p><em>Skipped: {esc(g['skipped'])}.</em></p>")
    else:
        meta, rows = g["meta"], g["rows"]
        parts.append(
            f"<p>{meta['n']} class-conditional samples per cell; Fréchet distance, precision, recall and class "
            f"accuracy in each feature space ({esc(', '.join(meta['features']))}); the best w of each step count "
            "marked ★."
            + (
                " The other spaces are independently trained networks, so that a choice is not tuned to one "
                "network's features."
                if len(meta["features"]) > 1
                else ""
            )
            + "</p>"
        )
        parts.append("<div class='findings'>" + ul(choice_sentences(meta["choice"], meta.get("default"))) + "</div>")
        ws = meta["guidances"]
        for space in meta["features"]:
            body = []
            for sa in meta["samplers"]:
                for st in meta["steps"]:
                    mine = [r for r in rows if (r["sampler"], r["steps"], r["features"]) == (sa, st, space)]
                    cells = {r["guidance"]: r for r in mine}
                    body.append(
                        [f"{sa}, S = {st}"]
                        + [
                            (f"{cells[w]['fd']:.4g} ★" if cells[w]["best"] else cells[w]["fd"]) if w in cells else None
                            for w in ws
                        ]
                    )
                    acc = [cells[w]["accuracy"] if w in cells else None for w in ws]
                    body.append(["   accuracy", *acc])
            parts.append(f"<h3>{esc(space)}: Fréchet distance (and class accuracy)</h3>")
            parts.append(_table(["", *[f"w = {w:g}" for w in ws]], body))
        parts.append(_file_img(work / "guidance" / "guidance.png", "guidance x steps", "900px"))
    # diversity
    d = results["diversity"]
    rows = d["rows"]
    parts.append("<h2>η and diversity</h2>")
    parts.append(
        f"<p>{d['n']} samples per cell at S = {d['steps']}, the same x_T in every cell. Diversity: mean feature "
        "distance between samples of one class; spread: how far each seed's image moves from its DDIM image at the "
        "smallest η, relative to the distance between different seeds of a class.</p>"
    )
    meta = {"steps": d["steps"]}
    parts.append("<div class='findings'>" + ul(findings(rows, meta)) + "</div>")
    from ddim.evaluation.diversity import _label

    parts.append(
        _table(
            ["", "diversity ↑", "recall ↑", "precision ↑", "FD ↓", "accuracy ↑", "spread (px)", "spread / between"],
            [
                [_label(r), r["diversity"], r["recall"], r["precision"], r["fd"], r["accuracy"], r["spread_px"]]
                + [r["spread_ratio"]]
                for r in rows
            ],
        )
    )
    parts.append(
        "<div class='flex'>"
        + _file_img(work / "diversity" / "diversity.png", "diversity against eta", "620px")
        + _file_img(work / "diversity" / "diversity_seeds.png", "the same x_T across eta", "420px")
        + "</div>"
    )
    # memorization
    m = results["memorization"]
    parts.append("<h2>Memorization</h2>")
    if "skipped" in m:
        parts.append(f"<p><em>Skipped: {esc(m['skipped'])}.</em></p>")
    else:
        f = m["fraction"]
        parts.append(
            f"<p>{m['n']} samples against the training images ({esc(m['train']['name'])}, {m['train']['n']}) and "
            f"held-out images ({esc(m['heldout']['name'])}, {m['heldout']['n']}): the nearest image in pixels "
            "(RMS on [0, 1]) and in features. Control: half "
            "the held-out images (never trained on) asked the same question against the training set and the "
            "other half.</p>"
        )
        parts.append(f"<div class='findings'><p>{esc(verdict(m))}</p></div>")
        parts.append(
            _table(
                ["closer to a training image than to any held-out image", "pixels", "features"],
                [
                    ["samples", f["samples_px"], f["samples_feat"]],
                    ["control (real, unseen)", f["control_px"], f["control_feat"]],
                ],
            )
        )
        parts.append(
            "<div class='flex'>"
            + _file_img(work / "memorization" / "memorization.png", "closest pairs", "620px")
            + _file_img(work / "memorization" / "memorization_hist.png", "distance ratios", "420px")
            + "</div>"
        )
    # cost
    c = results["cost"]
    rows, meta = c["rows"], c["meta"]
    parts.append("<h2>Cost: time, network calls and memory</h2>")
    parts.append(
        f"<p>Wall time (fastest of {meta['repeats']} after a warm-up), network forward calls and peak memory above "
        f"the memory held before sampling ({esc(rows[0]['memory'] if rows else 'RSS')}), {meta['threads']} CPU "
        "threads, on this machine.</p>"
    )
    verdicts = verdict_sentences(rows, meta.get("eta", 0.0), meta.get("sample_numel"))
    parts.append("<div class='findings'>" + ul(verdicts) + "</div>")
    steps = sorted({r["steps"] for r in rows})
    body = []
    for sa, b in dict.fromkeys((r["sampler"], r["batch"]) for r in rows):
        by = {r["steps"]: r for r in rows if r["sampler"] == sa and r["batch"] == b}
        body.append([f"{sa}, batch {b}: s"] + [by[x]["seconds"] if x in by else None for x in steps])
        body.append(["   MiB"] + [by[x]["peak_mb"] if x in by else None for x in steps])
        body.append(["   calls"] + [by[x]["calls"] if x in by else None for x in steps])
    parts.append(_table(["", *[f"S = {x}" for x in steps]], body, 3))
    parts.append(_file_img(work / "cost" / "cost.png", "cost against steps", "820px"))
    return parts
