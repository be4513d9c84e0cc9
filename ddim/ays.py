"""Align Your Steps (Sabour, Fidler & Kreis, ICML 2024, arXiv 2404.14507): timesteps that minimise the
Kullback-Leibler upper bound (KLUB) between the reverse-time SDE and its discretisation.

A solver that holds the denoiser fixed over a step (DDIM / Euler-Maruyama in data prediction) replaces
x̂₀(x_t, t) by x̂₀(x_{t_i}, t_i) on [t_{i+1}, t_i]. By Girsanov, for the reverse SDE with the model's score
(in Karras et al.'s σ = e^{-λ}, dx = -2σ̇σ∇log p dt + sqrt(2σ̇σ) dω, ∇log p = (x̂₀ - x)/σ²), the KL between
the two path measures is at most

    KLUB = Σ_i ∫_{λ_i}^{λ_{i+1}} e^{2λ} E ||x̂₀(x_λ, λ) - x̂₀(x_{λ_i}, λ_i)||² dλ         (AYS Eq. 8, in λ)

(the drift gap 2σ̇/σ·Δx̂₀, squared, over twice the diffusion 2σ̇σ). The expectation is over data x₀ and
one noise ε per sample, shared by both points (x_λ = α x₀ + σ ε, in the scaled variables y = x/α). This
module evaluates x̂₀ once on a grid of G timesteps (uniform in log-SNR, including T-1 and 0) for n data
samples, turns the integral into a sum over the grid, and finds the schedule on the grid with the
smallest KLUB exactly, by dynamic programming over the additive cost of each interval (AYS optimises
the same objective by coordinate descent from a start schedule; on a grid the optimum is exact).

The last listed timestep's interval runs to t = 0, the grid's end (every sampler here then steps to
ᾱ = 1 with x̂₀ of its last call).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ddim.prediction import Denoiser, Model
from ddim.schedule import NoiseSchedule
from ddim.timesteps import timesteps as make_timesteps

__all__ = ["KlubTable", "klub_table", "klub_timesteps", "klub", "optimized_timesteps"]


@dataclass(frozen=True)
class KlubTable:
    """The KLUB of every interval of a timestep grid.

    Attributes:
        timesteps: int64 [G], descending, the grid (starts at T-1, ends at 0).
        cost: float64 [G, G]: cost[i, j] (i < j) = Σ_{g=i}^{j-1} w_g E||x̂₀_g - x̂₀_i||², the KLUB of a step
            from grid level i to grid level j; cost[i, i] is unused.
        tail: float64 [G]: tail[i] = the same from level i to the grid's end (the last listed level's).
    """

    timesteps: torch.Tensor
    cost: torch.Tensor
    tail: torch.Tensor

    def __call__(self, idx: list[int]) -> float:
        """The KLUB of the schedule at grid indices ``idx`` (increasing, starting at 0)."""
        total = sum(float(self.cost[a, b]) for a, b in zip(idx[:-1], idx[1:], strict=True))
        return total + float(self.tail[idx[-1]])


def klub_table(
    model: Model,
    schedule: NoiseSchedule,
    data: torch.Tensor,
    *,
    grid: int = 100,
    model_kwargs: Mapping[str, Any] | None = None,
    uncond_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    prediction: str = "epsilon",
    seed: int = 0,
    batch: int = 128,
    progress: bool = False,
    **denoiser_kwargs: Any,
) -> KlubTable:
    """Evaluate x̂₀ on ``grid`` timesteps (the "logsnr" spacing) for the clean samples ``data`` [n, ...]
    (one noise each, from ``seed``) and tabulate the KLUB of every interval. Network calls:
    grid · ceil(n / batch). Keyword arguments as :func:`ddim.model_stats.compute_stats` (tensors in
    ``model_kwargs`` with a first dimension n are taken per sample)."""
    from ddim.model_stats import _slice_kwargs

    if not isinstance(data, torch.Tensor) or data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be a tensor [n, ...] of clean samples, got {getattr(data, 'shape', data)}")
    ts = make_timesteps(schedule, grid, "logsnr")
    ab = schedule.alphas_cumprod.double()[ts]
    if bool((ab <= 0).any()):
        raise ValueError("the KLUB needs levels with ᾱ > 0 (no zero terminal SNR)")
    n = data.shape[0]
    try:
        p = next(model.parameters())  # type: ignore[union-attr]
        dtype, device = p.dtype, p.device
    except (AttributeError, StopIteration):
        dtype, device = (data.dtype if data.dtype.is_floating_point else torch.float32), data.device
    x0 = data.to(device=device, dtype=dtype)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(x0)
    D = torch.empty((grid, n, math.prod(x0.shape[1:])), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, batch):
            sl = slice(start, min(start + batch, n))
            denoise = Denoiser(
                model,
                schedule,
                prediction,
                guidance_scale=guidance_scale,
                model_kwargs=_slice_kwargs(model_kwargs, sl, n),
                uncond_kwargs=_slice_kwargs(uncond_kwargs, sl, n),
                **denoiser_kwargs,
            )
            for g in tqdm(range(grid), disable=not progress, desc="klub", leave=False):
                a, s = float(ab[g].sqrt()), float((1 - ab[g]).sqrt())
                m, _ = denoise(a * x0[sl] + s * eps[sl], int(ts[g]))
                D[g, sl] = m.double().cpu().flatten(1)
    lam = 0.5 * (ab.log() - torch.log1p(-ab))  # increasing along the grid
    dlam = torch.diff(lam)
    w = torch.exp(2 * lam) * torch.cat([dlam, dlam[-1:]])  # e^{2λ_g} Δλ_g
    flat = D.reshape(grid, -1)
    sq = (flat * flat).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * flat @ flat.T).clamp(min=0) / n  # E||x̂₀_g - x̂₀_i||² (sum over pixels)
    contrib = w[None, :] * dist  # [i, g]
    cum = torch.cat([torch.zeros(grid, 1, dtype=torch.float64), contrib.cumsum(1)], dim=1)  # cum[i, k] = Σ_{g<k}
    start = torch.diagonal(cum[:, :grid])[:, None]
    idx = torch.arange(grid)
    cost = torch.where(idx[None, :] > idx[:, None], cum[:, :grid] - start, torch.full((grid, grid), math.inf))
    tail = cum[:, grid] - start[:, 0]
    return KlubTable(ts, cost, tail)


def klub_timesteps(table: KlubTable, steps: int) -> list[int]:
    """The ``steps`` grid timesteps (descending, starting at T-1) with the smallest KLUB: exact, by dynamic
    programming over the grid (O(steps · G²))."""
    G = table.timesteps.numel()
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= G:
        raise ValueError(f"steps must be an int in [1, {G}] (the grid's size), got {steps!r}")
    best = torch.full((G,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(steps - 1):
        total = best[:, None] + table.cost  # from i to j
        val, arg = total.min(0)
        back.append(arg)
        best = val
    final = best + table.tail
    j = int(torch.argmin(final))
    idx = [j]
    for arg in reversed(back):
        j = int(arg[j])
        idx.append(j)
    idx.reverse()
    return [int(table.timesteps[i]) for i in idx]


def klub(table: KlubTable, timesteps: list[int]) -> float:
    """The KLUB of a schedule whose timesteps are all on the table's grid."""
    where = {int(t): i for i, t in enumerate(table.timesteps.tolist())}
    missing = [t for t in timesteps if t not in where]
    if missing:
        raise ValueError(f"timesteps {missing} are not on the grid")
    return table([where[t] for t in timesteps])


def optimized_timesteps(config: Mapping[str, Any], steps: int) -> list[int]:
    """The optimised list a model ships for ``steps`` steps: ``config["sampling"]["optimized_timesteps"][str(steps)]``
    (what ``--spacing optimized`` uses). Raises ValueError naming the step counts it has."""
    table = dict((config.get("sampling") or {}).get("optimized_timesteps") or {})
    if str(steps) not in table:
        have = ", ".join(sorted(table, key=int)) or "none"
        raise ValueError(
            f"spacing 'optimized': this model ships optimised timesteps for steps {have}, not {steps} "
            "(make a list with `ddim optimize-timesteps` and pass it as --timesteps)"
        )
    return [int(t) for t in table[str(steps)]]
