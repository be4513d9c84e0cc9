"""Per-run tables built once: a small LRU cache keyed by content (levels, dtype, device, …)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["memo", "tensor_key"]

_MEMO: OrderedDict[tuple, Any] = OrderedDict()
_MEMO_SIZE = 256


def memo(key: tuple, build: Callable[[], Any], valid: Callable[[Any], bool] | None = None) -> Any:
    """The value cached under ``key``, built by ``build()`` on first use (least recently used of
    ``_MEMO_SIZE`` entries dropped; a cached value failing ``valid`` is rebuilt). Samplers keep their
    per-run tables here, keyed by the content of the levels (see :func:`tensor_key`), η, dtype and
    device, so repeated runs (chunks of a large request, benchmarks) skip the ~0.5 ms of small float64
    tensor work. Cached tensors are shared: never modify them in place. A ``build`` that raises caches
    nothing."""
    if key in _MEMO:
        value = _MEMO[key]
        if valid is None or valid(value):
            _MEMO.move_to_end(key)
            return value
    value = build()
    _MEMO[key] = value
    _MEMO.move_to_end(key)
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value


def tensor_key(t: torch.Tensor) -> tuple:
    """A hashable key for the contents of a small CPU tensor (dtype, shape, bytes)."""
    t = t.detach()
    return (t.dtype, tuple(t.shape), t.contiguous().numpy().tobytes())
