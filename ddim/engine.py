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

- **fused** (:func:`ddim.fused.run_fused`), for a linear denoiser (no clipping or thresholding): x̂₀ and ε̂ are
  linear in (x_i, out_i), so the table is folded once, in float64, with the denoiser's conversion
  coefficients into x_{i+1} = G_1 + A_i x_i + B_i out_i (+ σ_i z) with the past carried in G_1 … G_H
  (:func:`ddim.fused.fold_linear`), cast once, cached on the levels, and applied with two or three fused ops per
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

from ddim.fused import fold_linear, multistep_rows, run_fused
from ddim.memo import memo, tensor_key
from ddim.prediction import Denoiser, Plan, scalar_rows
from ddim.registry import SAMPLERS, Callback, Levels, progress_bar, register_sampler

T = TypeVar("T")

__all__ = ["Method", "StepContext", "deterministic", "fused_rows", "run", "run_general", "table_sampler"]

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
        model: the network being sampled (``denoise.model``: e.g. for statistics attached to it).
        state: a dict that lives for the run, the same at every step, empty at step 0: what a method
            carries from step to step besides the engine's history (DPM-Solver-v3's corrector).
        levels: the run's levels (for tables that also depend on the model: build them with
            :func:`cached`).
    """

    i: int
    last: bool
    predict: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    noise: Noise | None
    model: Any = None
    state: dict | None = None
    levels: Levels | None = None


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


def cached(levels: Levels, x: torch.Tensor, key: tuple, build: Callable[[], T]) -> T:
    """A step method's per-run tables, cached like the engine's own (see :func:`_cached`): ``key``
    names the method and whatever else the tables depend on (e.g. the model's statistics)."""
    return _cached(levels, x, ("step", *key), build)


def _cached(levels: Levels, x: torch.Tensor, key: tuple, build: Callable[[], T]) -> T:
    """``build()``, a run's tables, cached on ``levels`` (one dict lookup) and by the levels' content
    (:func:`~ddim.prediction.memo`: equal levels of another schedule object), for x's device, dtype and
    number of dimensions (fused rows broadcast over a sample)."""
    key = (*key, x.device, x.dtype, x.ndim)
    return levels.cached(key, lambda: memo((*key, tensor_key(levels.alpha_bars)), build))


def _table(method: Method, levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """``method.table(levels, eta, variance)``, checked: float64 with a row per step, and for a table
    method the 4 + H columns (a, b, c, w_1 … w_H, σ)."""
    table = method.table(levels, eta, variance)
    N = levels.timesteps.numel()
    cols = 4 + method.history if method.step is None else None
    if (
        not isinstance(table, torch.Tensor)
        or table.dtype != torch.float64
        or table.ndim != 2
        or table.shape[0] != N
        or (cols is not None and table.shape[1] != cols)
    ):
        got = f"{table.dtype} {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table).__name__
        want = f"[{N}, {cols}]" if cols is not None else f"[{N}, C]"
        raise ValueError(f"sampler {method.name!r}: its table must be float64 {want} (one row a step), got {got}")
    return table


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
    state: dict = {}  # a step method's own state for this run (StepContext.state)

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
            x = step(StepContext(i, i == N - 1, predict, noise, denoise.model, state, levels), x, x0, eps, row)
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
    table = _table(method, levels, eta, variance)
    used = (table[:, :3] != 0).any(dim=0).tolist() if method.step is None else []
    return scalar_rows(table, x), used, _last_noise(method, table)


# ============================================================================ the fused path's table
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
    table = _table(method, levels, eta, variance)
    N = table.shape[0]
    H = min(method.history, N - 1)
    # x̂₀ = c0 x + c1 out, ε̂ = c2 x + c3 out: a x + b x̂₀ + c ε̂ = A x + B out
    now = plan.fuse(table[:, 1], table[:, 2], table[:, 0])
    last_noise = _last_noise(method, table)
    if H == 0:
        return scalar_rows(torch.stack([*now, table[:, -1]], dim=1), x), 0, last_noise
    basis = (c[:N, 0], c[:N, 1]) if method.past == "x0" else (c[:N, 2], c[:N, 3])
    return multistep_rows(fold_linear(now, table[:, 3 : 3 + H], basis, table[:, -1]), x), H, last_noise


# ============================================================================ runs made of runs
def schedule_alpha_bars(denoise: Denoiser) -> torch.Tensor:
    """float64 [T]: ᾱ_t of the denoiser's schedule (for methods that choose timesteps of their own)."""
    return denoise.schedule.alphas_cumprod.double()


def run_segment(
    sampler: str,
    denoise: Denoiser,
    x: torch.Tensor,
    timesteps: list[int],
    final_alpha_bar: torch.Tensor,
    *,
    callback: Callback | None = None,
    offset: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """One segment of a longer run (restart sampling's ODE segments): the registered deterministic
    ``sampler`` from x at the level of ``timesteps[0]`` over ``timesteps`` (descending ints) into
    ᾱ = ``final_alpha_bar`` (0-d float64), on :class:`Levels` of its own. ``callback`` numbers the
    segment's calls from ``offset``. Returns the sample at the final level."""
    ab = schedule_alpha_bars(denoise)
    levels = Levels(torch.tensor(timesteps, dtype=torch.int64), torch.cat([ab[timesteps], final_alpha_bar.reshape(1)]))
    cb = None if callback is None else (lambda i, t, x_t, x0: callback(offset + i, t, x_t, x0))
    return SAMPLERS[sampler].fn(denoise, x, levels, callback=cb, progress=progress)
