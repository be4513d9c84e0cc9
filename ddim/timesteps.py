"""Which timesteps a sampler visits: the spacing rules, kept apart from how a step is taken.

A sampler with S steps visits S *listed* timesteps t_0 > t_1 > … > t_{S-1} (descending int64 in
[0, T-1]) and then makes one last step to ᾱ = 1 (or ᾱ_0). Every step goes from one listed timestep to
the next listed one, so a spacing only has to produce the list.

Spacings live in one registry, :data:`SPACINGS` (name -> function ``(schedule, steps) -> sequence of
ints``); :func:`register_spacing` adds one (e.g. "logsnr" or "karras" later). :func:`timesteps` calls
the function and checks its result, so a new spacing gets the same guarantees for free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ddim.schedule import NoiseSchedule

__all__ = ["SPACINGS", "register_spacing", "timesteps", "check_timesteps"]

SpacingFn = Callable[[NoiseSchedule, int], Sequence[int]]

#: name -> function(schedule, steps) returning ``steps`` distinct ints in [0, T-1] (any order).
SPACINGS: dict[str, SpacingFn] = {}


def register_spacing(name: str) -> Callable[[SpacingFn], SpacingFn]:
    """Decorator adding a spacing rule ``fn(schedule, steps) -> ints`` to :data:`SPACINGS` under ``name``."""

    def add(fn: SpacingFn) -> SpacingFn:
        SPACINGS[name] = fn
        return fn

    return add


@register_spacing("leading")
def _leading(schedule: NoiseSchedule, steps: int) -> Sequence[int]:
    # The paper's uniform stride τ_i = ⌊i·T/S⌋ (Song et al. 2021, App. D.2). Where S divides T this is
    # ermongroup/ddim's range(0, T, T//S) and diffusers' "leading" with steps_offset=0, k·(T//S). Where it
    # does not, k·(T//S) truncated to S values starts far below T-1 (t = 500 for S = 501), so x_T ~ N(0, I)
    # would enter at the wrong noise level; ⌊i·T/S⌋ always starts at T - ⌈T/S⌉.
    T = schedule.T
    return [i * T // steps for i in range(steps)]


@register_spacing("trailing")
def _trailing(schedule: NoiseSchedule, steps: int) -> Sequence[int]:
    # diffusers: round(arange(T, 0, -T/S)) - 1. Float arange sometimes yields S+1 values (the extra
    # one rounds to -1, e.g. S=61 with T=1000); keeping the first S fixes that and changes nothing else.
    T = schedule.T
    vals = np.round(np.arange(T, 0, -T / steps))[:steps].astype(np.int64) - 1
    return vals.tolist()


@register_spacing("linspace")
def _linspace(schedule: NoiseSchedule, steps: int) -> Sequence[int]:
    # round(linspace(0, T-1, S)): both ends included.
    return np.round(np.linspace(0, schedule.T - 1, steps)).astype(np.int64).tolist()


@register_spacing("quadratic")
def _quadratic(schedule: NoiseSchedule, steps: int) -> Sequence[int]:
    # Song et al. (2021), CIFAR-10: int(x) for x in linspace(0, sqrt(0.8 T), S)**2. That repeats small
    # timesteps (S=50 gives 49 distinct values), so each repeat is bumped to the next free integer.
    T = schedule.T
    raw = (np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(np.int64).tolist()
    out: list[int] = []
    for t in raw:
        out.append(t if not out or t > out[-1] else out[-1] + 1)
    return out


def _distinct_ints(t: np.ndarray, T: int) -> list[int]:
    """Round ascending real timesteps to as many distinct ints in [0, T-1]: a repeat is moved up to the
    next free integer, and values pushed past T-1 are moved back down (len(t) <= T always fits)."""
    out = np.clip(np.round(t), 0, T - 1).astype(np.int64)
    for k in range(1, out.size):
        out[k] = max(out[k], out[k - 1] + 1)
    for k in range(out.size - 1, -1, -1):
        out[k] = min(out[k], T - 1 if k == out.size - 1 else out[k + 1] - 1)
    return out.tolist()


def _even_in(values: np.ndarray, grid: np.ndarray, T: int) -> list[int]:
    """Timesteps whose ``values`` (a table over t, non-decreasing in t) are the targets ``grid``.

    Linear interpolation of t over the finite part of the table, rounded to distinct ints; the noisiest
    target always maps to T-1 (where an infinite value, e.g. zero terminal SNR, cannot be interpolated).
    """
    t = np.arange(T, dtype=np.float64)
    ok = np.isfinite(values)
    real = np.interp(grid, values[ok], t[ok])
    real[np.argmax(grid)] = T - 1
    return _distinct_ints(np.sort(real), T)


@register_spacing("logsnr")
def _logsnr(schedule: NoiseSchedule, steps: int) -> Sequence[int]:
    # Uniform in log-SNR λ_t = log(ᾱ_t / (1 - ᾱ_t)) from λ_{T-1} to λ_0 (DPM-Solver's "logSNR" steps,
    # Lu et al. 2022), mapped to t by interpolating -λ (increasing in t).
    neg_lam = -schedule.log_snr().numpy()
    ok = np.isfinite(neg_lam)
    lo, hi = neg_lam[ok].min(), neg_lam[ok].max()
    return _even_in(neg_lam, np.linspace(hi, lo, steps), schedule.T)


@register_spacing("karras")
def _karras(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> Sequence[int]:
    # Karras et al. (2022), Eq. 5 with ρ = 7: σ_i = (σ_max^(1/ρ) + i/(S-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ
    # between σ_{T-1} and σ_0, σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), mapped to t by interpolating log σ.
    ab = schedule.alphas_cumprod.numpy()
    with np.errstate(divide="ignore"):
        log_sigma = 0.5 * (np.log1p(-ab) - np.log(ab))
    ok = np.isfinite(log_sigma)
    s_min, s_max = np.exp(log_sigma[ok].min()), np.exp(log_sigma[ok].max())
    ramp = np.linspace(0.0, 1.0, steps)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _even_in(log_sigma, np.log(sigmas), schedule.T)


def _check_steps(steps: object, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= int(steps) <= T:
        raise ValueError(f"steps must be in [1, T={T}], got {steps}")
    return int(steps)


def check_spacing(spacing: object) -> str:
    """Return ``spacing`` if it names a registered rule, else raise ValueError listing the valid ones."""
    if not isinstance(spacing, str) or spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(sorted(SPACINGS))}")
    return spacing


def timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "leading") -> torch.Tensor:
    """The ``steps`` timesteps a sampler visits, descending.

    Args:
        schedule: the model's training schedule (only ``schedule.T`` is used by the built-in rules).
        steps: S, an int in [1, T].
        spacing: a key of :data:`SPACINGS`:

            - ``"leading"`` (default): ⌊i·T/S⌋ for i = 0 … S-1, the paper's uniform stride; where S divides
              T it is k·(T//S) (ermongroup/ddim, diffusers "leading" with offset 0). Starts at T - ⌈T/S⌉,
              never at T-1. (diffusers' own k·(T//S) for other S starts far lower: a diffusers pipeline
              folder keeps diffusers' exact list, see :func:`ddim.diffusers_io.sampling_kwargs`.)
            - ``"trailing"``: round(T - k·T/S) - 1, starts at T-1 (diffusers "trailing").
            - ``"linspace"``: round(linspace(0, T-1, S)), contains both 0 and T-1.
            - ``"quadratic"``: int(linspace(0, √(0.8T), S)²) with repeats bumped up to the next free
              integer (Song et al. 2021, used for CIFAR-10).
            - ``"logsnr"``: uniform in log-SNR λ_t from λ_{T-1} to λ_0 (DPM-Solver's steps), contains T-1
              and 0; where rounding repeats a timestep (near t = 0) the repeat moves to the next free one.
            - ``"karras"``: Karras et al. (2022) ρ = 7 steps in σ_t = sqrt((1-ᾱ_t)/ᾱ_t) from σ_{T-1} to
              σ_0, contains T-1 and 0, repeats moved likewise.

    Returns:
        int64 CPU tensor of shape [S]: S distinct values in [0, T-1], strictly descending.

    Raises:
        TypeError / ValueError naming ``steps`` or ``spacing``.
    """
    T = schedule.T
    steps = _check_steps(steps, T)
    check_spacing(spacing)
    raw = torch.as_tensor(list(SPACINGS[spacing](schedule, steps)), dtype=torch.int64)
    out = torch.sort(raw, descending=True).values
    if out.numel() != steps or torch.unique(out).numel() != steps or out.min() < 0 or out.max() > T - 1:
        raise RuntimeError(f"spacing {spacing!r} did not give {steps} distinct timesteps in [0, {T - 1}]: {out}")
    return out


def check_timesteps(timesteps: Sequence[int] | torch.Tensor | np.ndarray, T: int) -> torch.Tensor:
    """Validate an explicit list of timesteps and return it as an int64 CPU tensor of shape [S].

    The list must be 1-D, non-empty, integer-valued, strictly descending (no repeats) and inside
    [0, T-1]. Floats that are whole numbers are accepted. Errors name ``timesteps``.
    """
    if isinstance(timesteps, torch.Tensor):
        t = timesteps.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(timesteps))
        except (TypeError, ValueError) as e:
            raise TypeError(f"timesteps must be a 1-D sequence of ints, got {type(timesteps).__name__}") from e
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"timesteps must hold integers, got dtype {t.dtype}")
    if t.dtype.is_floating_point:
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise ValueError(f"timesteps must be whole numbers, got {t.tolist()}")
    t = t.to(torch.int64)
    if t.min() < 0 or t.max() > T - 1:
        raise ValueError(f"timesteps must lie in [0, T-1={T - 1}], got min {int(t.min())}, max {int(t.max())}")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"timesteps must not repeat, got {t.tolist()}")
    if t.numel() > 1 and not (t[1:] < t[:-1]).all():
        raise ValueError(f"timesteps must be strictly descending (largest first), got {t.tolist()}")
    return t.clone()
