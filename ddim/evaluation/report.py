"""``ddim report``: one self-contained HTML page (images embedded) with Table 1, Table 2, the
consistency grid and the interpolation strips for a model, readable without a terminal.

Every part is run through the same functions as ``ddim eval`` into a work folder, so a second run
(or a killed one) reuses what is there.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim import __version__
from ddim.evaluation.common import EvalSetup, fig_png, fmt, pyplot, write_text
from ddim.evaluation.consistency import run_consistency
from ddim.evaluation.extractors import FeatureExtractor
from ddim.evaluation.interpolation import run_interpolation
from ddim.evaluation.metrics import Reference
from ddim.evaluation.paper import PAPER_TABLE1, PAPER_TABLE1_SIGMA_HAT, PAPER_TABLE2, trend_checks
from ddim.evaluation.table1 import METRIC_LABELS, SIGMA_HAT, eta_label, metric_names, plot_table1, run_table1
from ddim.evaluation.table2 import plot_table2, run_table2

__all__ = ["ReportSettings", "build_report", "render_report"]


@dataclass
class ReportSettings:
    """Sizes of the report's parts. The defaults take a few minutes on a 2-core CPU for the default
    model (about 55,000 image-forwards, most of them Table 1's, and about 15,000 more for the evidence
    sections, which reuse Table 1's cells where the settings coincide); raise them for publication
    figures."""

    steps: list[int] = field(default_factory=lambda: [10, 20, 50])
    etas: list[float | str] = field(default_factory=lambda: [0.0, 1.0])  # may hold "hat" (σ̂)
    n: int = 100
    table2_n: int = 50
    consistency_steps: list[int] = field(default_factory=lambda: [10, 20, 50, 100, 200])
    consistency_n: int = 8
    pairs: int = 4
    frames: int = 9
    interpolation_steps: int = 50
    # the evidence sections (guidance × steps, η and diversity, memorization, cost); n and S come from above
    evidence: bool = True
    guidance_values: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    guidance_steps: list[int] | None = None  # None: the two smallest of ``steps``
    diversity_samplers: list[str] = field(default_factory=lambda: ["ddim", "ddpm", "dpmpp_2m"])
    cost_steps: list[int] | None = None  # None: ``steps``
    cost_batches: list[int] = field(default_factory=lambda: [1, 8])
    cost_samplers: list[str] = field(default_factory=lambda: ["ddim", "ddpm"])
    # editing real images (class-conditional 1×28×28 digit models with labelled held-out images; 0 = off)
    edit_n: int = 20
    edit_steps: int = 20
    # straightness: models (folders or shipped names, e.g. "reflow") compared with this one at few Euler steps
    straightness: list[str] = field(default_factory=list)
    straightness_calls: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    straightness_paths: int = 32
    # few calls: rows MODEL:SAMPLER:STEPS[:SPACING] (MODEL "self" = this model, else a folder or shipped name,
    # e.g. "pd4:ddim:4", "cd:consistency:1", "self:dpmv3:5:trailing"), judged against this model's DDIM-200 map
    few_calls: list[str] = field(default_factory=list)


def build_report(
    setup: EvalSetup,
    config: dict[str, Any],
    out: str | os.PathLike,
    work: str | os.PathLike,
    extractor: FeatureExtractor,
    reference: Reference,
    heldout: torch.Tensor,
    heldout_name: str,
    settings: ReportSettings | None = None,
    *,
    progress: bool = True,
    train: torch.Tensor | None = None,
    train_name: str = "training images",
    reference_labels: torch.Tensor | None = None,
    extra_spaces: list[tuple[FeatureExtractor, Reference]] | None = None,
    memorization_heldout: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | None = None,
) -> Path:
    """Run (or resume) every part into ``work`` and write the page to ``out``; returns ``out``.

    ``heldout``: real images [N, C, H, W] the model did not train on, for Table 2 (the first
    ``settings.table2_n``; :func:`ddim.evaluation.sources.heldout_subset` picks them spread over a set)
    and the memorization control. With ``settings.evidence`` the page also holds guidance × steps
    (judged in ``extractor``'s features and those of ``extra_spaces``), η and diversity
    (``reference_labels``: the reference images' classes), memorization (needs ``train``, the model's
    training images; ``memorization_heldout``: all the held-out images, default ``heldout``) and cost:
    see :mod:`ddim.evaluation.evidence_report`. With ``heldout_labels`` (the classes of ``heldout``), a
    class-conditional 1×28×28 model and ``settings.edit_n`` > 0 it also holds the editing section
    (:func:`ddim.evaluation.edit.run_edit_eval` on the first ``edit_n`` held-out images).
    """
    s = settings or ReportSettings()
    work = Path(work)
    timings = {}
    tic = time.perf_counter()
    t1 = run_table1(setup, work / "table1", extractor, reference, steps=s.steps, etas=s.etas, n=s.n, progress=progress)
    timings["Table 1"] = time.perf_counter() - tic
    tic = time.perf_counter()
    held = heldout[: s.table2_n]
    t2 = run_table2(setup, held, work / "table2", steps=s.steps, data_name=heldout_name, progress=progress)
    timings["Table 2"] = time.perf_counter() - tic
    tic = time.perf_counter()
    cons = run_consistency(setup, work / "consistency", steps=s.consistency_steps, n=s.consistency_n, progress=progress)
    timings["consistency"] = time.perf_counter() - tic
    tic = time.perf_counter()
    interp = run_interpolation(
        setup, work / "interpolation", pairs=s.pairs, frames=s.frames, steps=s.interpolation_steps, progress=progress
    )
    timings["interpolation"] = time.perf_counter() - tic
    edit_rows = None
    cfg = setup.model.config
    conditional = int(getattr(cfg, "num_classes", 0) or 0) == 10
    if s.edit_n and heldout_labels is not None and conditional and (cfg.in_channels, cfg.image_size) == (1, 28):
        from ddim.classifier import load_classifier
        from ddim.evaluation.edit import run_edit_eval

        tic = time.perf_counter()
        edit_rows = run_edit_eval(
            setup.model, setup.schedule, heldout[: s.edit_n].to(setup.device),
            heldout_labels[: s.edit_n].to(setup.device), load_classifier(), work / "edit", steps=s.edit_steps,
            prediction=setup.prediction, spacing=setup.named_spacing("the editing evaluation"),
        )  # fmt: skip
        timings["editing"] = time.perf_counter() - tic
    evidence = None
    if s.evidence:
        from ddim.evaluation.evidence_report import run_evidence

        evidence, more = run_evidence(
            setup, work, s, extractor, reference, heldout=heldout, heldout_name=heldout_name, train=train,
            train_name=train_name, reference_labels=reference_labels, extra_spaces=extra_spaces,
            memorization_heldout=memorization_heldout, progress=progress,
        )  # fmt: skip
        timings.update(more)
    few = None
    if s.few_calls:
        tic = time.perf_counter()
        few = run_few_calls_section(setup, config, s, work / "few_calls", extractor, reference)
        timings["few calls"] = time.perf_counter() - tic
    straight = None
    if s.straightness:
        tic = time.perf_counter()
        straight = run_straightness_section(setup, config, s, work / "straightness", extractor, reference)
        timings["straightness"] = time.perf_counter() - tic
    page = render_report(
        setup=setup,
        config=config,
        work=work,
        extractor=extractor,
        reference=reference,
        settings=s,
        table1=t1,
        table2=t2,
        consistency=cons,
        interpolation=interp,
        heldout_name=heldout_name,
        timings=timings,
        evidence=evidence,
        edit=edit_rows,
        straightness=straight,
        few_calls=few,
    )
    out = Path(out)
    write_text(out, page)
    return out


def run_straightness_section(
    setup: EvalSetup,
    config: dict[str, Any],
    settings: ReportSettings,
    work: Path,
    extractor: FeatureExtractor,
    reference: Reference,
) -> dict[str, Any]:
    """The straightness section's results: this model (the reference map) and ``settings.straightness``'s
    models, via :mod:`ddim.evaluation.straightness` (n = ``settings.n`` images a row, seeds from
    ``setup.seed`` + 1,000,000, clear of the seeds a reflow student was trained on), cached in ``work``."""
    from ddim.checkpoint import load
    from ddim.evaluation.straightness import ModelRun, few_step_rows, straightness

    name = setup.describe()["model"]
    runs = {name: ModelRun(setup.model, setup.schedule, config, guidance=setup.guidance)}
    for other in settings.straightness:
        model, schedule, cfg = load(other, device=next(setup.model.parameters()).device)
        runs[str(other)] = ModelRun(model, schedule, cfg)
    deviations = {
        k: straightness(r, n=settings.straightness_paths, seed=setup.seed + 1_000_000, batch=setup.batch, cache=work)
        for k, r in runs.items()
    }
    rows = few_step_rows(
        runs, name, calls=settings.straightness_calls, n=settings.n, seed=setup.seed + 1_000_000, batch=setup.batch,
        cache=work, extractor=extractor, real=reference.features,
    )  # fmt: skip
    return {"deviations": deviations, "rows": rows, "reference": name}


def run_few_calls_section(
    setup: EvalSetup,
    config: dict[str, Any],
    settings: ReportSettings,
    work: Path,
    extractor: FeatureExtractor,
    reference: Reference,
) -> dict[str, Any]:
    """The few-calls section's rows (:func:`ddim.evaluation.straightness.few_call_rows`): ``settings.few_calls``
    from the same n = ``settings.n`` noises (seeds from ``setup.seed`` + 2,000,000, class i mod K), against
    this model's DDIM-200 map; cached in ``work``."""
    from ddim.checkpoint import load
    from ddim.evaluation.straightness import FewCallRun, ModelRun, few_call_rows

    specs = [FewCallRun.parse(t) for t in settings.few_calls]
    runs = {"self": ModelRun(setup.model, setup.schedule, config, guidance=setup.guidance)}
    device = next(setup.model.parameters()).device
    for name in dict.fromkeys(sp.model for sp in specs if sp.model != "self"):
        model, schedule, cfg = load(name, device=device)
        runs[name] = ModelRun(model, schedule, cfg)
    rows = few_call_rows(
        runs, specs, "self", n=settings.n, seed=setup.seed + 2_000_000, batch=setup.batch, cache=work,
        extractor=extractor, real=reference.features,
    )  # fmt: skip
    name = setup.describe()["model"]
    for r in rows:
        r["model"] = name if r["model"] == "self" else r["model"]
    return {"rows": rows, "reference": name, "n": settings.n}


def render_few_calls(result: dict[str, Any]) -> list[str]:
    """HTML of the few-calls section: students and training-free samplers at a few network calls."""
    return [
        "<h2>A few network calls: samplers and students</h2>",
        "<p>Each row samples the same noises and classes (image i: class i mod K). Fréchet distance in the "
        f"report's features (n = {result['n']}; compare rows, not with other n), accuracy where the features "
        f"classify, and the RMS difference on [0, 1] to {html.escape(result['reference'])}'s DDIM-200 map from "
        "the same x_T, which sees blur and speckle that a classifier's features barely see. Network calls per "
        "image: a guided call counts two. Stochastic samplers (restart, multistep consistency) draw their "
        "noise from each image's seed, so they land elsewhere than the ODE map by design.</p>",
        _table(
            ["model", "sampler", "spacing", "steps", "network calls", "Fréchet distance", "accuracy", "RMS to map"],
            [
                [r["model"], r["sampler"], r["spacing"], r["steps"], r["calls"], r["fd"], r["accuracy"], r["rms"]]
                for r in result["rows"]
            ],
            digits=3,
        ),
    ]


def render_straightness(result: dict[str, Any]) -> list[str]:
    """HTML of the straightness section: path deviation per model, then quality at few Euler steps."""
    dev = result["deviations"]
    parts = [
        "<h2>Straightness and few-step sampling</h2>",
        "<p>How far each model's ODE paths (DDIM = Euler, 100 steps, in the flow coordinate) stray from the "
        "straight line between their ends, over its length (0 = straight: one Euler step lands on the end). "
        "Then DDIM (Euler) at a few steps from the same noises: Fréchet distance in the report's features, "
        f"accuracy (where they classify), and RMS on [0, 1] to {html.escape(result['reference'])}'s DDIM-200 map.</p>",
        _table(
            ["model", "path deviation (mean)", "std", "max", "paths"],
            [[k, d["mean"], d["std"], d["max"], d["n"]] for k, d in dev.items()],
        ),
        _table(
            ["model", "spacing", "steps", "network calls", "Fréchet distance", "accuracy", "RMS to map"],
            [
                [r["model"], r["spacing"], r["steps"], r["calls"], r["fd"], r["accuracy"], r["rms"]]
                for r in result["rows"]
            ],
            digits=3,
        ),
    ]
    return parts


# ------------------------------------------------------------------ rendering
def _img(data: bytes, alt: str, width: str | None = None) -> str:
    style = f' style="max-width:{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}"{style}>'


def _file_img(path: Path, alt: str, width: str | None = None) -> str:
    if not path.is_file():
        return f"<p><em>missing: {html.escape(str(path))}</em></p>"
    return _img(path.read_bytes(), alt, width)


def _table(header: list[str], rows: list[list[Any]], digits: int = 4, cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            tag = "th" if i == 0 else "td"
            cells.append(f"<{tag}>{html.escape(fmt(v, digits) if not isinstance(v, str) else v)}</{tag}>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _samples_figure(rows: list[dict[str, Any]], work: Path, per_cell: int = 16) -> bytes:
    """A mini-grid of the first samples of every Table 1 cell: η down, S across (same seeds everywhere)."""
    from ddim.images import make_grid

    plt = pyplot()
    cells = [r for r in rows if r["sampler"] != "data"]
    groups = list(dict.fromkeys((r["sampler"], r["eta"]) for r in cells))
    steps = sorted({r["steps"] for r in cells})
    size = (2.0 * len(steps) + 0.8, 2.05 * len(groups))
    fig, axes = plt.subplots(len(groups), len(steps), figsize=size, squeeze=False)
    side = int(np.sqrt(per_cell))
    for i, (sampler, eta) in enumerate(groups):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            match = [r for r in cells if r["sampler"] == sampler and r["eta"] == eta and r["steps"] == s]
            if not match:
                continue
            with np.load(work / match[0]["samples"]) as z:
                imgs = z["images"][:per_cell]
            grid = make_grid(imgs, nrow=side, pad=1)
            ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
            if i == 0:
                ax.set_title(f"S = {s}", fontsize=9)
        axes[i][0].set_ylabel(eta_label(sampler, eta), fontsize=9)
    fig.suptitle("First samples of each cell (the same seeds in every cell)", fontsize=9)
    fig.tight_layout()
    return fig_png(fig)


def _pivot(cells: list[dict[str, Any]], metric: str, floor: dict[str, Any] | None) -> tuple[list[str], list[list]]:
    steps = sorted({r["steps"] for r in cells})
    groups = list(dict.fromkeys((r["sampler"], r["eta"]) for r in cells))
    rows = []
    for sampler, eta in groups:
        by_s = {r["steps"]: r for r in cells if r["sampler"] == sampler and r["eta"] == eta}
        rows.append([eta_label(sampler, eta)] + [by_s[s][metric] if s in by_s else None for s in steps])
    if floor is not None and floor.get(metric) is not None:
        rows.append([f"real data (n = {floor['n']})"] + [floor[metric]] * len(steps))
    return ["", *[f"S = {s}" for s in steps]], rows


def _findings(t1: list[dict], t2: list[dict], cons: dict, interp: dict) -> list[str]:
    """A few sentences read off the numbers (no judgement beyond what they show)."""
    out = []
    cells = [r for r in t1 if r["sampler"] == "ddim" and r["eta"] not in (None, SIGMA_HAT)]
    etas = sorted({r["eta"] for r in cells})
    steps = sorted({r["steps"] for r in cells})
    if cells and len(etas) > 1:
        lo, hi = etas[0], etas[-1]
        fd = {(r["eta"], r["steps"]): r["fd"] for r in cells}
        s0 = steps[0]
        out.append(
            f"At S = {s0}, η = {lo:g} scores a Fréchet distance of {fd[(lo, s0)]:.3g} against {fd[(hi, s0)]:.3g} "
            f"for η = {hi:g} ({'lower' if fd[(lo, s0)] < fd[(hi, s0)] else 'not lower'}: "
            f"{'as' if fd[(lo, s0)] < fd[(hi, s0)] else 'unlike'} the paper, where DDIM beats η = 1 at few steps)."
        )
        s1 = steps[-1]
        narrows = abs(fd[(lo, s1)] - fd[(hi, s1)]) < abs(fd[(lo, s0)] - fd[(hi, s0)])
        out.append(
            f"At S = {s1}: {fd[(lo, s1)]:.3g} (η = {lo:g}) and {fd[(hi, s1)]:.3g} (η = {hi:g}); the gap between "
            f"η values {'narrows' if narrows else 'does not narrow'} from S = {s0} to S = {s1}."
        )
    if t2:
        a, b = t2[0], t2[-1]
        out.append(
            f"Inversion: reconstruction MSE {a['mse']:.2g} at S = {a['steps']} and {b['mse']:.2g} at S = {b['steps']} "
            f"({'falling' if b['mse'] < a['mse'] else 'not falling'} with S, as in the paper's Table 2)."
        )
    rows = [r for r in cons["rows"] if r["steps"] != cons["reference_steps"]]
    if rows:
        worst = max(r["ratio"] for r in rows if r["ratio"] is not None)
        out.append(
            f"Consistency: images of the same x_T stay within {worst:.2f}× the distance between independent x_T "
            f"at every S (1 would mean S matters as much as x_T)."
        )
    out.append(
        f"Interpolation: the largest step between neighbouring frames is on average {interp['mean_ratio']:.2f}× "
        f"the mean step (worst strip {interp['max_ratio']:.2f}×; 1 = perfectly even)."
    )
    return out


KNOWN = ("classifier", "inception")  # extractors a command line can name


def _training_line(config: dict[str, Any]) -> str:
    train, data = config.get("train", {}), config.get("data", {})
    if not train and not data:
        return "not recorded in the config"
    where = data.get("name", "unrecorded data") + (f" ({data['subset']}, {data['n']} images)" if "n" in data else "")
    return f"{train.get('step', 'unrecorded')} steps on {where}"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}thead th{background:#f3f3f3}tbody th{text-align:left;
background:#fafafa;font-weight:600}
.meta td,.meta th{text-align:left}.paper{color:#555}.note{color:#555;font-size:.9em}
.findings{background:#f5f8ff;border:1px solid #cdd9f5;padding:.6em 1.2em;border-radius:6px}
img{max-width:100%;height:auto;display:block;margin:.4em 0}
.flex{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.6em;border-radius:4px;font-size:.85em}
"""


def render_report(
    *,
    setup: EvalSetup,
    config: dict[str, Any],
    work: Path,
    extractor: FeatureExtractor,
    reference: Reference,
    settings: ReportSettings,
    table1: list[dict[str, Any]],
    table2: list[dict[str, Any]],
    consistency: dict[str, Any],
    interpolation: dict[str, Any],
    heldout_name: str,
    timings: dict[str, float],
    evidence: dict[str, Any] | None = None,
    edit: list[dict[str, Any]] | None = None,
    straightness: dict[str, Any] | None = None,
    few_calls: dict[str, Any] | None = None,
) -> str:
    """The HTML page (a string) from the results of the four parts (and the evidence, editing and
    straightness sections, when given)."""
    esc = html.escape
    s = setup.describe()
    cfg = setup.model.config
    n_params = sum(p.numel() for p in setup.model.parameters())
    sched = config.get("schedule", {})
    cells = [r for r in table1 if r["sampler"] != "data"]
    floor = next((r for r in table1 if r["sampler"] == "data"), None)
    meta1 = {"extractor": extractor.name, "n": settings.n}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>DDIM evaluation: {esc(s['model'])}</title><style>{CSS}</style></head><body>",
        f"<h1>DDIM evaluation of {esc(s['model'])}</h1>",
        f"<p class='note'>ddim {esc(__version__)}, {esc(datetime.datetime.now().strftime('%Y-%m-%d %H:%M'))}. "
        "The evidence of the DDIM paper (Song, Meng &amp; Ermon, ICLR 2021) measured on this model: sample quality "
        "against steps S and η (Table 1), inversion error against S (Table 2), the same x_T across S (§5.2) and "
        "interpolation in x_T (§5.3).</p>",
        "<div class='findings'><b>What the numbers say</b><ul>"
        + "".join(f"<li>{esc(t)}</li>" for t in _findings(table1, table2, consistency, interpolation))
        + "</ul></div>",
        "<h2>Model and settings</h2>",
        _table(
            ["", "value"],
            [
                ["model", s["model"]],
                ["weights (sha256 prefix)", s["model_id"]],
                ["parameters", f"{n_params:,}"],
                ["images", f"{cfg.in_channels}×{cfg.image_size}×{cfg.image_size}"],
                ["classes", str(cfg.num_classes or "unconditional")],
                ["schedule", f"{sched.get('name')} (T = {sched.get('T')})"],
                ["prediction", s["prediction"]],
                ["training", _training_line(config)],
                ["sampling classes", str(s["class"] or "unconditional")],
                ["guidance", str(s["guidance"])],
                ["timesteps", s["spacing"]],
                ["seeds", f"image i uses seed {s['seed']} + i"],
            ],
            cls="meta",
        ),
    ]
    # Table 1
    parts.append("<h2>Table 1: sample quality against S and η</h2>")
    parts.append(
        f"<p>{settings.n} samples per cell, compared with {esc(str(reference.info.get('data')))} "
        f"({reference.info.get('n')} images) in the features of the {esc(extractor.name)}. "
        "Fréchet distance (FID's formula; lower is better), KID (lower is better), precision (share of samples "
        "on the data manifold) and recall (share of the data covered by the samples), k = 3 nearest neighbours. "
        "The <i>real data</i> row scores the same number of real images: the best a sampler can reach at this n.</p>"
    )
    if extractor.name != "Inception-V3 (FID)":
        parts.append(
            "<p class='note'>These distances are in the digit classifier's feature space, not Inception's: compare "
            "them with each other, not with published FIDs.</p>"
        )
    metrics = metric_names(cells)
    tables = []
    for m in metrics:
        head, body = _pivot(cells, m, floor if m != "accuracy" else None)
        tables.append(f"<div><h3>{esc(METRIC_LABELS[m])}</h3>{_table(head, body)}</div>")
    parts.append("<div class='flex'>" + "".join(tables) + "</div>")
    parts.append(_img(plot_table1(table1, meta1), "Table 1 metrics against S"))
    head, body = _pivot(cells, "images_per_s", None)
    parts.append(f"<h3>Images per second (sampling only, this machine)</h3>{_table(head, body, 3)}")
    parts.append(_img(_samples_figure(table1, work / "table1"), "samples per cell", "900px"))
    steps_p = sorted(PAPER_TABLE1[0.0])
    parts.append(
        "<h3 class='paper'>For comparison: the paper, CIFAR-10 FID (Inception), same DDPM weights</h3>"
        + _table(
            ["", *[f"S = {x}" for x in steps_p]],
            [[f"η = {e:g}"] + [PAPER_TABLE1[e][x] for x in steps_p] for e in PAPER_TABLE1]
            + [["σ̂"] + [PAPER_TABLE1_SIGMA_HAT[x] for x in steps_p]],
            cls="paper",
        )
        + "<p class='note'>Different data, model and feature space: compare trends (how the numbers move with S "
        "and η), not values.</p>"
    )
    # Table 2
    parts.append("<h2>Table 2: reconstruction error of DDIM inversion against S</h2>")
    parts.append(
        f"<p>{table2[0]['n'] if table2 else 0} real images the model did not train on ({esc(heldout_name)}) are "
        "encoded to x_T with S steps of the reversed DDIM ODE and decoded with the same S steps, with the null class "
        "(unconditional). Error: per-dimension MSE on [0, 1], as in the paper.</p>"
    )
    parts.append(
        _table(
            ["S", "NFE", "MSE", "± s.e.", "median", "images/s"],
            [[r["steps"], r["nfe"], r["mse"], r["mse_sem"], r["mse_median"], r["images_per_s"]] for r in table2],
        )
    )
    paper2 = PAPER_TABLE2
    parts.append(
        "<p class='paper'>The paper (CIFAR-10 test set): "
        + ", ".join(f"S = {k}: {v:g}" for k, v in paper2.items())
        + ".</p>"
    )
    parts.append("<div class='flex'>" + _img(plot_table2(table2), "MSE against S", "460px"))
    parts.append(_file_img(work / "table2" / "table2_examples.png", "inversion examples", "560px") + "</div>")
    # Trends beside the paper's
    t1 = {}
    for r in cells:
        if r["sampler"] == "ddim" and r["eta"] is not None:
            key = SIGMA_HAT if r["eta"] == SIGMA_HAT else float(r["eta"])
            t1.setdefault(key, {})[int(r["steps"])] = r["fd"]
    checks = trend_checks(t1, {int(r["steps"]): r["mse"] for r in table2})
    if checks:
        verdict = {True: "agrees", False: "differs", None: "n/a"}
        parts.append("<h3>The paper's trends, checked on this model</h3>")
        parts.append(
            _table(
                ["trend in the paper", "paper", "this model", ""],
                [[c["trend"], c["paper"], c["ours"], verdict[c["agree"]]] for c in checks],
                cls="meta",
            )
        )
    # Consistency
    ref = consistency["reference_steps"]
    parts.append("<h2>Consistency: the same x_T across S (§5.2)</h2>")
    parts.append(
        f"<p>{consistency['n']} noises x_T, each decoded with deterministic DDIM (η = 0) at every S. Distance: mean "
        f"|Δ| per pixel on [0, 1] to the S = {ref} image of the <i>same</i> x_T, against the distance to the "
        f"S = {ref} image of an <i>independent</i> x_T ({esc(consistency['baseline'])}). A small ratio means x_T, "
        "not S, decides what the image shows.</p>"
    )
    parts.append(
        _table(
            ["S", "same x_T", "independent x_T", "ratio"],
            [
                [r["steps"], r["same_xT"], r["independent_xT"], r["ratio"]]
                for r in consistency["rows"]
                if r["steps"] < ref
            ],
        )
    )
    parts.append(_file_img(work / "consistency" / "consistency.png", "consistency grid", "820px"))
    # Interpolation
    parts.append("<h2>Interpolation in x_T (§5.3)</h2>")
    parts.append(
        f"<p>Spherical interpolation between the noises of two seeds, {interpolation['frames']} frames decoded with "
        f"DDIM (η = 0, S = {interpolation['steps']}). Smoothness: the largest step between neighbouring frames over "
        f"the mean step (1 = perfectly even). Mean over strips <b>{interpolation['mean_ratio']:.2f}</b>, worst "
        f"<b>{interpolation['max_ratio']:.2f}</b>.</p>"
    )
    parts.append(_file_img(work / "interpolation" / "interpolation.png", "interpolation strips", "900px"))
    if edit is not None:
        from ddim.evaluation.edit import render_edit_section

        parts.extend(render_edit_section(edit, work / "edit"))
    if evidence is not None:
        from ddim.evaluation.evidence_report import render_evidence

        parts.extend(render_evidence(evidence, work))
    if straightness is not None:
        parts.extend(render_straightness(straightness))
    if few_calls is not None:
        parts.extend(render_few_calls(few_calls))
    # Reproduce
    model_flag = "" if s["model"] == "embedded default" else f" --model {s['model']}"
    cls = s["class"] if s["class"] is not None else "none"
    common = f"{model_flag} --class {cls} --guidance {s['guidance']} --spacing {s['spacing']} --seed {s['seed']}"
    steps_txt = ",".join(str(x) for x in settings.steps)
    etas_txt = ",".join(e if e == SIGMA_HAT else f"{e:g}" for e in settings.etas)
    cmds = [
        f"ddim eval table1{common} --steps {steps_txt} --eta {etas_txt} "
        f"--n {settings.n}" + (f" --features {feat}" if (feat := extractor.key.split("-")[0]) in KNOWN else ""),
        f"ddim eval table2{model_flag} --steps {steps_txt} --n {settings.table2_n}",
        f"ddim eval consistency{common} --steps {','.join(str(x) for x in settings.consistency_steps)} "
        f"--n {settings.consistency_n}",
        f"ddim eval interpolation{common} --pairs {settings.pairs} --frames {settings.frames} "
        f"--steps {settings.interpolation_steps}",
    ]
    if edit is not None:
        cmds.append(f"ddim eval edit{model_flag} --n {settings.edit_n} --steps {settings.edit_steps}")
    if few_calls is not None:
        runs = " ".join(f"--few-calls {x}" for x in settings.few_calls)
        cmds.append(f"ddim eval report{model_flag} --n {settings.n} {runs}  # the few-calls section is the report's")
    if evidence is not None:
        steps_sorted = sorted(settings.steps)
        mid = steps_sorted[len(steps_sorted) // 2]
        ws = ",".join(f"{w:g}" for w in settings.guidance_values)
        g_steps = ",".join(str(x) for x in (settings.guidance_steps or steps_sorted[:2]))
        d_etas = ",".join(f"{e:g}" for e in settings.etas if e != SIGMA_HAT)
        c_steps = ",".join(str(x) for x in (settings.cost_steps or steps_sorted))
        cmds += [
            f"ddim eval guidance{common} --guidances {ws} --steps {g_steps} --n {settings.n}",
            f"ddim eval diversity{common} --eta {d_etas} --sampler {','.join(settings.diversity_samplers)} "
            f"--steps {mid} --n {settings.n}",
            f"ddim eval memorization{common} --n {settings.n} --steps {mid}",
            f"ddim eval cost{common} --steps {c_steps} --batches {','.join(map(str, settings.cost_batches))} "
            f"--sampler {','.join(settings.cost_samplers)}",
        ]
    parts.append("<h2>Reproduce</h2><p>The same numbers, part by part (add <code>--out DIR</code>):</p><pre>")
    if straightness is not None:
        others = "".join(f" --model {m}" for m in settings.straightness)
        calls = ",".join(str(c) for c in settings.straightness_calls)
        cmds.append(
            f"ddim eval straightness --model {model_flag.split()[-1] if model_flag else 'default'}{others} "
            f"--paths {settings.straightness_paths} --n {settings.n} --calls {calls} --seed {s['seed'] + 1_000_000}"
        )
    parts.append(esc("\n".join(cmds)) + "</pre>")
    total = sum(timings.values())
    parts.append(
        "<p class='note'>Time for this page: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f" (total {total / 60:.1f} min; cached parts take ~0 s). Sampling time stored with the cached results: "
        + f"Table 1 {sum(r['seconds'] or 0 for r in cells):.0f} s, Table 2 {sum(r['seconds'] for r in table2):.0f} s. "
        + "Settings: "
        + esc(str(asdict(settings)))
        + "</p></body></html>"
    )
    return "\n".join(parts)
