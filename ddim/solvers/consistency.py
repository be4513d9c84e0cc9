"""Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
Algorithm 1): "consistency".

A consistency model (:class:`ddim.consistency.ConsistencyModel`) maps any point of a trajectory to its
start in one call: its x̂₀ is f. One call gives a sample; more calls alternate re-noising to the next
listed level with fresh noise (one seed per sample) and mapping back:

    x̂ = f(x_T, t_0);   for i = 1 … N-1:  z_i = √ᾱ_{t_i} x̂ + √(1-ᾱ_{t_i}) ξ_i,  x̂ = f(z_i, t_i).

As an engine table (x_{i+1} = a x_i + b x̂₀_i + c ε̂_i + σ_i z_i): the re-noising to level i+1 is
b = √ᾱ_{i+1}, σ = √(1-ᾱ_{i+1}); the last step returns x̂ into ᾱ = 1 (the engine's ``final_x0``), and into
ᾱ_final < 1 (latent-diffusion schedules) the point √ᾱ_final x̂ + √(1-ᾱ_final) ε̂ on the last call's
trajectory, without noise. η does not apply: the re-noising is the method.
"""

from __future__ import annotations

import torch

from ddim.engine import table_sampler
from ddim.registry import Levels

__all__ = ["consistency_table"]


def _check(eta: float, variance: str) -> None:
    if eta != 0.0:
        raise ValueError("sampler 'consistency' re-noises to each level by construction: leave eta at 0")
    if variance != "eta":
        raise ValueError(f"variance={variance!r} only applies to the 'ddim' and 'ddpm' samplers, not to 'consistency'")


def _always(eta: float) -> bool:
    return True


@table_sampler("consistency", noisy=_always, check=_check)
def consistency_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1), one call per listed timestep: x̂ = f(x_T, t_0),
    then for each later timestep t_i re-noise z = √ᾱ_{t_i} x̂ + √(1-ᾱ_{t_i}) ξ (fresh noise, one seed per
    sample) and x̂ = f(z, t_i). For a consistency model (``ddim.load`` of a distilled "cd" folder). Rows
    (a, b, c, σ): (0, √ᾱ_{i+1}, 0, √(1-ᾱ_{i+1})); the last (0, √ᾱ_f, √(1-ᾱ_f), 0)."""
    ab = levels.alpha_bars[1:]  # the level each step goes to
    table = torch.zeros(ab.numel(), 4, dtype=torch.float64)
    table[:, 1] = ab.sqrt()
    table[:-1, 3] = (1.0 - ab[:-1]).sqrt()
    table[-1, 2] = (1.0 - ab[-1]).sqrt()
    return table
