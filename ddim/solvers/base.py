"""What the solvers' tables share: the noise levels of a run in float64 and the order of each multistep step.

Notation (Lu et al. 2022; Kingma et al. 2021) for level j of a run (j = 0 … N-1 the listed timesteps,
j = N the final level ᾱ_final): α_j = √ᾱ_j, σ_j = √(1 - ᾱ_j), λ_j = log(α_j / σ_j) (the log-SNR, +∞ at
ᾱ = 1 and -∞ at ᾱ = 0), and Karras et al.'s noise level s_j = σ_j / α_j = sqrt((1 - ᾱ_j) / ᾱ_j).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddim.engine import deterministic
from ddim.registry import Levels

__all__ = ["LevelTable", "level_table", "multistep_orders", "check_ode_args"]


@dataclass(frozen=True)
class LevelTable:
    """α, σ, λ and s at the N+1 levels of a run, as python floats (float64)."""

    alpha: list[float]
    sigma: list[float]
    lam: list[float]
    karras_sigma: list[float]

    @property
    def N(self) -> int:
        """Number of listed timesteps (= number of steps)."""
        return len(self.alpha) - 1

    def h(self, j: int) -> float:
        """λ_{j+1} - λ_j, the log-SNR length of step j (0 between equal levels, +∞ into ᾱ = 1 or out of ᾱ = 0)."""
        a, b = self.lam[j], self.lam[j + 1]
        return 0.0 if a == b else b - a

    @property
    def lands_on_data(self) -> bool:
        """Whether the final level is ᾱ = 1 (σ = 0): the last step then returns x̂₀ of its model call."""
        return self.sigma[-1] == 0.0


def level_table(levels: Levels) -> LevelTable:
    """α, σ, λ and s of a run's N+1 levels in float64 (python floats)."""
    ab = levels.alpha_bars.tolist()
    alpha = [math.sqrt(a) for a in ab]
    sigma = [math.sqrt(max(1.0 - a, 0.0)) for a in ab]
    lam = [math.inf if s == 0 else -math.inf if a == 0 else math.log(a / s) for a, s in zip(alpha, sigma, strict=True)]
    karras = [math.inf if a == 0 else s / a for a, s in zip(alpha, sigma, strict=True)]
    return LevelTable(alpha, sigma, lam, karras)


def multistep_orders(lv: LevelTable, max_order: int, lower_order_final: bool) -> list[int]:
    """The order of each step i of a multistep method (step i goes from level i to level i+1).

    - warm-up: step i can use at most i+1 model values, and only those at levels of finite λ (a level
      with ᾱ = 0 has λ = -∞ and cannot enter a divided difference) and distinct λ;
    - a step of length h = 0 or h = ∞ (e.g. the last step into ᾱ = 1) is first order: the higher terms
      vanish or diverge there;
    - ``lower_order_final``: step i has order at most N - i (last step first order, the one before at
      most second), as DPM-Solver++ does for fewer than 15 steps and UniPC always, for stability.
    """
    orders, usable = [], 0
    for i in range(lv.N):
        if not math.isfinite(lv.lam[i]):
            usable = 0
        elif i > 0 and lv.h(i - 1) == 0:
            usable = 1  # the previous level equals this one: no divided difference across it
        else:
            usable += 1
        h = lv.h(i)
        p = min(max_order, max(usable, 1))
        if lower_order_final:
            p = min(p, lv.N - i)
        if h == 0 or not math.isfinite(h):
            p = 1
        orders.append(p)
    return orders


def check_ode_args(name: str, eta: float, variance: str) -> None:
    """Refuse η > 0 and variance="large" for a deterministic (probability-flow ODE) sampler
    (:func:`ddim.engine.deterministic`, the check :func:`~ddim.engine.table_sampler` applies by default)."""
    deterministic(name)(eta, variance)
