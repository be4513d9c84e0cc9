"""Several processes with ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m ddim ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment; :func:`init`
reads them and joins the process group (gloo on CPU, nccl when the work runs on CUDA). Without
those variables (a plain ``ddim ...``) everything here is a no-op on a world of one process, so
the same code runs single-process, unchanged.

Failures: when one rank raises, ``torchrun`` sees its process exit and stops the others, and the
command fails with that rank's error on stderr. Where the ranks must agree before going on (a
folder that cannot be resumed, a checkpoint that could not be written), :func:`check` makes every
rank raise together rather than leave the healthy ones waiting in the next collective; and every
collective has a timeout (``DDIM_DIST_TIMEOUT`` seconds, default 1800) as the last resort.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "Context",
    "RankError",
    "init",
    "context",
    "teardown",
    "finish",
    "shard",
    "check",
    "all_gather_objects",
    "gather_objects",
    "broadcast_object",
    "all_reduce_sum",
    "barrier",
    "timeout_seconds",
    "local_device",
]

T = TypeVar("T")

#: Environment variable: seconds to wait in init and in each collective before failing.
TIMEOUT_ENV = "DDIM_DIST_TIMEOUT"
#: Environment variable: force the backend ("gloo" or "nccl").
BACKEND_ENV = "DDIM_DIST_BACKEND"
DEFAULT_TIMEOUT = 1800.0


class RankError(RuntimeError):
    """Another rank failed; raised on the ranks that did not (the failing rank raises its own error)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its machine.

    ``backend`` is None for a single process (no process group). ``device`` is where the
    collectives' tensors live (CPU for gloo, this rank's GPU for nccl).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes shared outputs and prints."""
        return self.rank == 0


_CTX = Context()
_OWNED = False  # whether init() started the process group (finish() leaves only a group it started)


def timeout_seconds() -> float:
    """The collective timeout: ``$DDIM_DIST_TIMEOUT`` seconds, default 1800."""
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {raw!r}") from None


def local_device(device: str | torch.device) -> str:
    """This rank's device: a bare ``"cuda"`` under torchrun means GPU ``LOCAL_RANK``; anything else as given."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and _env_int("WORLD_SIZE", 1) > 1:
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return str(device)


def context() -> Context:
    """The current context (a world of one until :func:`init` joined a process group)."""
    return _CTX


def init(device: str | torch.device | None = None, backend: str | None = None) -> Context:
    """Join the process group that ``torchrun`` set up, once; returns the :class:`Context`.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) nothing is started and the context is
    rank 0 of 1. ``backend`` defaults to ``$DDIM_DIST_BACKEND``, else "nccl" when ``device`` is
    CUDA and "gloo" otherwise. With nccl each rank uses GPU ``LOCAL_RANK``.
    """
    global _CTX, _OWNED
    if dist.is_available() and dist.is_initialized():
        if _CTX.world_size != dist.get_world_size():  # a process group someone else started
            backend = dist.get_backend()
            comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            _CTX = Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), backend, comm)
        return _CTX
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    if world == 1:
        _CTX = Context()
        return _CTX
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if dev.type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    kwargs: dict[str, Any] = {}
    comm = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl backend needs CUDA GPUs; use gloo (DDIM_DIST_BACKEND=gloo) on CPU")
        comm = torch.device("cuda", local_rank)
        torch.cuda.set_device(comm)
        kwargs["device_id"] = comm
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_seconds()), **kwargs
    )
    _CTX = Context(rank, world, local_rank, backend, comm)
    _OWNED = True
    atexit.register(teardown)
    return _CTX


def teardown() -> None:
    """Leave the process group (at exit; harmless when there is none)."""
    global _CTX, _OWNED
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX, _OWNED = Context(), False


def finish() -> None:
    """End a run that succeeded on every rank: wait for all ranks, then leave the process group.

    Every rank calls it after its last collective (the CLI does, after a command returns). gloo
    releases an operation's tensors on its worker thread *after* the caller has resumed, and a
    tensor that Python created needs the GIL to be freed; a process that is already shutting its
    interpreter down then aborts ("terminate called without an active exception"). The barrier
    (which holds no tensors) lets those threads finish first. A no-op single-process or for a
    process group that :func:`init` did not start. Do not call it on a failure path: a rank that
    never arrives would keep the others waiting for the collective timeout.
    """
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.barrier()
        teardown()


def shard(items: Sequence[T], ctx: Context | None = None) -> list[T]:
    """This rank's share of ``items``: positions ``rank, rank + world, ...`` (balanced to within one)."""
    ctx = ctx or _CTX
    return list(items[ctx.rank :: ctx.world_size])


def check(error: BaseException | str | None = None, ctx: Context | None = None) -> None:
    """A barrier that fails everywhere if any rank failed.

    Every rank calls it, passing the error it met (or None). When all passed None it returns;
    otherwise a failing rank re-raises its own error and the others raise :class:`RankError`
    naming the first failing rank and its message. Single-process: raises ``error`` if given.
    """
    ctx = ctx or _CTX
    if not ctx.distributed:
        if isinstance(error, BaseException):
            raise error
        if error is not None:
            raise RuntimeError(str(error))
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return
    text = (
        None if error is None else (f"{type(error).__name__}: {error}" if isinstance(error, Exception) else str(error))
    )
    messages = all_gather_objects(text, ctx)
    if isinstance(error, BaseException):
        raise error
    if error is not None:
        raise RankError(str(error))
    first = next(r for r, m in enumerate(messages) if m is not None)
    raise RankError(f"rank {first} of {ctx.world_size} failed: {messages[first]}")


def all_gather_objects(obj: Any, ctx: Context | None = None) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    ctx = ctx or _CTX
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0, ctx: Context | None = None) -> list[Any] | None:
    """``[obj of rank 0, ...]`` on rank ``dst``, None elsewhere."""
    ctx = ctx or _CTX
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0, ctx: Context | None = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    ctx = ctx or _CTX
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks (a new tensor on the tensor's device; float64 stays float64)."""
    ctx = ctx or _CTX
    if not ctx.distributed:
        return tensor.clone()
    buf = tensor.detach().to(ctx.device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def barrier(ctx: Context | None = None) -> None:
    """Wait for every rank (with the collective timeout)."""
    ctx = ctx or _CTX
    if ctx.distributed:
        check(None, ctx)
