"""Noise schedules: the forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I).

A :class:`NoiseSchedule` is nothing but the table ᾱ_0 … ᾱ_{T-1} (``alphas_cumprod``)
in float64. Every sampler reads its coefficients from this one table, so respacing
(choosing fewer timesteps) never rebuilds betas: a step from t to s simply uses
ᾱ_t and ᾱ_s.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["NoiseSchedule"]


class NoiseSchedule:
    """The cumulative signal level ᾱ_t for t = 0 … T-1 of a DDPM-trained model.

    Args:
        alphas_cumprod: 1-D tensor of length T, values in [0, 1], non-increasing.
            Stored as float64.
        name: how the schedule was built (for configs and reprs).
        params: the keyword arguments of the constructor that built it, so that
            :meth:`to_dict` / :meth:`from_dict` round-trip.

    Use the constructors: :meth:`linear`, :meth:`scaled_linear`, :meth:`cosine`, :meth:`flow`,
    :meth:`from_betas`, :meth:`from_alphas_cumprod`.
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        *,
        name: str = "custom",
        params: dict[str, Any] | None = None,
    ) -> None:
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().clone()
        if ab.ndim != 1 or ab.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(ab.shape)}")
        if not torch.isfinite(ab).all():
            raise ValueError("alphas_cumprod must be finite")
        if (ab < 0).any() or (ab > 1).any():
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if (ab[1:] > ab[:-1] + 1e-12).any():
            raise ValueError("alphas_cumprod must be non-increasing in t")
        self._ab = ab
        self.name = name
        self.params = dict(params or {})

    # ----------------------------------------------------------------- constructors
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM's linear betas (Ho et al. 2020): β_t = linspace(beta_start, beta_end, T)."""
        _check_T(T)
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls._from_betas(betas, "linear", {"T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
        """Latent diffusion's schedule: √β_t linear from √beta_start to √beta_end."""
        _check_T(T)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls._from_betas(betas, "scaled_linear", {"T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal (2021) cosine schedule (diffusers' ``squaredcos_cap_v2``).

        β_t = min(1 - f((t+1)/T) / f(t/T), max_beta) with f(u) = cos²((u + s)/(1 + s) · π/2).
        """
        _check_T(T)

        def f(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)
        return cls._from_betas(betas, "cosine", {"T": T, "s": s, "max_beta": max_beta})

    @classmethod
    def flow(cls, T: int = 1000, shift: float = 1.0) -> NoiseSchedule:
        """The time grid of flow-matching / rectified-flow models, as variance-preserving levels.

        A flow model sees z_τ = (1 - τ) x₀ + τ ε on τ ∈ [0, 1] (Lipman et al. 2023; Liu et al. 2023). It
        has the signal-to-noise ratio of the VP state x = z / √((1-τ)² + τ²) at level
        ᾱ = (1 - τ)² / ((1 - τ)² + τ²), so every sampler runs it on this table unchanged (the adapter
        :class:`ddim.prediction.Denoiser` with ``prediction="flow"`` rescales x to z before each call).

        Timestep t ∈ [0, T-1] is flow time τ_t = (t + 1)/T, the grid of diffusers'
        ``FlowMatchEulerDiscreteScheduler`` (whose networks see t + 1 = τ·T): τ = 1/T at t = 0 (ᾱ_0 < 1)
        and τ = 1 at t = T-1, so ᾱ_{T-1} = 0 exactly (zero terminal SNR: pure noise, where flow's
        x̂₀ = z - τ·v stays finite). ``shift`` > 0 (default 1: none) is Stable Diffusion 3's time shift
        τ -> shift·τ / (1 + (shift - 1)·τ), spending more of the grid at high noise.
        """
        _check_T(T)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a positive float, got {shift!r}")
        tau = torch.arange(1, T + 1, dtype=torch.float64) / T
        tau = shift * tau / (1 + (shift - 1) * tau)
        ab = (1 - tau) ** 2 / ((1 - tau) ** 2 + tau**2)
        return cls(ab, name="flow", params={"T": T, "shift": float(shift)})

    @property
    def is_flow(self) -> bool:
        """Whether this is a flow time grid (:meth:`flow`), the only schedule a ``prediction="flow"`` model
        may be sampled on: its timesteps are the flow times the network was trained at."""
        return self.name == "flow"

    def flow_times(self) -> torch.Tensor:
        """The flow time τ_t = √(1-ᾱ_t) / (√ᾱ_t + √(1-ᾱ_t)) ∈ [0, 1] of each level, float64 [T]
        (the inverse of :meth:`flow`'s map; defined for any schedule)."""
        a, b = self._ab.sqrt(), (1 - self._ab).clamp(min=0).sqrt()
        return b / (a + b)

    @classmethod
    def from_betas(cls, betas: torch.Tensor | list[float]) -> NoiseSchedule:
        """A schedule from per-step betas β_t (ᾱ_t = ∏_{i≤t} (1 - β_i))."""
        b = torch.as_tensor(betas, dtype=torch.float64)
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if (b < 0).any() or (b > 1).any():
            raise ValueError("betas must lie in [0, 1]")
        return cls._from_betas(b, "custom", {"betas": b.tolist()})

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor | list[float]) -> NoiseSchedule:
        """A schedule from the table ᾱ_t directly."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(ab, name="custom", params={"alphas_cumprod": ab.tolist()})

    @classmethod
    def _from_betas(cls, betas: torch.Tensor, name: str, params: dict[str, Any]) -> NoiseSchedule:
        return cls(torch.cumprod(1.0 - betas, dim=0), name=name, params=params)

    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.

        Shifts and scales √ᾱ so that ᾱ_0 is unchanged and ᾱ_{T-1} = 0 exactly (zero terminal
        SNR). Models sampled from pure noise then need v-prediction (ε-prediction cannot
        recover x̂₀ at ᾱ = 0). Returns a new schedule.
        """
        s = self._ab.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * s0 / (s0 - sT)
        out = NoiseSchedule(s**2, name=self.name, params=self.params)
        out.params["rescale_zero_terminal_snr"] = True
        return out

    # ----------------------------------------------------------------- accessors
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t, float64, shape [T] (a copy is not made: do not modify in place)."""
        return self._ab

    @property
    def betas(self) -> torch.Tensor:
        """β_t = 1 - ᾱ_t / ᾱ_{t-1} (with ᾱ_{-1} = 1), float64, shape [T]."""
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self._ab[:-1]])
        return 1.0 - self._ab / prev

    @property
    def T(self) -> int:
        """Number of training timesteps."""
        return int(self._ab.numel())

    def __len__(self) -> int:
        return self.T

    def log_snr(self) -> torch.Tensor:
        """λ_t = log(ᾱ_t / (1 - ᾱ_t)), float64, shape [T] (+inf where ᾱ = 1, -inf where ᾱ = 0)."""
        return torch.log(self._ab) - torch.log1p(-self._ab)

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description that :meth:`from_dict` turns back into this schedule."""
        return {"name": self.name, **self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseSchedule:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        name = d.pop("name", "custom")
        rescale = d.pop("rescale_zero_terminal_snr", False)
        if name in ("linear", "scaled_linear", "cosine", "flow"):
            sched = getattr(cls, name)(**d)
        elif "betas" in d:
            sched = cls.from_betas(d["betas"])
        elif "alphas_cumprod" in d:
            sched = cls.from_alphas_cumprod(d["alphas_cumprod"])
        else:
            raise ValueError(f"unknown schedule description: name={name!r}, keys={sorted(d)}")
        return sched.rescale_zero_terminal_snr() if rescale else sched

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.params.items() if k not in ("betas", "alphas_cumprod")}
        args = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"NoiseSchedule.{self.name}({args})"


def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
