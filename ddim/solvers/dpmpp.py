"""DPM-Solver++ multistep (Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", arXiv 2211.01095): "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde".

The probability-flow ODE in log-SNR λ with the data prediction x̂₀ = m, solved exactly for its linear
part (an exponential integrator), with m(λ) extrapolated from the last 1, 2 or 3 model values:

    x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ m(λ) dλ.

One network call per listed timestep. Each step is x_{i+1} = a·x_i + k0·m_i + k1·m_{i-1} + k2·m_{i-2}
(+ c_z·z for the SDE); :func:`dpmpp_coefficients` builds that table once in float64 from the paper's
formulas, and :mod:`ddim.engine` runs it (history: the last 1 or 2 x̂₀; fused into two ops per step
for a linear denoiser).
"""

from __future__ import annotations

import math

import torch

from ddim.engine import table_sampler
from ddim.registry import Levels
from ddim.solvers.base import LevelTable, level_table, multistep_orders

__all__ = ["dpmpp_coefficients", "dpmpp_table"]


def _step_row(lv: LevelTable, i: int, order: int, sde: bool) -> list[float]:
    """(a, k0, k1, k2, c_z) of step i, level s = i to level t = i+1, from the paper's update rules."""
    h = lv.h(i)
    alpha_t, sigma_t = lv.alpha[i + 1], lv.sigma[i + 1]
    a = sigma_t / lv.sigma[i]
    if sde:
        # SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5 / App.): the variance-preserving noise replaces e^{-h}.
        a *= math.exp(-h)
        c0 = alpha_t * -math.expm1(-2 * h)  # α_t (1 - e^{-2h})
        c_z = sigma_t * math.sqrt(-math.expm1(-2 * h))  # σ_t sqrt(1 - e^{-2h})
    else:
        c0 = alpha_t * -math.expm1(-h)  # α_t (1 - e^{-h})
        c_z = 0.0
    if order == 1:
        # DPM-Solver++(1) = DDIM: x_t = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) m_s.
        return [a, c0, 0.0, 0.0, c_z]
    r0 = lv.h(i - 1) / h  # r = h_{i-1} / h_i
    if order == 2:
        # Algorithm 2: D = (1 + 1/(2r)) m_s - 1/(2r) m_{s-1};  x_t = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) D.
        w = 1 / (2 * r0) if math.isfinite(r0) else 0.0
        return [a, c0 * (1 + w), -c0 * w, 0.0, c_z]
    # Third order (DPM-Solver++(3M), the multistep form of Lu et al. 2022a Alg. 2 in data prediction):
    r1 = lv.h(i - 2) / h
    phi1 = -math.expm1(-h)  # 1 - e^{-h}
    c1 = alpha_t * (1 - phi1 / h)  # α_t ((e^{-h} - 1)/h + 1)
    c2 = alpha_t * ((h - phi1) / h**2 - 0.5)  # α_t ((e^{-h} - 1 + h)/h² - 1/2)
    # D1_0 = (m_s - m_{s-1})/r0, D1_1 = (m_{s-1} - m_{s-2})/r1,
    # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1),
    # x_t = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) m_s + c1 D1 - c2 D2.  Collect the terms of D1_0 (A) and D1_1 (B):
    A = c1 * (1 + r0 / (r0 + r1)) - c2 / (r0 + r1)
    B = -c1 * r0 / (r0 + r1) + c2 / (r0 + r1)
    return [a, c0 + A / r0, -A / r0 + B / r1, -B / r1, c_z]


def dpmpp_coefficients(levels: Levels, order: int, sde: bool = False) -> tuple[torch.Tensor, list[int]]:
    """The float64 table of a DPM-Solver++ run and the order of each step.

    Args:
        levels: the run's levels (N listed timesteps, then ᾱ_final).
        order: 2 or 3 (the solver's highest order; 1 gives DDIM).
        sde: SDE-DPM-Solver++ (order ≤ 2): each step adds c_z·z, z ~ N(0, I).

    Returns:
        (table [N, 5], orders): step i is x_{i+1} = a x_i + k0 m_i + k1 m_{i-1} + k2 m_{i-2} + c_z z with
        row i = (a, k0, k1, k2, c_z) and m_j the x̂₀ of the model call at level j. Orders follow
        :func:`~ddim.solvers.base.multistep_orders` with lower-order final steps below 15 steps
        (as diffusers). The SDE's last step adds σ_N sqrt(1 - e^{-2h}) z like every other step: 0 into
        ᾱ_final = 1 (σ_N = 0), noise into ᾱ_0 (``set_alpha_to_one=False``), as diffusers'
        ``final_sigmas_type="sigma_min"``.
    """
    lv = level_table(levels)
    orders = multistep_orders(lv, order, lower_order_final=lv.N < 15)
    rows = [_step_row(lv, i, p, sde) for i, p in enumerate(orders)]
    return torch.tensor(rows, dtype=torch.float64), orders


def dpmpp_table(levels: Levels, order: int, sde: bool = False) -> torch.Tensor:
    """The engine's table of a DPM-Solver++ run (:mod:`ddim.engine`): columns (a, b, c, w_1, w_2, σ) =
    (a, k0, 0, k1, k2, c_z), history x̂₀, from :func:`dpmpp_coefficients` (the last w's dropped below 3M)."""
    table, _ = dpmpp_coefficients(levels, order, sde)
    zero = torch.zeros(table.shape[0], 1, dtype=torch.float64)
    return torch.cat([table[:, :2], zero, table[:, 2 : 1 + order], table[:, 4:]], dim=1)


def _check_sde(eta: float, variance: str) -> None:
    if eta not in (0.0, 1.0):
        raise ValueError(f"eta is fixed at 1 by sampler='dpmpp_2m_sde' (leave it at 0 or pass 1), got {eta}")
    if variance != "eta":
        raise ValueError(f"variance={variance!r} only applies to the 'ddim' and 'ddpm' samplers, not to 'dpmpp_2m_sde'")


@table_sampler("dpmpp_2m", history=1)
def dpmpp_2m_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. (2022b) Algorithm 2: second-order multistep in log-SNR, data prediction.

    Step 0 is DDIM (first order); step i ≥ 1, with h_i = λ_{i+1} - λ_i and r_i = h_{i-1} / h_i:
    D_i = (1 + 1/(2r_i)) x̂₀_i - 1/(2r_i) x̂₀_{i-1};  x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1} (1 - e^{-h_i}) D_i.
    Below 15 steps the last step is first order; into ᾱ = 1 it always is (x = x̂₀).
    One network call per step. Deterministic: ``eta`` must be 0.
    """
    return dpmpp_table(levels, 2)


@table_sampler("dpmpp_3m", history=2)
def dpmpp_3m_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """DPM-Solver++(3M), Lu et al. (2022b): third-order multistep in log-SNR, data prediction.

    The 2M update plus the second divided difference of x̂₀ over the last three calls (see
    :func:`dpmpp_coefficients`). Warm-up: orders 1, 2, then 3; below 15 steps the last two steps are
    of order 1 and 2. One network call per step. Deterministic: ``eta`` must be 0.
    """
    return dpmpp_table(levels, 3)


@table_sampler("dpmpp_2m_sde", history=1, noisy=lambda eta: True, check=_check_sde)
def dpmpp_2m_sde_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), Lu et al. (2022b): second-order multistep for the reverse SDE (midpoint form).

    x_{i+1} = (σ_{i+1}/σ_i) e^{-h} x_i + α_{i+1} (1 - e^{-2h}) D_i + σ_{i+1} sqrt(1 - e^{-2h}) z_i, with D_i of
    2M. Its first-order step is exactly the DDPM posterior (DDIM with η = 1). The noise z_i comes from
    the per-sample seeds of :func:`ddim.sample` (as with η > 0). The last step adds noise only where the
    run ends at ᾱ_0 < 1 (``set_alpha_to_one=False``), as diffusers does.
    ``eta`` is fixed at 1 by the SDE: leave it at 0 or pass 1.
    """
    return dpmpp_table(levels, 2, sde=True)
