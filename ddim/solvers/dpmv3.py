"""DPM-Solver-v3 (Zheng, Lu, Bao & Zhu, NeurIPS 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with
Empirical Model Statistics", arXiv 2310.13268): "dpmv3".

With the empirical model statistics l, s, b of :mod:`ddim.model_stats` (per element, functions of λ)
and f = (σ ε̂ - l x)/α = (1 - l) x/α - x̂₀, the probability-flow ODE dx/dλ = α (x̂₀ - α x) is, for a step
from λ_s to λ_t (Eq. 11; L_s(λ) = ∫_{λ_s}^λ l, S_s(λ) = ∫_{λ_s}^λ s, E_s = e^{L_s + S_s}),

    x_t = (α_t/α_s) e^{-L_s(λ_t)} x_s - α_t e^{-L_s(λ_t)} ∫_{λ_s}^{λ_t} E_s(λ) (g(λ) + B_s(λ)) dλ,

    g(λ) = e^{-S_s(λ)} f(λ) - B_s(λ),   B_s(λ) = ∫_{λ_s}^λ e^{-S_s(r)} b_r dr,

solved exactly for everything but g, the part of f the statistics do not predict; g is replaced by its
Taylor polynomial around λ_s, with derivatives from the last few values of f (each re-expressed as g
relative to λ_s). Multistep predictor of order p (p values: the current one and p-1 before), and after
the next call a corrector that redoes the step with the new value too (order p+1, no extra call; the
new f is kept as evaluated at the predicted point, as the paper's code does). l = 1, s = b = 0 gives the
data-prediction predictor-corrector (the paper's "degenerated" solver, used when a model has no
statistics).

Every coefficient is an element-wise float64 function of the levels and the statistics, built once per
run by :func:`dpmv3_coefficients` (the integrals by the trapezoidal rule on ``SUB`` nodes per step);
the loop only applies the table. One network call per listed timestep; the last step into ᾱ = 1
returns x̂₀ of the last call, as every sampler here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddim.engine import StepContext, cached, table_sampler
from ddim.model_stats import ModelStats, degenerate_stats, stats_for
from ddim.registry import Levels
from ddim.solvers.base import level_table, multistep_orders

__all__ = ["Dpmv3Step", "dpmv3_coefficients", "dpmv3_step", "dpmv3_table", "DPMV3_ORDER", "SUB"]

#: Highest predictor order of "dpmv3" (the corrector adds one).
DPMV3_ORDER = 3
#: Whether "dpmv3" corrects each point with the next call (UniC-style, no extra calls).
CORRECTOR = True
#: Trapezoid nodes per step for the integrals of the statistics (runs of up to 20 steps; fewer per step
#: for longer runs, whose steps are shorter).
SUB = 256


@dataclass(frozen=True)
class Dpmv3Step:
    """One update x_new = a ⊙ x_start + Σ_k w[k] ⊙ f_{points[k]} + c (float64, shapes broadcast over a sample).

    Attributes:
        points: the level indices whose f values enter, the step's start level first.
        a: [*shape] the weight on the step's starting point.
        w: [len(points), *shape] the weights on those f values.
        c: [*shape] the part the statistics predict (from b).
    """

    points: tuple[int, ...]
    a: torch.Tensor
    w: torch.Tensor
    c: torch.Tensor


def _cumtrapz(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∫_{x_0}^{x_k} y for every node k (trapezoids), along dim 0; y [G, ...], x [G]."""
    dx = (x[1:] - x[:-1]).reshape(-1, *([1] * (y.ndim - 1)))
    steps = 0.5 * (y[1:] + y[:-1]) * dx
    return torch.cat([torch.zeros_like(y[:1]), steps.cumsum(0)])


def _trapz(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dx = (x[1:] - x[:-1]).reshape(-1, *([1] * (y.ndim - 1)))
    return (0.5 * (y[1:] + y[:-1]) * dx).sum(0)


@dataclass(frozen=True)
class _Segment:
    """The statistics integrated over one step, λ_k to λ_{k+1} (float64, element-wise)."""

    lam: torch.Tensor  # [M+1] nodes
    L: torch.Tensor  # [M+1, *shape] ∫_{λ_k}^λ l
    S: torch.Tensor  # [M+1, *shape] ∫_{λ_k}^λ s
    B: torch.Tensor  # [M+1, *shape] ∫_{λ_k}^λ e^{-S} b


def _segment(stats: ModelStats, lam0: float, lam1: float, sub: int) -> _Segment:
    nodes = torch.linspace(lam0, lam1, sub + 1, dtype=torch.float64)
    l_n, s_n, b_n = stats.at(nodes)
    L, S = _cumtrapz(l_n, nodes), _cumtrapz(s_n, nodes)
    return _Segment(nodes, L, S, _cumtrapz(torch.exp(-S) * b_n, nodes))


def _step(
    lam: list[float], alpha: list[float], segs: list[_Segment], Sg: torch.Tensor, s: int, points: list[int]
) -> Dpmv3Step:
    """The update from level s to s+1 using the f values at ``points`` (``points[0] == s``, then any of
    s+1 (a corrector) and earlier levels). ``Sg[k]`` = ∫_{λ_0}^{λ_k} s, per element."""
    seg = segs[s]
    E = torch.exp(seg.L + seg.S)  # E_s(λ) on the step
    Q = alpha[s + 1] * torch.exp(-seg.L[-1])  # α_t e^{-L_s(λ_t)}
    a = alpha[s + 1] / alpha[s] * torch.exp(-seg.L[-1])
    n = len(points) - 1
    d = (seg.lam - lam[s]).reshape(-1, *([1] * (E.ndim - 1)))
    I = [_trapz(E * d**k / math.factorial(k), seg.lam) for k in range(n + 1)]  # noqa: E741 - ∫ E_s (λ-λ_s)^k/k!
    c = _trapz(E * seg.B, seg.lam)  # ∫ E_s B_s
    w = [I[0].clone()]
    if n:
        # g^{(k)} = Σ_r R⁻¹[k-1, r] (g_{j_r} - g_s) from g_j - g_s = Σ_k δ_j^k/k! g^{(k)} (δ_j = λ_j - λ_s)
        deltas = [lam[j] - lam[s] for j in points[1:]]
        Rinv = np.linalg.inv(np.array([[dl**k / math.factorial(k) for k in range(1, n + 1)] for dl in deltas]))
        for r, j in enumerate(points[1:]):
            wr = sum(I[k] * float(Rinv[k - 1, r]) for k in range(1, n + 1))
            if j == s + 1:  # the step's end (the corrector's new value)
                S_j, B_j = seg.S[-1], seg.B[-1]
            else:  # an earlier level: S_s(λ_j) = -∫_{λ_j}^{λ_s} s, B_s(λ_j) = -∫_{λ_j}^{λ_s} e^{-S_s} b
                S_j = Sg[j] - Sg[s]
                B_j = -sum(torch.exp(Sg[s] - Sg[m]) * segs[m].B[-1] for m in range(j, s))
            w[0] = w[0] - wr
            w.append(wr * torch.exp(-S_j))  # g_j = e^{-S_s(λ_j)} f_j - B_s(λ_j)
            c = c - wr * B_j
    return Dpmv3Step(tuple(points), a, -Q * torch.stack(w), -Q * c)


def dpmv3_coefficients(
    levels: Levels,
    stats: ModelStats | None = None,
    order: int = DPMV3_ORDER,
    corrector: bool = True,
    sub: int | None = None,
) -> tuple[torch.Tensor, list[Dpmv3Step], list[Dpmv3Step | None], list[int]]:
    """The float64 tables of a DPM-Solver-v3 run.

    Args:
        levels: the run's levels (N listed timesteps, then ᾱ_final).
        stats: the model's statistics (default :func:`~ddim.model_stats.degenerate_stats`).
        order: the predictor's highest order (1-3; the corrector's is one more).
        corrector: whether to correct each point with the next call (no extra calls).
        sub: trapezoid nodes per step (default :data:`SUB` up to 20 steps, fewer for more, at least 16).

    Returns:
        (f_coef, pred, corr, orders): f_coef float64 [N, *shape], (1 - l)/α at each listed level, so that
        f_i = f_coef[i] ⊙ x_i - x̂₀_i; pred[i] the predictor step from level i to i+1 (absent, so one
        entry fewer, when the last step lands on ᾱ = 1: that step is x̂₀); corr[i] the corrector of
        step i, applied at level i+1 after its call, or None; orders as
        :func:`~ddim.solvers.base.multistep_orders` (lower-order final steps).

    Raises ValueError for a listed level with ᾱ = 0 (zero terminal SNR: λ = -∞).
    """
    stats = degenerate_stats() if stats is None else stats
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    lv = level_table(levels)
    N = lv.N
    if not all(math.isfinite(v) for v in lv.lam[:N]):
        raise ValueError("sampler 'dpmv3' needs listed levels with 0 < ᾱ < 1 (zero terminal SNR is not supported)")
    sub = sub or max(16, min(SUB, SUB * 20 // N))
    last = N - 1 if not math.isfinite(lv.lam[N]) else N  # the last level the table reaches (ᾱ = 1: x̂₀)
    lam, alpha = lv.lam, lv.alpha
    segs = [_segment(stats, lam[k], lam[k + 1], sub) for k in range(last)]
    zero = torch.zeros(stats.shape, dtype=torch.float64)
    Sg = torch.stack([zero, *[sg.S[-1] for sg in segs]]).cumsum(0)  # ∫_{λ_0}^{λ_k} s
    level_l = stats.at(torch.tensor(lam[:N], dtype=torch.float64))[0]
    f_coef = (1.0 - level_l) / torch.tensor(alpha[:N], dtype=torch.float64).reshape(-1, *([1] * len(stats.shape)))
    orders = multistep_orders(lv, order, lower_order_final=True)
    pred: list[Dpmv3Step] = []
    corr: list[Dpmv3Step | None] = []
    for i in range(last):
        pts = list(range(i, i - orders[i], -1))
        pred.append(_step(lam, alpha, segs, Sg, i, pts))
        # the corrector of step i runs at level i+1 when a later step starts there
        ok = corrector and i + 1 < last and lv.h(i) > 0
        corr.append(_step(lam, alpha, segs, Sg, i, [i, i + 1, *pts[1:]]) if ok else None)
    return f_coef, pred, corr, orders


def _on_device(step: Dpmv3Step | None, x: torch.Tensor) -> tuple | None:
    """A step's tables on x's device, in x's dtype (they are per element: a wider dtype would widen x)."""
    if step is None:
        return None
    dt = x.dtype
    cast = [v.to(device=x.device, dtype=dt) for v in (step.a, step.c)]
    return step.points, cast[0], list(step.w.to(device=x.device, dtype=dt).unbind(0)), cast[1]


def _apply(row: tuple, x: torch.Tensor, f: dict[int, torch.Tensor]) -> torch.Tensor:
    points, a, w, c = row
    out = torch.mul(x, a).add_(c)
    for j, wj in zip(points, w, strict=True):
        out.addcmul_(f[j], wj)
    return out


def _tables(model: object, levels: Levels, x: torch.Tensor) -> tuple:
    """The run's f coefficients, predictor and corrector steps on x's device and dtype, for the model's
    statistics (checked against x's sample shape)."""
    stats = stats_for(model)
    shape = tuple(x.shape[1:])
    if stats is not None and stats.shape not in ((), shape):
        raise ValueError(
            f"the model's DPM-Solver-v3 statistics are for samples shaped {list(stats.shape)}, not {list(shape)}"
        )

    def build() -> tuple:
        f_coef, pred, corr, _ = dpmv3_coefficients(levels, stats, DPMV3_ORDER, CORRECTOR)
        return (
            list(f_coef.to(device=x.device, dtype=x.dtype).unbind(0)),
            [_on_device(r, x) for r in pred],
            [_on_device(r, x) for r in corr],
        )

    return cached(levels, x, ("dpmv3", None if stats is None else stats.uid, DPMV3_ORDER, CORRECTOR), build)


def dpmv3_step(ctx: StepContext, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, row: tuple) -> torch.Tensor:
    """Step i of DPM-Solver-v3 after its call at x_i: f_i = (1 - l_i) x_i/α_i - x̂₀_i; the corrector redoes
    step i-1 from its start with f_i too; the predictor steps to level i+1. (Into ᾱ = 1 the engine returns
    x̂₀ of the last call instead.) ``ctx.state`` carries the tables, the last f values and the start."""
    st, i = ctx.state, ctx.i
    if i == 0:
        st["tables"], st["f"] = _tables(ctx.model, ctx.levels, x), {}
    f_coef, pred, corr = st["tables"]
    f = st["f"]
    f[i] = torch.mul(x, f_coef[i]).sub_(x0)
    f.pop(i - DPMV3_ORDER - 1, None)
    if i > 0 and corr[i - 1] is not None:
        x = _apply(corr[i - 1], st["start"], f)  # corrector: step i-1 again, now with f_i
    st["start"] = x
    return _apply(pred[i], x, f)


@table_sampler("dpmv3", step=dpmv3_step)
def dpmv3_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """DPM-Solver-v3 (Zheng et al. 2023), multistep predictor-corrector with the model's statistics.

    The statistics are those attached to the model (:func:`~ddim.model_stats.attach_stats`; :func:`ddim.load`
    finds ``model.ems.safetensors`` beside the weights, made by ``ddim stats``); without them the
    degenerate l = 1, s = b = 0 (a data-prediction predictor-corrector). At level i: f_i = (1 - l_i) x_i/α_i
    - x̂₀_i from the call at x_i; the corrector redoes the step into level i with f_i too; the predictor
    (order ≤ :data:`DPMV3_ORDER`, lower near the end) steps to level i+1. One network call per step.
    Deterministic: ``eta`` must be 0. The engine's table is the predictor order of each step ([N, 1]);
    the element-wise coefficients depend on the model's statistics and are built by :func:`dpmv3_step`.
    """
    lv = level_table(levels)
    orders = multistep_orders(lv, DPMV3_ORDER, lower_order_final=True)
    col = torch.zeros(lv.N, 1, dtype=torch.float64)
    col[: len(orders), 0] = torch.tensor(orders, dtype=torch.float64)
    return col
