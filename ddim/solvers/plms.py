"""PLMS, the pseudo linear multistep method of PNDM (Liu, Ren, Lin & Zhao, ICLR 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds", arXiv 2202.09778): "plms" (order ≤ 3) and "plms4" (the paper's).

PNDM splits a step into a gradient part, a fourth-order Adams–Bashforth combination of the last four ε̂,

    ε' = (55 ε̂_i - 59 ε̂_{i-1} + 37 ε̂_{i-2} - 9 ε̂_{i-3}) / 24            (Eq. 12)

and a transfer part φ, the DDIM step from t_i to t_{i+1} driven by ε' (Eq. 9–11):

    x_{i+1} = √ᾱ_{i+1} x̂₀' + √(1-ᾱ_{i+1}) ε',   x̂₀' = (x_i - √(1-ᾱ_i) ε') / √ᾱ_i.

The paper warms up with three pseudo Runge–Kutta steps (4 network calls each). Here the warm-up uses
the lower-order Adams–Bashforth formulas instead (ε̂_i; (3ε̂_i - ε̂_{i-1})/2; (23ε̂_i - 16ε̂_{i-1} + 5ε̂_{i-2})/12),
as iPNDM does (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"),
so that every step costs exactly one network call. The first step is DDIM.

Few steps: the transfer multiplies the error of the extrapolated ε' by √ᾱ_{i+1}√(1-ᾱ_i)/√ᾱ_i -
√(1-ᾱ_{i+1}), which is 1.7-2.7 in the middle of a 10-step run on the linear schedule, and the fixed
fourth-order weights (55, -59, 37, -9)/24 amplify the step-to-step change of ε̂ further. Where a
trained network's ε̂ changes fast between distant timesteps (with x̂₀ clipping it jumps whenever the
clip engages) the paper's method is worse than DDIM at 10 steps: on the embedded model its samples
are speckled and further from the converged ODE map than DDIM-10's. So "plms" caps the
Adams–Bashforth order at 3 (:func:`plms_order`), which is closer to that map than DDIM, than order 4
and than order 2 at 5–30 steps; "plms4" is the paper's method as published, fourth order at every
step count (its exact-ε convergence order is tested, as is "plms"'s).

:mod:`ddim.engine` runs the table with a history of the last two (plms4: three) ε̂'s; without clipping
or thresholding it folds them into carried sums, two fused ops per step.
"""

from __future__ import annotations

import torch

from ddim.engine import table_sampler
from ddim.registry import Levels
from ddim.solvers.base import level_table

__all__ = ["ADAMS_BASHFORTH", "MAX_ORDER", "plms_coefficients", "plms_order", "plms_table"]

#: Adams–Bashforth weights of orders 1–4 on (ε̂_i, ε̂_{i-1}, ε̂_{i-2}, ε̂_{i-3}), for equal steps.
ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


#: The highest Adams–Bashforth order "plms" uses (see :func:`plms_order`); "plms4" uses the paper's 4.
MAX_ORDER = 3


def plms_order(steps: int) -> int:
    """The highest Adams–Bashforth order "plms" uses for a run of ``steps`` steps: 3 at every step count.

    Measured on the embedded model (``scripts/map_distance.py``, 64 class-conditional samples, guidance 2,
    RMS on [0, 1] to DDIM-200 from the same x_T): order 3 is closer to the converged map than the paper's
    order 4 at 5, 8, 10, 15, 20 and 30 steps, on leading and log-SNR spacing alike (10 leading steps:
    0.030 against 0.061; DDIM-10: 0.043), and than order 2 at all but two of those twelve points. The
    fourth-order weights (55, -59, 37, -9)/24 amplify the step-to-step change of a real network's ε̂ more
    than they gain in accuracy (docs/samplers.md). One rule for every S, so a run never changes character
    at some threshold; the paper's method stays available as "plms4".
    """
    del steps
    return MAX_ORDER


def plms_coefficients(levels: Levels, max_order: int = 4) -> tuple[torch.Tensor, list[int]]:
    """Float64 table [N, 5] and orders: step i is x_{i+1} = √ᾱ_{i+1} x̂₀_i + Σ_k w_k ε̂_{i-k}, row (√ᾱ_{i+1}, w_0..w_3).

    Since x_i = √ᾱ_i x̂₀_i + √(1-ᾱ_i) ε̂_i (the model adapter keeps this exact), the transfer φ reads
    x_{i+1} = √ᾱ_{i+1} x̂₀_i + c ε̂_i + (√(1-ᾱ_{i+1}) - c) ε' with c = √ᾱ_{i+1} √(1-ᾱ_i)/√ᾱ_i. At order 1
    (ε' = ε̂_i) this is the DDIM step √ᾱ_{i+1} x̂₀_i + √(1-ᾱ_{i+1}) ε̂_i, finite even where ᾱ_i = 0.
    """
    lv = level_table(levels)
    rows, orders = [], []
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"max_order must be 1, 2, 3 or 4, got {max_order}")
    for i in range(lv.N):
        p = min(i + 1, max_order)
        if lv.alpha[i] == 0:
            p = 1  # x̂₀' needs √ᾱ_i > 0 unless ε' = ε̂_i
        w = [lv.sigma[i + 1] * b for b in ADAMS_BASHFORTH[p - 1]]  # √(1-ᾱ_{i+1}) ε'
        if p > 1:
            c = lv.alpha[i + 1] * lv.sigma[i] / lv.alpha[i]
            w = [wk - c * b for wk, b in zip(w, ADAMS_BASHFORTH[p - 1], strict=True)]
            w[0] += c  # + c (ε̂_i - ε')
        rows.append([lv.alpha[i + 1], *w, *[0.0] * (4 - p)])
        orders.append(p)
    return torch.tensor(rows, dtype=torch.float64), orders


def plms_table(levels: Levels, max_order: int) -> torch.Tensor:
    """The engine's table of a PLMS run (:mod:`ddim.engine`): columns (a, b, c, w_1 … w_{p-1}, σ) =
    (0, √ᾱ_{i+1}, w_0, w_1, …, 0) with history ε̂, from :func:`plms_coefficients`."""
    table, _ = plms_coefficients(levels, max_order)
    zero = torch.zeros(table.shape[0], 1, dtype=torch.float64)
    return torch.cat([zero, table[:, : 1 + max_order], zero], dim=1)


@table_sampler("plms", history=MAX_ORDER - 1, past="eps", final_x0=False)
def plms_3_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """PLMS (PNDM, Liu et al. 2022, Eq. 9–12) with its Adams–Bashforth order capped at 3.

    Step i: ε' = the Adams–Bashforth combination of order min(i+1, 3) of the last ε̂'s (the fixed weights
    of that order; :func:`plms_order` says why 3), then the DDIM transfer from t_i to t_{i+1} with ε'.
    The last step, to ᾱ_final, is the same transfer (to ᾱ = 1 it returns x̂₀'). One network call per
    step. Deterministic: ``eta`` must be 0. "plms4" is the paper's method, fourth order at every step count.
    """
    return plms_table(levels, plms_order(levels.timesteps.numel()))


@table_sampler("plms4", history=3, past="eps", final_x0=False)
def plms4_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """PLMS exactly as published (PNDM, Liu et al. 2022, Eq. 12): fourth-order Adams–Bashforth from the
    fourth step on, whatever the step count, with the warm-up of "plms". One network call per step.
    Deterministic: ``eta`` must be 0."""
    return plms_table(levels, 4)
