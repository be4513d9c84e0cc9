"""Closed-form data for measuring solvers: a Gaussian mixture, whose optimal ε* is exact at every noise
level and whose probability-flow ODE can be solved to any accuracy.

Data x₀ ~ Σ_k w_k N(μ_k, s_k² I) in D dimensions. In Karras et al.'s variables y = x_t/√ᾱ and
σ = sqrt((1-ᾱ)/ᾱ) the noisy data is y ~ Σ_k w_k N(μ_k, (s_k² + σ²) I), so

    ε*(y, σ) = E[ε | y] = σ Σ_k π_k(y, σ) (y - μ_k) / (s_k² + σ²),
    π_k(y, σ) ∝ w_k N(y; μ_k, (s_k² + σ²) I)            (the posterior component weights),

and the probability-flow ODE is dy/dσ = ε*(y, σ) (Karras et al. 2022, Eq. 4). ε* depends on ᾱ only, so
the ODE's solution between two levels does not depend on how the levels are parametrised: the
reference :meth:`GaussianMixture.ode_solve` integrates it with classical RK4 on a ρ = 7 grid of
thousands of σ's in float64 (error far below any sampler's; see the tests). One component is the
Gaussian case, whose solution is also known in closed form.
"""

from __future__ import annotations

import math

import torch

from ddim.schedule import NoiseSchedule

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """A Gaussian-mixture data distribution with exact ε* — a "model" for :func:`ddim.sample`.

    Args:
        schedule: the noise schedule (ᾱ_t for integer t).
        means: [K, D] component means μ_k.
        stds: [K] component standard deviations s_k > 0 (isotropic).
        weights: [K] mixture weights (normalised here); default uniform.

    Calling ``mixture(x_t, t)`` (x_t [B, D], t int64 [B]) returns ε*(x_t, t) in x_t's dtype, computed in
    float64: use it with ``prediction="epsilon"``.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.schedule = schedule
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(self.means.shape)}")
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(K)
        if not (self.stds > 0).all():
            raise ValueError("stds must be > 0")
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_weights = torch.log(w / w.sum())

    @classmethod
    def random(cls, schedule: NoiseSchedule, dim: int = 8, components: int = 3, seed: int = 0) -> GaussianMixture:
        """Means in [-1, 1]^D, stds in [0.1, 0.3], weights in [0.5, 1.5] (normalised), from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        means = torch.rand(components, dim, generator=g, dtype=torch.float64) * 2 - 1
        stds = 0.1 + 0.2 * torch.rand(components, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(schedule, means, stds, weights)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact draws of x₀, float64 [n, D]."""
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def eps_karras(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        """ε*(y, σ) for y = x/√ᾱ at noise level σ = sqrt((1-ᾱ)/ᾱ) ≥ 0 (finite), float64 [B, D]."""
        var = self.stds**2 + sigma**2  # [K]
        diff = y[:, None, :] - self.means[None]  # [B, K, D]
        logp = self.log_weights - 0.5 * self.dim * torch.log(var) - 0.5 * (diff**2).sum(-1) / var  # [B, K]
        post = torch.softmax(logp, dim=1)
        return sigma * torch.einsum("bk,bkd->bd", post / var, diff)

    def eps_at(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """ε*(x_t) at level ᾱ in [0, 1] (ε* = x_t at ᾱ = 0, 0 at ᾱ = 1), float64 [B, D]."""
        x = x.to(torch.float64)
        if alpha_bar == 0:
            return x.clone()
        sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        return self.eps_karras(x / math.sqrt(alpha_bar), sigma)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        ts = torch.as_tensor(t).reshape(-1).cpu()
        out = torch.empty(x.shape, dtype=torch.float64)
        for tv in ts.unique().tolist():
            rows = ts == tv
            out[rows] = self.eps_at(x[rows].cpu(), float(self.schedule.alphas_cumprod[tv]))
        return out.to(device=x.device, dtype=x.dtype)

    def ode_solve(
        self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float = 1.0, steps: int = 4000
    ) -> torch.Tensor:
        """The probability-flow ODE solution from level ᾱ_from (x [B, D]) to level ᾱ_to ≥ ᾱ_from, float64.

        Classical RK4 in (σ, y) on ``steps`` steps of a ρ = 7 grid from σ_from to σ_to (dense near
        small σ, where ε* varies fastest); needs ᾱ_from > 0.
        """
        if not 0 < alpha_bar_from <= alpha_bar_to <= 1:
            raise ValueError(f"need 0 < alpha_bar_from <= alpha_bar_to <= 1, got {alpha_bar_from}, {alpha_bar_to}")
        s0 = math.sqrt((1 - alpha_bar_from) / alpha_bar_from)
        s1 = math.sqrt((1 - alpha_bar_to) / alpha_bar_to)
        rho = 7.0
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        grid = (s0 ** (1 / rho) + ramp * (s1 ** (1 / rho) - s0 ** (1 / rho))) ** rho
        grid[0], grid[-1] = s0, s1
        y = x.to(torch.float64) / math.sqrt(alpha_bar_from)
        f = self.eps_karras
        for a, b in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
            dt = b - a
            k1 = f(y, a)
            k2 = f(y + 0.5 * dt * k1, a + 0.5 * dt)
            k3 = f(y + 0.5 * dt * k2, a + 0.5 * dt)
            k4 = f(y + dt * k3, b)
            y = y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y * math.sqrt(alpha_bar_to)
