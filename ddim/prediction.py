"""The one model adapter: raw network output -> the canonical pair (x̂₀, ε̂).

Every sampler works on (x̂₀, ε̂) only; what the network predicts ("epsilon", "sample",
"v_prediction" or "flow"), x̂₀ clipping, Imagen's dynamic thresholding and classifier-free guidance are all
handled here, once. With x_t = √ᾱ x₀ + √(1-ᾱ) ε (Ho et al. 2020) and v = √ᾱ ε - √(1-ᾱ) x₀
(Salimans & Ho 2022):

- epsilon:      x̂₀ = (x_t - √(1-ᾱ) out) / √ᾱ,      ε̂ = out
- sample:       x̂₀ = out,                            ε̂ = (x_t - √ᾱ out) / √(1-ᾱ)
- v_prediction: x̂₀ = √ᾱ x_t - √(1-ᾱ) out,           ε̂ = √ᾱ out + √(1-ᾱ) x_t
- flow:         x̂₀ = k x_t - τ out,                   ε̂ = k x_t + (1-τ) out

Flow models (flow matching, rectified flow) predict the velocity v = ε - x₀ of the straight path
z_τ = (1-τ) x₀ + τ ε. The VP state with the same SNR is x_t = z_τ / √((1-τ)² + τ²), i.e.
√ᾱ = (1-τ)/√((1-τ)² + τ²), so from ᾱ alone τ = √(1-ᾱ)/(√ᾱ + √(1-ᾱ)) and z_τ = k x_t with
k = 1/(√ᾱ + √(1-ᾱ)) (:func:`input_scale`). The network is called with k·x_t (a per-call scalar, so
x̂₀ = z - τ v and ε̂ = z + (1-τ) v stay linear in (x_t, out)); its timestep t indexes the flow grid
of :meth:`ddim.schedule.NoiseSchedule.flow` (τ_t = (t+1)/T), the only schedule it is accepted on.

This module is the adapter's arithmetic; how the network is called (the per-run call plan,
guidance batching, the output checks) is :mod:`ddim.calls`, which :class:`Denoiser` extends.

Each is linear in (x_t, out), so the coefficients are computed once in float64 (for all steps of a
run) and applied with two fused tensor ops. At ᾱ = 1 (no noise) ε̂ is not identifiable and is set
to 0 where a formula would divide by √(1-ᾱ) = 0. At ᾱ = 0 (zero terminal SNR) ε-prediction cannot
give x̂₀ and is refused with a ValueError; the others stay finite (v: x̂₀ = -v, ε̂ = x_t; flow: τ = 1,
x̂₀ = x_t - v, ε̂ = x_t).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ddim.calls import ModelCalls, Plan
from ddim.memo import _MEMO, memo, tensor_key  # noqa: F401 - re-exported (the per-run table cache)
from ddim.schedule import NoiseSchedule

__all__ = [
    "PREDICTIONS",
    "Denoiser",
    "Plan",
    "check_prediction",
    "check_zero_snr",
    "coefficient_dtype",
    "conversion_coefficients",
    "dynamic_threshold",
    "input_scale",
    "memo",
    "scalar_rows",
    "tensor_key",
    "to_x0_eps",
]

#: What a network may predict.
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")

Model = Callable[..., Any]


def check_prediction(prediction: object) -> str:
    """Return ``prediction`` if it is one of :data:`PREDICTIONS`, else raise ValueError naming it."""
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid predictions: {', '.join(PREDICTIONS)}")
    return prediction


def check_zero_snr(prediction: str, alpha_bars: torch.Tensor, timesteps: torch.Tensor | None = None) -> None:
    """Refuse ε-prediction at any level with ᾱ = 0 (zero terminal SNR), before any network call.

    Args:
        prediction: one of :data:`PREDICTIONS`.
        alpha_bars: float64 ᾱ of the levels where the network will be evaluated, any shape.
        timesteps: the matching timesteps (same shape), only used in the message.
    """
    if prediction != "epsilon":
        return
    zero = alpha_bars == 0
    if bool(zero.any()):
        where = ""
        if timesteps is not None:
            where = f" at timestep t={int(torch.as_tensor(timesteps).reshape(-1)[zero.reshape(-1)][0])}"
        raise ValueError(
            f"prediction='epsilon' cannot be sampled{where}, where ᾱ_t = 0 (zero terminal SNR): "
            "x̂₀ = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t divides by zero. Use a v-prediction model "
            "(prediction='v_prediction'), or timesteps that avoid ᾱ_t = 0 (e.g. spacing='leading')."
        )


def conversion_coefficients(alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """Float64 coefficients turning (x_t, out) into (x̂₀, ε̂), shape ``alpha_bar.shape + (6,)``.

    Columns: x̂₀ = c0·x_t + c1·out; ε̂ = c2·x_t + c3·out; and, after x̂₀ was clipped, the consistent
    ε̂ = c4·x_t + c5·x̂₀ = (x_t - √ᾱ x̂₀)/√(1-ᾱ). ε-prediction at ᾱ = 0 gives inf (callers refuse it
    first with :func:`check_zero_snr`). For "flow", x_t is the VP state and ``out`` the velocity the
    network returned at its input :func:`input_scale` · x_t.
    """
    check_prediction(prediction)
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    a, b = ab.sqrt(), (1.0 - ab).clamp(min=0.0).sqrt()
    zero, one = torch.zeros_like(ab), torch.ones_like(ab)
    inv_b = torch.where(b > 0, 1.0 / torch.where(b > 0, b, one), zero)  # 0 where ᾱ = 1
    if prediction == "epsilon":
        cols = [1.0 / a, -b / a, zero, one]
    elif prediction == "sample":
        cols = [zero, one, inv_b, -a * inv_b]
    elif prediction == "flow":  # z = k·x_t, τ = k·√(1-ᾱ), 1 - τ = k·√ᾱ
        k = 1.0 / (a + b)
        cols = [k, -b * k, k, a * k]
    else:  # v_prediction
        cols = [a, -b, b, a]
    cols += [inv_b, -a * inv_b]
    return torch.stack(torch.broadcast_tensors(*cols), dim=-1)


def input_scale(alpha_bar: torch.Tensor | float, prediction: str) -> torch.Tensor | None:
    """The factor the VP state x_t is multiplied by before the network sees it, float64 shaped like
    ``alpha_bar``; None (no scaling) for every prediction but "flow", whose networks take
    z_τ = x_t / (√ᾱ + √(1-ᾱ)) (the point (1-τ) x₀ + τ ε of the straight path with the same SNR;
    1 at ᾱ = 0 and at ᾱ = 1)."""
    if check_prediction(prediction) != "flow":
        return None
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return 1.0 / (ab.sqrt() + (1.0 - ab).clamp(min=0.0).sqrt())


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022), per sample, out of place.

    s = clamp(quantile(|x̂₀|, ratio), 1, max_value) over all non-batch dims; x̂₀ <- clamp(x̂₀, -s, s) / s.
    ``x0``: [B, ...]; returns the same shape and dtype (half precision is thresholded in float32).
    """
    dtype, B = x0.dtype, x0.shape[0]
    flat = x0.reshape(B, -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _convert(
    x: torch.Tensor,
    out: torch.Tensor,
    c: Sequence[torch.Tensor],
    prediction: str,
    clip_range: float | None,
    threshold: tuple[float, float] | None,
    clipped_eps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the six coefficients ``c`` (tensors broadcastable to x, in x's device). Never modifies x or out.

    With clipping or thresholding, ε̂ is the model's own (``clipped_eps=False``, diffusers' default) or
    recomputed from the clipped x̂₀ (``clipped_eps=True``)."""
    if prediction == "epsilon":
        x0, eps = torch.mul(x, c[0]).addcmul_(out, c[1]), out
    elif prediction == "sample":
        x0, eps = out, torch.mul(x, c[2]).addcmul_(out, c[3])
    else:
        x0, eps = torch.mul(x, c[0]).addcmul_(out, c[1]), torch.mul(x, c[2]).addcmul_(out, c[3])
    if threshold is not None or clip_range is not None:
        if threshold is not None:
            x0 = dynamic_threshold(x0, *threshold)
        else:
            x0 = x0.clamp(-clip_range, clip_range)
        if clipped_eps:
            eps = torch.mul(x, c[4]).addcmul_(x0, c[5])  # ε̂ consistent with the clipped x̂₀
    return x0, eps


def coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype coefficients are applied in for tensors of ``dtype``: itself, or float32 for 16-bit floats
    (a bf16 coefficient like 0.9999 would round to 1)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def scalar_rows(table: torch.Tensor, like: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """A float64 table [N, K] as N tuples of K 0-d tensors on ``like``'s device (dtype from
    :func:`coefficient_dtype`), made once before a loop so that step i costs a list lookup, not tensor
    indexing, and no host synchronisation on accelerators."""
    t = table.to(device=like.device, dtype=coefficient_dtype(like.dtype))
    return list(zip(*t.t().unbind(0), strict=True))


def _broadcastable_alpha_bar(alpha_bar: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).detach().cpu()
    if ab.ndim == 1 and ab.numel() == x.shape[0] and x.ndim > 1:
        ab = ab.reshape(-1, *([1] * (x.ndim - 1)))
    if not torch.isfinite(ab).all() or (ab < 0).any() or (ab > 1).any():
        raise ValueError(f"alpha_bar must lie in [0, 1], got {ab.flatten()[:8].tolist()}")
    return ab


def _check_threshold_args(
    clip_sample_range: float, dynamic_thresholding_ratio: float, sample_max_value: float
) -> tuple[float, float, float]:
    if not float(clip_sample_range) > 0:
        raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
    if not 0 < float(dynamic_thresholding_ratio) <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
    if not float(sample_max_value) > 0:
        raise ValueError(f"sample_max_value must be > 0, got {sample_max_value}")
    return float(clip_sample_range), float(dynamic_thresholding_ratio), float(sample_max_value)


def _check_flag(v: object, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return v


def to_x0_eps(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar: float | torch.Tensor,
    prediction: str = "epsilon",
    *,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn one raw network output into (x̂₀, ε̂). Pure; inputs are not modified.

    Args:
        x_t: [B, ...] floating tensor at noise level ᾱ.
        model_output: the network's output, same shape as ``x_t``.
        alpha_bar: ᾱ of x_t: a float, a 0-d tensor, a [B] tensor (one per sample) or any shape
            broadcastable to x_t (e.g. [B, 1, 1, 1]). Coefficients are computed in float64.
        prediction: "epsilon" (default), "sample", "v_prediction" or "flow" (then ``model_output`` is the
            velocity the network returned at :func:`input_scale` · x_t).
        clip_sample: clamp x̂₀ to [-clip_sample_range, clip_sample_range] (default off: clipping
            ruins latent-space models).
        thresholding: Imagen dynamic thresholding of x̂₀ (see :func:`dynamic_threshold`); takes
            precedence over ``clip_sample``.
        dynamic_thresholding_ratio, sample_max_value: its percentile and upper bound for s.
        use_clipped_model_output: after clipping or thresholding, recompute ε̂ from the clipped x̂₀,
            ε̂ = (x_t - √ᾱ x̂₀)/√(1-ᾱ), so that (x̂₀, ε̂) again describe x_t exactly (guided-diffusion;
            diffusers' ``use_clipped_model_output=True``). Default False: ε̂ is the model's own, as
            diffusers' ``DDIMScheduler.step`` and ``DDIMPipeline`` do. No effect without clipping.

    Returns:
        (x̂₀, ε̂), each shaped like x_t in x_t's dtype.
    """
    prediction = check_prediction(prediction)
    clip_range, ratio, max_value = _check_threshold_args(
        clip_sample_range, dynamic_thresholding_ratio, sample_max_value
    )
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} differs from x_t shape {tuple(x_t.shape)}")
    ab = _broadcastable_alpha_bar(alpha_bar, x_t)
    check_zero_snr(prediction, ab)
    c = conversion_coefficients(ab, prediction).to(device=x_t.device, dtype=x_t.dtype)
    return _convert(
        x_t,
        model_output,
        c.unbind(-1),
        prediction,
        clip_range if clip_sample else None,
        (ratio, max_value) if thresholding else None,
        _check_flag(use_clipped_model_output, "use_clipped_model_output"),
    )


class Denoiser(ModelCalls):
    """Wrap any network as a function (x_t, t) -> (x̂₀, ε̂); samplers see nothing else.

    Args:
        model: a callable ``model(x_t, t, **model_kwargs)`` with x_t [B, ...] and t int64 [B] on x_t's
            device, returning a tensor shaped like x_t or an object with ``.sample`` (diffusers'
            UNet2DModel output).
        schedule: the training schedule (ᾱ_t = ``schedule.alphas_cumprod[t]``).
        prediction: "epsilon" (default), "sample", "v_prediction" or "flow" (velocity ε - x₀ of the
            straight path; needs a :meth:`~ddim.schedule.NoiseSchedule.flow` schedule, and the network
            is called with the flow state z = :func:`input_scale` · x_t and the int timestep t of that
            grid, τ_t = (t+1)/T). Samplers see no difference.
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value:
            x̂₀ clipping / dynamic thresholding, see :func:`to_x0_eps` (default: neither).
        use_clipped_model_output: with clipping/thresholding, recompute ε̂ from the clipped x̂₀ (default
            False: keep the model's ε̂, as diffusers' DDIM does); see :func:`to_x0_eps`.
        guidance_scale: classifier-free guidance weight s (Ho & Salimans 2022); 1.0 (default) is off.
            When on, the conditional (``model_kwargs``) and unconditional (``uncond_kwargs``) halves
            run in ONE forward of batch 2B and are combined on the raw output: out = u + s·(c - u).
        model_kwargs: extra keyword arguments of the network (default none).
        uncond_kwargs: the unconditional ones; required when guidance_scale != 1, with the same keys.
        guidance_rescale: φ in [0, 1] of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
            Steps are Flawed", Eq. 15-16), for zero-SNR / v-prediction models: the guided output g is
            replaced by φ·g·std(c)/std(g) + (1-φ)·g, std per sample (default 0: off). As diffusers,
            it acts on the raw output (ε or v).

    Attributes:
        nfe: number of network evaluations so far. One guided forward (batch 2B) counts as 1 NFE,
            so a guided S-step DDIM run reports S, like an unguided one.
    """

    def __init__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        prediction: str = "epsilon",
        *,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        use_clipped_model_output: bool = False,
        guidance_scale: float = 1.0,
        model_kwargs: Mapping[str, Any] | None = None,
        uncond_kwargs: Mapping[str, Any] | None = None,
        guidance_rescale: float = 0.0,
    ) -> None:
        if not hasattr(schedule, "alphas_cumprod"):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        if self.prediction == "flow" and not getattr(schedule, "is_flow", False):
            raise ValueError(
                f"prediction='flow' needs the flow time grid NoiseSchedule.flow(T, shift) (timestep t is flow "
                f"time τ = (t+1)/T), got {schedule!r}: its timesteps do not name the times a flow model was "
                "trained at"
            )
        rng, ratio, max_value = _check_threshold_args(clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
        self.clip_range = rng if clip_sample else None
        self.threshold = (ratio, max_value) if thresholding else None
        self.clipped_eps = _check_flag(use_clipped_model_output, "use_clipped_model_output")
        super().__init__(
            model,
            guidance_scale=guidance_scale,
            model_kwargs=model_kwargs,
            uncond_kwargs=uncond_kwargs,
            guidance_rescale=guidance_rescale,
        )

    # ----------------------------------------------------------------- fast path for samplers
    @property
    def linear(self) -> bool:
        """Whether (x̂₀, ε̂) are linear in (x_t, out): no clipping and no thresholding. Then samplers may
        fold the conversion into their own update with :meth:`Plan.fuse` and :meth:`output`."""
        return self.clip_range is None and self.threshold is None

    def plan(
        self,
        timesteps: torch.Tensor,
        x: torch.Tensor,
        alpha_bars: torch.Tensor | None = None,
        *,
        cache: Callable[[tuple, Callable[[], Any]], Any] | None = None,
    ) -> Plan:
        """Precompute, once, the per-call tables for evaluating the network at ``timesteps`` (in order).

        Args:
            timesteps: int64 [N], the network's timestep at call i (repeats allowed).
            x: a tensor shaped like the samples (gives batch, dtype and device).
            alpha_bars: float64 [N], the ᾱ used to convert call i's output (default ᾱ of timesteps[i]).
            cache: ``cache(key, build)`` keeping values for these very timesteps and ᾱ's (e.g.
                :meth:`ddim.sampling.Levels.cached`): the tables are then found by ``key`` (prediction,
                batch, device, dtype) without hashing the timesteps. Without it they are cached by
                content (:func:`memo`).

        Raises ValueError (mentioning v-prediction) for ε-prediction at a level with ᾱ = 0.
        """
        B = x.shape[0]
        reps = 2 * B if self.guidance_scale != 1.0 else B
        device = x.device
        key = ("plan", self.prediction, reps, device, coefficient_dtype(x.dtype))
        if cache is None:
            parts = self._plan_parts(timesteps, x, alpha_bars, key)
        else:
            parts = cache(key, lambda: self._plan_parts(timesteps, x, alpha_bars, key))
        timesteps_list, t_in, coefs, conv, t_rows, rows, scales = parts  # shared with later plans: read only
        bad = None if x.is_cpu else torch.zeros(len(timesteps_list), dtype=torch.bool, device=device)
        return Plan(timesteps_list, t_in, coefs, self._forward_kwargs(B), bad, conv, t_rows, rows, scales)

    def _plan_parts(
        self, timesteps: torch.Tensor, x: torch.Tensor, alpha_bars: torch.Tensor | None, key: tuple
    ) -> tuple:
        """The cacheable part of :meth:`plan`, cached by the content of the timesteps and ᾱ's."""
        ts = torch.as_tensor(timesteps, dtype=torch.int64).cpu().reshape(-1)
        ab = self.schedule.alphas_cumprod[ts] if alpha_bars is None else torch.as_tensor(alpha_bars).double().cpu()
        _, _, reps, device, cdtype = key

        def build() -> tuple:
            check_zero_snr(self.prediction, ab, ts)
            t_in = ts[:, None].expand(ts.numel(), reps).contiguous().to(device)
            conv = conversion_coefficients(ab, self.prediction)
            coefs = conv.to(device=device, dtype=cdtype)
            rows = list(zip(*coefs.t().unbind(0), strict=True))
            k = input_scale(ab, self.prediction)
            scales = None if k is None else list(k.to(device=device, dtype=cdtype).unbind(0))
            return ts.tolist(), t_in, coefs, conv, list(t_in.unbind(0)), rows, scales

        return memo((*key, tensor_key(ts), tensor_key(ab)), build)

    def predict(self, x: torch.Tensor, plan: Plan, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂₀, ε̂) for call i of ``plan`` at the current sample x [B, ...]. No host sync off CPU."""
        scale = None if plan.scales is None else plan.scales[i]
        out = self._forward(x, plan.t_rows[i], plan.kwargs, i, plan.timesteps[i], plan.bad, scale=scale)
        return _convert(x, out, plan.rows[i], self.prediction, self.clip_range, self.threshold, self.clipped_eps)

    def x0(self, x: torch.Tensor, out: torch.Tensor, plan: Plan, i: int) -> torch.Tensor:
        """x̂₀ from a raw output of call i (for callbacks of fused samplers); clipping applied if on."""
        return _convert(x, out, plan.rows[i], self.prediction, self.clip_range, self.threshold, self.clipped_eps)[0]

    # ----------------------------------------------------------------- general entry point
    def __call__(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        alpha_bar: float | torch.Tensor | None = None,
        *,
        step: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂₀, ε̂) at x_t [B, ...] for timestep t.

        Args:
            x_t: the current sample.
            t: int, 0-d int tensor, or int64 [B] (one timestep per sample).
            alpha_bar: the ᾱ that x_t is at (float, [B] or broadcastable); default ᾱ_t from the schedule.
            step: the sampler's step index, only for error messages.

        Checks shapes and finiteness at once (a host sync on accelerators); samplers use
        :meth:`plan` / :meth:`predict` instead.
        """
        B = x_t.shape[0]
        t_vec = torch.as_tensor(t, dtype=torch.int64, device=x_t.device)
        t_vec = t_vec.expand(B) if t_vec.ndim == 0 else t_vec.reshape(-1)
        if t_vec.numel() != B:
            raise ValueError(f"t must be an int or hold one timestep per sample ({B}), got shape {tuple(t_vec.shape)}")
        if alpha_bar is None:
            alpha_bar = self.schedule.alphas_cumprod[t_vec.cpu()]
            if bool((alpha_bar == alpha_bar[0]).all()):
                alpha_bar = alpha_bar[0]
        ab = _broadcastable_alpha_bar(alpha_bar, x_t)
        check_zero_snr(self.prediction, ab)
        t_in = torch.cat([t_vec, t_vec]) if self.guided else t_vec.contiguous()
        t_desc = t_vec.tolist() if t_vec.numel() > 1 and not bool((t_vec == t_vec[0]).all()) else int(t_vec[0])
        k = input_scale(ab, self.prediction)
        scale = None if k is None else k.to(device=x_t.device, dtype=coefficient_dtype(x_t.dtype))
        out = self._forward(x_t, t_in, self._forward_kwargs(B), step, t_desc, None, scale=scale)
        c = conversion_coefficients(ab, self.prediction).to(device=x_t.device, dtype=x_t.dtype)
        return _convert(x_t, out, c.unbind(-1), self.prediction, self.clip_range, self.threshold, self.clipped_eps)
