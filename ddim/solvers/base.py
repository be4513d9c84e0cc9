"""What the solvers share: the noise levels of a run in float64, the order of each multistep step,
argument checks, and the one linear update every table-driven step is made of.

Notation (Lu et al. 2022; Kingma et al. 2021) for level j of a run (j = 0 … N-1 the listed timesteps,
j = N the final level ᾱ_final): α_j = √ᾱ_j, σ_j = √(1 - ᾱ_j), λ_j = log(α_j / σ_j) (the log-SNR, +∞ at
ᾱ = 1 and -∞ at ᾱ = 0), and Karras et al.'s noise level s_j = σ_j / α_j = sqrt((1 - ᾱ_j) / ᾱ_j).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch

from ddim.noise import StepNoise
from ddim.prediction import Denoiser, Plan, coefficient_dtype, memo, scalar_rows, tensor_key
from ddim.sampling import Callback, Levels, _NoBar

T = TypeVar("T")

__all__ = [
    "LevelTable",
    "level_table",
    "multistep_orders",
    "check_ode_args",
    "combine",
    "cached",
    "cached_fused",
    "to_rows",
    "fold_linear",
    "fold_multistep",
    "MultistepRow",
    "multistep_rows",
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
    """``build()``, the per-run tables of sampler ``name``, cached for x's device, dtype and number of
    dimensions (:func:`multistep_rows` shapes coefficients to broadcast over a sample) and ``extra``.

    Looked up first on ``levels`` itself (:meth:`~ddim.sampling.Levels.cached`, one dict lookup:
    :func:`ddim.sample` reuses one Levels object per schedule object and timesteps), then by the
    content of the levels (:func:`~ddim.prediction.memo`), so repeated runs (chunks of a large request,
    a timestep search) never rebuild them. Tables are made with :func:`to_rows` or :func:`multistep_rows`.
    """
    key = ("solvers", name, x.device, x.dtype, x.ndim, *extra)
    return levels.cached(key, lambda: memo((*key, tensor_key(levels.alpha_bars)), build))


def cached_fused(name: str, levels: Levels, plan: Plan, x: torch.Tensor, build: Callable[[], T], *extra: object) -> T:
    """:func:`cached` for a table folded with the conversion coefficients of ``plan``, which must have
    been made for ``levels.timesteps``; ``extra`` must name the prediction (all the plan's float64
    coefficients depend on, besides the levels)."""
    if plan.conv is None:
        raise RuntimeError("this plan has no float64 coefficients (make it with Denoiser.plan)")
    return cached(name, levels, x, build, *extra)


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


# ============================================================================ folded multistep tables
def fold_linear(
    now: tuple[torch.Tensor, torch.Tensor],
    past: torch.Tensor,
    basis: tuple[torch.Tensor, torch.Tensor],
    c_z: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Fold a linear multistep method into updates linear in (x_i, out_i) and carried tensors (float64).

    The method: x_{i+1} = A_i x_i + B_i out_i + Σ_{l=1..H} past[i, l-1] v_{i-l} (+ c_z,i z), where
    v_j = d0_j x_j + d1_j out_j is a quantity of call j that is linear in its input and output (x̂₀ or ε̂
    of a linear denoiser: a pair of columns of ``plan.conv``). The past enters through carried tensors
    G_1 … G_H: G_l holds what the v's made so far contribute to the step l ahead, so that

        x_{i+1} = G_1 + A_i x_i + B_i out_i (+ c_z z),
        G_l ← G_{l+1} + P_l,i x_i + Q_l,i out_i,    P_l,i = past[i+l, l-1] d0_i,  Q_l,i = past[i+l, l-1] d1_i

    (G_{H+1} = 0; weights of steps past the last are 0).

    Args:
        now: (A, B), float64 [N] each.
        past: float64 [N, H].
        basis: (d0, d1), float64 [N] each.
        c_z: float64 [N] or a scalar: the noise weight of each step.

    Returns:
        float64 [N, 2 + 2H + 1]: (A, B, P_1, Q_1, …, P_H, Q_H, c_z).
    """
    A, B = now
    N, H = past.shape
    d0, d1 = basis[0][:N], basis[1][:N]
    cols = [A, B]
    for lag in range(1, H + 1):
        k = torch.zeros(N, dtype=torch.float64)
        k[: N - lag] = past[lag:, lag - 1]  # the weight on v_i of step i + lag, the step that uses it
        cols += [k * d0, k * d1]
    cols.append(torch.as_tensor(c_z, dtype=torch.float64).expand(N))
    return torch.stack(cols, dim=1)


def fold_multistep(plan: Plan, table: torch.Tensor, history: int) -> torch.Tensor:
    """Fold a multistep table on x̂₀ into one linear in (x_i, out_i) and ``history`` carried tensors (float64).

    ``table`` is [N, 2 + history + 1]: step i is x_{i+1} = a x_i + Σ_{k≤history} k_k m_{i-k} (+ c_z z),
    row (a, k_0, …, k_history, c_z), with m_j = c0_j x_j + c1_j out_j the x̂₀ of call j (a linear
    denoiser; c0, c1 from ``plan.conv``). Then A_i = a_i + k_0,i c0_i, B_i = k_0,i c1_i and the older
    m's are carried as in :func:`fold_linear`, which gives the result: [N, 2 + 2·history + 1],
    (A, B, P_1, Q_1, …, P_history, Q_history, c_z).
    """
    c = plan.conv
    if c is None:
        raise RuntimeError("this plan has no float64 coefficients (make it with Denoiser.plan)")
    N = table.shape[0]
    c0, c1 = c[:N, 0], c[:N, 1]
    now = (table[:, 0] + table[:, 1] * c0, table[:, 1] * c1)
    return fold_linear(now, table[:, 2 : 2 + history], (c0, c1), table[:, -1])


class MultistepRow(NamedTuple):
    """One step of a folded table (:func:`fold_linear`) on the device, cast once, as the loops apply it.

    Attributes:
        xs, outs: (A, P_1, …, P_H) and (B, Q_1, …, Q_H) shaped [H+1, 1, …, 1]: one coefficient per
            row of a stacked buffer, broadcast over a sample.
        c_z, a, b: the noise weight, A and B, 0-d.
        p, q: (P_1, …, P_H) and (Q_1, …, Q_H) as 0-d tensors.
    """

    xs: torch.Tensor
    outs: torch.Tensor
    c_z: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    p: tuple[torch.Tensor, ...]
    q: tuple[torch.Tensor, ...]


def multistep_rows(folded: torch.Tensor, x: torch.Tensor) -> list[MultistepRow]:
    """A table of :func:`fold_linear` ([N, 2 + 2H + 1], float64) as N :class:`MultistepRow` s on x's device
    (dtype from :func:`~ddim.prediction.coefficient_dtype`), cast once, for samples shaped like x."""
    H = (folded.shape[1] - 3) // 2
    t = folded.to(device=x.device, dtype=coefficient_dtype(x.dtype))
    ones = [1] * x.ndim
    xs = t[:, 0 : 2 * H + 2 : 2].contiguous().reshape(-1, H + 1, *ones).unbind(0)
    outs = t[:, 1 : 2 * H + 2 : 2].contiguous().reshape(-1, H + 1, *ones).unbind(0)
    cols = [c.unbind(0) for c in t.t().unbind(0)]  # cols[j][i]: 0-d entry (i, j)
    return [
        MultistepRow(
            xs[i],
            outs[i],
            cols[-1][i],
            cols[0][i],
            cols[1][i],
            tuple(cols[2 * lag][i] for lag in range(1, H + 1)),
            tuple(cols[2 * lag + 1][i] for lag in range(1, H + 1)),
        )
        for i in range(t.shape[0])
    ]


# ============================================================================ the fused multistep loop
#: On the CPU, samples up to this size (bytes) take the stacked update (two ops per step for all rows);
#: larger ones, where memory traffic rather than the number of ops sets the time, update the rows one
#: by one in place (2 + 2H ops, fewer bytes moved). Other devices always stack (kernel launches count).
STACK_BYTES = 32 * 2**10


def multistep_loop(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    rows: list[MultistepRow],
    history: int,
    noise: Callable[[], torch.Tensor] | None,
    callback: Callback | None,
    bar: Any,
    last_noise: bool = False,
) -> torch.Tensor:
    """The fused loop of a linear multistep method (rows of :func:`fold_linear`, cast by :func:`multistep_rows`).

    Step i computes x_{i+1} = G_1 + A x_i + B out_i and G_l ← G_{l+1} + P_l x_i + Q_l out_i (l = 1 … H,
    G_{H+1} = 0) from the network output out_i, in one of two ways, chosen by size:

    - stacked (small samples, :data:`STACK_BYTES`, and accelerators): the sample and the G's are
      the rows of one buffer, (x_{i+1}, G_1, …, G_H, 0) with the last row always zero. Step i reads rows
      1 … H+1 of the previous buffer, (G_1, …, G_H, 0), and writes rows 0 … H of the other one in two
      fused ops for the whole stack: new[0:H+1] = prev[1:H+2] + (A, P_1, …, P_H)·x_i, then
      new[0:H+1] += (B, Q_1, …, Q_H)·out_i;
    - row by row (large samples on the CPU): 2 + 2H fused in-place ops on carried buffers, x_{i+1}
      written into G_1's, each new G_l into G_{l+1}'s and G_H into x_i's.

    In every case the loop allocates nothing per step (small buffers are even kept between runs,
    :data:`POOL_BYTES`; a callback, which may keep the x_t it is given, gets fresh ones), does no tensor
    indexing and no host synchronisation, and the result is a fresh tensor. With ``noise``, c_z·z is
    added to x_{i+1} at every step but the last, and at the last too with ``last_noise`` (a run that
    ends at a noisy level, e.g. SDE-DPM-Solver++ into ᾱ_0).

    NaN/Inf, as in the DDIM loop (:func:`ddim.sampling._linear_loop`): checked once, on the result
    (every output is multiplied into it, and 0·NaN and 0·Inf are NaN); if it is not finite the run is
    repeated checking every call, so the error names the first bad step and timestep.
    """
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    run = _run_stacked if not x.is_cpu or x.numel() * x.element_size() <= STACK_BYTES else _run_rows
    x_start = x
    x = run(denoise, x, plan, rows, history, noise, callback, bar, False)
    if noise is not None and last_noise:
        x.addcmul_(noise(), rows[-1].c_z)  # x is a fresh tensor (never the caller's)
    if not denoise.finite(x):
        again = noise.restarted() if isinstance(noise, StepNoise) else noise
        run(denoise, x_start, plan, rows, history, again, None, _NoBar(), True)
        denoise.finish(plan)
        raise FloatingPointError(
            "the result contains NaN or Inf, but a re-run checking every model output found none "
            "(is the model deterministic?)"
        )
    return x


def _stack(x: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised [rows, *x.shape] buffer whose rows are laid out like x (e.g. channels-last)."""
    strides = x.stride() if x.is_contiguous() else torch.empty_like(x).stride()
    return torch.empty_strided((rows, *x.shape), (x.numel(), *strides), dtype=x.dtype, device=x.device)


Views = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _views(b: torch.Tensor, k: int) -> Views:
    """A step buffer of k+1 rows as (rows 0…k-1: written, rows 1…k: read by the next step, row 0: x, row 1)."""
    return b[:k], b[1:], b[0], b[1]


def _buffer(x: torch.Tensor, k: int) -> Views:
    """One step's buffer of k+1 rows, the last zero (see :func:`_views`)."""
    b = _stack(x, k + 1)
    b[k].zero_()
    return _views(b, k)


#: Loop buffers up to this size (bytes) are kept for the next run with the same layout (:func:`_take`):
#: for small samples, making them and their views costs more than several steps' arithmetic. Larger
#: ones are made per run and freed with it.
POOL_BYTES = 2**20
_POOL: dict[tuple, list[Any]] = {}


def _take(key: tuple, make: Callable[[], T]) -> T:
    """A loop's buffers (and their views) for ``key`` from the pool, else ``make()``. A run holds its
    buffers alone until :func:`_give_back`: a run started meanwhile (another thread, a model that
    samples) gets others."""
    free = _POOL.get(key)
    if free:
        try:
            return free.pop()
        except IndexError:  # taken by another thread in between
            pass
    return make()


def _give_back(key: tuple, value: Any, nbytes: int) -> None:
    """Keep a run's buffers for the next run when small (at most two sets per key, 16 keys)."""
    if nbytes > POOL_BYTES:
        return
    if key not in _POOL and len(_POOL) >= 16:
        _POOL.clear()
    free = _POOL.setdefault(key, [])
    if len(free) < 2:
        free.append(value)


def _layout(x: torch.Tensor, *extra: object) -> tuple:
    """Pool key: x's layout, and whether the buffers are inference tensors (they cannot be written outside)."""
    return (x.shape, x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled(), *extra)


def _two_buffers(x: torch.Tensor, k: int) -> list[Views]:
    """Two step buffers (see :func:`_buffer`) from one allocation; their zero rows are never written."""
    two = _stack(x, 2 * k + 2).view(2, k + 1, *x.shape)
    two[:, k].zero_()
    return [_views(b, k) for b in two.unbind(0)]


def _run_stacked(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    rows: list[MultistepRow],
    history: int,
    noise: Callable[[], torch.Tensor] | None,
    callback: Callback | None,
    bar: Any,
    check: bool,
) -> torch.Tensor:
    k = history + 1  # rows written per step: x_{i+1}, G_1 … G_H
    output, last = denoise.output, len(rows) - 1
    pooled = callback is None and last > 0
    if pooled:
        key = _layout(x, "stacked", k)
        views = _take(key, lambda: _two_buffers(x, k))
    tail = g1 = None  # (G_1, …, G_H, 0) of the previous step and its G_1; none before the first step
    try:
        for i in range(last):
            xs, outs, c_z = rows[i][:3]
            out = output(x, plan, i, check)
            if callback is None:
                head, next_tail, x_next, next_g1 = views[i & 1]
            else:
                callback(i, plan.timesteps[i], x, denoise.x0(x, out, plan, i))
                head, next_tail, x_next, next_g1 = _buffer(x, k)  # a fresh one: the callback may keep x
            if tail is None:
                torch.mul(x, xs, out=head).addcmul_(out, outs)
            else:
                torch.addcmul(tail, x, xs, out=head).addcmul_(out, outs)
            if noise is not None:
                x_next.addcmul_(noise(), c_z)
            x, tail, g1 = x_next, next_tail, next_g1
            bar.update()
        # Last step, to ᾱ_final, noise-free: x_N = G_1 + A x + B out (into ᾱ = 1, G_1 = 0: x̂₀), a fresh tensor.
        row = rows[last]
        out = output(x, plan, last, check)
        if callback is not None:
            callback(last, plan.timesteps[last], x, denoise.x0(x, out, plan, last))
        bar.update()
        x = (torch.mul(x, row.a) if g1 is None else torch.addcmul(g1, x, row.a)).addcmul_(out, row.b)
    finally:
        if pooled:
            _give_back(key, views, 2 * views[0][0].numel() * x.element_size())
    return x


def _run_rows(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    rows: list[MultistepRow],
    history: int,
    noise: Callable[[], torch.Tensor] | None,
    callback: Callback | None,
    bar: Any,
    check: bool,
) -> torch.Tensor:
    output, last = denoise.output, len(rows) - 1
    g: list[torch.Tensor | None] = [None] * (history + 1)  # G_1 … G_H, then G_{H+1} = 0 (None: zero)
    for i in range(last):
        row = rows[i]
        out = output(x, plan, i, check)
        if callback is not None:
            callback(i, plan.timesteps[i], x, denoise.x0(x, out, plan, i))
        # x_{i+1} = G_1 + A x_i + B out_i (+ c_z z), written into G_1's buffer
        x_next = (torch.mul(x, row.a) if g[0] is None else g[0].addcmul_(x, row.a)).addcmul_(out, row.b)
        if noise is not None:
            x_next.addcmul_(noise(), row.c_z)
        # G_l ← G_{l+1} + P_l x_i + Q_l out_i, into G_{l+1}'s buffer; G_H into x_i's, which is no longer
        # needed unless it is the caller's x_T, was given to a callback, or is `out` itself.
        for lag in range(history - 1):
            nxt = g[lag + 1]
            g[lag] = (torch.mul(x, row.p[lag]) if nxt is None else nxt.addcmul_(x, row.p[lag])).addcmul_(
                out, row.q[lag]
            )
        mine = i > 0 and callback is None and out.data_ptr() != x.data_ptr()
        g[history - 1] = (x.mul_(row.p[-1]) if mine else torch.mul(x, row.p[-1])).addcmul_(out, row.q[-1])
        x = x_next
        bar.update()
    # Last step, to ᾱ_final, noise-free: x_N = G_1 + A x + B out (into ᾱ = 1, G_1 = 0 and this is x̂₀).
    row = rows[last]
    out = output(x, plan, last, check)
    if callback is not None:
        callback(last, plan.timesteps[last], x, denoise.x0(x, out, plan, last))
    bar.update()
    return (torch.mul(x, row.a) if g[0] is None else g[0].addcmul_(x, row.a)).addcmul_(out, row.b)
