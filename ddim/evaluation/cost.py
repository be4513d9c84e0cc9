"""What sampling costs: wall time, network calls and peak memory against steps S and batch size, per sampler.

One cell per (sampler, S, batch): a warm run (caches built, as in any later call), then ``repeats``
timed runs of :func:`ddim.generate.generate` on ``batch`` images (image i from seed i). Measured:

- ``seconds``: the fastest run's wall time; ``images_per_s``; ``ms_per_call``.
- ``calls``: forward calls the network received (counted at the network, so classifier-free
  guidance's doubled batch shows up in ``rows_per_image``, the rows per image in each call), against
  ``nfe`` (:func:`ddim.nfe`: evaluations per image the sampler promises).
- ``peak_mb``: memory the run needed above what the process held before it. On CUDA,
  ``torch.cuda.max_memory_allocated`` (reset before the run) less the memory allocated before; on
  the CPU, the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) less its
  resident set before. glibc's heap is set to give large blocks back to the system (a fixed
  ``mmap`` threshold) and trimmed before each run (``malloc_trim``), so memory freed earlier does not
  hide a run's needs; the model's weights and torch's own buffers are in the baseline, not in ``peak_mb``.

Cells are cached as JSON in ``out/cells/`` (keyed by every setting and the device): a rerun measures
only what is missing; delete the folder to measure again (times are this machine's).

Written: ``cost.csv``, ``cost.md`` (tables and, for each sampler, whether memory depends on S),
``cost.png`` (time and memory against S, a line per batch size) and ``cost.json``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ddim.evaluation.common import (
    EvalSetup,
    Progress,
    _digest,
    fig_png,
    fmt,
    markdown_table,
    pyplot,
    write_csv,
    write_json,
    write_text,
)
from ddim.generate import generate, sample_shape
from ddim.sampling import SAMPLERS
from ddim.sampling import nfe as sampler_nfe

__all__ = ["COLUMNS", "check_grid", "measure_cell", "run_cost", "memory_verdicts", "write_cost"]

COLUMNS = (
    "sampler",
    "steps",
    "batch",
    "nfe",
    "calls",
    "rows_per_image",
    "seconds",
    "images_per_s",
    "ms_per_call",
    "peak_mb",
    "memory",
    "device",
)
#: Memory growth from the fewest to the most steps below this (MiB, and share) counts as "does not depend".
FLAT_MB, FLAT_SHARE = 2.0, 0.10


def check_grid(values: Sequence[Any], name: str, *, minimum: float | None = None, integer: bool = False) -> list:
    """``values`` as a list, refused (ValueError naming ``name``) when empty, repeated, or out of range."""
    values = list(values)
    if not values:
        raise ValueError(f"{name} must name at least one value")
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{name} repeats {seen[0]!r}: name each value once")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"{name} must hold numbers, got {v!r}")
        if integer and int(v) != v:
            raise ValueError(f"{name} must hold integers, got {v!r}")
        if minimum is not None and v < minimum:
            raise ValueError(f"{name} values must be >= {minimum:g}, got {v!r}")
    return values


def check_samplers(samplers: Sequence[str], name: str = "samplers") -> list[str]:
    """Known, unrepeated sampler names, else ValueError naming the valid ones."""
    samplers = list(samplers)
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise ValueError(f"{name}: unknown {bad or samplers!r}; valid: {', '.join(sorted(SAMPLERS))}")
    rep = [s for i, s in enumerate(samplers) if s in samplers[:i]]
    if rep:
        raise ValueError(f"{name} repeats {rep[0]!r}: name each sampler once")
    return samplers


# ------------------------------------------------------------------ memory
def _glibc_give_back() -> bool:
    """Make glibc ``mmap`` blocks of 128 KiB and more and give them back on free (no dynamic threshold)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``), so the baseline holds none."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _PeakMemory:
    """Peak memory of a block above the memory before it, in MiB (None where it cannot be measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda allocated" if device.type == "cuda" else "RSS"
        self.mb: float | None = None

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _trim()
            self.ok = _reset_peak_rss()
            self.base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.ok and self.base is not None:
            peak = _status_kb("VmHWM")
            self.mb = None if peak is None else max(0, peak - self.base) / 1024


# ------------------------------------------------------------------ one cell
class _CountingModel(torch.nn.Module):
    """The network with a counter of forward calls and of the rows (images) they carried."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.calls = 0
        self.rows = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.rows += int(x.shape[0])
        return self.model(x, t, *args, **kwargs)


def measure_cell(
    setup: EvalSetup, *, sampler: str, steps: int, batch: int, eta: float = 0.0, repeats: int = 1
) -> dict[str, Any]:
    """Time, network calls and peak memory of sampling ``batch`` images with ``steps`` steps (see the module).

    Returns a row with the keys of :data:`COLUMNS` (``memory``: "RSS" or "cuda allocated")."""
    device = torch.device(setup.device)
    net = _CountingModel(setup.model)
    labels = setup.labels(batch)
    spacing, timesteps = setup.step_times(steps)
    kwargs = dict(
        n=batch,
        seed=setup.seed,
        labels=labels,
        guidance=setup.guidance,
        steps=steps,
        eta=eta if sampler == "ddim" else (1.0 if sampler == "ddpm" else 0.0),
        spacing=spacing,
        timesteps=timesteps,
        sampler=sampler,
        prediction=setup.prediction,
        clip_sample=setup.clip_sample,
        batch=batch,
        device=device,
        image_shape=None,
    )
    generate(net, setup.schedule, **{**kwargs, "n": 1, "labels": labels[:1], "batch": 1})  # warm-up
    best, peak = float("inf"), None
    for _ in range(max(1, repeats)):
        net.calls = net.rows = 0
        with _PeakMemory(device) as mem:
            tic = time.perf_counter()
            r = generate(net, setup.schedule, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - tic
        if not torch.isfinite(r.images).all():
            raise FloatingPointError(f"{sampler} S={steps} batch={batch}: the samples are not finite")
        del r
        best = min(best, seconds)
        peak = mem.mb if peak is None or (mem.mb is not None and mem.mb > peak) else peak
    calls, rows = net.calls, net.rows
    return {
        "sampler": sampler,
        "steps": int(steps),
        "batch": int(batch),
        "nfe": sampler_nfe(sampler, steps),
        "calls": calls,
        "rows_per_image": rows / (calls * batch) if calls else None,
        "seconds": best,
        "images_per_s": batch / best if best > 0 else None,
        "ms_per_call": 1000 * best / calls if calls else None,
        "peak_mb": peak,
        "memory": mem.kind,
        "device": str(device),
    }


def _cell_file(setup: EvalSetup, folder: Path, sampler: str, steps: int, batch: int, eta: float, repeats: int) -> Path:
    key = {**setup.describe(), "sampler": sampler, "steps": steps, "batch": batch, "eta": eta, "repeats": repeats}
    key.update(device=setup.device, torch=torch.__version__, threads=torch.get_num_threads())
    key.pop("model")
    return folder / f"{sampler}-S{steps}-B{batch}-{_digest(key)}.json"


def run_cost(
    setup: EvalSetup,
    out: str | os.PathLike,
    *,
    steps: Sequence[int] = (10, 20, 50, 100),
    batches: Sequence[int] = (1, 16, 64),
    samplers: Sequence[str] = ("ddim", "ddpm", "dpmpp_2m"),
    eta: float = 0.0,
    repeats: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure (or read from ``out/cells``) every (sampler, S, batch) cell and write the cost files.

    ``eta`` applies to "ddim" (others run at their own: ddpm η = 1, the rest 0). Returns the rows
    (the keys of :data:`COLUMNS`). Raises ValueError for repeated or invalid grid values.
    """
    steps = [int(s) for s in check_grid(steps, "steps", minimum=1, integer=True)]
    batches = [int(b) for b in check_grid(batches, "batch sizes", minimum=1, integer=True)]
    samplers = check_samplers(samplers)
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    T = len(setup.schedule.alphas_cumprod)
    if max(steps) > T:
        raise ValueError(f"steps must be at most the model's T = {T}, got {max(steps)}")
    out = Path(out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    grid = [(s, st, b) for s in samplers for b in batches for st in steps]
    files = {c: _cell_file(setup, cells_dir, c[0], c[1], c[2], eta, repeats) for c in grid}
    work = {c: (repeats * c[2] + 1) * sampler_nfe(c[0], c[1]) for c in grid}
    done = sum(w for c, w in work.items() if files[c].is_file())
    bar = Progress(sum(work.values()), done, desc="cost", enabled=progress)
    give_back = setup.device == "cpu" and _glibc_give_back()
    rows = []
    try:
        for c in grid:
            sampler, s, b = c
            if files[c].is_file():
                rows.append(json.loads(files[c].read_text()))
                continue
            bar.describe(f"{sampler} S={s} batch={b}")
            row = measure_cell(setup, sampler=sampler, steps=s, batch=b, eta=eta, repeats=repeats)
            write_json(files[c], row)
            rows.append(row)
            bar.update(work[c])
    finally:
        bar.close()
    meta = {
        "setup": setup.describe(),
        "steps": steps,
        "batches": batches,
        "samplers": samplers,
        "eta": eta,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "glibc_gives_back": give_back,
        "sample_numel": int(torch.Size(sample_shape(setup.model)).numel()),
    }
    write_cost(rows, out, meta)
    return rows


# ------------------------------------------------------------------ reading the numbers
def memory_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (sampler, batch): peak memory at the fewest and most steps and whether it depends on S
    (it does when it grows by more than :data:`FLAT_MB` MiB and :data:`FLAT_SHARE` of itself)."""
    out = []
    for sampler, b in dict.fromkeys((r["sampler"], r["batch"]) for r in rows):
        cells = sorted((r for r in rows if r["sampler"] == sampler and r["batch"] == b), key=lambda r: r["steps"])
        lo, hi = cells[0], cells[-1]
        if len(cells) < 2 or lo["peak_mb"] is None or hi["peak_mb"] is None:
            continue
        grow = hi["peak_mb"] - lo["peak_mb"]
        depends = grow > FLAT_MB and grow > FLAT_SHARE * max(lo["peak_mb"], 1e-9)
        out.append(
            {
                "sampler": sampler,
                "batch": b,
                "steps_lo": lo["steps"],
                "steps_hi": hi["steps"],
                "mb_lo": lo["peak_mb"],
                "mb_hi": hi["peak_mb"],
                "depends": depends,
            }
        )
    return out


def _noisy(sampler: str, eta: float) -> bool:
    return sampler == "ddpm" or sampler.endswith("_sde") or (sampler == "ddim" and eta > 0)


def verdict_sentences(rows: list[dict[str, Any]], eta: float = 0.0, sample_numel: int | None = None) -> list[str]:
    """Plain sentences on whether memory depends on S, per sampler (largest batch measured).

    ``sample_numel``: values per sample (C·H·W), to state the size of the pre-drawn step noise."""
    lines = []
    verdicts = memory_verdicts(rows)
    for sampler in dict.fromkeys(v["sampler"] for v in verdicts):
        v = max((v for v in verdicts if v["sampler"] == sampler), key=lambda v: v["batch"])
        word = "grows with" if v["depends"] else "does not measurably depend on"
        text = (
            f"**{sampler}**: peak memory {word} the number of steps (batch {v['batch']}: {v['mb_lo']:.1f} MiB at "
            f"S = {v['steps_lo']}, {v['mb_hi']:.1f} MiB at S = {v['steps_hi']})."
        )
        if _noisy(sampler, eta):
            text += " Its step noise for the whole run is drawn before the loop: S·B·values·4 bytes (capped at 64 MiB)"
            if sample_numel:
                mb = [min(64.0, s * v["batch"] * sample_numel * 4 / 2**20) for s in (v["steps_lo"], v["steps_hi"])]
                text += f", {mb[0]:.1f} → {mb[1]:.1f} MiB here"
            text += ", the part of its memory that grows with S."
        else:
            text += " It keeps a fixed number of tensors whatever S (deterministic: no step noise is drawn)."
        lines.append(text)
    if rows:
        same = all(r["calls"] == r["nfe"] for r in rows)
        lines.append(
            "Network forward calls equal the sampler's NFE in every cell, whatever the batch size."
            if same
            else "Network forward calls differ from the NFE in some cells: see the calls table."
        )
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            b = max(r["batch"] for r in rows if r["sampler"] == sampler)
            cells = sorted((r for r in rows if r["sampler"] == sampler and r["batch"] == b), key=lambda r: r["steps"])
            if len(cells) >= 2 and cells[0]["seconds"] > 0:
                lo, hi = cells[0], cells[-1]
                lines.append(
                    f"{sampler}, batch {b}: {hi['seconds'] / lo['seconds']:.1f}× the time for "
                    f"{hi['steps'] / lo['steps']:.1f}× the steps (S = {lo['steps']} → {hi['steps']})."
                )
        batches = sorted({r["batch"] for r in rows})
        if len(batches) >= 2:
            s_hi = max(r["steps"] for r in rows)
            by = {(r["sampler"], r["batch"]): r["peak_mb"] for r in rows if r["steps"] == s_hi}
            pairs = [
                f"{sa} {by[(sa, batches[0])]:.1f} → {by[(sa, batches[-1])]:.1f} MiB"
                for sa in dict.fromkeys(r["sampler"] for r in rows)
                if by.get((sa, batches[0])) is not None and by.get((sa, batches[-1])) is not None
            ]
            if pairs:
                lines.append(f"From batch {batches[0]} to {batches[-1]} at S = {s_hi}: " + "; ".join(pairs) + ".")
    return lines


def markdown_cost(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta.get("setup", {})
    kind = rows[0]["memory"] if rows else "RSS"
    lines = [
        "# Cost: time, network calls and memory against steps and batch size",
        "",
        f"Model `{s.get('model')}` (weights {s.get('model_id')}), class `{s.get('class')}`, guidance "
        f"{s.get('guidance')}, {s.get('spacing')} timesteps, device `{rows[0]['device'] if rows else '?'}`, "
        f"{meta.get('threads')} CPU threads; fastest of {meta.get('repeats')} run(s) after a warm-up. Peak memory "
        f"(MiB): {'the peak RSS (VmHWM) of the run' if kind == 'RSS' else 'torch.cuda.max_memory_allocated'} "
        "less the memory held before it (the weights are in that baseline).",
        "",
        "## Does memory depend on the number of steps?",
        "",
    ]
    lines += [f"- {t}" for t in verdict_sentences(rows, float(meta.get("eta", 0.0)), meta.get("sample_numel"))]
    lines.append("")
    steps = sorted({r["steps"] for r in rows})
    for metric, label in (
        ("seconds", "Wall time per batch (s)"),
        ("peak_mb", "Peak memory above baseline (MiB)"),
        ("calls", "Network forward calls per batch"),
    ):
        lines += [f"## {label}", ""]
        body = []
        for sampler, b in dict.fromkeys((r["sampler"], r["batch"]) for r in rows):
            by = {r["steps"]: r for r in rows if r["sampler"] == sampler and r["batch"] == b}
            body.append([f"{sampler}, batch {b}"] + [by[st][metric] if st in by else None for st in steps])
        lines.append(markdown_table(["", *[f"S = {st}" for st in steps]], body))
    rpi = sorted({fmt(r["rows_per_image"]) for r in rows})
    lines.append(
        f"Network rows per image in each call: {', '.join(rpi)} (2 = classifier-free guidance's conditional and "
        "unconditional rows in one batch)."
    )
    return "\n".join(lines) + "\n"


def plot_cost(rows: list[dict[str, Any]], path: str | os.PathLike | None = None) -> bytes:
    """Time and peak memory against S (log-log), a panel per sampler, a line per batch size."""
    plt = pyplot()
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    fig, axes = plt.subplots(2, len(samplers), figsize=(3.2 * len(samplers), 5.4), squeeze=False)
    batches = sorted({r["batch"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for j, sampler in enumerate(samplers):
        for k, b in enumerate(batches):
            mine = [r for r in rows if r["sampler"] == sampler and r["batch"] == b]
            pts = sorted((r["steps"], r["seconds"], r["peak_mb"]) for r in mine)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            color = cmap(k / max(1, len(batches) - 1) * 0.85)
            axes[0][j].plot(xs, [p[1] for p in pts], "o-", ms=3, color=color, label=f"batch {b}")
            axes[1][j].plot(xs, [p[2] or 0 for p in pts], "o-", ms=3, color=color, label=f"batch {b}")
        axes[0][j].set_title(sampler, fontsize=10)
        axes[0][j].set_xscale("log")
        axes[0][j].set_yscale("log")
        axes[1][j].set_xscale("log")
        axes[1][j].set_xlabel("steps S")
        for i in range(2):
            axes[i][j].grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("seconds per batch")
    axes[1][0].set_ylabel("peak memory above baseline (MiB)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig_png(fig, path)


def write_cost(rows: list[dict[str, Any]], out: str | os.PathLike, meta: dict[str, Any]) -> list[Path]:
    """cost.csv, cost.md, cost.png and cost.json in ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "cost.csv", out / "cost.md", out / "cost.png", out / "cost.json"]
    write_csv(paths[0], rows, COLUMNS)
    write_text(paths[1], markdown_cost(rows, meta))
    plot_cost(rows, paths[2])
    write_json(paths[3], {"meta": meta, "rows": rows, "verdicts": memory_verdicts(rows)})
    return paths
