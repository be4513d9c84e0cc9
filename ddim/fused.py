"""The engine's fused path: a linear method's table folded with the denoiser's conversion, and the loops
that apply it (:func:`run_fused`) with a few fused tensor ops per step on carried buffers.

Used by :func:`ddim.engine.run` for every table sampler when the denoiser is linear (no clipping or
thresholding); see :mod:`ddim.engine` for the table itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

from ddim.noise import StepNoise
from ddim.prediction import Denoiser, Plan, coefficient_dtype
from ddim.registry import Callback, _NoBar

T = TypeVar("T")
Noise = Callable[[], torch.Tensor]

__all__ = ["Fused", "MultistepRow", "POOL_BYTES", "STACK_BYTES", "fold_linear", "multistep_rows", "run_fused"]


# ============================================================================ folding
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


# ============================================================================ the fused path: loops
#: On the CPU, samples up to this size (bytes) take the stacked update (two ops per step for all rows);
#: larger ones, where memory traffic rather than the number of ops sets the time, update the rows one
#: by one in place (2 + 2H ops, fewer bytes moved). Other devices always stack (kernel launches count).
STACK_BYTES = 32 * 2**10


class Fused(NamedTuple):
    """What a fused loop runs: the denoiser and its plan, the folded rows (:func:`fused_rows`), H, and
    whether the last step draws noise."""

    denoise: Denoiser
    plan: Plan
    rows: list[Any]
    history: int
    last_noise: bool


def run_fused(
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    rows: list[Any],
    history: int,
    noise: Noise | None,
    callback: Callback | None,
    bar: Any,
    last_noise: bool = False,
) -> torch.Tensor:
    """The fused loop of a folded table (:func:`fused_rows`): ``history`` = 0 with rows (A, B, σ), else
    :class:`MultistepRow` s.

    Step i computes x_{i+1} = G_1 + A x_i + B out_i and G_l ← G_{l+1} + P_l x_i + Q_l out_i (l = 1 … H,
    G_{H+1} = 0) from the network output out_i:

    - H = 0: two fused ops (three with noise) into two buffers used in turn (:func:`_run_single`);
    - stacked (small samples, :data:`STACK_BYTES`, and accelerators): the sample and the G's are
      the rows of one buffer, (x_{i+1}, G_1, …, G_H, 0) with the last row always zero. Step i reads rows
      1 … H+1 of the previous buffer, (G_1, …, G_H, 0), and writes rows 0 … H of the other one in two
      fused ops for the whole stack: new[0:H+1] = prev[1:H+2] + (A, P_1, …, P_H)·x_i, then
      new[0:H+1] += (B, Q_1, …, Q_H)·out_i;
    - row by row (large samples on the CPU): 2 + 2H fused in-place ops on carried buffers, x_{i+1}
      written into G_1's, each new G_l into G_{l+1}'s and G_H into x_i's.

    In every case the loop allocates nothing per step (small buffers are even kept between runs,
    :data:`POOL_BYTES`; a callback, which may keep the x_t it is given, gets fresh ones), does no tensor
    indexing and no host synchronisation, and the result is a fresh tensor. With ``noise``, σ·z is
    added to x_{i+1} at every step but the last, and at the last too with ``last_noise`` (a run that
    ends at a noisy level, e.g. SDE-DPM-Solver++ into ᾱ_0).

    NaN/Inf: checked once, on the result (every output is multiplied into it, and 0·NaN and 0·Inf are
    NaN); if it is not finite the run is repeated checking every call, so the error names the first bad
    step and timestep, as a checked loop would.
    """
    if history == 0:
        loop = _run_single
    elif not x.is_cpu or x.numel() * x.element_size() <= STACK_BYTES:
        loop = _run_stacked
    else:
        loop = _run_rows
    x_start = x
    run = Fused(denoise, plan, rows, history, last_noise)
    x = loop(run, x, noise, callback, bar, False)
    if not denoise.finite(x):
        again = noise.restarted() if isinstance(noise, StepNoise) else noise
        loop(run, x_start, again, None, _NoBar(), True)  # raises at the bad call
        denoise.finish(plan)  # accelerators: the deferred report of the checked run
        raise FloatingPointError(
            "the result contains NaN or Inf, but a re-run checking every model output found none "
            "(is the model deterministic?)"
        )
    return x


def _run_single(
    run: Fused, x: torch.Tensor, noise: Noise | None, callback: Callback | None, bar: Any, check: bool
) -> torch.Tensor:
    """H = 0: x ← A_i x + B_i out (+ σ_i z), one network call and two fused ops per step."""
    denoise, plan, rows, _, last_noise = run
    noisy_steps = len(rows) if last_noise else len(rows) - 1
    # Two buffers, written in turn, instead of a new tensor per step: no allocator work in the loop
    # (a fresh 200 kB tensor can cost page faults, more than the update itself) and fixed addresses
    # (CUDA graphs). Not with a callback, which may keep the x_t it is given.
    bufs = None if callback is not None else (torch.empty_like(x), torch.empty_like(x))
    for i, (a, b, sigma) in enumerate(rows):
        out = denoise.output(x, plan, i, check)
        if callback is not None:
            callback(i, plan.timesteps[i], x, denoise.x0(x, out, plan, i))
        x_next = torch.mul(x, a) if bufs is None else torch.mul(x, a, out=bufs[i % 2])
        x_next.addcmul_(out, b)
        if noise is not None and i < noisy_steps:
            x_next.addcmul_(noise(), sigma)
        x = x_next
        bar.update()
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
    run: Fused, x: torch.Tensor, noise: Noise | None, callback: Callback | None, bar: Any, check: bool
) -> torch.Tensor:
    """H ≥ 1, small samples and accelerators: the sample and the G's as the rows of one buffer."""
    denoise, plan, rows, history, last_noise = run
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
        x = _last_step(run, x, g1, False, noise, callback, bar, check)  # g1 is pooled: a fresh result
    finally:
        if pooled:
            _give_back(key, views, 2 * views[0][0].numel() * x.element_size())
    return x


def _run_rows(
    run: Fused, x: torch.Tensor, noise: Noise | None, callback: Callback | None, bar: Any, check: bool
) -> torch.Tensor:
    """H ≥ 1, large CPU samples: the G's as separate buffers updated in place."""
    denoise, plan, rows, history, last_noise = run
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
    return _last_step(run, x, g[0], True, noise, callback, bar, check)  # this run's own G_1: written in place


def _last_step(
    run: Fused,
    x: torch.Tensor,
    g1: torch.Tensor | None,
    in_place: bool,
    noise: Noise | None,
    callback: Callback | None,
    bar: Any,
    check: bool,
) -> torch.Tensor:
    """The last step of a multistep loop, to ᾱ_final: x_N = G_1 + A x + B out (into ᾱ = 1, G_1 = 0 and
    this is x̂₀), + σ z where the run ends at a noisy level (``last_noise``)."""
    denoise, plan, rows, _, last_noise = run
    last = len(rows) - 1
    row = rows[last]
    out = denoise.output(x, plan, last, check)
    if callback is not None:
        callback(last, plan.timesteps[last], x, denoise.x0(x, out, plan, last))
    bar.update()
    if g1 is None:
        x = torch.mul(x, row.a)
    else:
        x = g1.addcmul_(x, row.a) if in_place else torch.addcmul(g1, x, row.a)
    x.addcmul_(out, row.b)
    if noise is not None and last_noise:
        x.addcmul_(noise(), row.c_z)
    return x
