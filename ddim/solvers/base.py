"""What the solvers share: the noise levels of a run in float64, the order of each multistep step,
argument checks, and the one linear update every table-driven step is made of.

Notation (Lu et al. 2022; Kingma et al. 2021) for level j of a run (j = 0 … N-1 the listed timesteps,
j = N the final level ᾱ_final): α_j = √ᾱ_j, σ_j = √(1 - ᾱ_j), λ_j = log(α_j / σ_j) (the log-SNR, +∞ at
ᾱ = 1 and -∞ at ᾱ = 0), and Karras et al.'s noise level s_j = σ_j / α_j = sqrt((1 - ᾱ_j) / ᾱ_j).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ddim.noise import StepNoise
from ddim.prediction import Denoiser, Plan, memo, scalar_rows, tensor_key
from ddim.sampling import Callback, Levels, _NoBar

T = TypeVar("T")

__all__ = [
    "LevelTable",
    "level_table",
    "multistep_orders",
    "check_ode_args",
    "combine",
    "cached",
    "to_rows",
    "fold_multistep",
    "multistep_loop",
]


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
    """Refuse η > 0 and variance="large" for a deterministic (probability-flow ODE) sampler."""
    if eta != 0:
        raise ValueError(
            f"sampler {name!r} is deterministic: eta must be 0, got {eta} "
            "(for stochastic sampling use 'ddim' with eta > 0, 'ddpm' or 'dpmpp_2m_sde')"
        )
    if variance != "eta":
        raise ValueError(f"variance={variance!r} only applies to the 'ddim' and 'ddpm' samplers, not to {name!r}")


def cached(name: str, levels: Levels, x: torch.Tensor, build: Callable[[], T], *extra: object) -> T:
    """``build()``, the per-run tables of sampler ``name``, cached by the run's levels, x's dtype and
    device and ``extra`` (:func:`~ddim.prediction.memo`): repeated runs (chunks of a large request,
    a timestep search) skip rebuilding them. Tables are made with :func:`to_rows`."""
    return memo(("solvers", name, tensor_key(levels.alpha_bars), x.device, x.dtype, *extra), build)


def cached_fused(name: str, levels: Levels, plan: Plan, x: torch.Tensor, build: Callable[[], T], *extra: object) -> T:
    """:func:`cached` for a table folded with ``plan``'s conversion coefficients (``extra`` must name
    the prediction), first looked up by the identity of ``levels`` and of the plan's cached float64
    coefficients (both weakly referenced, so a recycled id is told apart): a repeated run skips
    hashing the levels' contents."""

    def by_content() -> tuple:
        return weakref.ref(levels), weakref.ref(plan.conv), cached(name, levels, x, build, *extra)

    key = ("solvers-id", name, id(levels), id(plan.conv), x.device, x.dtype, *extra)
    return memo(key, by_content, valid=lambda v: v[0]() is levels and v[1]() is plan.conv)[2]


def to_rows(table: torch.Tensor, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """A float64 table [N, C] as N rows of C 0-d tensors on x's device, cast once (the loop then does
    no tensor indexing); see :func:`~ddim.prediction.scalar_rows`."""
    return scalar_rows(table, x)


def combine(x: torch.Tensor, row: Sequence[torch.Tensor], values: list[torch.Tensor], n: int) -> torch.Tensor:
    """row[0]·x + Σ_{k<n} row[k+1]·values[k], out of place (row: 0-d tensors in x's dtype/device)."""
    out = torch.mul(x, row[0])
    for k in range(n):
        out.addcmul_(values[k], row[k + 1])
    return out


def fold_multistep(plan: Plan, table: torch.Tensor, history: int) -> torch.Tensor:
    """Fold a multistep table into one linear in (x_i, out_i) and ``history`` carried tensors (float64).

    ``table`` is [N, 2 + history + 1]: step i is x_{i+1} = a x_i + Σ_{k≤history} k_k m_{i-k} (+ c_z z),
    row (a, k_0, …, k_history, c_z), with m_j = c0_j x_j + c1_j out_j the x̂₀ of call j (a linear
    denoiser; c0, c1 from ``plan.conv``). The past enters through carried tensors G_1 … G_history:
    G_l holds what the x̂₀'s made so far contribute to the step l ahead, so that

        x_{i+1} = G_1 + A_i x_i + B_i out_i (+ c_z z),    A_i = a_i + k_0,i c0_i,  B_i = k_0,i c1_i,
        G_l ← G_{l+1} + P_l,i x_i + Q_l,i out_i,          P_l,i = k_l,i+l c0_i,   Q_l,i = k_l,i+l c1_i

    (G_{history+1} = 0; k of steps past the last are 0). Returns [N, 2 + 2·history + 1]:
    (A, B, P_1, Q_1, …, P_history, Q_history, c_z).
    """
    c = plan.conv
    if c is None:
        raise RuntimeError("this plan has no float64 coefficients (make it with Denoiser.plan)")
    N = table.shape[0]
    c0, c1 = c[:N, 0], c[:N, 1]
    cols = [table[:, 0] + table[:, 1] * c0, table[:, 1] * c1]
    for lag in range(1, history + 1):
        k = torch.zeros(N, dtype=torch.float64)
        k[: N - lag] = table[lag:, 1 + lag]  # k_lag of step i + lag, the step that uses m_i
        cols += [k * c0, k * c1]
    return torch.stack([*cols, table[:, -1]], dim=1)


def multistep_loop(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    rows: list[tuple[torch.Tensor, ...]],
    history: int,
    noise: Callable[[], torch.Tensor] | None,
    callback: Callback | None,
    bar: Any,
) -> torch.Tensor:
    """The fused loop of a linear multistep method (rows of :func:`fold_multistep`, cast by :func:`to_rows`).

    Step i is 2 + 2·history fused in-place ops (+1 with noise) on carried buffers: no allocation after
    the first step (none at all beyond three buffers without a callback), no tensor indexing, no host
    synchronisation. With ``noise``, one draw at every step but the last (noise-free). As in the DDIM
    loop (:func:`ddim.sampling._linear_loop`), NaN/Inf is checked once, on the result (every term
    multiplies the network outputs that reach it); if it is not finite the run is repeated checking
    every call, so the error names the first bad step and timestep.
    """
    x_start = x
    x = _run_multistep(denoise, x, plan, rows, history, noise, callback, bar, check=False)
    if not denoise.finite(x):
        again = noise.restarted() if isinstance(noise, StepNoise) else noise
        _run_multistep(denoise, x_start, plan, rows, history, again, None, _NoBar(), check=True)
        denoise.finish(plan)
        raise FloatingPointError(
            "the result contains NaN or Inf, but a re-run checking every model output found none "
            "(is the model deterministic?)"
        )
    return x


def _run_multistep(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    rows: list[tuple[torch.Tensor, ...]],
    history: int,
    noise: Callable[[], torch.Tensor] | None,
    callback: Callback | None,
    bar: Any,
    check: bool,
) -> torch.Tensor:
    if history not in (1, 2):
        raise ValueError(f"history must be 1 or 2, got {history}")
    output, last = denoise.output, len(rows) - 1
    g1 = g2 = None  # G_1, G_2 (None: zero, before the first step)
    for i in range(last):
        row = rows[i]
        out = output(x, plan, i, check)
        if callback is not None:
            callback(i, plan.timesteps[i], x, denoise.x0(x, out, plan, i))
        # x_{i+1} = G_1 + A x_i + B out_i (+ c_z z), written into G_1's buffer
        x_next = (torch.mul(x, row[0]) if g1 is None else g1.addcmul_(x, row[0])).addcmul_(out, row[1])
        if noise is not None:
            x_next.addcmul_(noise(), row[-1])
        # G_1 ← G_2 + P_1 x_i + Q_1 out_i;  G_2 ← P_2 x_i + Q_2 out_i. The newest G goes into x_i's buffer:
        # x_i is no longer needed, unless it is the caller's x_T, was given to a callback, or is `out` itself.
        mine = i > 0 and callback is None and out.data_ptr() != x.data_ptr()
        if history == 2:
            g1 = (torch.mul(x, row[2]) if g2 is None else g2.addcmul_(x, row[2])).addcmul_(out, row[3])
            g2 = (x.mul_(row[4]) if mine else torch.mul(x, row[4])).addcmul_(out, row[5])
        else:
            g1 = (x.mul_(row[2]) if mine else torch.mul(x, row[2])).addcmul_(out, row[3])
        x = x_next
        bar.update()
    # Last step, to ᾱ_final, noise-free: x_N = G_1 + A x + B out (into ᾱ = 1, G_1 = 0 and this is x̂₀).
    row = rows[last]
    out = output(x, plan, last, check)
    if callback is not None:
        callback(last, plan.timesteps[last], x, denoise.x0(x, out, plan, last))
    x = torch.mul(x, row[0]) if g1 is None else g1.addcmul_(x, row[0])
    bar.update()
    return x.addcmul_(out, row[1])
