"""End-to-end speed settings for sampling: threads, precision, memory format, torch.compile.

:func:`prepare` turns a loaded model into the fastest form for a device, keeping the sampler's state in
float32 (only the network runs in half precision), so that results stay comparable across settings:

- weights frozen (``requires_grad_(False)``), eval mode; sampling runs under ``torch.inference_mode``
  (:func:`ddim.generate.generate` does that).
- channels-last memory format where it helps: on CUDA, and on CPU too for this package's U-Net
  (measured ~15-20 % faster at batch 1-128 on a 2-core CPU with one thread).
- ``dtype`` float16/bfloat16 (accelerators): the network's input is cast to it and its output back to
  float32, so the fused float32 sampler update loses nothing to half-precision coefficients.
- ``compile=True``: ``torch.compile``; on CUDA with mode "reduce-overhead" (CUDA graphs: the whole
  forward replays as one graph, removing per-kernel launch cost). Compiling takes minutes on a small
  CPU and pays off only for long runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["PRECISIONS", "Precision", "prepare", "resolve_dtype", "set_threads", "check_threads", "input_dtype"]

#: Names accepted for ``--dtype``.
PRECISIONS = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A precision name ("fp32", "fp16", "bf16", "float16", ...) or dtype -> torch dtype.

    None means float32. float16 is refused on CPU (slow and poorly supported there); bfloat16 is
    allowed everywhere.
    """
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).lower()
        if key not in PRECISIONS:
            raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(PRECISIONS)}")
        dtype = PRECISIONS[key]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("dtype float16 needs an accelerator (use bfloat16 or float32 on CPU)")
    return dtype


def check_threads(threads: int | None) -> int | None:
    """``threads`` unchanged if it is None or at most the machine's CPU count (``os.cpu_count()``).

    Raises ValueError otherwise: more threads than CPUs never helps, and far more (e.g. 100000)
    crashes the OpenMP runtime instead of failing.
    """
    cpus = os.cpu_count() or 1
    if threads is not None and threads > cpus:
        raise ValueError(f"{threads} threads is more than this machine's {cpus} CPUs; give at most {cpus}")
    return threads


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads and return the number in use.

    ``threads`` if given; otherwise ``$OMP_NUM_THREADS`` if set (torch already honours it); otherwise
    the CPUs this process may run on (``os.sched_getaffinity``), as torch's default may count
    hyper-threads or CPUs outside a container's share. One inter-op thread: sampling is sequential.
    """
    check_threads(threads)
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - not Linux
                threads = os.cpu_count() or 1
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass
    return torch.get_num_threads()


def input_dtype(model: Any) -> torch.dtype | None:
    """The dtype ``model`` wants its input x in: its first floating parameter's, or None when any
    floating dtype will do (a :class:`Precision` wrapper casts x itself; a plain function has no
    parameters). Looks through ``torch.compile`` and :func:`prepare`'s wrappers; costs a few µs."""
    if not isinstance(model, torch.nn.Module):
        return None
    mods = [model._modules.get("_orig_mod", model)]  # (no getattr: the wrappers' __getattr__ raises twice)
    while mods:
        mod = mods.pop()
        if mod is None:
            continue
        if isinstance(mod, Precision):
            return None
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point():
                return p.dtype
        mods.extend(reversed(mod._modules.values()))
    return None


class Precision(torch.nn.Module):
    """Run ``model`` in ``dtype``: cast the input x to it and the output back to x's dtype.

    ``config`` and any other attribute are those of the wrapped model.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.model(x.to(self.dtype), t, **kwargs)
        if not isinstance(out, torch.Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        return out.to(x.dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class _ChannelsLast(torch.nn.Module):
    """Feed ``model`` channels-last input (its weights are converted once)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> Any:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x, t, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


def prepare(
    model: torch.nn.Module,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
) -> torch.nn.Module:
    """The model made ready for fast sampling on ``device`` (see the module docstring).

    Args:
        model: a loaded model (:func:`ddim.load`), any ``nn.Module`` called as ``model(x, t, **kw)``.
        device: where to run (default CPU).
        dtype: the network's precision: None/"fp32" (default), "fp16" (accelerators), "bf16". The
            sampler's state stays float32.
        channels_last: None (default) = on for 4-D conv nets (CUDA, and CPU where it measured faster);
            True/False to force.
        compile: wrap in ``torch.compile`` (default off).
        compile_mode: ``torch.compile``'s mode; default "reduce-overhead" (CUDA graphs) on CUDA, torch's
            default elsewhere.

    Returns:
        A module with the same call signature whose attributes (``config`` ...) are the model's.
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    if channels_last is None:
        channels_last = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if channels_last:
        model = _ChannelsLast(model)
    if dtype != torch.float32:
        model = Precision(model, dtype)
    if compile:
        mode = compile_mode or ("reduce-overhead" if device.type == "cuda" else None)
        model = torch.compile(model, mode=mode, dynamic=False)
    return model
