"""Euler and Heun in σ-space (Karras, Aittala, Aila & Laine, NeurIPS 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", arXiv 2206.00364, Algorithm 1 with S_churn = 0): "euler", "heun".

With s = sqrt((1-ᾱ)/ᾱ) and y = x/√ᾱ the probability-flow ODE is dy/ds = (y - x̂₀)/s = ε̂ (Eq. 4 with
σ(t) = t). The state stays in x = √ᾱ y, so each step is x_{i+1} = a_i x_i + b_i d with
a_i = √ᾱ_{i+1}/√ᾱ_i and b_i = √ᾱ_{i+1} (s_{i+1} - s_i), built once in float64. The network is only
evaluated at the listed integer timesteps: Heun's second evaluation, at the end of step i, uses the
next listed timestep t_{i+1}. Euler in these variables is exactly DDIM (η = 0).

Euler is a table of the engine (:mod:`ddim.engine`); Heun, two calls per step, is a ``step`` the
engine's general loop calls (:func:`heun_step`).
"""

from __future__ import annotations

import torch

from ddim.engine import StepContext, table_sampler
from ddim.registry import Levels
from ddim.solvers.base import level_table

__all__ = ["karras_coefficients", "heun_step", "heun_timesteps"]


def karras_coefficients(levels: Levels, name: str) -> torch.Tensor:
    """Float64 [N, 2]: row i = (a_i, b_i) with x_{i+1} = a_i x_i + b_i d, the Euler step from level i to i+1.

    Raises ValueError when a listed timestep has ᾱ = 0 (s = ∞: zero terminal SNR), where σ-space
    steps are undefined; use 'ddim' or 'dpmpp_*' there, or timesteps that avoid t = T-1.
    """
    lv = level_table(levels)
    if any(a == 0 for a in lv.alpha[:-1]):
        t = int(levels.timesteps[[a == 0 for a in lv.alpha[:-1]].index(True)])
        raise ValueError(
            f"sampler {name!r} steps in σ = sqrt((1-ᾱ)/ᾱ), which is infinite at timestep t={t} (ᾱ_t = 0, "
            "zero terminal SNR); use sampler 'ddim' or 'dpmpp_2m' there, or timesteps that avoid it"
        )
    s, al = lv.karras_sigma, lv.alpha
    rows = [[al[i + 1] / al[i], al[i + 1] * (s[i + 1] - s[i])] for i in range(lv.N)]
    return torch.tensor(rows, dtype=torch.float64)


def heun_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """The 2N-1 timesteps Heun's calls see, in order: t_0, t_1, t_1, t_2, …, t_{N-2}, t_{N-1}, t_{N-1}.

    Step i < N-1 evaluates at t_i (the current point) and t_{i+1} (the Euler guess); the last step
    evaluates at t_{N-1} only.
    """
    return torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])


@table_sampler("euler")
def euler_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """Euler's method, Karras et al. (2022) Alg. 1 without the Heun correction (S_churn = 0).

    d_i = (y_i - x̂₀_i)/s_i = ε̂_i;  y_{i+1} = y_i + (s_{i+1} - s_i) d_i  (in x = √ᾱ y). The last step, to
    s = 0 (ᾱ = 1), gives y_i - s_i ε̂_i = x̂₀_i. One network call per step; the same map as DDIM (η = 0).
    The engine's table: (a_i, 0, b_i, 0), the step applied to (x_i, ε̂_i).
    """
    ab = karras_coefficients(levels, "euler")
    zero = torch.zeros(ab.shape[0], 1, dtype=torch.float64)
    return torch.cat([ab[:, :1], zero, ab[:, 1:], zero], dim=1)


def heun_step(ctx: StepContext, x: torch.Tensor, x0: torch.Tensor, d: torch.Tensor, row: tuple) -> torch.Tensor:
    """Step i of Heun (Karras et al. 2022, Alg. 1 lines 5-7) from its first call's d = ε̂(x_i, t_i),
    row (a_i, b_i, b_i/2) of :func:`heun_table`: the Euler guess, d' there, then the trapezoid."""
    a, b, half_b = row
    x_euler = torch.mul(x, a).addcmul_(d, b)  # Euler guess at s_{i+1}
    if ctx.last:
        return x_euler  # Alg. 1 line 8: no correction into the last level
    _, d_next = ctx.predict(x_euler, 2 * ctx.i + 1)  # d' at (x̃, t_{i+1})
    return torch.mul(x, a).addcmul_(d, half_b).addcmul_(d_next, half_b)  # trapezoid


@table_sampler("heun", step=heun_step, calls=heun_timesteps, calls_per_step=2, nfe=lambda steps: 2 * steps - 1)
def heun_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """Heun's second-order method, Karras et al. (2022) Algorithm 1 (S_churn = 0).

    ``steps`` = N listed timesteps; network calls = 2N - 1. Step i < N-1, from s_i to s_{i+1}:
    d_i = ε̂(x_i, t_i);  x̃ = Euler step with d_i;  d' = ε̂(x̃, t_{i+1});  y_{i+1} = y_i + (s_{i+1} - s_i)(d_i + d')/2.
    The last step, to ᾱ_final, is an Euler step (Alg. 1 line 8: no correction when σ_{i+1} = 0).
    Deterministic: ``eta`` must be 0. The table: rows (a_i, b_i, b_i/2) for :func:`heun_step`.
    """
    table = karras_coefficients(levels, "heun")
    return torch.cat([table, table[:, 1:] / 2], dim=1)
