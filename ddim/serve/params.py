"""Reading and checking the query parameters of ``ddim serve``'s API: one-line errors naming the parameter.

Every endpoint accepts a fixed set of names; any other name (a path, a model, ...) is refused, so a
request can only choose among the settings below, never a file or another model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BadParam", "Limits", "read_params"]


class BadParam(ValueError):
    """A query parameter is missing, unknown or out of range (HTTP 400)."""


@dataclass(frozen=True)
class Limits:
    """What requests may ask for.

    Attributes:
        max_steps: most sampling steps of one request (default 200; the schedule's T caps it too).
        max_frames: most interpolation frames (default 33).
        num_classes: the model's classes (0 = unconditional model).
        samplers, spacings: the accepted names.
        deterministic: samplers that draw no noise at η = 0 (interpolation needs one).
        default_guidance: the model's guidance weight when none is given.
        default_spacing: the model's spacing when none is given.
        optimized_steps: the step counts the model ships optimised timesteps for (spacing "optimized").
        optimized_fallback: the model's own spacing is "optimized", with a fallback at other step counts;
            otherwise "optimized" at a step count without a list is refused.
    """

    max_steps: int
    max_frames: int
    num_classes: int
    samplers: Sequence[str]
    spacings: Sequence[str]
    deterministic: Sequence[str]
    default_guidance: float
    default_spacing: str = "leading"
    optimized_steps: Sequence[int] = ()
    optimized_fallback: bool = False


def _one(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadParam(f"{name} is given {len(values)} times; give it once")
    return values[0]


def _int(args: Mapping[str, Sequence[str]], name: str, default: int | None, lo: int, hi: int) -> int:
    raw = _one(args, name)
    if raw is None:
        if default is None:
            raise BadParam(f"{name} is required (an int in {lo}..{hi})")
        return default
    try:
        v = int(raw.strip())
    except ValueError:
        raise BadParam(f"{name} must be an int in {lo}..{hi}, got {raw[:40]!r}") from None
    if not lo <= v <= hi:
        raise BadParam(f"{name} must be an int in {lo}..{hi}, got {v}")
    return v


def _float(args: Mapping[str, Sequence[str]], name: str, default: float, lo: float, hi: float) -> float:
    raw = _one(args, name)
    if raw is None:
        return default
    try:
        v = float(raw.strip())
    except ValueError:
        raise BadParam(f"{name} must be a number in [{lo:g}, {hi:g}], got {raw[:40]!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise BadParam(f"{name} must be a number in [{lo:g}, {hi:g}], got {raw[:40]!r}")
    return v + 0.0  # -0.0 -> 0.0: one cache key and one result per value


def _choice(args: Mapping[str, Sequence[str]], name: str, default: str, valid: Sequence[str]) -> str:
    raw = _one(args, name)
    if raw is None:
        return default
    if raw not in valid:
        raise BadParam(f"unknown {name} {raw[:40]!r}; valid: {', '.join(valid)}")
    return raw


def _class(args: Mapping[str, Sequence[str]], name: str, num_classes: int) -> int:
    """-1 = unconditional (absent, empty, "none" or -1)."""
    raw = _one(args, name)
    if raw is None or raw.strip().lower() in ("", "none", "-1"):
        return -1
    if num_classes == 0:
        raise BadParam(f"{name}: this model is unconditional (it has no classes)")
    return _int({name: [raw]}, name, None, 0, num_classes - 1)


#: Names each endpoint reads (any other name is refused).
FIELDS = {
    "sample": ("seed", "steps", "eta", "sampler", "spacing", "class", "guidance"),
    "interpolate": ("seed_a", "seed_b", "frames", "frame", "steps", "sampler", "spacing", "class", "guidance"),
    "reconstruct": ("steps", "spacing", "class"),
    "swap": ("steps", "spacing", "source", "target", "guidance"),
    "sdedit": ("strength", "seed", "steps", "eta", "spacing", "class", "guidance"),
    "inpaint": ("seed", "steps", "eta", "spacing", "class", "guidance"),
}

MAX_SEED = 2**32 - 1  # torch's CPU generator keeps a seed's low 32 bits: larger seeds would alias (ddim.noise)


def read_params(kind: str, args: Mapping[str, Sequence[str]], limits: Limits) -> dict[str, Any]:
    """The checked settings of an ``kind`` request (a key of :data:`FIELDS`) from its query ``args``
    (name -> list of values). Raises :class:`BadParam` with a one-line message."""
    allowed = FIELDS[kind]
    for name in args:
        if name not in allowed:
            raise BadParam(f"unknown parameter {name[:40]!r}; /api/{kind} takes {', '.join(allowed)}")
    p: dict[str, Any] = {"steps": _int(args, "steps", 10, 1, limits.max_steps)}
    if "spacing" in allowed:
        p["spacing"] = _choice(args, "spacing", limits.default_spacing, limits.spacings)
        sampling = kind in ("sample", "interpolate")  # the edits use the model's fallback spacing instead
        if sampling and p["spacing"] == "optimized" and not limits.optimized_fallback:
            if p["steps"] not in limits.optimized_steps:
                have = ", ".join(map(str, sorted(limits.optimized_steps)))
                raise BadParam(f"spacing 'optimized': this model ships optimised timesteps for steps {have}, "
                               f"not {p['steps']}")  # fmt: skip
    if "seed" in allowed:
        p["seed"] = _int(args, "seed", 0, 0, MAX_SEED)
    if "eta" in allowed:
        p["eta"] = _float(args, "eta", 0.0, 0.0, 1.0)
    if "guidance" in allowed:
        p["guidance"] = _float(args, "guidance", limits.default_guidance, 0.0, 20.0)
    if "class" in allowed:
        p["class"] = _class(args, "class", limits.num_classes)
    if kind == "sample":
        p["sampler"] = _choice(args, "sampler", "ddim", limits.samplers)
        if p["sampler"] == "ddpm" and p["eta"] not in (0.0, 1.0):
            raise BadParam(f"eta is fixed at 1 by sampler ddpm (leave it at 0 or give 1), got {p['eta']:g}")
    elif kind == "interpolate":
        p["sampler"] = _choice(args, "sampler", "ddim", limits.samplers)
        if p["sampler"] not in limits.deterministic:
            raise BadParam(
                f"interpolation needs a deterministic sampler, got {p['sampler']!r}; "
                f"valid: {', '.join(limits.deterministic)}"
            )
        p["seed_a"] = _int(args, "seed_a", 0, 0, MAX_SEED)
        p["seed_b"] = _int(args, "seed_b", 1, 0, MAX_SEED)
        p["frames"] = _int(args, "frames", 9, 2, limits.max_frames)
        frame = _one(args, "frame")
        p["frame"] = None if frame is None else _int(args, "frame", None, 0, p["frames"] - 1)
    elif kind == "swap":
        if limits.num_classes == 0:
            raise BadParam("class swap needs a class-conditional model; this one is unconditional")
        p["source"] = _class(args, "source", limits.num_classes)  # -1: invert under the null class
        p["target"] = _int(args, "target", None, 0, limits.num_classes - 1)
    elif kind == "sdedit":
        p["strength"] = _float(args, "strength", 0.5, 0.0, 1.0)
        if p["strength"] == 0.0:
            raise BadParam("strength must be a number in (0, 1], got 0")
    return p
