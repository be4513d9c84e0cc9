"""How straight a model's ODE paths are, and what that buys at 1, 2, 4, 8 Euler calls (``ddim eval straightness``).

Every model is compared in one coordinate system, the flow state z = x_t / (√ᾱ_t + √(1-ᾱ_t)) at flow time
τ = √(1-ᾱ_t) / (√ᾱ_t + √(1-ᾱ_t)) (:meth:`~ddim.schedule.NoiseSchedule.flow_times`): there the noising of a
fixed x₀ is the straight line z_τ = (1-τ) x₀ + τ ε and DDIM is the Euler method, for ε-, x₀-, v- and flow
models alike. A path whose x̂₀ never changes is a straight segment, and one Euler step lands on its end.

:func:`path_deviation` is the measure: the perpendicular distance of each path point from the chord between
the path's two ends, over the chord's length, averaged over τ ∈ [0, 1] (trapezoid rule on the path's grid).
0 for a straight path; a quarter circle traversed at uniform speed (the variance-preserving arc
x₀ cos θ + ε sin θ of orthogonal x₀, ε of equal norm) scores 2/π - 1/2 ≈ 0.137.
:func:`straightness` solves a model's ODE from n noises with a fine Euler (DDIM) grid and reports the
mean, standard deviation and largest per-path deviation.

:func:`few_step_rows`: per model and Euler call budget, the digit classifier's Fréchet distance to MNIST-5k
and the RMS on [0, 1] to a reference model's converged ODE map (DDIM at ``ref_steps``) from the same noises.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddim.schedule import NoiseSchedule

__all__ = [
    "FewCallRun",
    "ModelRun",
    "few_call_rows",
    "few_step_rows",
    "ode_path",
    "path_deviation",
    "straightness",
    "straightness_markdown",
]


def path_deviation(path: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Mean normalised deviation of each path from the chord between its ends, float64 [B].

    Args:
        path: [K, B, ...] states along the paths in the flow coordinate z, from the noise end (k = 0) to the
            data end (k = K-1), K ≥ 2.
        taus: [K] flow times of the states (descending or ascending; only differences are used).

    Returns:
        For path b: ∫ d_b(τ) dτ / (|τ_0 - τ_{K-1}| · ‖z_{K-1} - z_0‖), with d the distance of z(τ) from the line
        through z_0 and z_{K-1} (trapezoid rule). 0 for a straight path; 0 where the two ends coincide.
    """
    if path.ndim < 2 or path.shape[0] < 2:
        raise ValueError(f"path must be [K >= 2, B, ...], got shape {tuple(path.shape)}")
    taus = torch.as_tensor(taus, dtype=torch.float64)
    if taus.shape != (path.shape[0],):
        raise ValueError(f"taus must be [K={path.shape[0]}], got shape {tuple(taus.shape)}")
    p = path.to(torch.float64).flatten(2)  # [K, B, D]
    start, end = p[0], p[-1]
    chord = end - start
    length = chord.norm(dim=-1)  # [B]
    u = chord / length.clamp(min=1e-30)[:, None]
    rel = p - start
    along = (rel * u).sum(-1, keepdim=True)
    dist = (rel - along * u).norm(dim=-1)  # [K, B]
    dt = (taus[1:] - taus[:-1]).abs()[:, None]
    area = (0.5 * (dist[1:] + dist[:-1]) * dt).sum(0)
    span = (taus[-1] - taus[0]).abs().clamp(min=1e-30)
    return torch.where(length > 0, area / (span * length.clamp(min=1e-30)), torch.zeros_like(length))


def _flow_scale(ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, τ) of VP levels ᾱ: z = k·x, τ = k·√(1-ᾱ), float64."""
    a, s = ab.sqrt(), (1 - ab).clamp(min=0).sqrt()
    k = 1.0 / (a + s)
    return k, k * s


@dataclass
class ModelRun:
    """A model and how it samples: ``ddim.load``'s triple plus its guidance (None: its config's)."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    config: dict[str, Any]
    guidance: float | None = None

    def kwargs(self, labels: torch.Tensor | None) -> dict[str, Any]:
        """:func:`ddim.sample` settings: the model's prediction, clipping and guidance for ``labels``."""
        s = dict(self.config.get("sampling") or {})
        kw: dict[str, Any] = {"prediction": self.config["prediction"], "clip_sample": bool(s.get("clip_sample", False))}
        for key in ("use_clipped_model_output", "clip_sample_range", "set_alpha_to_one"):
            if key in s:
                kw[key] = s[key]
        k = int(getattr(self.model.config, "num_classes", 0) or 0)
        if k and labels is not None:
            kw["model_kwargs"] = {"y": labels}
            g = float(s.get("guidance", 1.0)) if self.guidance is None else float(self.guidance)
            if g != 1.0:
                kw.update(guidance_scale=g, uncond_kwargs={"y": torch.full_like(labels, k)})
        return kw


def _cached(cache: str | os.PathLike | None, run: ModelRun, what: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, or its stored result: a ``.pt`` file under ``cache`` keyed by the model's weights, its
    sampling settings and ``what`` (None: no cache)."""
    if cache is None:
        return compute()
    from ddim.checkpoint import atomic_write
    from ddim.evaluation.extractors import module_hash

    settings = run.kwargs(None)
    blob = json.dumps({"model": module_hash(run.model, 32), "settings": settings, "guidance": run.guidance, **what})
    path = Path(cache) / f"{what.get('kind', 'cell')}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError, ValueError):
            pass  # damaged: compute again
    value = compute()
    atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value


def _labels(run: ModelRun, n: int) -> torch.Tensor | None:
    k = int(getattr(run.model.config, "num_classes", 0) or 0)
    return torch.arange(n) % k if k else None


def _noise(run: ModelRun, n: int, seed: int) -> torch.Tensor:
    from ddim.noise import randn

    return randn((n, *run.model.config.sample_shape), range(seed, seed + n))


def ode_path(
    run: ModelRun, x_T: torch.Tensor, labels: torch.Tensor | None, *, steps: int = 100, spacing: str = "trailing"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's DDIM (Euler) path from x_T in the flow coordinate: ``(path [steps+1, B, ...], taus [steps+1])``.

    The states are those the network saw (step i at the listed timestep t_i) and the final x₀ (τ = 0).
    """
    from ddim.sampling import sample

    states: list[torch.Tensor] = []
    ts: list[int] = []

    def keep(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        states.append(x_t.detach().to(torch.float64).cpu())
        ts.append(int(t))

    with torch.inference_mode():
        x0 = sample(run.model, x_T, run.schedule, steps=steps, spacing=spacing, callback=keep, **run.kwargs(labels))
    k, tau = _flow_scale(run.schedule.alphas_cumprod[torch.tensor(ts)])
    shape = (-1, *([1] * x_T.ndim))
    path = torch.cat([torch.stack(states) * k.view(shape), x0.detach().to(torch.float64).cpu()[None]])
    return path, torch.cat([tau, torch.zeros(1, dtype=torch.float64)])


def straightness(
    run: ModelRun,
    *,
    n: int = 64,
    steps: int = 100,
    seed: int = 0,
    spacing: str = "trailing",
    batch: int = 64,
    cache: str | os.PathLike | None = None,
) -> dict[str, float]:
    """:func:`path_deviation` of the model's ODE paths from n noises (image i: seed ``seed + i``, class i mod K).

    Returns ``{"mean", "std", "max", "n", "steps"}`` over the n paths, each solved with DDIM (Euler) at
    ``steps`` steps of ``spacing`` (default 100 trailing: the first level is t = T-1). ``cache``: a folder
    keeping the per-path deviations (keyed by the weights and settings) for the next call. ``steps`` above the
    model's T is taken as T."""
    steps = min(int(steps), run.schedule.T)
    x_T, labels = _noise(run, n, seed), _labels(run, n)

    def compute() -> torch.Tensor:
        devs = []
        for a in range(0, n, batch):
            y = None if labels is None else labels[a : a + batch]
            path, taus = ode_path(run, x_T[a : a + batch], y, steps=steps, spacing=spacing)
            devs.append(path_deviation(path, taus))
        return torch.cat(devs)

    what = {"kind": "paths", "n": n, "steps": steps, "seed": seed, "spacing": spacing}
    d = _cached(cache, run, what, compute)
    return {
        "mean": d.mean().item(),
        "std": d.std().item() if n > 1 else 0.0,
        "max": d.max().item(),
        "n": n,
        "steps": steps,
    }


def _images(
    run: ModelRun,
    x_T: torch.Tensor,
    labels,
    *,
    steps: int,
    spacing: str,
    batch: int,
    sampler: str = "ddim",
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """The model's samples from x_T in [-1, 1]; ``seeds`` (one per image) seed a stochastic sampler's noise."""
    from ddim.diffusers_io import sampling_kwargs
    from ddim.sampling import sample

    timesteps = None
    if spacing == "optimized":  # the model's shipped list for this step count
        spacing, timesteps = (
            sampling_kwargs(run.config, run.schedule, steps, "optimized")[k] for k in ("spacing", "timesteps")
        )

    out = []
    for a in range(0, x_T.shape[0], batch):
        y = None if labels is None else labels[a : a + batch]
        with torch.inference_mode():
            out.append(
                sample(
                    run.model,
                    x_T[a : a + batch],
                    run.schedule,
                    steps=steps,
                    spacing=spacing,
                    timesteps=timesteps,
                    sampler=sampler,
                    seeds=None if seeds is None else list(seeds[a : a + batch]),
                    **run.kwargs(y),
                )
            )
    return torch.cat(out).clamp(-1, 1)


def few_step_rows(
    runs: Mapping[str, ModelRun],
    reference: str,
    *,
    calls: Sequence[int] = (1, 2, 4, 8),
    n: int = 200,
    seed: int = 0,
    spacing: str = "trailing",
    ref_steps: int = 200,
    ref_spacing: str = "leading",
    extra_reference_steps: Sequence[int] = (50,),
    batch: int = 100,
    cache: str | os.PathLike | None = None,
    extractor: Any = None,
    real: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Fréchet distance (digit classifier, against MNIST-5k), accuracy and RMS on [0, 1] to the reference map.

    Args:
        runs: name -> :class:`ModelRun`; every model samples the same n noises (seed + i) and classes i mod K.
        reference: the name in ``runs`` whose DDIM at ``ref_steps`` (``ref_spacing``) is the converged map.
        calls: Euler (DDIM) step counts, on ``spacing`` (default trailing: every run starts at t = T-1).
        extra_reference_steps: also a row of the reference model's DDIM at these steps on ``ref_spacing``
            (these and ``ref_steps`` are capped at the reference model's T).
        cache: a folder keeping every run's images (keyed by the weights and settings) for the next call.
        extractor, real: a :class:`~ddim.evaluation.extractors.FeatureExtractor` and the real images' features
            [M, D] to measure against (default: the shipped digit classifier and MNIST-5k; accuracy is NaN
            for an extractor that does not classify).

    Returns:
        One dict per row: model, sampler, spacing, steps, calls (network calls per image: guided calls count
        two), fd, accuracy, rms.
    """
    ref_run = runs[reference] if reference in runs else None
    specs = [FewCallRun(name, "ddim", int(c), spacing) for name in runs for c in calls]
    if ref_run is not None:
        specs += [
            FewCallRun(reference, "ddim", min(int(s), ref_run.schedule.T), ref_spacing) for s in extra_reference_steps
        ]
    rows = few_call_rows(
        runs, specs, reference, n=n, seed=seed, ref_steps=ref_steps, ref_spacing=ref_spacing, batch=batch,
        cache=cache, extractor=extractor, real=real,
    )  # fmt: skip
    for r in rows:
        r["sampler"] = "ddim (Euler)"
    return rows


@dataclass(frozen=True)
class FewCallRun:
    """One row of :func:`few_call_rows`: a model (its name in ``runs``), a sampler, its steps and spacing
    (None: the model's own, ``config["sampling"]["spacing"]``, else "leading", as ``ddim sample``)."""

    model: str
    sampler: str
    steps: int
    spacing: str | None = None

    @classmethod
    def parse(cls, text: str) -> FewCallRun:
        """``MODEL:SAMPLER:STEPS[:SPACING]``, e.g. ``pd4:ddim:4``, ``default:dpmv3:5:trailing``."""
        parts = text.split(":")
        if len(parts) not in (3, 4) or not all(parts[:3]):
            raise ValueError(
                f"{text!r} is not MODEL:SAMPLER:STEPS[:SPACING] (e.g. pd4:ddim:4, default:dpmv3:5:trailing)"
            )
        from ddim.registry import SAMPLERS
        from ddim.timesteps import SPACINGS

        if parts[1] not in SAMPLERS:
            raise ValueError(f"{text!r}: unknown sampler {parts[1]!r}; valid: {', '.join(sorted(SAMPLERS))}")
        try:
            steps = int(parts[2])
        except ValueError:
            steps = 0
        if steps < 1:
            raise ValueError(f"{text!r}: STEPS must be an int >= 1, got {parts[2]!r}")
        spacing = parts[3] if len(parts) == 4 and parts[3] else None
        if spacing is not None and spacing not in (*SPACINGS, "optimized"):
            raise ValueError(f"{text!r}: unknown spacing {spacing!r}; valid: {', '.join(sorted(SPACINGS))}, optimized")
        return cls(parts[0], parts[1], steps, spacing)


def few_call_rows(
    runs: Mapping[str, ModelRun],
    specs: Sequence[FewCallRun],
    reference: str,
    *,
    n: int = 200,
    seed: int = 0,
    ref_steps: int = 200,
    ref_spacing: str = "leading",
    batch: int = 100,
    cache: str | os.PathLike | None = None,
    extractor: Any = None,
    real: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Models × samplers at a few network calls from the same noises: Fréchet distance, accuracy, RMS to a map.

    Args:
        runs: name -> :class:`ModelRun`; every row samples the same n noises (image i: seed + i, class i mod K).
        specs: the rows, each a :class:`FewCallRun` naming a model of ``runs``.
        reference: the name in ``runs`` whose DDIM at ``ref_steps`` (``ref_spacing``, capped at its T) is the
            converged ODE map that "rms" measures against.
        cache, extractor, real: as :func:`few_step_rows`.

    Returns:
        One dict per spec: model, sampler, spacing, steps, calls (network calls per image: a guided call counts
        two), fd, accuracy, rms (on [0, 1]).
    """
    from ddim.metrics import frechet_distance
    from ddim.registry import nfe

    if reference not in runs:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(runs)}")
    unknown = sorted({sp.model for sp in specs} - set(runs))
    if unknown:
        raise ValueError(f"runs name models {unknown} that are not among {sorted(runs)}")
    if (extractor is None) != (real is None):
        raise ValueError("give both extractor and real (the real images' features), or neither")
    if extractor is None:
        from ddim.data import mnist5k
        from ddim.evaluation.extractors import classifier_extractor

        extractor = classifier_extractor()
        real = extractor(mnist5k().images)
    ref_run = runs[reference]
    x_T = _noise(ref_run, n, seed)

    def images(run: ModelRun, sampler: str, steps: int, sp: str) -> torch.Tensor:
        y = _labels(run, n)
        what = {"kind": "images", "n": n, "seed": seed, "steps": steps, "spacing": sp}
        if sampler != "ddim":
            what["sampler"] = sampler
        return _cached(
            cache,
            run,
            what,
            lambda: _images(
                run, x_T, y, steps=steps, spacing=sp, batch=batch, sampler=sampler, seeds=range(seed, seed + n)
            ),
        )

    ref = (images(ref_run, "ddim", min(ref_steps, ref_run.schedule.T), ref_spacing) + 1) / 2
    rows = []
    for spec in specs:
        run = runs[spec.model]
        from ddim.diffusers_io import model_spacing

        sp = spec.spacing or model_spacing(run.config, spec.steps)
        y = _labels(run, n)
        x = images(run, spec.sampler, spec.steps, sp)
        feats, pred = extractor.features_and_predictions(x)
        guided = "uncond_kwargs" in run.kwargs(y if y is not None else None)
        rows.append(
            {
                "model": spec.model,
                "sampler": spec.sampler,
                "spacing": sp,
                "steps": spec.steps,
                "calls": nfe(spec.sampler, spec.steps) * (2 if guided else 1),
                "fd": frechet_distance(feats, real),
                "accuracy": (pred == y).float().mean().item() if y is not None and pred is not None else float("nan"),
                "rms": ((x + 1) / 2 - ref).pow(2).mean().sqrt().item(),
            }
        )
    return rows


def straightness_markdown(deviations: Mapping[str, dict[str, float]], rows: Sequence[dict[str, Any]]) -> str:
    """The two tables of ``ddim eval straightness`` as Markdown."""
    lines = ["| model | path deviation (mean) | std | max | paths | Euler steps |", "|---|---:|---:|---:|---:|---:|"]
    for name, d in deviations.items():
        lines.append(f"| {name} | {d['mean']:.4f} | {d['std']:.4f} | {d['max']:.4f} | {d['n']} | {d['steps']} |")
    if rows:
        lines += [
            "",
            "| model | sampler | spacing | steps | network calls | Fréchet distance | accuracy | RMS to map |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['sampler']} | {r['spacing']} | {r['steps']} | {r['calls']} | {r['fd']:.2f} "
                f"| {r['accuracy']:.3f} | {r['rms']:.4f} |"
            )
    return "\n".join(lines)
