"""Exact inversion of deterministic samplers: the fixed-point solve of :func:`ddim.invert` and BDIA.

- :func:`solve_fixed_point`: the engine of ``ddim.invert(..., method="fixed_point")``: every inversion
  step solves for the x whose DDIM step (Song et al. 2021, Eq. 12, η = 0) lands on the current sample,
  by fixed-point iteration with Anderson acceleration, per-sample stopping and a per-step call cap
  (:func:`front_loaded` spends a budget where the iteration converges slowest).
- BDIA-DDIM (Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via Bi-directional Integration
  Approximation", ECCV 2024): a sampler coupling three consecutive states so that every step is an
  explicit, exactly invertible map, one network call a step both ways. :func:`bdia_sample` is its
  decoder, :func:`bdia_invert` its inversion. (Not registered as a sampler: at γ = 0, the only γ that
  inverts stably, it generates poorly from noise at few steps; see docs/inversion.md.)
- :func:`round_trip`: invert with any of :data:`INVERSIONS` and decode with the matching decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ddim.prediction import Denoiser, Model, Plan, check_prediction, scalar_rows
from ddim.registry import Callback
from ddim.schedule import NoiseSchedule
from ddim.timesteps import check_spacing, check_timesteps
from ddim.timesteps import timesteps as make_timesteps

__all__ = [
    "BDIA_GAMMA",
    "INVERSIONS",
    "bdia_invert",
    "bdia_sample",
    "call_budget",
    "front_loaded",
    "round_trip",
    "solve_fixed_point",
]

#: Every inversion method and its decoder: "ddim" and "fixed_point" decode with :func:`ddim.sample`
#: (DDIM, η = 0), "bdia" with :func:`bdia_sample`.
INVERSIONS = ("ddim", "fixed_point", "bdia")

#: BDIA's default γ (the paper's convention: 1 is plain DDIM, 0 the symmetric step). Only γ = 0 inverts stably: at
#: γ = 0.5 the inverted latents of a Gaussian mixture reach std 13 at S = 10 and 1e12 at S = 50 (docs/inversion.md).
BDIA_GAMMA = 0.0

#: |γ| bound of the fixed-point inversion's Anderson(1) step. Measured on the embedded model (S = 10, 4 calls a
#: step, two sets of 100 held-out digits): unbounded 5.1e-5 / 5.2e-5 mean MSE (one digit at 2.4e-3), 0.5:
#: 1.9e-5 / 2.0e-5; 0.3: 2.1e-5, 0.75: 2.2e-5, 1: 4.1e-5, 0 (no acceleration): 6.8e-4 (first set).
ANDERSON_MAX = 0.5


# ============================================================================ fixed-point inversion
def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [B] tensor viewed as [B, 1, ...] to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def front_loaded(steps: int, calls: int) -> list[int]:
    """Per-step call caps spending ``calls`` network calls on a ``steps``-step fixed-point inversion,
    the first two steps (out of the data: the largest Lipschitz constant against the step, so the
    slowest convergence) getting twice the share of the others.

    With b = calls // (steps + 2): caps [2b, 2b, b, …, b], then the remainder one call each to steps 0,
    1, 2, … Needs ``calls >= steps + 2`` (at least one call a step). Example: ``front_loaded(10, 40)`` =
    [7, 7, 4, 4, 3, 3, 3, 3, 3, 3].
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < steps + min(steps, 2):
        raise ValueError(f"calls must be an int >= {steps + min(steps, 2)} for {steps} steps, got {calls!r}")
    weights = [2 if k < 2 else 1 for k in range(steps)]
    b = calls // sum(weights)
    caps = [w * b for w in weights]
    for k in range(calls - sum(caps)):
        caps[k % steps] += 1
    return caps


def call_budget(max_iter: int | Sequence[int], steps: int) -> list[int]:
    """The per-step call caps of a fixed-point inversion with ``steps`` steps.

    ``max_iter``: an int (the cap of every step), or a list of ``steps`` ints (step k in inversion order:
    k = 0 is the step out of the data; e.g. :func:`front_loaded`). Raises TypeError/ValueError naming
    ``max_iter`` otherwise.
    """
    if isinstance(max_iter, bool):
        raise TypeError(f"max_iter must be an int or a list of ints, got {max_iter!r}")
    if isinstance(max_iter, int):
        caps = [max_iter] * steps
    elif isinstance(max_iter, (list, tuple)) and max_iter and all(type(m) is int for m in max_iter):
        caps = list(max_iter)
        if len(caps) != steps:
            raise ValueError(f"max_iter lists {len(caps)} caps but the inversion has {steps} steps")
    else:
        raise TypeError(f"max_iter must be an int or a list of ints, got {type(max_iter).__name__}")
    if min(caps) < 1:
        raise ValueError(f"max_iter must be >= 1 (network calls per inversion step), got {max_iter}")
    return caps


def _anderson(f: torch.Tensor, g: torch.Tensor, f_old: torch.Tensor, g_old: torch.Tensor) -> torch.Tensor:
    """Anderson mixing of depth 1 (the secant step through the last two updates), per sample:
    x ← g - γ (g - g_old), γ = ⟨f, f - f_old⟩ / |f - f_old|², bounded to |γ| ≤ :data:`ANDERSON_MAX`."""
    df = (f - f_old).flatten(1)
    dd = (df * df).sum(1)
    gamma = torch.where(dd > 0, (f.flatten(1) * df).sum(1) / dd.clamp_min(torch.finfo(dd.dtype).tiny), 0)
    gamma = gamma.clamp(-ANDERSON_MAX, ANDERSON_MAX)  # safeguard: a bounded extrapolation
    return g - _per_sample(gamma, g) * (g - g_old)


def _solve_step(
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x_prev: torch.Tensor,
    x: torch.Tensor,
    eps_last: torch.Tensor,
    coef: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    into_data: bool,
    tol: float,
    cap: int,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Solve Φ(x) = x_prev for one step, starting at x: Φ(x) = a'·x̂₀(x) + b'·ε̂(x) is the sampler's DDIM
    step into the level (a'², ...) of x_prev (x̂₀(x) itself when ``into_data``), ``coef`` = (a', b', 1/A)
    with A the x-coefficient of Φ. Returns (x, ε̂ at the last point evaluated, calls, last change)."""
    ap, bp, inv_A = coef
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    change, j = float("inf"), 0
    f_old = g_old = None
    while j < cap:
        x0, eps = evaluate(x)
        j += 1
        landed = x0 if into_data else torch.mul(x0, ap).addcmul_(eps, bp)  # Φ(x): the sampler's step
        f = (x_prev - landed) * inv_A  # the fixed-point update x -> g = x + f
        g = x + f
        step_change = f.abs().flatten(1).amax(1)  # [B]
        x_new = g if f_old is None else _anderson(f, g, f_old, g_old)
        f_old, g_old = f, g
        mask = _per_sample(active, x)
        x = torch.where(mask, x_new, x)
        eps_last = torch.where(mask, eps, eps_last)
        change = float(step_change[active].max())
        active = active & (step_change > tol)
        if not bool(active.any()):
            break
    return x, eps_last, j, change


def solve_fixed_point(
    denoise: Denoiser,
    x_0: torch.Tensor,
    plan: Plan,
    ab: torch.Tensor,
    *,
    tol: float,
    max_iter: Sequence[int],
    callback: Callback | None = None,
    update: Callable[[], Any] | None = None,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Exact DDIM inversion by fixed-point iteration: the loop of ``ddim.invert(..., method="fixed_point")``.

    With ᾱ_k = ``ab[k]`` and ᾱ_{k-1} the level of the current sample x_prev (ᾱ_{-1} = 1), step k solves
    Φ_k(x) = x_prev for the sampler's step Φ_k(x) = √ᾱ_{k-1} x̂₀(x) + √(1-ᾱ_{k-1}) ε̂(x) (x̂₀(x) for k = 0),
    (x̂₀, ε̂) the denoiser at (x, s_k), by x ← x + (x_prev - Φ_k(x)) / A_k, A_k = √(ᾱ_{k-1}/ᾱ_k), with
    Anderson(1) mixing from the second call on. It starts from the plain inversion step with the last
    ε̂ computed (zero for k = 0: x = √ᾱ_0 x_0), stops a sample once an update moved it by at most ``tol``
    (max-abs) and makes at most ``max_iter[k]`` calls.

    Args:
        denoise: the run's denoiser (prediction, guidance, kwargs, clipping).
        x_0: [B, ...] the data.
        plan: ``denoise.plan(ts, x_0)`` for the ascending timesteps ts (call k of the plan is at s_k).
        ab: float64 [N], ᾱ of ts.
        tol: float ≥ 0; max_iter: N ints ≥ 1 (see :func:`call_budget`).
        callback: ``callback(k, t, x, x0_pred)`` at every call; update: called after each step.
        stats: filled with "iterations" (N ints: calls of step k) and "change" (N floats: the largest
            max-abs change of the last update of step k over the batch).

    Returns: x at level ᾱ_{N-1}, shaped like x_0. Network calls: Σ max_iter at most.
    """
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])  # the level each step starts from
    a, b = ab.sqrt(), (1.0 - ab).sqrt()
    a_prev, b_prev = ab_prev.sqrt(), (1.0 - ab_prev).sqrt()
    rows = scalar_rows(torch.stack([a, b, a_prev, b_prev, a / a_prev], dim=1), x_0)  # a / a_prev = 1 / A_k
    iterations, changes = [], []
    x_prev, eps_last = x_0, torch.zeros_like(x_0)
    for k, (a_k, b_k, ap_k, bp_k, inv_A_k) in enumerate(rows):

        def evaluate(x: torch.Tensor, k: int = k) -> tuple[torch.Tensor, torch.Tensor]:
            x0, eps = denoise.predict(x, plan, k)
            if callback is not None:
                callback(k, plan.timesteps[k], x, x0)
            return x0, eps

        # start: the plain step from x_prev with the last ε̂ (x̂₀ consistent with x_prev; x_0 itself for k = 0)
        x0_start = x_0 if k == 0 else (x_prev - bp_k * eps_last) / ap_k
        x = torch.mul(x0_start, a_k).addcmul_(eps_last, b_k)
        x_prev, eps_last, j, change = _solve_step(
            evaluate, x_prev, x, eps_last, (ap_k, bp_k, inv_A_k), k == 0, tol, max_iter[k]
        )
        iterations.append(j)
        changes.append(change)
        if update is not None:
            update()
    if stats is not None:
        stats.update(iterations=iterations, change=changes)
    return x_prev


# ============================================================================ BDIA
def _check_gamma(gamma: object) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be a number in [0, 1) (1 would be plain DDIM, not invertible), got {gamma!r}")
    return float(gamma)


def _bdia_rows(ab: torch.Tensor, like: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per call i (levels ab[0] > … noisy first, ab[N] the final level): (√ᾱ, √(1-ᾱ)) of the level below,
    ab[i+1], and of the level above, ab[i-1] (ab[0] for i = 0, unused)."""
    up = torch.cat([ab[:1], ab[:-2]])
    down = ab[1:]
    return scalar_rows(torch.stack([down.sqrt(), (1 - down).sqrt(), up.sqrt(), (1 - up).sqrt()], dim=1), like)


def _bdia_loop(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    ab: torch.Tensor,
    gamma: float,
    callback: Callback | None,
    update: Callable[[], Any] | None,
    x_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """BDIA-DDIM from u_0 = x at level ab[0] down to level ab[N]; call i at (u_i, plan's timestep i).

    With D_i^↓ = √ᾱ_{i+1} x̂₀ + √(1-ᾱ_{i+1}) ε̂ and D_i^↑ = √ᾱ_{i-1} x̂₀ + √(1-ᾱ_{i-1}) ε̂, (x̂₀, ε̂) the
    denoiser at u_i: u_1 = D_0^↓ (plain DDIM, or ``x_next``), then u_{i+1} = D_i^↓ + (1-γ)(u_{i-1} - D_i^↑).
    """
    rows = _bdia_rows(ab, x)
    keep = 1.0 - gamma
    prev = None
    for i, (ad, bd, au, bu) in enumerate(rows):
        x0, eps = denoise.predict(x, plan, i)
        if callback is not None:
            callback(i, plan.timesteps[i], x, x0)
        if i == 0:
            new = torch.mul(x0, ad).addcmul_(eps, bd) if x_next is None else x_next
        else:
            down = torch.mul(x0, ad).addcmul_(eps, bd)  # D↓: DDIM from u_i to the next level
            up = torch.mul(x0, au).addcmul_(eps, bu)  # D↑: DDIM from u_i back to the previous level
            new = down.add_(prev - up, alpha=keep)  # u_{i+1} = D↓ + (1-γ)(u_{i-1} - D↑)
        prev, x = x, new
        if update is not None:
            update()
    return x


def _descending(
    schedule: NoiseSchedule, steps: int, spacing: str, timesteps: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if timesteps is not None:
        return check_timesteps(timesteps, schedule.T)
    check_spacing(spacing)
    return make_timesteps(schedule, steps, spacing)


def _denoiser(
    model: Model,
    schedule: NoiseSchedule,
    prediction: str,
    model_kwargs: Mapping[str, Any] | None,
    guidance_scale: float,
    uncond_kwargs: Mapping[str, Any] | None,
) -> Denoiser:
    check_prediction(prediction)
    return Denoiser(
        model,
        schedule,
        prediction,
        guidance_scale=guidance_scale,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs if guidance_scale != 1.0 else None,
    )


def _check_input(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[0] < 1:
        raise TypeError(f"{name} must be a floating tensor [B, ...] with B >= 1")
    return x


@torch.no_grad()
def bdia_sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    spacing: str = "leading",
    timesteps: Sequence[int] | torch.Tensor | None = None,
    gamma: float = BDIA_GAMMA,
    prediction: str = "epsilon",
    model_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    uncond_kwargs: Mapping[str, Any] | None = None,
    x_next: torch.Tensor | None = None,
    callback: Callback | None = None,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """BDIA-DDIM sampling (Zhang, Lewis & Kleijn 2023): the decoder of :func:`bdia_invert`.

    With the listed timesteps t_0 > … > t_{N-1} (as :func:`ddim.sample`), levels ᾱ_0 … ᾱ_{N-1} and
    ᾱ_N = 1, states u_0 = x_T, …, u_N = x_0, and Δ(i→j | u_i) = √ᾱ_j x̂₀ + √(1-ᾱ_j) ε̂ - u_i the DDIM
    transfer from u_i (network at (u_i, t_i)) to level j:

        u_1 = u_0 + Δ(0→1 | u_0)                                          (plain DDIM)
        u_{i+1} = u_{i-1} - γ (u_{i-1} - u_i) - (1-γ) Δ(i→i-1 | u_i) + Δ(i→i+1 | u_i)

    (the paper's update with its γ: 1 is plain DDIM, 0 the symmetric, leapfrog-like step). Every
    step after the first is solved for u_{i-1} exactly, so the chain runs backwards (:func:`bdia_invert`)
    with one call a step. One network call a step, like DDIM.

    Args: as :func:`ddim.sample` (η = 0, no clipping; ``set_alpha_to_one`` is always True);
        gamma: in [0, 1) (default :data:`BDIA_GAMMA`); x_next: u_1 itself (the state after the first
        step, as :func:`bdia_invert` can return it) to skip the first DDIM step's inexactness.
        stats: gets "nfe" and "timesteps".

    Returns: x_0 shaped like x_T.
    """
    _check_input(x_T, "x_T")
    gamma = _check_gamma(gamma)
    ts = _descending(schedule, steps, spacing, timesteps)
    denoise = _denoiser(model, schedule, prediction, model_kwargs, guidance_scale, uncond_kwargs)
    if x_next is not None and x_next.shape != x_T.shape:
        raise ValueError(f"x_next has shape {tuple(x_next.shape)}, expected x_T's {tuple(x_T.shape)}")
    ab = torch.cat([schedule.alphas_cumprod[ts], torch.ones(1, dtype=torch.float64)])
    plan = denoise.plan(ts, x_T)
    x = _bdia_loop(denoise, x_T, plan, ab, gamma, callback, None, x_next)
    denoise.finish(plan)
    if stats is not None:
        stats.update(nfe=denoise.nfe, timesteps=ts.tolist(), sampler="bdia")
    return x


@torch.no_grad()
def bdia_invert(
    model: Model,
    x_0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    spacing: str = "leading",
    timesteps: Sequence[int] | torch.Tensor | None = None,
    gamma: float = BDIA_GAMMA,
    prediction: str = "epsilon",
    model_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    uncond_kwargs: Mapping[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`bdia_sample`: x_0 -> (x_T, x_next) with ``bdia_sample(x_T, x_next=x_next, same
    arguments)`` = x_0 up to float rounding.

    Runs the chain of :func:`bdia_sample` backwards (same notation, u_N = x_0), one network call a step:

    - u_{N-1} = √ᾱ_{N-1} x_0 + √(1-ᾱ_{N-1}) ε̂(x_0, t_{N-1}), the plain inversion step (BDIA is exact
      whatever u_{N-1} is: it only has to be a sensible state at that level);
    - for i = N-1 … 1: u_{i-1} = D↑_i + (u_{i+1} - D↓_i)/(1-γ), with D↓_i = u_i + Δ(i→i+1 | u_i) and
      D↑_i = u_i + Δ(i→i-1 | u_i) from one call at (u_i, t_i): the sampler's step solved for u_{i-1}.

    The chain fixes both u_0 and u_1, and u_1 is in general not the plain DDIM step from u_0 that
    :func:`bdia_sample` takes first when it is given x_T alone; so the latent is the pair (u_0, u_1) — as
    EDICT's is a pair. Decoding u_0 alone redoes that first step with DDIM (approximate). N network calls
    (N ≥ 2; as plain inversion). Solving for u_{i-1} divides by 1-γ: rounding errors can grow by up to
    1/(1-γ) a step, and the chain is only neutrally stable even at γ = 0, so the error grows with N
    (docs/inversion.md). ``stats`` gets "nfe" and "timesteps" (descending).

    Returns: (x_T, x_next), each shaped like x_0.
    """
    _check_input(x_0, "x_0")
    gamma = _check_gamma(gamma)
    ts = _descending(schedule, steps, spacing, timesteps)
    N = ts.numel()
    if N < 2:
        raise ValueError("BDIA needs at least 2 steps (its first step is plain DDIM); use method 'fixed_point'")
    denoise = _denoiser(model, schedule, prediction, model_kwargs, guidance_scale, uncond_kwargs)
    ab = torch.cat([schedule.alphas_cumprod[ts], torch.ones(1, dtype=torch.float64)])  # ab[N] = 1: the data
    plan = denoise.plan(ts, x_0)
    rows = _bdia_rows(ab, x_0)
    keep = 1.0 - gamma
    _, eps = denoise.predict(x_0, plan, N - 1)  # ε̂ at (x_0, t_{N-1}): the plain first inversion step
    u_next, u = x_0, float(ab[N - 1]) ** 0.5 * x_0 + float(1 - ab[N - 1]) ** 0.5 * eps  # u_{i+1}, u_i
    for i in range(N - 1, 0, -1):
        ad, bd, au, bu = rows[i]
        x0, eps = denoise.predict(u, plan, i)
        down = torch.mul(x0, ad).addcmul_(eps, bd)
        up = torch.mul(x0, au).addcmul_(eps, bu)
        u_next, u = u, up.add_(u_next - down, alpha=1.0 / keep)  # u_{i-1} = D↑ + (u_{i+1} - D↓)/(1-γ)
    denoise.finish(plan)
    if stats is not None:
        stats.update(nfe=denoise.nfe, timesteps=ts.tolist(), sampler="bdia")
    return u, u_next


# ============================================================================ one entry for every method
def round_trip(
    model: Model,
    x_0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    method: str = "ddim",
    steps: int = 50,
    spacing: str = "leading",
    prediction: str = "epsilon",
    model_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    uncond_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-6,
    max_iter: int | Sequence[int] = 4,
    gamma: float = BDIA_GAMMA,
) -> dict[str, Any]:
    """Invert ``x_0`` with ``method`` (one of :data:`INVERSIONS`) and decode with its decoder, both under
    the same condition and guidance, no clipping.

    "ddim": :func:`ddim.invert` then :func:`ddim.sample`; "fixed_point": the same with exact inversion
    (``tol``, ``max_iter``: an int or per-step list); "bdia": :func:`bdia_invert` then :func:`bdia_sample`
    (``gamma``; the latents are the pair (x_T, x_next), "latents" holds x_T and "x_next" x_next).

    Returns a dict: "latents" x_T, "x_next" (BDIA's second latent, else None), "reconstruction" [B, ...],
    "nfe" (inversion calls per batch), "decode_nfe" (decoding calls).
    """
    if method not in INVERSIONS:
        raise ValueError(f"unknown inversion method {method!r}; valid: {', '.join(INVERSIONS)}")
    guide = {"model_kwargs": model_kwargs, "guidance_scale": guidance_scale, "uncond_kwargs": uncond_kwargs}
    if guidance_scale == 1.0:
        guide["uncond_kwargs"] = None
    common = {"steps": steps, "spacing": spacing, "prediction": prediction, **guide}
    inv: dict[str, Any] = {}
    dec: dict[str, Any] = {}
    z_next = None
    if method == "bdia":
        z, z_next = bdia_invert(model, x_0, schedule, gamma=gamma, stats=inv, **common)
        rec = bdia_sample(model, z, schedule, gamma=gamma, x_next=z_next, stats=dec, **common)
    else:
        from ddim.inversion import invert  # (ddim.inversion imports this module)
        from ddim.sampling import sample

        z = invert(model, x_0, schedule, method=method, tol=tol, max_iter=max_iter, stats=inv, **common)
        rec = sample(model, z, schedule, stats=dec, **common)
    return {"latents": z, "x_next": z_next, "reconstruction": rec, "nfe": inv["nfe"], "decode_nfe": dec["nfe"]}
