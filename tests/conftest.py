"""Shared toy models and data for the sampler tests (all CPU, tiny, deterministic)."""

from __future__ import annotations

import pytest
import torch

from ddim import NoiseSchedule

torch.set_num_threads(1)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def dummy_model(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
    """diffusers' scheduler-test model, out = x·t/(t+1): nonlinear in t, deterministic."""
    tt = _bcast(t, x)
    return x * tt / (tt + 1)


def dummy_sample_deter() -> torch.Tensor:
    """diffusers' ``dummy_sample_deter``: arange(768) as (3, 8, 8, 4) / 768, permuted to (4, 3, 8, 8)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


class GaussianData:
    """Data x₀ ~ N(μ, s²) per dimension: the exact ε*, x₀* and ODE solution are closed form."""

    def __init__(self, schedule: NoiseSchedule, mu: float = 0.5, s: float = 0.3) -> None:
        self.schedule, self.mu, self.s = schedule, mu, s

    def eps(self, x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        """ε*(x_t, t) = sqrt(1-ᾱ)(x_t - √ᾱ μ) / (ᾱ s² + 1 - ᾱ)."""
        ab = _bcast(self.schedule.alphas_cumprod.to(x.device)[t], x)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)

    def invariant(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """(x_t - √ᾱ μ)/sqrt(ᾱ s² + 1 - ᾱ): constant along the probability-flow ODE."""
        return (x - alpha_bar**0.5 * self.mu) / (alpha_bar * self.s**2 + 1 - alpha_bar) ** 0.5

    def ode_solution(self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor:
        """Exact probability-flow ODE map from level ᾱ_from to level ᾱ_to."""
        z = self.invariant(x, alpha_bar_from)
        return alpha_bar_to**0.5 * self.mu + (alpha_bar_to * self.s**2 + 1 - alpha_bar_to) ** 0.5 * z


@pytest.fixture
def linear() -> NoiseSchedule:
    return NoiseSchedule.linear(1000)


@pytest.fixture
def gaussian(linear: NoiseSchedule) -> GaussianData:
    return GaussianData(linear)


def save_tiny_digit_model(folder, extra: dict | None = None, num_classes: int = 4) -> str:
    """A tiny random class-conditional 8×8 ε-model (T = 100, seed 0) saved as a model folder; returns its path."""
    from ddim.checkpoint import save_model
    from ddim.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_heads=2, num_classes=num_classes))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    save_model(folder, model, NoiseSchedule.linear(100), "epsilon", extra or {})
    return str(folder)
