"""Reproducible Gaussian noise: one CPU generator per sample, so a batch of 8 equals 8 batches of 1.

Noise is always drawn in float32 on the CPU and then moved/cast, as diffusers pipelines do when
given one ``torch.Generator("cpu")`` per sample; results therefore do not depend on the device,
the dtype of x or how samples are grouped into batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["randn", "StepNoise", "check_seeds", "SEED_LIMIT", "check_seed_range"]

#: Seeds are ints in [0, SEED_LIMIT): torch's CPU generator keeps only the low 32 bits of a seed, so
#: 2**32 (or -1) would silently give the images of seed 0 (or 2**32 - 1).
SEED_LIMIT = 2**32


def check_seed_range(first: int, n: int = 1, name: str = "seed") -> None:
    """Raise ValueError naming ``name`` unless seeds ``first .. first + n - 1`` all lie in [0, 2**32)."""
    if isinstance(first, bool) or not isinstance(first, int):
        raise TypeError(f"{name} must be an int, got {first!r}")
    if first < 0 or first + max(n, 1) - 1 >= SEED_LIMIT:
        last = f" (the last of {n} seeds would be {first + n - 1})" if n > 1 and first >= 0 else ""
        raise ValueError(
            f"{name} {first} is out of range{last}: seeds are ints in [0, {SEED_LIMIT - 1}] "
            "(torch's CPU generator keeps only their low 32 bits)"
        )


def check_seeds(seeds: object, batch: int) -> list[int]:
    """Return ``seeds`` as a list of ``batch`` ints, else raise TypeError/ValueError naming ``seeds``."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints (one per sample), got {type(seeds).__name__}")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not hasattr(s, "__index__"):
            raise TypeError(f"seeds must hold ints, got {s!r}")
        out.append(int(s))
    bad = [s for s in out if not 0 <= s < SEED_LIMIT]
    if bad:
        raise ValueError(
            f"seeds must be ints in [0, {SEED_LIMIT - 1}] (torch's CPU generator keeps only their low 32 bits, "
            f"so others would alias), got {bad[0]}"
        )
    if len(out) != batch:
        raise ValueError(f"seeds must hold one int per sample: got {len(out)} seeds for batch size {batch}")
    return out


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be [B, ...] with non-negative sizes, got {shape}")
    return shape


def randn(
    shape: Sequence[int],
    seeds: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` [B, ...] with sample i drawn from its own seed.

    Sample i is ``torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(seeds[i]))`` in
    float32 on the CPU; the samples are stacked and then moved to ``device`` (default CPU) and cast to
    ``dtype`` (default float32). Equals diffusers' ``randn_tensor`` with one CPU generator per sample.

    Raises ValueError naming ``seeds`` when ``len(seeds) != shape[0]`` or a seed is outside
    [0, 2**32), and TypeError naming ``dtype`` when it is not a floating dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    shape = _check_shape(shape)
    seeds = check_seeds(seeds, shape[0])
    out = torch.empty(shape, dtype=torch.float32)
    for i, s in enumerate(seeds):
        torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed(s), out=out[i])
    return out.to(device=device, dtype=dtype)


class StepNoise:
    """Fresh N(0, I) noise of shape [B, ...] for each stochastic step: call it to get the next draw.

    Args:
        shape: [B, ...], the shape of x.
        seeds: one int per sample, or None.
        device, dtype: where the returned noise lives (drawn in float32 on CPU, then moved/cast).
        block: with ``seeds``, how many steps' noise to draw at once (default 1). ``sample`` passes its
            number of steps, so the whole run's noise is drawn before the loop needs it: one
            ``torch.randn`` call per sample and one copy to the device per block, instead of B calls and
            one copy per step. The values are the same as drawing step by step (see below). Blocks are
            capped at about 64 MiB.

    With ``seeds``, sample i has its own ``torch.Generator("cpu").manual_seed(seeds[i])``. Its first
    draw is skipped: that draw is x_T when x_T came from :func:`randn` with the same seeds, so step
    noise continues the stream (never repeats x_T) and matches diffusers pipelines that pass one CPU
    generator per sample for both the initial latents and the scheduler's noise. Generators are made
    only when noise is first asked for, so deterministic runs pay nothing. Drawing k steps of one
    sample in one call gives exactly the k successive draws when the sample's size is a multiple of 16
    (torch's CPU normal sampler works in blocks of 16 values); other sizes are drawn one step at a
    time (still ahead of the loop).

    With ``seeds=None``, torch's global CPU RNG is used, one draw of shape[1:] per sample per step, at
    the time of the call (reproducible under ``torch.manual_seed``, but dependent on batch layout).

    The returned tensor may be reused by a later call: consume it before asking again.
    """

    #: Upper bound on the float32 bytes of one block of pre-drawn noise.
    BLOCK_BYTES = 64 * 2**20

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        block: int = 1,
    ) -> None:
        # a torch.Size (x.shape) is already a valid shape; seeds are checked only when given
        self.shape = tuple(shape) if type(shape) is torch.Size else _check_shape(shape)
        self.seeds = None if seeds is None else check_seeds(seeds, self.shape[0])
        self.device = device if type(device) is torch.device else torch.device(device or "cpu")
        self.dtype = dtype
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        per_draw = 4 * max(1, math.prod(self.shape))
        self.block = max(1, min(block, self.BLOCK_BYTES // per_draw))
        self._gens: list[torch.Generator] | None = None
        self._buf: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._ready: list[torch.Tensor] = []
        self.draws = 0

    def restarted(self) -> StepNoise:
        """A new source giving the same draws again from the first (with ``seeds``; the global RNG
        cannot be rewound, so without seeds the new source simply continues it)."""
        return StepNoise(self.shape, self.seeds, self.device, self.dtype, self.block)

    def _draw_into(self, buf: torch.Tensor) -> None:
        for i in range(self.shape[0]):
            gen = None if self._gens is None else self._gens[i]
            torch.randn(self.shape[1:], generator=gen, out=buf[i])

    def _start(self) -> None:
        self._gens = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        skip = torch.empty(self.shape[1:], dtype=torch.float32)
        for g in self._gens:
            torch.randn(self.shape[1:], generator=g, out=skip)  # skip the x_T draw (see class docstring)

    def _fill(self) -> None:
        """Draw the next ``block`` steps of every sample (seeded path)."""
        if self._gens is None:
            self._start()
        k, per = self.block, math.prod(self.shape[1:])
        buf = torch.empty((k, *self.shape), dtype=torch.float32)
        for i, g in enumerate(self._gens):
            if k > 1 and per >= 16 and per % 16 == 0:
                buf[:, i] = torch.randn((k, *self.shape[1:]), generator=g)  # = k successive draws
            else:
                for j in range(k):
                    torch.randn(self.shape[1:], generator=g, out=buf[j, i])
        if self.device.type != "cpu" or self.dtype != torch.float32:
            buf = buf.to(device=self.device, dtype=self.dtype)
        self._ready = list(reversed(buf.unbind(0)))

    def __call__(self) -> torch.Tensor:
        """The next draw: [B, ...] on ``device`` in ``dtype``."""
        self.draws += 1
        if self.seeds is not None:
            if not self._ready:
                self._fill()
            return self._ready.pop()
        if self._buf is None:
            self._buf = torch.empty(self.shape, dtype=torch.float32)
        self._draw_into(self._buf)
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return self._buf
        if self._out is None:
            self._out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._out.copy_(self._buf, non_blocking=False)
