"""The sampler registry: a run's noise levels, the registered samplers and what each costs.

Samplers live in :data:`SAMPLERS` (name -> :class:`SamplerSpec`) and share one signature::

    fn(denoise: Denoiser, x: Tensor, levels: Levels, *, eta, variance, noise, callback, progress) -> Tensor

Most are made by :func:`ddim.engine.table_sampler` from a coefficient table; :func:`register_sampler`
adds any function with that signature. Each spec knows its number of network evaluations in advance
(:func:`nfe`) and whether a run with a given η draws step noise (``noise`` is None for a run that does not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["Callback", "Levels", "SAMPLERS", "SamplerSpec", "check_sampler", "nfe", "register_sampler"]

#: ``callback(i, t, x_t, x0_pred)``: step i, the int timestep t the network saw, the sample it saw, its x̂₀.
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class Levels:
    """The noise levels of one run (treat as immutable: tables derived from them are cached on them).

    Attributes:
        timesteps: int64 CPU [N], descending: the network is evaluated at t_i at step i.
        alpha_bars: float64 CPU [N+1]: ᾱ at each listed timestep, then ᾱ_final (1, or ᾱ_0).
        tables: what samplers derived from these levels (see :meth:`cached`).
    """

    timesteps: torch.Tensor
    alpha_bars: torch.Tensor
    tables: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    #: Most entries :attr:`tables` keeps (it is emptied when full).
    MAX_TABLES = 64

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` for these levels: a sampler's coefficient rows, the denoiser's
        plan, … for one device, dtype and batch. :func:`ddim.sample` reuses one Levels object per
        schedule object, timesteps and final level, so a repeated run finds them with one dict lookup
        (no hashing of tensor contents). Cached values are shared: never modify them in place."""
        tables = self.tables
        if key in tables:
            return tables[key]
        if len(tables) >= self.MAX_TABLES:
            tables.clear()
        value = tables[key] = build()
        return value


def _always(eta: float) -> bool:
    return True


def _one_per_step(steps: int) -> int:
    return steps


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, its number of network evaluations for ``steps`` steps, and
    whether a run with a given η draws step noise (if not, :func:`ddim.sample` passes ``noise=None``)."""

    fn: Callable[..., torch.Tensor]
    nfe: Callable[[int], int]
    noisy: Callable[[float], bool] = _always


#: name -> SamplerSpec. Add more with :func:`register_sampler` or :func:`ddim.engine.table_sampler`.
SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(
    name: str,
    nfe: Callable[[int], int] = _one_per_step,
    noisy: Callable[[float], bool] = _always,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator registering a sampler under ``name``; ``nfe(steps)`` gives its network calls and
    ``noisy(eta)`` whether it draws step noise at that η (default: always given a noise source;
    deterministic samplers say ``lambda eta: False`` and are passed ``noise=None``)."""

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        SAMPLERS[name] = SamplerSpec(fn, nfe, noisy)
        return fn

    return add


def check_sampler(sampler: object) -> SamplerSpec:
    """The spec of a registered sampler name; ValueError listing the valid names otherwise."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[sampler]


def nfe(sampler: str = "ddim", steps: int = 50) -> int:
    """Number of network evaluations ``sampler`` makes for ``steps`` listed timesteps (known up front).

    "ddim" and "ddpm": one per step, so ``steps``. A guided forward (cond and uncond in one batch)
    counts as one. Raises ValueError unless ``steps`` is an int >= 1.
    """
    spec = check_sampler(sampler)
    if isinstance(steps, bool) or not hasattr(steps, "__index__") or int(steps) < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return spec.nfe(int(steps))


class _NoBar:
    """What :func:`progress_bar` returns when progress is off: a do-nothing context with ``update``."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


_NO_BAR = _NoBar()


def progress_bar(n: int, progress: bool, desc: str) -> tqdm | _NoBar:
    """A tqdm bar of ``n`` steps named ``desc`` when ``progress``, else a shared do-nothing one."""
    return tqdm(total=n, desc=desc, leave=False) if progress else _NO_BAR
