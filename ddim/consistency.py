"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023): one network call from any noise level to data.

Notation: the VP state z_t = α_t x + σ_t ε (α_t = √ᾱ_t, σ_t = √(1-ᾱ_t)) is, scaled by 1/α_t, the
variance-exploding state x_s = z_t/α_t = x + s ε at noise level s_t = σ_t/α_t (Karras et al.'s σ). The
consistency function f maps (x_s, s) to the start of its probability-flow ODE trajectory. It is built from
a network D_θ's x̂₀ with the skip/out parameterisation of Song et al. (Sec. 3.1),

    f(x, s) = c_skip(s) · x + c_out(s) · D_θ(α_t x, t),
    c_skip(s) = σ_d² / ((s - s_min)² + σ_d²),   c_out(s) = 1 - c_skip(s) = (s - s_min)² / ((s - s_min)² + σ_d²),

so that f(x, s_min) = x exactly (c_skip = 1, c_out = 0 in floating point too), the boundary condition, where
s_min = s at the first timestep t_min = 0 (≈ 0.01 on the linear schedule). Song et al. scale a raw network
output with c_out = σ_d (s - s_min)/√(σ_d² + s²); here D_θ is already an x̂₀ estimate (the ddim network's
output read through its prediction type, v by default), so c_out → 1 at high noise makes f → D_θ, and a
network initialised from a diffusion model starts as its one-step x̂₀, the analogue of Song et al.'s
initialisation from the EDM denoiser. σ_d = 0.5 as theirs.

:class:`ConsistencyModel` wraps a network so that ``model(z_t, t, **kwargs)`` returns f as an x̂₀ prediction
("sample"): :func:`ddim.load` wraps a model whose config holds a ``"consistency"`` entry. The multistep
sampler (Song et al. Alg. 1) is ``sampler="consistency"`` (:mod:`ddim.solvers.consistency`): x̂ = f(x_T, t_0);
then for each later timestep t_i, z = √ᾱ_{t_i} x̂ + √(1-ᾱ_{t_i}) z_i (fresh noise, one seed per sample) and
x̂ = f(z, t_i). One
network call per listed timestep.

Consistency distillation (Alg. 2) is :func:`consistency_distill_loss`: one teacher ODE step (DDIM, η = 0,
the teacher's own guidance and clipping) from t_{n+1} to t_n on a fixed grid, and the distance between the
online f(z_{t_{n+1}}) and the EMA target f⁻(ẑ_{t_n}). The distance is the pseudo-Huber
d(a, b) = √(‖a - b‖² + c²) - c with c = 0.00054·√dim (Song & Dhariwal 2023): LPIPS is unavailable here
(no pretrained VGG), L2's gradient grows with the error so the few samples whose teacher step lands far from
the target dominate a small batch; the pseudo-Huber gradient is L2's near 0 and bounded beyond c.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ddim.prediction import Denoiser, check_prediction
from ddim.schedule import NoiseSchedule
from ddim.timesteps import timesteps as make_timesteps

__all__ = [
    "SIGMA_DATA",
    "ConsistencyModel",
    "consistency_distill_loss",
    "consistency_grid",
    "pseudo_huber",
]

SIGMA_DATA = 0.5


class ConsistencyModel(nn.Module):
    """A network wrapped as the consistency function f (module docstring), called like a ddim model.

    Args:
        net: ``net(z_t, t, **kwargs)`` (a :class:`~ddim.unet.UNet`), its output read through ``prediction``.
        schedule: the VP schedule (ᾱ_t = ``schedule.alphas_cumprod[t]``); t_min = 0 is the boundary.
        prediction: what ``net`` predicts: "v_prediction" (default), "sample" or "epsilon".
        sigma_data: σ_d of the skip/out coefficients (default 0.5).

    ``forward(z_t, t, **kwargs)`` (z_t [B, ...] VP state, t int64 [B] or 0-d) returns f(z_t/α_t, s_t) [B, ...],
    an x̂₀ estimate: sample it with ``prediction="sample"``. ``config`` is the network's (for shapes/classes).
    """

    def __init__(
        self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "v_prediction", sigma_data: float = SIGMA_DATA
    ) -> None:
        super().__init__()
        self.net = net
        self.prediction = check_prediction(prediction)
        if self.prediction == "flow":
            raise ValueError("a consistency model's network predicts 'v_prediction', 'sample' or 'epsilon'")
        self.sigma_data = float(sigma_data)
        ab = schedule.alphas_cumprod.to(torch.float64)
        if not bool((ab > 0).all()):
            raise ValueError("a consistency model needs ᾱ_t > 0 at every timestep (no zero terminal SNR)")
        a, s = ab.sqrt(), (1 - ab).sqrt()
        sig = s / a
        d = (sig - sig[0]) ** 2
        c_skip = self.sigma_data**2 / (d + self.sigma_data**2)
        c_skip[0] = 1.0  # exactly (d[0] is exactly 0 already)
        # per timestep, float64: α, σ, 1/α, c_skip, c_out (not part of the state dict)
        self._table = torch.stack([a, s, 1 / a, c_skip, 1 - c_skip], dim=1)
        self._table[0, 4] = 0.0
        self._cast: dict[tuple, torch.Tensor] = {}

    @property
    def config(self) -> Any:
        return self.net.config

    @property
    def sigma_min(self) -> float:
        """s_min = s at t = 0: the level where f is the identity."""
        return float(self._table[0, 1] / self._table[0, 0])

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
        """(α_t, σ_t, 1/α_t, c_skip, c_out) of timesteps t [B], each [B, 1, …] in ``like``'s dtype and device."""
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = self._table.to(device=like.device, dtype=like.dtype)
        rows = self._cast[key][t.to(like.device).reshape(-1)]
        shape = (-1, *([1] * (like.ndim - 1)))
        return [rows[:, j].reshape(shape) for j in range(5)]

    def denoised(self, z: torch.Tensor, out: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """D_θ: the x̂₀ of the network's output ``out`` at z = α x + σ ε."""
        if self.prediction == "v_prediction":
            return a * z - s * out
        if self.prediction == "epsilon":
            return (z - s * out) / a
        return out

    def consistency_function(self, x: torch.Tensor, t: torch.Tensor | int, **kwargs: Any) -> torch.Tensor:
        """f(x, s_t) for the variance-exploding state x = z_t/α_t [B, ...] at int timesteps t; f(x, s_min) = x
        exactly at t = 0 (see the module docstring)."""
        t = _timesteps(t, x)
        a, s, _, c_skip, c_out = self.coefficients(t, x)
        out = self.net(a * x, t, **kwargs)
        return c_skip * x + c_out * self.denoised(a * x, out, a, s)

    def forward(self, z: torch.Tensor, t: torch.Tensor | int, **kwargs: Any) -> torch.Tensor:
        """f(z/α_t, s_t) for the VP state z [B, ...] at int timesteps t: an x̂₀ estimate shaped like z."""
        t = _timesteps(t, z)
        a, s, inv_a, c_skip, c_out = self.coefficients(t, z)
        out = self.net(z, t, **kwargs)
        return c_skip * (z * inv_a) + c_out * self.denoised(z, out, a, s)


def _timesteps(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.int64, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.reshape(-1)


def consistency_grid(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """The distillation grid: ``n`` "trailing" timesteps from T-1 down, then t_min = 0; int64 [n + 1],
    descending. It contains the trailing grids of every step count that divides n (the sampler's
    1, 2, 4 calls for n = 16), so the model is trained at the levels it is sampled at."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the consistency grid needs n >= 1 intervals, got {n!r}")
    ts = make_timesteps(schedule, n, "trailing")
    if int(ts[-1]) == 0:
        raise ValueError(f"n={n} trailing timesteps already reach t = 0; use n < T")
    return torch.cat([ts, torch.zeros(1, dtype=torch.int64)])


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """√(‖a - b‖² + c²) - c per sample, float [B]; ‖·‖ over all non-batch dims (the sum of squares), default
    c = 0.00054·√dim (Song & Dhariwal 2023)."""
    diff = (a - b).reshape(a.shape[0], -1).float()
    if c is None:
        c = 0.00054 * diff.shape[1] ** 0.5
    return (diff.pow(2).sum(dim=1) + c * c).sqrt() - c


def consistency_distill_loss(
    model: ConsistencyModel,
    target: ConsistencyModel,
    teacher: Callable[..., Any],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    grid: Sequence[int] | torch.Tensor,
    prediction: str = "epsilon",
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    teacher_options: Mapping[str, Any] | None = None,
    distance: str = "pseudo_huber",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The consistency-distillation loss of one batch (Song et al. 2023, Alg. 2; teacher's DDIM ODE step).

    For each sample: n ~ U{0 … N-1} (``grid`` holds N+1 descending timesteps, the last t_min = 0),
    z = √ᾱ x0 + √(1-ᾱ) ε at t_n (the noisier level), one teacher DDIM step (η = 0) to ẑ at t_{n+1}, and
    d(f_θ(z, t_n), f_θ⁻(ẑ, t_{n+1})) with the target network θ⁻ (no gradients).

    Args:
        model: the online :class:`ConsistencyModel` (gradients); target: its EMA copy.
        teacher: the teacher network ``teacher(x, t, y=labels)``; prediction: what it predicts.
        schedule: the training schedule. x0: [B, ...] data. labels: int64 [B] or None.
        grid: N+1 strictly descending timesteps ending at 0 (see :func:`consistency_grid`).
        guidance_scale, null_label, teacher_options: the teacher's classifier-free guidance and further
            :class:`~ddim.prediction.Denoiser` settings (clipping), as :func:`ddim.distill.progressive_distill_loss`.
        distance: "pseudo_huber" (default) or "l2" (mean squared error per sample).
        generator: for the indices and the noise; noise / index: given ε [B, ...] / int64 [B] instead.

    Returns: 0-d float tensor (the batch mean). One teacher call (batch 2B when guided), one target call, one
    online call with gradients.
    """
    ts = torch.as_tensor(grid, dtype=torch.int64).reshape(-1).cpu()
    if ts.numel() < 2 or int(ts[-1]) != 0 or not bool((ts[1:] < ts[:-1]).all()) or int(ts[0]) >= schedule.T:
        raise ValueError(f"grid must be >= 2 strictly descending timesteps in [0, T-1] ending at 0, got {ts.tolist()}")
    if distance not in ("pseudo_huber", "l2"):
        raise ValueError(f"unknown distance {distance!r}; valid: pseudo_huber, l2")
    B = x0.shape[0]
    kwargs: dict[str, Any] = {}
    uncond = None
    if labels is not None:
        kwargs = {"y": torch.as_tensor(labels, device=x0.device)}
    if guidance_scale != 1.0:
        if labels is None or null_label is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs labels and null_label (the unconditional class)")
        uncond = {"y": torch.full_like(kwargs["y"], int(null_label))}
    n = ts.numel() - 1
    if index is None:
        index = torch.randint(0, n, (B,), generator=generator)
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    ab = schedule.alphas_cumprod.to(torch.float64)
    t_hi, t_lo = ts[index], ts[index + 1]
    ab_hi, ab_lo = ab[t_hi], ab[t_lo]
    bc = (-1, *([1] * (x0.ndim - 1)))
    z = ab_hi.sqrt().reshape(bc).to(x0) * x0 + (1 - ab_hi).sqrt().reshape(bc).to(x0) * noise
    teach = Denoiser(
        teacher,
        schedule,
        prediction,
        guidance_scale=guidance_scale,
        model_kwargs=kwargs,
        uncond_kwargs=uncond,
        **dict(teacher_options or {}),
    )
    with torch.no_grad():
        x0_t, eps_t = teach(z, t_hi.to(x0.device), ab_hi)
        z_lo = ab_lo.sqrt().reshape(bc).to(x0) * x0_t + (1 - ab_lo).sqrt().reshape(bc).to(x0) * eps_t  # DDIM
        want = target(z_lo, t_lo.to(x0.device), **kwargs)
    got = model(z, t_hi.to(x0.device), **kwargs)
    if distance == "l2":
        return (got - want).pow(2).reshape(B, -1).mean(dim=1).mean()
    return pseudo_huber(got, want).mean()
