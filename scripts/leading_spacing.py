"""Where "leading" spacing starts, and what it costs: DDIM on closed-form data against the exact ODE map.

    python scripts/leading_spacing.py

Data: an 8-d Gaussian mixture with its exact ε* (``GaussianMixture.random(linear(1000), 8, 3, seed=0)``),
256 noises x_T ~ N(0, I) taken to be at t = T-1, as a sampler's x_T is. Printed per S: the first listed
timestep and the RMS distance of DDIM-S (leading) to the exact probability-flow map from t = T-1 to ᾱ = 1.
A list that starts far below T-1 feeds x_T in at the wrong noise level (docs/performance.md).
"""

import torch

import ddim
from ddim import GaussianMixture, NoiseSchedule

sched = NoiseSchedule.linear(1000)
mix = GaussianMixture.random(sched, dim=8, components=3, seed=0)
x = torch.randn(256, mix.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
exact = mix.ode_solve(x, float(sched.alphas_cumprod[999]), 1.0, 1000)
for S in (10, 50, 201, 334, 501, 999):
    ts = ddim.timesteps(sched, S, "leading")
    out = ddim.sample(mix, x, sched, steps=S, spacing="leading")
    rms = (out - exact).pow(2).mean().sqrt().item()
    print(f"S={S}: first t={int(ts[0])}, RMS to the exact map from T-1: {rms:.4f}")
