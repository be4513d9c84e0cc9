"""DDIM (Song, Meng & Ermon, ICLR 2021) and DDPM ancestral sampling, and DDIM inversion.

Notation: a run visits the listed timesteps t_0 > t_1 > … > t_{N-1} (see :mod:`ddim.timesteps`)
and then makes one last step to ᾱ_final = 1 (or ᾱ_0 with ``set_alpha_to_one=False``, as latent
diffusion and diffusers do). Step i goes from level ᾱ_{t_i} to the NEXT LISTED level — never to
t - T//S — so every spacing and every explicit timestep list is sampled exactly.

Samplers live in :data:`SAMPLERS` (name -> :class:`SamplerSpec`) and share one signature::

    fn(denoise: Denoiser, x: Tensor, levels: Levels, *, eta, variance, noise, callback, progress) -> Tensor

so other modules can add e.g. plms / dpmpp / unipc / heun with :func:`register_sampler`. Each spec
knows its number of network evaluations in advance (:func:`nfe`) and whether a run with a given η
draws step noise (``noise`` is None for a run that does not).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ddim.noise import StepNoise, check_seeds
from ddim.prediction import (
    Denoiser,
    Model,
    Plan,
    check_prediction,
    check_zero_snr,
    memo,
    scalar_rows,
    tensor_key,
    to_x0_eps,
)
from ddim.schedule import NoiseSchedule
from ddim.timesteps import SPACINGS, check_spacing, check_timesteps
from ddim.timesteps import timesteps as make_timesteps

__all__ = [
    "INVERSIONS",
    "SAMPLERS",
    "VARIANCES",
    "Levels",
    "SamplerSpec",
    "ddim_coefficients",
    "ddim_step",
    "ddpm_coefficients",
    "invert",
    "nfe",
    "register_sampler",
    "sample",
]

#: Noise-scale rules: "eta" = η · Eq. 16's σ; "large" = η · σ̂ with σ̂² = 1 - ᾱ_t/ᾱ_prev (the mean stays η's).
VARIANCES = ("eta", "large")

#: Inversion methods of :func:`invert`: plain DDIM (explicit Euler) and exact fixed-point inversion.
INVERSIONS = ("ddim", "fixed_point")

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Any]


# ============================================================================ coefficients (float64)
def _f64(v: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


def _ratio(ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """α_{t|s} = ᾱ_t / ᾱ_s (1 where ᾱ_s = 0, i.e. a step between two pure-noise levels)."""
    return torch.where(ab_s > 0, ab_t / torch.where(ab_s > 0, ab_s, torch.ones_like(ab_s)), torch.ones_like(ab_s))


def _noise_ratio(ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
    """(1 - ᾱ_s) / (1 - ᾱ_t) (1 where ᾱ_t = 1, which forces ᾱ_s = 1)."""
    den = 1.0 - ab_t
    return torch.where(den > 0, (1.0 - ab_s) / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))


def ddim_coefficients(
    alpha_bar_t: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    eta: float | torch.Tensor = 0.0,
    variance: str = "eta",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients of Eq. 12 of Song et al. (2021): x_prev = c_x0·x̂₀ + c_eps·ε̂ + σ·z.

    Args:
        alpha_bar_t, alpha_bar_prev: ᾱ of the current and the next (less noisy) level; floats or
            tensors, broadcast together.
        eta: η ≥ 0 (float or tensor broadcastable with the ᾱ's).
        variance: "eta" (default): σ = σ_η = η·sqrt((1-ᾱ_prev)/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_prev) (Eq. 16; η = 1
            is the DDPM posterior, η = 0 deterministic DDIM). "large": the same mean (c_x0, c_eps of η) with
            the noise of DDPM's larger variance, σ = η·σ̂, σ̂ = sqrt(1-ᾱ_t/ᾱ_prev). At η = 1 that is the
            paper's σ̂ step (Table 1; the reference code's ``ddpm_steps``): the posterior mean and variance
            σ̂² = β_t between the two levels, whenever ε̂ agrees with x_t (no clipping, or
            ``use_clipped_model_output``); ``sampler="ddpm", variance="large"`` is that step in every case.

    Returns:
        float64 tensors (c_x0, c_eps, σ): c_x0 = √ᾱ_prev and c_eps = sqrt(1-ᾱ_prev-σ_η²), clamped at 0
        where σ_η² exceeds 1-ᾱ_prev (η > 1). All finite for ᾱ in [0, 1], including ᾱ_t = 0 (zero
        terminal SNR) and ᾱ_t = ᾱ_prev.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    ab_t, ab_s, eta_t = _f64(alpha_bar_t), _f64(alpha_bar_prev), _f64(eta)
    one_minus_ratio = 1.0 - _ratio(ab_t, ab_s)  # 1 - ᾱ_t/ᾱ_prev = σ̂²
    sigma2 = (eta_t**2 * _noise_ratio(ab_t, ab_s) * one_minus_ratio).clamp(min=0.0)  # Eq. 16, squared
    c_x0 = ab_s.sqrt()
    c_eps = (1.0 - ab_s - sigma2).clamp(min=0.0).sqrt()
    if variance == "large":  # the mean of η, the noise of DDPM's larger variance: σ = η·σ̂
        sigma2 = (eta_t**2 * one_minus_ratio).clamp(min=0.0)
    c_x0, c_eps, sigma = torch.broadcast_tensors(c_x0, c_eps, sigma2.sqrt())
    return c_x0, c_eps, sigma


def ddpm_coefficients(
    alpha_bar_t: float | torch.Tensor, alpha_bar_prev: float | torch.Tensor, variance: str = "eta"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ho et al. (2020), Eq. 6–7, between any two levels: q(x_s | x_t, x̂₀) = N(c_x0·x̂₀ + c_xt·x_t, σ²I).

    With α = ᾱ_t/ᾱ_s and β = 1 - α: c_x0 = √ᾱ_s β/(1-ᾱ_t), c_xt = √α (1-ᾱ_s)/(1-ᾱ_t), and σ² = β̃ =
    β (1-ᾱ_s)/(1-ᾱ_t) (variance="eta": the posterior, identical to DDIM with η = 1) or σ² = β
    (variance="large": Ho et al.'s σ_t² = β_t). Returns float64 tensors (c_x0, c_xt, σ).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    ab_t, ab_s = _f64(alpha_bar_t), _f64(alpha_bar_prev)
    alpha = _ratio(ab_t, ab_s)
    beta = 1.0 - alpha
    frac = _noise_ratio(ab_t, ab_s)  # (1-ᾱ_s)/(1-ᾱ_t)
    # β/(1-ᾱ_t) = (1 - frac)/ᾱ_s; written this way it stays finite at ᾱ_t = 1 and ᾱ_t = 0.
    c_x0 = torch.where(ab_s > 0, (1.0 - frac) / ab_s.clamp(min=1e-300).sqrt(), torch.zeros_like(ab_s))
    c_xt = alpha.sqrt() * frac
    sigma2 = beta * frac if variance == "eta" else beta
    c_x0, c_xt, sigma = torch.broadcast_tensors(c_x0, c_xt, sigma2.clamp(min=0.0).sqrt())
    return c_x0, c_xt, sigma


# ============================================================================ the pure step
def _check_eta(eta: object) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float, got {type(eta).__name__}")
    if not eta >= 0 or eta == float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    return float(eta)


def ddim_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar_t: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction: str = "epsilon",
    variance: str = "eta",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One generalized DDIM step (Song, Meng & Ermon 2021, Eq. 12, σ from Eq. 16). Pure.

    x_prev = √ᾱ_prev · x̂₀ + sqrt(1 - ᾱ_prev - σ²) · ε̂ + σ · noise

    Args:
        x_t: [B, ...] floating tensor at level ᾱ_t.
        model_output: the network's raw output at x_t (same shape), interpreted per ``prediction``.
        alpha_bar_t, alpha_bar_prev: ᾱ of x_t and of the target level (python floats or tensors
            broadcastable to x_t, e.g. [B, 1, 1, 1]); coefficients are computed in float64.
        eta: η ≥ 0. 0 (default) is deterministic DDIM; 1 is exactly the DDPM posterior q(x_prev | x_t, x̂₀)
            (mean and variance); values above 1 are allowed (the direction term is then clamped at 0).
        noise: z ~ N(0, I) shaped like x_t; required when η > 0.
        prediction: "epsilon" (default), "sample", "v_prediction" or "flow" (then ``model_output`` is the
            velocity at the flow state :func:`ddim.prediction.input_scale` · x_t).
        variance: "eta" (default, Eq. 16) or "large": the mean of η with noise σ = η·sqrt(1 - ᾱ_t/ᾱ_prev),
            the DDPM "large variance" σ̂ (η = 1 gives the paper's σ̂ step); see :func:`ddim_coefficients`.

    Returns:
        (x_prev, x̂₀), both shaped like x_t in its dtype.

    Example (the worked jump): x_t = 0.90, ᾱ_t = 0.36, ᾱ_prev = 0.64, ε̂ = 0.50 gives
    x̂₀ = (0.90 - 0.8·0.5)/0.6 = 0.8333… and x_prev = 0.8·0.8333… + 0.6·0.5 = 0.9666….
    """
    eta = _check_eta(eta)
    if eta > 0 and noise is None:
        raise ValueError("noise is required when eta > 0 (pass z ~ N(0, I) shaped like x_t)")
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_t shape {tuple(x_t.shape)}")
    x0, eps = to_x0_eps(x_t, model_output, alpha_bar_t, prediction)
    c_x0, c_eps, sigma = (
        c.to(device=x_t.device, dtype=x_t.dtype) for c in ddim_coefficients(alpha_bar_t, alpha_bar_prev, eta, variance)
    )
    x_prev = torch.mul(x0, c_x0).addcmul_(eps, c_eps)
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


# ============================================================================ sampler registry
@dataclass(frozen=True)
class Levels:
    """The noise levels of one run (treat as immutable: tables derived from them are cached on them).

    Attributes:
        timesteps: int64 CPU [N], descending: the network is evaluated at t_i at step i.
        alpha_bars: float64 CPU [N+1]: ᾱ at each listed timestep, then ᾱ_final (1, or ᾱ_0).
        tables: what samplers derived from these levels (see :meth:`cached`).
    """

    timesteps: torch.Tensor
    alpha_bars: torch.Tensor
    tables: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    #: Most entries :attr:`tables` keeps (it is emptied when full).
    MAX_TABLES = 64

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` for these levels: a sampler's coefficient rows, the denoiser's
        plan, … for one device, dtype and batch. :func:`sample` reuses one Levels object per schedule
        object, timesteps and final level, so a repeated run finds them with one dict lookup (no hashing
        of tensor contents). Cached values are shared: never modify them in place."""
        tables = self.tables
        if key in tables:
            return tables[key]
        if len(tables) >= self.MAX_TABLES:
            tables.clear()
        value = tables[key] = build()
        return value


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, its number of network evaluations for ``steps`` steps, and
    whether a run with a given η draws step noise (if not, :func:`sample` passes ``noise=None``)."""

    fn: Callable[..., torch.Tensor]
    nfe: Callable[[int], int]
    noisy: Callable[[float], bool] = lambda eta: True


#: name -> SamplerSpec. Add more with :func:`register_sampler`.
SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(
    name: str,
    nfe: Callable[[int], int] = lambda steps: steps,
    noisy: Callable[[float], bool] = lambda eta: True,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator registering a sampler under ``name``; ``nfe(steps)`` gives its network calls and
    ``noisy(eta)`` whether it draws step noise at that η (default: always given a noise source;
    deterministic samplers say ``lambda eta: False`` and are passed ``noise=None``)."""

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        SAMPLERS[name] = SamplerSpec(fn, nfe, noisy)
        return fn

    return add


def _check_sampler(sampler: object) -> SamplerSpec:
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[sampler]


def nfe(sampler: str = "ddim", steps: int = 50) -> int:
    """Number of network evaluations ``sampler`` makes for ``steps`` listed timesteps (known up front).

    "ddim" and "ddpm": one per step, so ``steps``. A guided forward (cond and uncond in one batch)
    counts as one. Raises ValueError unless ``steps`` is an int >= 1.
    """
    spec = _check_sampler(sampler)
    if isinstance(steps, bool) or not hasattr(steps, "__index__") or int(steps) < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return spec.nfe(int(steps))


class _NoBar:
    """What :func:`_bar` returns when progress is off: a do-nothing context with ``update``."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


_NO_BAR = _NoBar()


def _bar(n: int, progress: bool, desc: str) -> tqdm | _NoBar:
    return tqdm(total=n, desc=desc, leave=False) if progress else _NO_BAR


def _cached_rows(
    name: str, levels: Levels, denoise: Denoiser, x: torch.Tensor, build: Callable[[], Any], *extra: object
) -> Any:
    """A sampler's per-run table, built once: kept on ``levels`` (:meth:`Levels.cached`) and by the
    content of the levels (:func:`~ddim.prediction.memo`), keyed by what else it is computed from and
    where it is applied."""
    key = (name, denoise.prediction, denoise.linear, x.device, x.dtype, *extra)
    return levels.cached(key, lambda: memo((*key, tensor_key(levels.alpha_bars)), build))


def _noise_free_last(sigma: torch.Tensor) -> torch.Tensor:
    """σ with its last entry set to 0 (the last step never adds noise)."""
    sigma = sigma.clone()
    sigma[-1] = 0.0
    return sigma


def _linear_loop(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    table: torch.Tensor | list[tuple[torch.Tensor, ...]],
    noise: Callable[[], torch.Tensor] | None,
    callback: Callback | None,
    bar: tqdm | _NoBar,
) -> torch.Tensor:
    """The fused loop shared by samplers whose step is linear in (x_t, out): x ← A_i x + B_i out + σ_i z_i.

    ``table`` is float64 [N, 3] with columns (A, B, σ) (see :meth:`Plan.fuse`), or the same already
    cast and split by :func:`~ddim.prediction.scalar_rows` into 0-d tensors on x's device. Each step is
    one network call and two fused tensor ops (three with noise): no allocation beyond the new sample,
    no tensor indexing, no host synchronisation. With ``noise``, one draw is taken at every step but the
    last (noise-free).

    NaN/Inf: every update multiplies both x and the network output (0·NaN and 0·Inf are NaN), so a
    non-finite output at any step makes the result non-finite. The loop therefore checks only its
    result (one reduction); if that is not finite it runs again from the start checking every call, so
    the error names the first step and timestep whose output was NaN/Inf, as a checked loop would.
    """
    rows = table if isinstance(table, list) else scalar_rows(table, x)
    x_start = x
    x = _run_linear(denoise, x, plan, rows, noise, callback, bar, check=False)
    if not denoise.finite(x):
        again = noise.restarted() if isinstance(noise, StepNoise) else noise
        _run_linear(denoise, x_start, plan, rows, again, None, _NoBar(), check=True)  # raises at the bad call
        denoise.finish(plan)  # accelerators: the deferred report of the checked run
        raise FloatingPointError(
            "the result contains NaN or Inf, but a re-run checking every model output found none "
            "(is the model deterministic?)"
        )
    return x


def _run_linear(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    rows: list[tuple[torch.Tensor, ...]],
    noise: Callable[[], torch.Tensor] | None,
    callback: Callback | None,
    bar: tqdm | _NoBar,
    check: bool,
) -> torch.Tensor:
    last = len(rows) - 1
    # Two buffers, written in turn, instead of a new tensor per step: no allocator work in the loop
    # (a fresh 200 kB tensor can cost page faults, more than the update itself) and fixed addresses
    # (CUDA graphs). Not with a callback, which may keep the x_t it is given.
    bufs = None if callback is not None else (torch.empty_like(x), torch.empty_like(x))
    for i, (a, b, sigma) in enumerate(rows):
        out = denoise.output(x, plan, i, check)
        if callback is not None:
            callback(i, plan.timesteps[i], x, denoise.x0(x, out, plan, i))
        x_next = torch.mul(x, a) if bufs is None else torch.mul(x, a, out=bufs[i % 2])
        x_next.addcmul_(out, b)
        if noise is not None and i < last:
            x_next.addcmul_(noise(), sigma)
        x = x_next
        bar.update()
    return x


@register_sampler("ddim", noisy=lambda eta: eta > 0)
def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    levels: Levels,
    *,
    eta: float = 0.0,
    variance: str = "eta",
    noise: Callable[[], torch.Tensor] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM, Song, Meng & Ermon (2021), Eq. 12 with σ from Eq. 16, over ``levels``.

    Step i (i < N-1): x_{t_{i+1}} = √ᾱ_{t_{i+1}} x̂₀ + sqrt(1 - ᾱ_{t_{i+1}} - σ_i²) ε̂ + σ_i z_i.
    Last step: x = √ᾱ_final x̂₀ + sqrt(1 - ᾱ_final) ε̂ (= x̂₀ when ᾱ_final = 1), always noise-free.

    Without clipping/thresholding (x̂₀, ε̂) are linear in (x_t, out), so the step is folded, in float64,
    into x ← A_i x_t + B_i out (+ σ_i z_i): two fused ops per step, the floor for a DDIM update.
    """
    ts, ab = levels.timesteps, levels.alpha_bars
    N = ts.numel()
    stochastic = eta > 0
    if stochastic and noise is None:
        raise ValueError("eta > 0 needs a noise source")
    plan = denoise.plan(ts, x, cache=levels.cached)

    def build() -> list[tuple[torch.Tensor, ...]]:
        # Per-step (c_x0, c_eps, σ) in float64, once per (levels, η, ...). η = 0 on the last step.
        etas = torch.full((N,), eta, dtype=torch.float64)
        etas[-1] = 0.0
        c_x0, c_eps, sigma = ddim_coefficients(ab[:-1], ab[1:], etas, variance)
        if denoise.linear:  # fold x̂₀/ε̂ in: x ← A x + B out + σ z
            return scalar_rows(torch.stack([*plan.fuse(c_x0, c_eps), sigma], dim=1), x)
        return scalar_rows(torch.stack([c_x0, c_eps, sigma], dim=1), x)

    rows = _cached_rows("ddim", levels, denoise, x, build, eta, variance)
    with _bar(N, progress, "ddim") as bar:
        if denoise.linear:
            x = _linear_loop(denoise, x, plan, rows, noise if stochastic else None, callback, bar)
            denoise.finish(plan)
            return x
        final_is_x0 = float(ab[-1]) == 1.0
        for i in range(N):
            x0, eps = denoise.predict(x, plan, i)
            if callback is not None:
                callback(i, plan.timesteps[i], x, x0)
            c = rows[i]
            if i == N - 1 and final_is_x0:
                x = x0  # ᾱ_final = 1: the result is x̂₀ itself
            else:
                x = torch.mul(x0, c[0]).addcmul_(eps, c[1])  # √ᾱ_prev x̂₀ + sqrt(1-ᾱ_prev-σ²) ε̂
                if stochastic and i < N - 1:
                    x.addcmul_(noise(), c[2])  # + σ z
            bar.update()
    denoise.finish(plan)
    return x


@register_sampler("ddpm")
def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    levels: Levels,
    *,
    eta: float = 1.0,
    variance: str = "eta",
    noise: Callable[[], torch.Tensor] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling, Ho et al. (2020), between the listed levels.

    Step i: x_{t_{i+1}} = c_x0 x̂₀ + c_xt x_t + σ z, the posterior q(x_{t_{i+1}} | x_t, x̂₀) of
    :func:`ddpm_coefficients` (variance "eta": β̃, the same distribution as DDIM with η = 1;
    "large": β). With all T timesteps listed this is the original DDPM chain; with fewer it is the
    respaced chain (as guided-diffusion's respacing). ``eta`` is unused (the posterior fixes the noise).
    The last step returns the posterior mean without noise (Ho et al. Alg. 2: z = 0 at t = 1).
    """
    del eta
    ts, ab = levels.timesteps, levels.alpha_bars
    N = ts.numel()
    if noise is None:
        raise ValueError("sampler 'ddpm' needs a noise source")
    plan = denoise.plan(ts, x, cache=levels.cached)

    def build() -> list[tuple[torch.Tensor, ...]]:
        c_x0, c_xt, sigma = ddpm_coefficients(ab[:-1], ab[1:], variance)
        sigma = _noise_free_last(sigma)
        if denoise.linear:  # fold x̂₀ in: x ← A x + B out + σ z
            return scalar_rows(torch.stack([*plan.fuse(c_x0, 0.0, c_xt), sigma], dim=1), x)
        return scalar_rows(torch.stack([c_x0, c_xt, sigma], dim=1), x)

    rows = _cached_rows("ddpm", levels, denoise, x, build, variance)
    with _bar(N, progress, "ddpm") as bar:
        if denoise.linear:
            x = _linear_loop(denoise, x, plan, rows, noise, callback, bar)
            denoise.finish(plan)
            return x
        final_is_x0 = float(ab[-1]) == 1.0
        for i in range(N):
            x0, _ = denoise.predict(x, plan, i)
            if callback is not None:
                callback(i, plan.timesteps[i], x, x0)
            c = rows[i]
            if i == N - 1 and final_is_x0:
                x = x0
            else:
                x = torch.mul(x0, c[0]).addcmul_(x, c[1])  # μ̃(x_t, x̂₀)
                if i < N - 1:
                    x.addcmul_(noise(), c[2])  # + σ z
            bar.update()
    denoise.finish(plan)
    return x


# ============================================================================ public entry points
def _check_x(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a batch dimension [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    return x


def _in_model_dtype(model: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
    """x cast to the dtype the model's weights are in, and x's own dtype to cast the result back to
    (None when no cast is needed): a float64 or float16 x on a float32 model runs in float32."""
    from ddim.perf import input_dtype

    want = input_dtype(model)
    if want is None or want == x.dtype or not want.is_floating_point:
        return x, None
    return x.to(want), x.dtype


def _check_bool(v: object, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return v


def _resolve_timesteps(
    schedule: NoiseSchedule, steps: int, spacing: str, timesteps: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    check_spacing(spacing)
    if timesteps is not None:
        if isinstance(timesteps, (list, tuple)) and all(type(t) is int for t in timesteps):
            # an explicit list, validated once (a checked list is a pure function of its values and T)
            return memo(("explicit", schedule.T, tuple(timesteps)), lambda: check_timesteps(timesteps, schedule.T))
        return check_timesteps(timesteps, schedule.T)
    # A spacing is a pure function of (schedule, steps): computed once per schedule object and rule.
    # (The weak reference tells a new schedule at a recycled id apart.)
    _, ts = memo(
        ("timesteps", id(schedule), steps, spacing, SPACINGS[spacing]),
        lambda: (weakref.ref(schedule), make_timesteps(schedule, steps, spacing)),
        valid=lambda v: v[0]() is schedule,
    )
    return ts


def _levels(schedule: NoiseSchedule, ts: torch.Tensor, set_alpha_to_one: bool) -> Levels:
    """The run's :class:`Levels` (cached per schedule object, timesteps and final level)."""

    def build() -> tuple[weakref.ref, Levels]:
        all_ab = schedule.alphas_cumprod
        final = torch.ones(1, dtype=torch.float64) if set_alpha_to_one else all_ab[:1]
        return weakref.ref(schedule), Levels(ts, torch.cat([all_ab[ts], final]))

    key = ("levels", id(schedule), tensor_key(ts), set_alpha_to_one)
    return memo(key, build, valid=lambda v: v[0]() is schedule)[1]


def _run_levels(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str,
    timesteps: Sequence[int] | torch.Tensor | None,
    set_alpha_to_one: bool,
) -> Levels:
    """The :class:`Levels` of a run, validated, with one cache lookup for the usual arguments.

    One Levels object is kept per schedule object (weakly referenced, so a new schedule at a recycled id
    is told apart), steps and spacing, or explicit list of ints, and final level; the tables samplers
    derive from it are kept on it (:meth:`Levels.cached`), so a repeated run hashes no tensor. Other
    timestep arguments (tensors, arrays) are validated and looked up by content each time.
    """
    if timesteps is None:
        check_spacing(spacing)
        key: tuple = ("run-levels", id(schedule), steps, spacing, SPACINGS[spacing], set_alpha_to_one)
    elif type(timesteps) is list or type(timesteps) is tuple:
        # lists equal as tuples (ints, whole floats, numpy ints: equal values hash equally) give the
        # same checked timesteps; anything check_timesteps refuses raises in build() and is not cached
        key = ("run-levels", id(schedule), tuple(timesteps), set_alpha_to_one)
    else:
        return _levels(schedule, _resolve_timesteps(schedule, steps, spacing, timesteps), set_alpha_to_one)

    def build() -> tuple[weakref.ref, Levels]:
        ts = _resolve_timesteps(schedule, steps, spacing, timesteps)
        return weakref.ref(schedule), _levels(schedule, ts, set_alpha_to_one)

    try:
        return memo(key, build, valid=lambda v: v[0]() is schedule)[1]
    except TypeError:  # an unhashable entry (e.g. a nested list): the checks below name the problem
        return _levels(schedule, _resolve_timesteps(schedule, steps, spacing, timesteps), set_alpha_to_one)


def _zero_snr(levels: Levels) -> bool:
    """Whether a listed level has ᾱ = 0 (zero terminal SNR), computed once per levels."""
    return levels.cached(("zero-snr",), lambda: bool((levels.alpha_bars[:-1] == 0).any()))


def _no_grad(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` with gradients off, as under ``torch.no_grad()``: switched off (and back on after) only when
    they are on. It sets the grad mode directly, as ``torch.no_grad`` itself does, without the context
    manager object, whose creation and enter/exit cost more than a whole short run's Python."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        _set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_grad_enabled(True)

    return wrapper


#: The grad-mode switch behind ``torch.no_grad`` / ``torch.set_grad_enabled`` (the public class, if a
#: torch build lacks the function).
_set_grad_enabled: Callable[[bool], Any] = getattr(torch._C, "_set_grad_enabled", torch.set_grad_enabled)


@_no_grad
def sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    timesteps: Sequence[int] | torch.Tensor | None = None,
    prediction: str = "epsilon",
    clip_sample: bool = False,
    seeds: Sequence[int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    sampler: str = "ddim",
    set_alpha_to_one: bool = True,
    guidance_scale: float = 1.0,
    uncond_kwargs: Mapping[str, Any] | None = None,
    thresholding: bool = False,
    variance: str = "eta",
    clip_sample_range: float = 1.0,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    stats: dict[str, Any] | None = None,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Sample x_0 from x_T with DDIM (default) or DDPM ancestral steps.

    Args:
        model: ``model(x_t, t, **model_kwargs)``; x_t [B, ...], t int64 [B] on x_T's device; returns a
            tensor shaped like x_t (or an object with ``.sample``).
        x_T: [B, ...] floating tensor at level ᾱ of the first listed timestep (usually N(0, I), e.g.
            ``ddim.randn(shape, seeds)``). Output has its shape, dtype and device; x_T is not modified.
            The run itself is in the dtype of the model's weights (a float64 or float16 x_T on a
            float32 model runs in float32 and comes back in x_T's dtype).
        schedule: the model's training :class:`~ddim.schedule.NoiseSchedule`.
        steps: number of listed timesteps S in [1, T] (default 50) = number of network evaluations.
            For sampler="ddpm", steps=T (with any spacing) is the original T-step DDPM chain and fewer
            steps give the respaced chain. Ignored when ``timesteps`` is given.
        eta: η ≥ 0 (default 0: deterministic DDIM; 1: DDPM posterior noise). For "ddpm" leave 0 or 1.
        spacing: "leading" (default), "trailing", "linspace", "quadratic" (see :func:`ddim.timesteps`).
        timesteps: an explicit strictly descending list of ints in [0, T-1]; overrides steps/spacing.
        prediction: "epsilon" (default), "sample", "v_prediction" or "flow" (a velocity model on
            :meth:`NoiseSchedule.flow`, see :class:`~ddim.prediction.Denoiser`).
        clip_sample, clip_sample_range: clamp x̂₀ to ±range (default off, range 1.0).
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic thresholding of x̂₀
            (default off, 0.995, 1.0).
        use_clipped_model_output: after clipping/thresholding, recompute ε̂ from the clipped x̂₀ (True,
            guided-diffusion's convention) or keep the model's ε̂ (False, default: diffusers'
            ``DDIMScheduler``/``DDIMPipeline``). Samplers that step on x̂₀ and x_t only ("ddpm", whose
            posterior mean uses the clipped x̂₀ as diffusers' ``DDPMScheduler`` does, "dpmpp_*", "unipc")
            give the same result either way. No effect without clipping or thresholding.
        seeds: one int per sample for the step noise (η > 0 or "ddpm"): sample i's noise comes from
            ``torch.Generator("cpu").manual_seed(seeds[i])`` (after skipping one draw, the x_T that
            ``ddim.randn`` makes from the same seed), drawn in float32 on CPU, so a batch of 8 equals 8
            batches of 1. None (default): torch's global CPU RNG, one draw per sample per step.
        model_kwargs: extra network kwargs (e.g. class labels), default none.
        callback: ``callback(i, t, x_t, x0_pred)`` at every step i = 0 … N-1, with t the int timestep,
            x_t the sample the network saw and x0_pred its x̂₀ (after clipping).
        progress: show a tqdm bar (default False).
        sampler: a key of :data:`SAMPLERS`: "ddim" (default) or "ddpm".
        set_alpha_to_one: the last step lands on ᾱ = 1, returning x̂₀ (default True); False lands on
            ᾱ_0 = alphas_cumprod[0] (latent diffusion / diffusers' set_alpha_to_one=False).
        guidance_scale, uncond_kwargs, guidance_rescale: classifier-free guidance and Lin et al.'s
            rescale φ (default 0), see :class:`~ddim.prediction.Denoiser`.
        variance: "eta" (default, Eq. 16) or "large": DDPM's larger variance σ̂² = 1 - ᾱ_t/ᾱ_prev (β of the
            respaced chain). ``sampler="ddpm", variance="large"`` is the paper's σ̂ row of Table 1 (the
            reference code's DDPM step: posterior mean from x_t and x̂₀, noise σ̂); "ddim" with η keeps
            η's mean and draws noise η·σ̂ (the same step at η = 1 when ε̂ agrees with x_t).
        stats: if a dict is given it is filled with "nfe" (network evaluations made, equal to
            :func:`nfe` ``(sampler, steps)``), "timesteps" (the listed timesteps) and "sampler".

    Every step goes from one listed timestep to the next listed one; the last step is noise-free.
    All arguments are validated before the first network call (errors name the argument). ε-prediction
    with a listed ᾱ_t = 0 (zero terminal SNR) is refused: use v-prediction. A model output with NaN/Inf
    raises FloatingPointError naming the step i and timestep t. The loop never waits for the device:
    "ddim"/"ddpm" without clipping or thresholding check only the result (a NaN/Inf output always
    reaches it) and, if it is not finite, run again checking every call to name the step; otherwise
    every call is checked (on CPU at once; on accelerators after the loop). Runs under
    ``torch.no_grad()``; to differentiate through sampling, loop over :func:`ddim_step` yourself.

    Returns:
        x_0, shaped like x_T.
    """
    _check_x(x_T, "x_T")
    x_T, out_dtype = _in_model_dtype(model, x_T)
    spec = _check_sampler(sampler)
    eta = _check_eta(eta)
    if sampler == "ddpm" and eta not in (0.0, 1.0):
        raise ValueError(f"eta is fixed at 1 by sampler='ddpm' (leave it at 0 or pass 1), got {eta}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    check_prediction(prediction)
    _check_bool(set_alpha_to_one, "set_alpha_to_one")
    _check_bool(clip_sample, "clip_sample")
    _check_bool(thresholding, "thresholding")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    levels = _run_levels(schedule, steps, spacing, timesteps, set_alpha_to_one)
    ts = levels.timesteps
    if seeds is not None:
        seeds = check_seeds(seeds, x_T.shape[0])
    if prediction == "epsilon" and _zero_snr(levels):
        check_zero_snr(prediction, levels.alpha_bars[:-1], ts)
    denoise = Denoiser(
        model,
        schedule,
        prediction,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value,
        use_clipped_model_output=use_clipped_model_output,
        guidance_scale=guidance_scale,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
        guidance_rescale=guidance_rescale,
    )
    # a deterministic run makes no noise source (building one costs more than a step's arithmetic)
    noise = (
        StepNoise(x_T.shape, seeds, device=x_T.device, dtype=x_T.dtype, block=ts.numel()) if spec.noisy(eta) else None
    )
    x = spec.fn(denoise, x_T, levels, eta=eta, variance=variance, noise=noise, callback=callback, progress=progress)
    if stats is not None:
        stats.update(nfe=denoise.nfe, timesteps=ts.tolist(), sampler=sampler)
    return x if out_dtype is None else x.to(out_dtype)


@_no_grad
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
    e.g. :func:`ddim.inversion.front_loaded`, which spends more where convergence is slowest: the first
    steps out of the data). The loop and its measurements: :func:`ddim.inversion.solve_fixed_point`,
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
    :func:`ddim.inversion.bdia_invert`); ``tol`` (float ≥ 0) and ``max_iter`` (int ≥ 1, or a list of N)
    are validated always and used by "fixed_point" only. Runs under ``torch.no_grad()``.

    Returns:
        x_T shaped like x_0.
    """
    _check_x(x_0, "x_0")
    x_0, out_dtype = _in_model_dtype(model, x_0)
    check_prediction(prediction)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    ts = torch.flip(_resolve_timesteps(schedule, steps, spacing, timesteps), dims=[0])  # ascending
    N = ts.numel()
    _check_bool(clip_sample, "clip_sample")
    if method not in INVERSIONS:
        raise ValueError(f"unknown inversion method {method!r}; valid: {', '.join(INVERSIONS)}")
    from ddim.inversion import call_budget, solve_fixed_point  # the exact inversion's loop lives there

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
        with _bar(N, progress, "invert") as bar:
            x = solve_fixed_point(
                denoise, x_0, plan, schedule.alphas_cumprod[ts], tol=tol, max_iter=caps, callback=callback,
                update=bar.update, stats=fp_stats,
            )  # fmt: skip
        denoise.finish(plan)
        if stats is not None:
            stats.update(nfe=denoise.nfe, timesteps=ts.tolist(), sampler="invert", method=method, **fp_stats)
        return x if out_dtype is None else x.to(out_dtype)
    ab = schedule.alphas_cumprod[ts]
    evaluated = torch.cat([ts[:1], ts[:-1]])  # the network's timestep at step k
    plan = denoise.plan(evaluated, x_0)  # refuses ε-prediction at ᾱ = 0 before any call
    a, b = ab.sqrt(), (1.0 - ab).sqrt()  # x_{s_k} = a_k x̂₀ + b_k ε̂
    x = x_0
    with _bar(N, progress, "invert") as bar:
        if denoise.linear:
            # Step 0 uses x̂₀ = x_0 = the network's input exactly; steps k >= 1 the network's x̂₀. Folded:
            # x ← A_k x + B_k out.
            a_x0, a_x = a.clone(), torch.zeros_like(a)
            a_x0[0], a_x[0] = 0.0, a[0]
            rows = memo(
                ("invert", tensor_key(ab), denoise.prediction, x_0.device, x_0.dtype),
                lambda: scalar_rows(torch.stack([*plan.fuse(a_x0, b, a_x), torch.zeros_like(a)], dim=1), x_0),
            )
            x = _linear_loop(denoise, x, plan, rows, None, callback, bar)
        else:
            rows = scalar_rows(torch.stack([a, b], dim=1), x_0)
            for k in range(N):
                x0, eps = denoise.predict(x, plan, k)
                if callback is not None:
                    callback(k, plan.timesteps[k], x, x0)
                # Step 0 starts at ᾱ = 1, where x̂₀ = x_0 exactly; ε̂ comes from the network at (x_0, s_0).
                x = torch.mul(x_0 if k == 0 else x0, rows[k][0]).addcmul_(eps, rows[k][1])
                bar.update()
    denoise.finish(plan)
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
