"""How the network is called: the per-run call plan, classifier-free guidance batching, and the checks
of every output (shape, NaN/Inf) without host syncs in a sampler's loop.

:class:`ModelCalls` holds the network, its keyword arguments and the guidance settings, and makes one
(possibly guided) forward per call; :class:`~ddim.prediction.Denoiser` adds the arithmetic that turns
its raw output into (x̂₀, ε̂).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ModelCalls", "Plan"]

Model = Callable[..., Any]


def _unwrap(out: Any) -> Any:
    """A diffusers model returns an object with ``.sample`` (or a tuple with return_dict=False)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


def _batch_kwargs(cond: Mapping[str, Any], uncond: Mapping[str, Any], B: int) -> dict[str, Any]:
    """Keyword arguments for one forward over [cond; uncond]: batch-B tensors are concatenated."""
    if set(cond) != set(uncond):
        raise ValueError(
            f"uncond_kwargs must have the same keys as model_kwargs, got {sorted(uncond)} vs {sorted(cond)}"
        )
    merged: dict[str, Any] = {}
    for k, c in cond.items():
        u = uncond[k]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if c.ndim >= 1 and u.ndim >= 1 and c.shape[0] == B and u.shape[0] == B:
                merged[k] = torch.cat([c, u])
            elif c.shape == u.shape and torch.equal(c, u):
                merged[k] = c
            else:
                raise ValueError(
                    f"model_kwargs[{k!r}] and uncond_kwargs[{k!r}] must be tensors with batch dim {B} "
                    f"(to be concatenated) or equal; got shapes {tuple(c.shape)} and {tuple(u.shape)}"
                )
        elif isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
            raise ValueError(f"model_kwargs[{k!r}] and uncond_kwargs[{k!r}] must both be tensors or both not")
        else:
            same = c is u
            if not same:
                try:
                    same = bool(c == u)
                except Exception:  # noqa: BLE001 - objects without a usable ==
                    same = False
            if not same:
                raise ValueError(f"non-tensor model_kwargs[{k!r}] and uncond_kwargs[{k!r}] must be equal")
            merged[k] = c
    return merged


@dataclass
class Plan:
    """Everything a sampler's loop needs from the denoiser, built once before the first step.

    Attributes:
        timesteps: the N timesteps (python ints) the network sees, in call order.
        t_in: int64 [N, B'] on x's device (B' = 2B with guidance): row i is the network's ``t``.
        coefs: [N, 6] conversion coefficients (see :func:`conversion_coefficients`) in x's device, in
            :func:`coefficient_dtype` of x's dtype.
        kwargs: the keyword arguments of every forward (batched with guidance).
        bad: bool [N] on x's device recording non-finite outputs (accelerators only; None on CPU,
            where the check raises at once).
        conv: the same coefficients in float64 on the CPU, for :meth:`fuse`.
        t_rows: the N rows of ``t_in``, split once so that call i indexes a list (no tensor indexing,
            no host sync in the loop); :attr:`rows` does the same for ``coefs``.
        scales: None, or (flow models) N 0-d tensors: call i feeds the network ``scales[i]·x``
            (:func:`input_scale`); the coefficients already account for it.

    Made by :meth:`Denoiser.plan`, which caches everything but ``kwargs`` and ``bad``: the lists and
    tensors of a plan are shared with later plans for the same timesteps, so never modify them.
    """

    timesteps: list[int]
    t_in: torch.Tensor
    coefs: torch.Tensor
    kwargs: dict[str, Any]
    bad: torch.Tensor | None
    conv: torch.Tensor | None = None
    t_rows: list[torch.Tensor] = field(default_factory=list)
    _rows: list[tuple[torch.Tensor, ...]] | None = field(default=None, repr=False)
    scales: list[torch.Tensor] | None = None

    @property
    def rows(self) -> list[tuple[torch.Tensor, ...]]:
        """``coefs`` as N tuples of six 0-d tensors, split on first use (fused samplers never need them)."""
        if self._rows is None or len(self._rows) != self.coefs.shape[0]:
            self._rows = list(zip(*self.coefs.t().unbind(0), strict=True))
        return self._rows

    def fuse(
        self,
        a_x0: torch.Tensor | float,
        a_eps: torch.Tensor | float,
        a_x: torch.Tensor | float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold an update that is linear in (x̂₀, ε̂, x_t) into one that is linear in (x_t, out).

        For a linear denoiser (:attr:`Denoiser.linear`: no clipping or thresholding) x̂₀ = c0·x_t + c1·out
        and ε̂ = c2·x_t + c3·out, so for every call i

            a_x0·x̂₀ + a_eps·ε̂ + a_x·x_t = A·x_t + B·out,  A = a_x0·c0 + a_eps·c2 + a_x,  B = a_x0·c1 + a_eps·c3.

        Args: a_x0, a_eps, a_x: float64 [N] (or scalars) per call. Returns float64 (A, B), each [N], so
        that a sampler's step is two fused tensor ops on the raw network output.
        """
        c = self.conv
        if c is None:
            raise RuntimeError("this plan has no float64 coefficients (make it with Denoiser.plan)")
        a_x0, a_eps, a_x = (torch.as_tensor(v, dtype=torch.float64) for v in (a_x0, a_eps, a_x))
        return a_x0 * c[:, 0] + a_eps * c[:, 2] + a_x, a_x0 * c[:, 1] + a_eps * c[:, 3]


class ModelCalls:
    """The network and how it is called (see the module docstring); the base of
    :class:`~ddim.prediction.Denoiser`, whose docstring gives the arguments.

    Attributes:
        nfe: number of network evaluations so far. One guided forward (batch 2B) counts as 1 NFE.
    """

    def __init__(
        self,
        model: Model,
        *,
        guidance_scale: float = 1.0,
        model_kwargs: Mapping[str, Any] | None = None,
        uncond_kwargs: Mapping[str, Any] | None = None,
        guidance_rescale: float = 0.0,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a float, got {type(guidance_scale).__name__}")
        self.guidance_scale = float(guidance_scale)
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)):
            raise TypeError(f"guidance_rescale must be a float, got {type(guidance_rescale).__name__}")
        if not 0.0 <= float(guidance_rescale) <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        self.guidance_rescale = float(guidance_rescale)
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (1 = no guidance), got {self.guidance_scale}")
        for name, kw in (("model_kwargs", model_kwargs), ("uncond_kwargs", uncond_kwargs)):
            if kw is not None and not isinstance(kw, Mapping):
                raise TypeError(f"{name} must be a dict, got {type(kw).__name__}")
        self.model_kwargs = dict(model_kwargs or {})
        self.uncond_kwargs = None if uncond_kwargs is None else dict(uncond_kwargs)
        if self.guided and self.uncond_kwargs is None:
            raise ValueError("uncond_kwargs is required when guidance_scale != 1 (the unconditional model's kwargs)")
        self._kwargs_cache: tuple[int, dict[str, Any]] | None = None
        self._cat_buf: torch.Tensor | None = None
        self.nfe = 0

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is on (guidance_scale != 1)."""
        return self.guidance_scale != 1.0

    def _forward_kwargs(self, B: int) -> dict[str, Any]:
        if not self.guided:
            return self.model_kwargs
        if self._kwargs_cache is None or self._kwargs_cache[0] != B:
            self._kwargs_cache = (B, _batch_kwargs(self.model_kwargs, self.uncond_kwargs or {}, B))
        return self._kwargs_cache[1]

    def output(self, x: torch.Tensor, plan: Plan, i: int, check: bool = True) -> torch.Tensor:
        """The raw network output for call i of ``plan`` at x [B, ...] (guidance applied), checked for
        shape and, unless ``check=False``, for NaN/Inf (one reduction per call). With a :attr:`linear`
        denoiser, (x̂₀, ε̂) are the columns of ``plan.rows[i]`` applied to (x, output); see
        :meth:`Plan.fuse`. A loop that skips the NaN/Inf check must check its result (:meth:`finite`)."""
        scale = None if plan.scales is None else plan.scales[i]
        if check or self.guidance_scale != 1.0:
            return self._forward(x, plan.t_rows[i], plan.kwargs, i, plan.timesteps[i], plan.bad, check, scale)
        # the fused loops' path (unguided, unchecked): the call and its shape check, nothing else
        out = self.model(x if scale is None else x * scale, plan.t_rows[i], **plan.kwargs)
        if type(out) is not torch.Tensor:
            out = _tensor_output(out)
        self.nfe += 1
        if out.shape != x.shape:
            raise self._shape_error(out, x, i, plan.timesteps[i])
        return out

    def finite(self, x: torch.Tensor) -> bool:
        """Whether every value of a result is finite: one sum (a NaN/Inf anywhere makes it non-finite;
        a sum that merely overflowed is re-checked element-wise), and one host sync off CPU."""
        total = x.sum() if x.dtype in _FULL else x.sum(dtype=torch.float32)
        return math.isfinite(total.item()) or bool(torch.isfinite(x).all())

    def finish(self, plan: Plan) -> None:
        """Raise the deferred non-finite-output error of an accelerator run (one sync, after the loop)."""
        if plan.bad is not None and bool(plan.bad.any()):
            i = int(plan.bad.nonzero()[0, 0])
            raise FloatingPointError(_nonfinite_message(i, plan.timesteps[i]))

    def _forward(
        self,
        x: torch.Tensor,
        t_in: torch.Tensor,
        kwargs: dict[str, Any],
        step: int | None,
        t_desc: Any,
        bad: torch.Tensor | None,
        check: bool = True,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One (possibly guided) network evaluation, checked for shape and (if ``check``) NaN/Inf. The
        network sees ``scale · x`` when ``scale`` is given (flow models, see :func:`input_scale`)."""
        if scale is not None:
            x = x * scale
        if self.guided:  # [x; x] into a buffer reused across calls (the model's input never escapes)
            buf = self._cat_buf
            if (
                buf is None
                or buf.shape[0] != 2 * x.shape[0]
                or buf.shape[1:] != x.shape[1:]
                or buf.dtype != x.dtype
                or buf.is_inference() != torch.is_inference_mode_enabled()
            ):
                buf = self._cat_buf = torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            x_in = torch.cat([x, x], out=buf) if buf.device == x.device else torch.cat([x, x])
        else:
            x_in = x
        out = self.model(x_in, t_in, **kwargs)
        if type(out) is not torch.Tensor:
            out = _tensor_output(out)
        self.nfe += 1
        if out.shape != x_in.shape:
            raise self._shape_error(out, x_in, step, t_desc)
        # One float32/float64 sum instead of isfinite(out).all() (~25x cheaper on CPU at batch 64): a
        # NaN/Inf anywhere makes the sum non-finite. On CPU a sum that merely overflowed is re-checked.
        if check:
            total = out.sum() if out.dtype in _FULL else out.sum(dtype=torch.float32)
            if bad is None:
                if not math.isfinite(total.item()) and not bool(torch.isfinite(out).all()):
                    raise FloatingPointError(_nonfinite_message(step, t_desc))
            else:
                bad[step] = ~torch.isfinite(total)  # no host sync; reported by finish()
        if self.guided:
            cond, uncond = out.chunk(2)
            out = torch.lerp(uncond, cond, self.guidance_scale)  # u + s·(c - u)
            if self.guidance_rescale:
                out = _rescale_guided(out, cond, self.guidance_rescale)
        return out

    def _shape_error(self, out: torch.Tensor, x_in: torch.Tensor, step: int | None, t_desc: Any) -> ValueError:
        return ValueError(
            f"model output at step {step} (timestep t={t_desc}) has shape {tuple(out.shape)}, "
            f"expected {tuple(x_in.shape)} (the shape of x_t{' doubled for guidance' if self.guided else ''})"
        )


def _rescale_guided(out: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 Eq. 15-16: φ·g·std(c)/std(g) + (1-φ)·g, std over all but the batch dim."""
    dims = list(range(1, out.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
    return out * (phi * ratio + (1.0 - phi))


def _tensor_output(out: Any) -> torch.Tensor:
    """The tensor in a model's output (see :func:`_unwrap`), else TypeError."""
    out = _unwrap(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor (or an object with .sample), got {type(out).__name__}")
    return out


_FULL = (torch.float32, torch.float64)


def _nonfinite_message(step: int | None, t: Any) -> str:
    return f"model output contains NaN or Inf at step i={step} (timestep t={t})"
