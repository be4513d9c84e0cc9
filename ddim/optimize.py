"""Adaptive step selection: choose the S timesteps a sampler visits so that its samples land closest to
a fine reference solution of the same ODE, from the same noises.

The result is a plain descending list of ints, to reuse with ``ddim.sample(..., timesteps=...)`` or
``ddim sample --timesteps 999,...``. The search is a coordinate descent over integer timesteps
(a pattern search): starting from the best of a few fixed spacings, each interior timestep is moved
by ±δ while the error falls, with δ halving down to 1. Steps therefore migrate to where the model's
prediction changes fastest along the trajectories, where a step of fixed size costs the most error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ddim.prediction import Model
from ddim.sampling import SAMPLERS, nfe, sample
from ddim.schedule import NoiseSchedule
from ddim.solvers import STOCHASTIC_SAMPLERS
from ddim.timesteps import check_spacing
from ddim.timesteps import timesteps as make_timesteps

__all__ = ["optimize_timesteps", "trajectory_error"]

_NOT_ALLOWED = ("steps", "spacing", "timesteps", "sampler", "eta", "seeds", "callback", "stats", "progress")


def trajectory_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean squared difference of two batches of samples (float64 accumulation)."""
    return math.sqrt(float((a.double() - b.double()).pow(2).mean()))


def optimize_timesteps(
    model: Model,
    schedule: NoiseSchedule,
    steps: int,
    x_T: torch.Tensor,
    sampler: str = "ddim",
    *,
    reference: torch.Tensor | None = None,
    reference_sampler: str = "dpmpp_3m",
    reference_steps: int = 200,
    init: Sequence[str] = ("logsnr", "karras", "trailing", "linspace"),
    max_evals: int = 300,
    progress: bool = False,
    stats: dict[str, Any] | None = None,
    **sample_kwargs: Any,
) -> list[int]:
    """Choose ``steps`` timesteps for ``sampler`` that minimise the distance to a fine reference solution.

    Args:
        model, schedule: as :func:`ddim.sample`.
        steps: S, the number of listed timesteps to choose (network calls: ``ddim.nfe(sampler, S)``).
        x_T: [B, ...] training noises (e.g. ``ddim.randn(shape, range(8))``); a handful suffices, the
            result is meant for other noises.
        sampler: a deterministic sampler (not "ddpm" / "dpmpp_2m_sde").
        reference: the target samples for x_T; default: ``reference_sampler`` with ``reference_steps``
            log-SNR steps (default "dpmpp_3m", 200 steps: far closer to the exact ODE solution than any
            S-step run).
        init: spacings to start from; the best one on x_T (among those starting at t = T-1, the level of
            x_T) is the starting point, so the result is never worse than it on x_T.
        max_evals: budget of sampler runs in the search (each costs ``nfe(sampler, S)`` calls on x_T).
        progress: show a bar over the evaluations.
        stats: if a dict is given it is filled with "error" (RMS distance of the result to the reference
            on x_T), "start_error", "start_spacing", "errors" (spacing -> error), "evals" (sampler runs),
            "nfe" (network calls in all: reference + searches).
        sample_kwargs: passed to every :func:`ddim.sample` call (prediction, model_kwargs, guidance_scale,
            uncond_kwargs, clip_sample, set_alpha_to_one, …); not steps/spacing/timesteps/eta/seeds.

    Cost: ``reference_steps`` + (len(init) + evals) · nfe(sampler, S) network calls on the batch x_T, with
    evals ≤ ``max_evals``; for S = 10 the search typically stops after 100–250 runs.

    Returns:
        S strictly descending ints in [0, T-1] starting with T-1.
    """
    spec_ok = isinstance(sampler, str) and sampler in SAMPLERS
    if not spec_ok:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    for name, value in (("sampler", sampler), ("reference_sampler", reference_sampler)):
        if value in STOCHASTIC_SAMPLERS:
            raise ValueError(f"optimize_timesteps needs a deterministic {name}, not {value!r}")
    bad = sorted(set(sample_kwargs) & set(_NOT_ALLOWED))
    if bad:
        raise TypeError(f"optimize_timesteps does not take {', '.join(bad)} (the search sets them)")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 0:
        raise ValueError(f"max_evals must be an int >= 0, got {max_evals!r}")
    T = schedule.T
    starts = {name: make_timesteps(schedule, steps, check_spacing(name)).tolist() for name in init}
    starts = {k: v for k, v in starts.items() if v[0] == T - 1}
    if not starts:
        raise ValueError(f"none of the init spacings {list(init)} starts at t = T-1 = {T - 1} with {steps} steps")

    calls = 0
    if reference is None:
        ref_stats: dict[str, Any] = {}
        reference = sample(
            model,
            x_T,
            schedule,
            steps=reference_steps,
            spacing="logsnr",
            sampler=reference_sampler,
            stats=ref_stats,
            **sample_kwargs,
        )
        calls += ref_stats["nfe"]
    elif reference.shape != x_T.shape:
        raise ValueError(f"reference shape {tuple(reference.shape)} differs from x_T shape {tuple(x_T.shape)}")

    seen: dict[tuple[int, ...], float] = {}
    per_run = nfe(sampler, steps)
    bar = tqdm(total=max_evals, disable=not progress, desc=f"optimize {sampler} S={steps}", leave=False)

    def error(ts: Sequence[int]) -> float:
        nonlocal calls
        key = tuple(ts)
        if key not in seen:
            out = sample(model, x_T, schedule, timesteps=list(ts), sampler=sampler, **sample_kwargs)
            seen[key] = trajectory_error(out, reference)
            calls += per_run
            bar.update()
        return seen[key]

    errors = {name: error(ts) for name, ts in starts.items()}
    start = min(errors, key=errors.get)
    best, best_err = list(starts[start]), errors[start]
    n_start = len(seen)

    # Pattern search: move each interior timestep by ±δ while the error falls; halve δ when none does.
    delta = max(1, T // max(steps, 1) // 2)
    while delta >= 1 and len(seen) - n_start < max_evals:
        improved = False
        for k in range(1, steps):
            for sign in (-1, 1):
                while len(seen) - n_start < max_evals:
                    cand = list(best)
                    cand[k] += sign * delta
                    upper = cand[k - 1]
                    lower = cand[k + 1] if k + 1 < steps else -1
                    if not lower < cand[k] < upper:
                        break
                    e = error(cand)
                    if e >= best_err:
                        break
                    best, best_err, improved = cand, e, True
        if not improved:
            delta //= 2
    bar.close()
    if stats is not None:
        stats.update(
            error=best_err,
            start_error=errors[start],
            start_spacing=start,
            errors=errors,
            evals=len(seen),
            nfe=calls,
        )
    return best
