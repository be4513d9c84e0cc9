"""Euler and Heun in σ-space (Karras, Aittala, Aila & Laine, NeurIPS 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", arXiv 2206.00364, Algorithm 1 with S_churn = 0): "euler", "heun".

With s = sqrt((1-ᾱ)/ᾱ) and y = x/√ᾱ the probability-flow ODE is dy/ds = (y - x̂₀)/s = ε̂ (Eq. 4 with
σ(t) = t). The state stays in x = √ᾱ y, so each step is x_{i+1} = a_i x_i + b_i d with
a_i = √ᾱ_{i+1}/√ᾱ_i and b_i = √ᾱ_{i+1} (s_{i+1} - s_i), built once in float64. The network is only
evaluated at the listed integer timesteps: Heun's second evaluation, at the end of step i, uses the
next listed timestep t_{i+1}. Euler in these variables is exactly DDIM (η = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddim.prediction import Denoiser
from ddim.sampling import Callback, Levels, _bar, register_sampler
from ddim.solvers.base import cached, check_ode_args, level_table, to_rows

__all__ = ["karras_coefficients", "heun_timesteps", "sample_euler", "sample_heun"]


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


@register_sampler("euler", noisy=lambda eta: False)
def sample_euler(
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
    """Euler's method, Karras et al. (2022) Alg. 1 without the Heun correction (S_churn = 0).

    d_i = (y_i - x̂₀_i)/s_i = ε̂_i;  y_{i+1} = y_i + (s_{i+1} - s_i) d_i  (in x = √ᾱ y). The last step, to
    s = 0 (ᾱ = 1), gives y_i - s_i ε̂_i = x̂₀_i. One network call per step; the same map as DDIM (η = 0).
    """
    check_ode_args("euler", eta, variance)
    rows = cached("euler", levels, x, lambda: to_rows(karras_coefficients(levels, "euler"), x))
    N = len(rows)
    plan = denoise.plan(levels.timesteps, x)
    with _bar(N, progress, "euler") as bar:
        for i in range(N - 1):
            x0, d = denoise.predict(x, plan, i)
            if callback is not None:
                callback(i, plan.timesteps[i], x, x0)
            a, b = rows[i]
            x = torch.mul(x, a).addcmul_(d, b)  # y + (s_{i+1} - s_i) d
            bar.update()
        # Last step, to ᾱ_final.
        x0, d = denoise.predict(x, plan, N - 1)
        if callback is not None:
            callback(N - 1, plan.timesteps[N - 1], x, x0)
        bar.update()
    denoise.finish(plan)
    if float(levels.alpha_bars[-1]) == 1.0:
        return x0
    a, b = rows[N - 1][:2]
    return torch.mul(x, a).addcmul_(d, b)


@register_sampler("heun", nfe=lambda steps: 2 * steps - 1, noisy=lambda eta: False)
def sample_heun(
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
    """Heun's second-order method, Karras et al. (2022) Algorithm 1 (S_churn = 0).

    ``steps`` = N listed timesteps; network calls = 2N - 1. Step i < N-1, from s_i to s_{i+1}:
    d_i = ε̂(x_i, t_i);  x̃ = Euler step with d_i;  d' = ε̂(x̃, t_{i+1});  y_{i+1} = y_i + (s_{i+1} - s_i)(d_i + d')/2.
    The last step, to ᾱ_final, is an Euler step (Alg. 1 line 8: no correction when σ_{i+1} = 0).
    Deterministic: ``eta`` must be 0.
    """
    check_ode_args("heun", eta, variance)

    def build() -> list[tuple[torch.Tensor, ...]]:
        table = karras_coefficients(levels, "heun")
        return to_rows(torch.cat([table, table[:, 1:] / 2], dim=1), x)  # (a, b, b/2)

    rows = cached("heun", levels, x, build)
    N = len(rows)
    plan = denoise.plan(heun_timesteps(levels.timesteps), x)
    with _bar(N, progress, "heun") as bar:
        for i in range(N - 1):
            x0, d = denoise.predict(x, plan, 2 * i)
            if callback is not None:
                callback(i, plan.timesteps[2 * i], x, x0)
            a, b, half_b = rows[i]
            x_euler = torch.mul(x, a).addcmul_(d, b)  # Euler guess at s_{i+1}
            _, d_next = denoise.predict(x_euler, plan, 2 * i + 1)  # d' at (x̃, t_{i+1})
            x = torch.mul(x, a).addcmul_(d, half_b).addcmul_(d_next, half_b)  # trapezoid
            bar.update()
        # Last step, to ᾱ_final: Euler.
        x0, d = denoise.predict(x, plan, 2 * N - 2)
        if callback is not None:
            callback(N - 1, plan.timesteps[2 * N - 2], x, x0)
        bar.update()
    denoise.finish(plan)
    if float(levels.alpha_bars[-1]) == 1.0:
        return x0
    a, b = rows[N - 1][:2]
    return torch.mul(x, a).addcmul_(d, b)
