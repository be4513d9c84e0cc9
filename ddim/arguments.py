"""Checks of the public entry points' arguments (:func:`ddim.sample`, :func:`ddim.invert`) and the
run's :class:`~ddim.registry.Levels`, resolved once per schedule object and timestep rule."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ddim.memo import memo, tensor_key
from ddim.registry import Levels
from ddim.schedule import NoiseSchedule
from ddim.timesteps import SPACINGS, check_spacing, check_timesteps
from ddim.timesteps import timesteps as make_timesteps

__all__ = ["check_x", "in_model_dtype", "check_bool", "resolve_timesteps", "run_levels", "zero_snr", "no_grad"]


def check_x(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a batch dimension [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    return x


def in_model_dtype(model: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
    """x cast to the dtype the model's weights are in, and x's own dtype to cast the result back to
    (None when no cast is needed): a float64 or float16 x on a float32 model runs in float32."""
    from ddim.perf import input_dtype

    want = input_dtype(model)
    if want is None or want == x.dtype or not want.is_floating_point:
        return x, None
    return x.to(want), x.dtype


def check_bool(v: object, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return v


def resolve_timesteps(
    schedule: NoiseSchedule, steps: int, spacing: str, timesteps: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    check_spacing(spacing)
    if timesteps is not None:
        if isinstance(timesteps, (list, tuple)) and all(type(t) is int for t in timesteps):
            # an explicit list, validated once (a checked list is a pure function of its values and T)
            return memo(("explicit", schedule.T, tuple(timesteps)), lambda: check_timesteps(timesteps, schedule.T))
        return check_timesteps(timesteps, schedule.T)
    # A spacing is a pure function of (schedule, steps): computed once per schedule object and rule.
    # (The weak reference tells a new schedule at a recycled id apart.)
    _, ts = memo(
        ("timesteps", id(schedule), steps, spacing, SPACINGS[spacing]),
        lambda: (weakref.ref(schedule), make_timesteps(schedule, steps, spacing)),
        valid=lambda v: v[0]() is schedule,
    )
    return ts


def _levels(schedule: NoiseSchedule, ts: torch.Tensor, set_alpha_to_one: bool) -> Levels:
    """The run's :class:`Levels` (cached per schedule object, timesteps and final level)."""

    def build() -> tuple[weakref.ref, Levels]:
        all_ab = schedule.alphas_cumprod
        final = torch.ones(1, dtype=torch.float64) if set_alpha_to_one else all_ab[:1]
        return weakref.ref(schedule), Levels(ts, torch.cat([all_ab[ts], final]))

    key = ("levels", id(schedule), tensor_key(ts), set_alpha_to_one)
    return memo(key, build, valid=lambda v: v[0]() is schedule)[1]


def run_levels(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str,
    timesteps: Sequence[int] | torch.Tensor | None,
    set_alpha_to_one: bool,
) -> Levels:
    """The :class:`Levels` of a run, validated, with one cache lookup for the usual arguments.

    One Levels object is kept per schedule object (weakly referenced, so a new schedule at a recycled id
    is told apart), steps and spacing, or explicit list of ints, and final level; the tables samplers
    derive from it are kept on it (:meth:`Levels.cached`), so a repeated run hashes no tensor. Other
    timestep arguments (tensors, arrays) are validated and looked up by content each time.
    """
    if timesteps is None:
        check_spacing(spacing)
        key: tuple = ("run-levels", id(schedule), steps, spacing, SPACINGS[spacing], set_alpha_to_one)
    elif type(timesteps) is list or type(timesteps) is tuple:
        # lists equal as tuples (ints, whole floats, numpy ints: equal values hash equally) give the
        # same checked timesteps; anything check_timesteps refuses raises in build() and is not cached
        key = ("run-levels", id(schedule), tuple(timesteps), set_alpha_to_one)
    else:
        return _levels(schedule, resolve_timesteps(schedule, steps, spacing, timesteps), set_alpha_to_one)

    def build() -> tuple[weakref.ref, Levels]:
        ts = resolve_timesteps(schedule, steps, spacing, timesteps)
        return weakref.ref(schedule), _levels(schedule, ts, set_alpha_to_one)

    try:
        return memo(key, build, valid=lambda v: v[0]() is schedule)[1]
    except TypeError:  # an unhashable entry (e.g. a nested list): the checks below name the problem
        return _levels(schedule, resolve_timesteps(schedule, steps, spacing, timesteps), set_alpha_to_one)


def zero_snr(levels: Levels) -> bool:
    """Whether a listed level has ᾱ = 0 (zero terminal SNR), computed once per levels."""
    return levels.cached(("zero-snr",), lambda: bool((levels.alpha_bars[:-1] == 0).any()))


def no_grad(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` with gradients off, as under ``torch.no_grad()``: switched off (and back on after) only when
    they are on. It sets the grad mode directly, as ``torch.no_grad`` itself does, without the context
    manager object, whose creation and enter/exit cost more than a whole short run's Python."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        _set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_grad_enabled(True)

    return wrapper


#: The grad-mode switch behind ``torch.no_grad`` / ``torch.set_grad_enabled`` (the public class, if a
#: torch build lacks the function).
_set_grad_enabled: Callable[[bool], Any] = getattr(torch._C, "_set_grad_enabled", torch.set_grad_enabled)
