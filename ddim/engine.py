"""The one stepping engine: every registered sampler is a float64 table (or a step) run by this module.

A sampler module declares and does not loop. It gives a pure function from a run's levels to its
per-step table, and with :func:`table_sampler` says what the engine needs to know (see :class:`Method`).
Row i of the table is step i, from level i to level i+1 (docs/engine.md walks through one module)::

    x_{i+1} = a_i x_i + b_i x̂₀_i + c_i ε̂_i + Σ_{l=1..H} w_{i,l} v_{i-l} + σ_i z_i

with columns (a, b, c, w_1, …, w_H, σ), float64 [N, 4 + H]: x̂₀_i and ε̂_i from the model call at
level i, v_j the x̂₀ (``past="x0"``) or ε̂ (``past="eps"``) of the earlier call j (a weight is 0
where the call does not exist yet: warm-up), z_i ~ N(0, I). DDIM, DDPM, DPM-Solver++ (2M, 3M, SDE),
PLMS, UniPC and Euler are all of this form.

The engine runs a table in one of two ways, each written once here:

- **fused** (:func:`run_fused`), for a linear denoiser (no clipping or thresholding): x̂₀ and ε̂ are
  linear in (x_i, out_i), so the table is folded once, in float64, with the denoiser's conversion
  coefficients into x_{i+1} = G_1 + A_i x_i + B_i out_i (+ σ_i z) with the past carried in G_1 … G_H
  (:func:`fold_linear`), cast once, cached on the levels, and applied with two or three fused ops per
  step on carried buffers: no allocation, no tensor indexing, no host sync in the loop, and one
  finiteness check of the result (a non-finite result re-runs the loop checking every call, to name
  the first bad step);
- **general** (:func:`run_general`), for clipping, thresholding and any guidance setting: x̂₀ and ε̂
  first (:meth:`~ddim.prediction.Denoiser.predict`, every call checked), then the row applied to them.

Both give ``callback(i, t, x_t, x̂₀)`` at every step and advance the progress bar once per step. A
method that is not one table per call (Heun's two calls per step, restart-style loops) gives a
``step`` function instead; the general loop calls it with a :class:`StepContext`, whose ``predict``
makes the extra calls, so such a method still has no loop of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch

from ddim.noise import StepNoise
from ddim.prediction import Denoiser, Plan, coefficient_dtype, memo, scalar_rows, tensor_key
from ddim.registry import Callback, Levels, _NoBar, progress_bar, register_sampler

T = TypeVar("T")

__all__ = [
    "Method",
    "MultistepRow",
    "StepContext",
    "fold_linear",
    "fused_rows",
    "multistep_rows",
    "run",
    "run_fused",
    "run_general",
    "table_sampler",
]

Noise = Callable[[], torch.Tensor]
#: ``table(levels, eta, variance)``: the float64 table of a run.
TableFn = Callable[[Levels, float, str], torch.Tensor]


class StepContext(NamedTuple):
    """What a custom ``step`` (:attr:`Method.step`) is given besides (x, x̂₀, ε̂, row).

    Attributes:
        i: the step (0 … N-1); last: whether it is the step to ᾱ_final.
        predict: ``predict(x, call)`` -> (x̂₀, ε̂) of the network call number ``call`` of the run's
            plan (:attr:`Method.calls` gives their timesteps; step i's first call is ``calls_per_step·i``).
        noise: the run's noise source (None for a deterministic run).
    """

    i: int
    last: bool
    predict: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    noise: Noise | None


Step = Callable[[StepContext, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


def _never(eta: float) -> bool:
    return False


def _no_check(eta: float, variance: str) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """What a sampler declares; :func:`run` does the rest.

    Attributes:
        name: the registered name (progress bars, cache keys).
        table: ``table(levels, eta, variance)`` -> float64 [N, 4 + history] (columns in the module
            docstring), a pure function of its arguments. With ``step``, any float64 [N, C]: row i is
            handed to the step as C 0-d tensors.
        history: H, how many earlier model values a step uses (0 for one-step methods).
        past: which value the history holds: "x0" (x̂₀) or "eps" (ε̂).
        noisy: ``noisy(eta)``: whether a run at that η draws noise (then σ z is added at every step but
            the last, and at the last where the table's last σ is not 0).
        final_x0: the last-step rule: a run that ends at ᾱ = 1 returns the x̂₀ of its last call (exactly,
            on the general path) instead of applying the last row. False for methods whose last step is
            not x̂₀ (PLMS: x̂₀' of the extrapolated ε').
        step: None (the table is the linear form above), or a step function
            ``step(ctx, x, x̂₀, ε̂, row) -> x_{i+1}`` for methods that need more than one call per step.
        calls: ``calls(timesteps)`` -> int64 [M], the timesteps of the run's calls in order (default:
            the listed ones, one call per step).
        calls_per_step: step i's first call is number ``calls_per_step·i`` in ``calls``.
        check: ``check(eta, variance)``, raising ValueError for arguments the method refuses.
    """

    name: str
    table: TableFn
    history: int = 0
    past: str = "x0"
    noisy: Callable[[float], bool] = _never
    final_x0: bool = True
    step: Step | None = None
    calls: Callable[[torch.Tensor], torch.Tensor] | None = None
    calls_per_step: int = 1
    check: Callable[[float, str], None] = _no_check

    def __post_init__(self) -> None:
        if self.past not in ("x0", "eps"):
            raise ValueError(f"past must be 'x0' or 'eps', got {self.past!r}")
        if self.history < 0:
            raise ValueError(f"history must be >= 0, got {self.history}")


# ============================================================================ registration
def deterministic(name: str) -> Callable[[float, str], None]:
    """The argument check of a probability-flow ODE sampler: η = 0 and variance="eta" only."""

    def check(eta: float, variance: str) -> None:
        if eta != 0:
            raise ValueError(
                f"sampler {name!r} is deterministic: eta must be 0, got {eta} "
                "(for stochastic sampling use 'ddim' with eta > 0, 'ddpm' or 'dpmpp_2m_sde')"
            )
        if variance != "eta":
            raise ValueError(f"variance={variance!r} only applies to the 'ddim' and 'ddpm' samplers, not to {name!r}")

    return check


def table_sampler(
    name: str,
    *,
    history: int = 0,
    past: str = "x0",
    noisy: Callable[[float], bool] = _never,
    check: Callable[[float, str], None] | None = None,
    final_x0: bool = True,
    step: Step | None = None,
    calls: Callable[[torch.Tensor], torch.Tensor] | None = None,
    calls_per_step: int = 1,
    nfe: Callable[[int], int] | None = None,
    doc: str | None = None,
) -> Callable[[TableFn], TableFn]:
    """Decorator on a table function: registers sampler ``name`` (in :data:`ddim.sampling.SAMPLERS`),
    run by :func:`run` with the :class:`Method` these arguments declare.

    ``check(eta, variance)`` validates the run's η and variance before any work (default
    :func:`deterministic`); ``nfe(steps)`` the network calls of a run (default ``steps``); ``doc`` the
    registered function's docstring (default the table function's). Returns the table function unchanged.
    """
    checker = deterministic(name) if check is None else check

    def add(table: TableFn) -> TableFn:
        method = Method(name, table, history, past, noisy, final_x0, step, calls, calls_per_step, checker)
        sampler = functools.partial(run, method)  # the registry's signature: (denoise, x, levels, *, eta, …)
        sampler.__name__ = sampler.__qualname__ = f"sample_{name}"  # type: ignore[attr-defined]
        sampler.__doc__ = doc or table.__doc__
        register_sampler(name, noisy=noisy, **({} if nfe is None else {"nfe": nfe}))(sampler)
        return table

    return add


# ============================================================================ one run
def run(
    method: Method,
    denoise: Denoiser,
    x: torch.Tensor,
    levels: Levels,
    *,
    eta: float = 0.0,
    variance: str = "eta",
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``method`` from x (at level 0 of ``levels``) to ᾱ_final: its argument check, then fused when
    the denoiser is linear and the method is a table, general otherwise; then the deferred device-side
    checks. Returns a fresh tensor shaped like x. With ``method`` bound, this is a registered sampler."""
    method.check(eta, variance)
    if method.noisy(eta):
        if noise is None:
            raise ValueError(f"sampler {method.name!r} needs a noise source at eta={eta}")
    else:
        noise = None
    if method.calls is None:
        plan = denoise.plan(levels.timesteps, x, cache=levels.cached)
    else:  # its own call timesteps: its own plan cache entries on the levels
        plan = denoise.plan(
            method.calls(levels.timesteps), x, cache=lambda k, b: levels.cached(("calls", method.name, *k), b)
        )
    N = levels.timesteps.numel()
    with progress_bar(N, progress, method.name) as bar:
        if method.step is None and denoise.linear:
            rows, history, last_noise = _cached(
                levels,
                x,
                ("fused", method.name, eta, variance, denoise.prediction),
                lambda: fused_rows(method, plan, levels, x, eta, variance),
            )
            x = run_fused(denoise, x, plan, rows, history, noise, callback, bar, last_noise)
        else:
            x = run_general(method, denoise, x, plan, levels, eta, variance, noise, callback, bar)
    denoise.finish(plan)
    return x


def _cached(levels: Levels, x: torch.Tensor, key: tuple, build: Callable[[], T]) -> T:
    """``build()``, a run's tables, cached on ``levels`` (one dict lookup) and by the levels' content
    (:func:`~ddim.prediction.memo`: equal levels of another schedule object), for x's device, dtype and
    number of dimensions (fused rows broadcast over a sample)."""
    key = (*key, x.device, x.dtype, x.ndim)
    return levels.cached(key, lambda: memo((*key, tensor_key(levels.alpha_bars)), build))


def _last_noise(method: Method, table: torch.Tensor) -> bool:
    """Whether the last step adds noise: a noisy method whose last σ is not 0 (read on the CPU table)."""
    return method.step is None and float(table[-1, -1]) != 0.0


# ============================================================================ the general path
def run_general(
    method: Method,
    denoise: Denoiser,
    x: torch.Tensor,
    plan: Plan,
    levels: Levels,
    eta: float,
    variance: str,
    noise: Noise | None,
    callback: Callback | None,
    bar: Any,
) -> torch.Tensor:
    """The general loop: x̂₀ and ε̂ of every call first (clipping, thresholding, guidance, every call
    checked), then row i applied to them (or the method's ``step``). Into ᾱ = 1 a ``final_x0`` method
    returns the last x̂₀ itself."""
    rows, used, last_noise = _cached(
        levels, x, ("rows", method.name, eta, variance), lambda: _general_rows(method, levels, x, eta, variance)
    )
    N, k, H = len(rows), method.calls_per_step, method.history
    final_x0 = method.final_x0 and float(levels.alpha_bars[-1]) == 1.0
    step, keep_eps = method.step, method.past == "eps"
    past: list[torch.Tensor] = []  # the history, newest first

    def predict(x_in: torch.Tensor, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        return denoise.predict(x_in, plan, call)

    for i in range(N):
        x0, eps = denoise.predict(x, plan, k * i)
        if callback is not None:
            callback(i, plan.timesteps[k * i], x, x0)
        bar.update()
        if i == N - 1 and final_x0:
            return x0
        row = rows[i]
        if step is not None:
            x = step(StepContext(i, i == N - 1, predict, noise), x, x0, eps, row)
            continue
        terms = [(v, w) for v, w, on in zip((x, x0, eps), row, used, strict=False) if on]
        terms += zip(past, row[3 : 3 + H], strict=False)  # the earlier calls there are (warm-up: fewer)
        x_next = torch.mul(*terms[0])
        for value, weight in terms[1:]:
            x_next.addcmul_(value, weight)
        if noise is not None and (i < N - 1 or last_noise):
            x_next.addcmul_(noise(), row[-1])
        if H:
            past = [eps if keep_eps else x0, *past[: H - 1]]
        x = x_next
    return x


def _general_rows(
    method: Method, levels: Levels, x: torch.Tensor, eta: float, variance: str
) -> tuple[list[tuple[torch.Tensor, ...]], list[bool], bool]:
    """The table as rows of 0-d tensors on x's device, which of its columns (a, b, c) are not 0 anywhere
    (the others are never applied), and whether the last step draws noise."""
    table = method.table(levels, eta, variance)
    used = (table[:, :3] != 0).any(dim=0).tolist() if method.step is None else []
    return scalar_rows(table, x), used, _last_noise(method, table)


# ============================================================================ the fused path: folding
def fused_rows(
    method: Method, plan: Plan, levels: Levels, x: torch.Tensor, eta: float, variance: str
) -> tuple[list[Any], int, bool]:
    """The fused form of a method's table for this plan's conversion coefficients, cast once for x.

    Returns (rows, H, last_noise): with H = 0 (no history, or a 1-step run) N tuples (A_i, B_i, σ_i) of
    0-d tensors; else N :class:`MultistepRow` s of :func:`fold_linear`'s table. H is trimmed to N-1 (a
    value older than the run's first call is never used)."""
    c = plan.conv
    if c is None:
        raise RuntimeError("this plan has no float64 coefficients (make it with Denoiser.plan)")
    table = method.table(levels, eta, variance)
    N = table.shape[0]
    H = min(method.history, N - 1)
    # x̂₀ = c0 x + c1 out, ε̂ = c2 x + c3 out: a x + b x̂₀ + c ε̂ = A x + B out
    now = plan.fuse(table[:, 1], table[:, 2], table[:, 0])
    last_noise = _last_noise(method, table)
    if H == 0:
        return scalar_rows(torch.stack([*now, table[:, -1]], dim=1), x), 0, last_noise
    basis = (c[:N, 0], c[:N, 1]) if method.past == "x0" else (c[:N, 2], c[:N, 3])
    return multistep_rows(fold_linear(now, table[:, 3 : 3 + H], basis, table[:, -1]), x), H, last_noise


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
