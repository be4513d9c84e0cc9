"""DDIM inversion (x_0 -> x_T along the η = 0 ODE, the sampler's timesteps reversed): plain explicit
Euler, and exact inversion by fixed-point iteration (its loop, BDIA and :func:`round_trip` are in
:mod:`ddim.exact_inversion`, re-exported here)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ddim import engine
from ddim.arguments import check_bool, check_x, in_model_dtype, no_grad, resolve_timesteps
from ddim.exact_inversion import (
    BDIA_GAMMA,
    INVERSIONS,
    bdia_invert,
    bdia_sample,
    call_budget,
    front_loaded,
    round_trip,
    solve_fixed_point,
)
from ddim.prediction import Denoiser, Model, check_prediction
from ddim.registry import Callback, Levels, progress_bar
from ddim.schedule import NoiseSchedule

__all__ = [
    "BDIA_GAMMA",
    "INVERSIONS",
    "bdia_invert",
    "bdia_sample",
    "call_budget",
    "front_loaded",
    "invert",
    "inversion_table",
    "round_trip",
    "solve_fixed_point",
]

#: Methods of :func:`invert`: plain DDIM (explicit Euler) and exact fixed-point inversion. (Every method,
#: BDIA's coupled pair included, is :data:`INVERSIONS`, run both ways by :func:`round_trip`.)
INVERT_METHODS = ("ddim", "fixed_point")


def inversion_table(levels: Levels, eta: float = 0.0, variance: str = "eta") -> torch.Tensor:
    """The engine's table of plain DDIM inversion over ``levels`` (ᾱ_{-1} = 1, ᾱ_{s_0}, …, ᾱ_{s_{N-1}}):
    step k is x_{s_k} = √ᾱ_{s_k} x̂₀ + √(1-ᾱ_{s_k}) ε̂, columns (a, b, c, σ); step 0 starts at ᾱ = 1, where
    x̂₀ = x_0 is the network's input itself: (√ᾱ_{s_0}, 0, √(1-ᾱ_{s_0}), 0)."""
    ab = levels.alpha_bars[1:]
    a, b = ab.sqrt(), (1.0 - ab).sqrt()
    on_x = torch.zeros_like(a)
    on_x[0] = a[0]
    on_x0 = a.clone()
    on_x0[0] = 0.0
    return torch.stack([on_x, on_x0, b, torch.zeros_like(a)], dim=1)


_PLAIN = engine.Method("invert", inversion_table, final_x0=False)


@no_grad
def invert(
    model: Model,
    x_0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    spacing: str = "leading",
    timesteps: Sequence[int] | torch.Tensor | None = None,
    prediction: str = "epsilon",
    model_kwargs: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    guidance_scale: float = 1.0,
    uncond_kwargs: Mapping[str, Any] | None = None,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    stats: dict[str, Any] | None = None,
    method: str = "ddim",
    tol: float = 1e-6,
    max_iter: int | Sequence[int] = 4,
) -> torch.Tensor:
    """DDIM inversion: run the η = 0 ODE forward, x_0 -> x_T, mirroring :func:`sample` on the same timesteps.

    With the listed timesteps ascending, s_0 < s_1 < … < s_{N-1} (the sampler's list reversed),
    step k goes from the current level to ᾱ_{s_k}:

        x_{s_k} = √ᾱ_{s_k} x̂₀ + √(1-ᾱ_{s_k}) ε̂

    - k ≥ 1: (x̂₀, ε̂) from the network at the current point x_{s_{k-1}} with its own timestep s_{k-1}
      (explicit Euler in the ODE's natural variables; the sampler's step s_k -> s_{k-1} uses ε̂ at s_k).
    - k = 0 starts at ᾱ = 1, where there is no timestep to give the network. x̂₀ = x_0 exactly, and
      ε̂ = the network's ε̂ at (x_0, s_0), the smallest listed timestep: the closest level the network
      was trained on, and the very timestep the sampler's last step (s_0 -> ᾱ = 1) evaluates. The error
      this makes is O(√(1-ᾱ_{s_0})), small and shrinking as s_0 -> 0.

    The output is at level ᾱ_{s_{N-1}} (the largest listed t), ready for ``sample(..., timesteps=same)``;
    the round trip error falls as steps grow (the ODE is solved to first order).

    ``method="fixed_point"`` (exact inversion) instead solves, at every step, for the x_{s_k} whose DDIM
    step (Song et al. Eq. 12, η = 0, exactly as :func:`sample` takes it) lands on the current sample:
    fixed-point iteration with Anderson(1) acceleration, started from the plain step, a sample stopping
    once an update moved it by at most ``tol`` (max-abs, data units, default 1e-6), step k making at
    most ``max_iter`` calls (an int for every step, default 4, or a list of N caps in inversion order,
    e.g. :func:`ddim.exact_inversion.front_loaded`, which spends more where convergence is slowest: the first
    steps out of the data). The loop and its measurements: :func:`ddim.exact_inversion.solve_fixed_point`,
    docs/inversion.md. A run costs at most Σ caps network calls (plain: N). Decoding the result with
    ``sample(..., timesteps=same, set_alpha_to_one=True)`` and the same prediction, guidance and
    ``model_kwargs`` returns x_0 up to the tolerance (times the sampler's error growth) and rounding.
    Clipping of x̂₀ makes the step non-invertible where it engages: there the iteration can only
    approach the step's range.

    Args: as :func:`sample` (x_0 [B, ...] floating; no noise or eta). ``clip_sample``/``clip_sample_range``
    clamp x̂₀ as diffusers' ``DDIMInverseScheduler`` does (default off: clipping makes the map
    non-invertible); ``use_clipped_model_output`` as in :func:`sample`. ``callback(k, t, x, x0_pred)``
    gets the timestep t the network saw at step k and the point x it saw (with "fixed_point", at every
    call). ``stats`` gets "nfe" (network calls: N for "ddim"), "timesteps" (ascending), "sampler" and
    "method"; with "fixed_point" also "iterations" (list of N ints: calls made by step k's iteration)
    and "change" (list of N floats: the largest max-abs change of the last update of step k, over the
    batch). ``method``: "ddim" (default) or "fixed_point" (BDIA has its own sampler:
    :func:`ddim.exact_inversion.bdia_invert`); ``tol`` (float ≥ 0) and ``max_iter`` (int ≥ 1, or a list of N)
    are validated always and used by "fixed_point" only. Runs under ``torch.no_grad()``.

    Returns:
        x_T shaped like x_0.
    """
    check_x(x_0, "x_0")
    x_0, out_dtype = in_model_dtype(model, x_0)
    check_prediction(prediction)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    ts = torch.flip(resolve_timesteps(schedule, steps, spacing, timesteps), dims=[0])  # ascending
    N = ts.numel()
    check_bool(clip_sample, "clip_sample")
    if method not in INVERT_METHODS:
        raise ValueError(f"unknown inversion method {method!r}; valid: {', '.join(INVERT_METHODS)} (BDIA: bdia_invert)")
    tol, _ = _check_iteration(tol, 1)
    caps = call_budget(max_iter, N)
    denoise = Denoiser(
        model,
        schedule,
        prediction,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        use_clipped_model_output=use_clipped_model_output,
        guidance_scale=guidance_scale,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
    )
    if method == "fixed_point":
        plan = denoise.plan(ts, x_0)  # refuses ε-prediction at ᾱ = 0 before any call
        fp_stats: dict[str, Any] = {}
        with progress_bar(N, progress, "invert") as bar:
            x = solve_fixed_point(
                denoise, x_0, plan, schedule.alphas_cumprod[ts], tol=tol, max_iter=caps, callback=callback,
                update=bar.update, stats=fp_stats,
            )  # fmt: skip
        denoise.finish(plan)
        if stats is not None:
            stats.update(nfe=denoise.nfe, timesteps=ts.tolist(), sampler="invert", method=method, **fp_stats)
        return x if out_dtype is None else x.to(out_dtype)
    # step k from ᾱ_{s_{k-1}} (ᾱ_{-1} = 1) to ᾱ_{s_k}, the network at s_{k-1} (at s_0 for k = 0)
    evaluated = torch.cat([ts[:1], ts[:-1]])
    levels = Levels(evaluated, torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod[ts]]))
    x = engine.run(_PLAIN, denoise, x_0, levels, callback=callback, progress=progress)
    if stats is not None:
        stats.update(nfe=denoise.nfe, timesteps=ts.tolist(), sampler="invert", method=method)
    return x if out_dtype is None else x.to(out_dtype)


def _check_iteration(tol: object, max_iter: object) -> tuple[float, int]:
    """Validate the fixed-point inversion's ``tol`` (finite float ≥ 0) and ``max_iter`` (int ≥ 1)."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a float, got {type(tol).__name__}")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise TypeError(f"max_iter must be an int, got {type(max_iter).__name__}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1 (network calls per inversion step), got {max_iter}")
    return float(tol), max_iter
