"""Restart sampling (Xu, Deng, Wang, Pei, Tian & Jaakkola, NeurIPS 2023, "Restart Sampling for Improving
Generative Processes", arXiv 2306.14878): "restart".

The probability-flow ODE, interrupted once it reaches a low noise level t_min: the forward process adds
noise back up to t_max, x ← √(ᾱ_max/ᾱ_min) x + √(1 - ᾱ_max/ᾱ_min) z (Alg. 1's x + √(σ_max² - σ_min²) z in
x = √ᾱ y), and the ODE runs again from t_max to t_min on ``RESTART_STEPS`` steps, ``RESTARTS`` times,
before it finishes. Each restart contracts the errors made so far (the forward noise and the ODE's
backward pass shrink their total variation, Thm. 3) at the price of the extra calls. z comes from the
per-sample seeds as the noise of η > 0 does, so image i depends only on its seed.

The run's listed timesteps are the main ODE's; t_min is the listed timestep whose Karras noise level
s = sqrt((1-ᾱ)/ᾱ) is closest to ``SIGMA_MIN`` (never the first), t_max the timestep closest to
``SIGMA_MAX`` (above t_min). Every ODE segment is solved by DPM-Solver++(2M) (:mod:`ddim.solvers.dpmpp`)
on :class:`~ddim.sampling.Levels` of its own. Network calls: steps + RESTARTS · RESTART_STEPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ddim.engine import run_segment, schedule_alpha_bars
from ddim.prediction import Denoiser
from ddim.registry import Callback, Levels, register_sampler

__all__ = ["RestartPlan", "restart_plan", "sample_restart", "RESTARTS", "RESTART_STEPS", "SIGMA_MIN", "SIGMA_MAX"]

#: Restarts K, and ODE steps per restart (network calls: one each).
RESTARTS = 1
RESTART_STEPS = 3
#: The restart interval in Karras et al.'s noise level s = sqrt((1-ᾱ)/ᾱ) (Xu et al.'s [t_min, t_max]).
SIGMA_MIN = 0.06
SIGMA_MAX = 0.30
#: The ODE solver of every segment.
INNER = "dpmpp_2m"


@dataclass(frozen=True)
class RestartPlan:
    """Where a restart run goes (all timesteps ints of the schedule, descending within a segment).

    Attributes:
        before: the main run's listed timesteps down to t_min (exclusive): the first ODE segment.
        t_min, t_max: the restart interval; ``restart`` the timesteps of one restart segment (from t_max,
            ending at t_min exclusive); ``after`` the listed timesteps from t_min on (the last segment).
        restarts: how many times the noise is added back.
        gain, noise: the forward jump t_min -> t_max, x ← gain·x + noise·z (float64 scalars).
    """

    before: list[int]
    t_min: int
    t_max: int
    restart: list[int]
    after: list[int]
    restarts: int
    gain: float
    noise: float

    @property
    def nfe(self) -> int:
        return len(self.before) + self.restarts * len(self.restart) + len(self.after)


def _karras_sigma(ab: float) -> float:
    return math.inf if ab <= 0 else math.sqrt((1.0 - ab) / ab)


def restart_plan(
    alphas_cumprod: torch.Tensor,
    timesteps: list[int],
    restarts: int = RESTARTS,
    restart_steps: int = RESTART_STEPS,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> RestartPlan:
    """The segments of a restart run over the listed ``timesteps`` (descending ints, at least 2) of a
    schedule with ᾱ_t = ``alphas_cumprod[t]``; see the module docstring. The restart segment's timesteps
    are uniform in log-SNR from t_max down to (not including) t_min."""
    if len(timesteps) < 2:
        raise ValueError("sampler 'restart' needs at least 2 steps (it restarts from a listed level below the first)")
    ab = alphas_cumprod.double()
    sig = [_karras_sigma(float(ab[t])) for t in timesteps]
    j = 1 + int(np.argmin([abs(math.log(s / sigma_min)) if math.isfinite(s) else math.inf for s in sig[1:]]))
    t_min = timesteps[j]
    T = ab.numel()
    all_sig = np.array([_karras_sigma(float(a)) for a in ab.tolist()])
    t_max = int(np.argmin(np.abs(np.log(np.where(np.isfinite(all_sig), all_sig, 1e30) / sigma_max))))
    t_max = min(max(t_max, t_min + restart_steps), T - 1)
    if t_max - t_min < restart_steps:
        raise ValueError(f"no room for {restart_steps} restart steps above t_min = {t_min}")
    lam = 0.5 * (torch.log(ab) - torch.log1p(-ab))  # log-SNR λ_t, decreasing in t
    targets = np.linspace(float(lam[t_max]), float(lam[t_min]), restart_steps + 1)[:-1]
    grid = np.interp(targets, lam.flip(0).numpy(), np.arange(T)[::-1].astype(np.float64))
    seg: list[int] = []
    for k, t in enumerate(np.round(grid).astype(int).tolist()):
        t = t_max if k == 0 else min(max(t, t_min + restart_steps - k), seg[-1] - 1)
        seg.append(t)
    ratio = float(ab[t_max] / ab[t_min])
    return RestartPlan(
        timesteps[:j], t_min, t_max, seg, timesteps[j:], restarts, math.sqrt(ratio), math.sqrt(1.0 - ratio)
    )


@register_sampler("restart", nfe=lambda steps: steps + RESTARTS * RESTART_STEPS)
def sample_restart(
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
    """Restart sampling, Xu et al. (2023) Algorithm 1, with DPM-Solver++(2M) segments (see the module).

    ``steps`` listed timesteps make the main ODE; :data:`RESTARTS` times the sample jumps from t_min back to
    t_max with fresh forward noise (from the per-sample seeds) and is brought down again on
    :data:`RESTART_STEPS` steps. Network calls: steps + RESTARTS · RESTART_STEPS. ``eta`` must be 0 (the
    restart noise is the method's own). ``callback`` numbers the calls 0, 1, … across segments.
    """
    if eta != 0:
        raise ValueError(f"sampler 'restart' adds its own noise: eta must be 0, got {eta}")
    if variance != "eta":
        raise ValueError(f"variance={variance!r} only applies to the 'ddim' and 'ddpm' samplers, not to 'restart'")
    if noise is None:
        raise ValueError("sampler 'restart' needs a noise source")
    ts = levels.timesteps.tolist()
    ab = schedule_alpha_bars(denoise)
    plan = restart_plan(ab, ts, RESTARTS, RESTART_STEPS, SIGMA_MIN, SIGMA_MAX)
    ab_min = ab[plan.t_min]
    x = run_segment(INNER, denoise, x, plan.before, ab_min, callback=callback)
    done = len(plan.before)
    for _ in range(plan.restarts):
        x = torch.mul(x, plan.gain).add_(noise(), alpha=plan.noise)  # forward jump t_min -> t_max
        x = run_segment(INNER, denoise, x, plan.restart, ab_min, callback=callback, offset=done)
        done += len(plan.restart)
    return run_segment(
        INNER, denoise, x, plan.after, levels.alpha_bars[-1], callback=callback, offset=done, progress=progress
    )
