"""UniPC (Zhao, Bai, Rao, Zhou & Lu, NeurIPS 2023, "UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models", arXiv 2302.04867), data prediction, B(h) = e^{h} - 1 ("bh2"): "unipc".

Each listed level i gets one network call, m_i = x̂₀(x_i, t_i), used twice:

1. UniC (Alg. 1, corrector): it corrects x_i, the predictor's guess, with the step from level i-1 that
   produced it, now also using m_i: x_i^c. No extra call, and the order rises by one.
2. UniP (Alg. 2, predictor): from x_i^c to level i+1 with m_i, m_{i-1}, … (order p ≤ 2 here).

Both are x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m_s - α_t B(h) Σ_k ρ_k D_k with h = λ_t - λ_s,
D_k = (m_{s_k} - m_s) / r_k, r_k = (λ_{s_k} - λ_s) / h, and ρ solving the order conditions R ρ = b
(Eq. 7–8; :func:`_rhos`). All weights are built once in float64 by :func:`unipc_coefficients`.

Predictor and corrector together are one multistep table on x̂₀ (:func:`unipc_multistep_table`),
which :mod:`ddim.engine` runs with a history of two x̂₀'s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddim.engine import table_sampler
from ddim.registry import Levels
from ddim.solvers.base import LevelTable, level_table, multistep_orders

__all__ = ["UNIPC_ORDER", "unipc_coefficients", "unipc_multistep_table"]

#: Highest predictor order of "unipc" (UniPC-2; with the corrector the method is of order 3).
UNIPC_ORDER = 2


def _rhos(rks: list[float], hh: float, corrector: bool) -> list[float]:
    """ρ of UniP (predictor) or UniC (corrector) from the order conditions R ρ = b (Zhao et al., Eq. 8).

    With hh = -h (data prediction) and B(h) = e^{hh} - 1 (bh2): b_k = k!·hh·φ_{k+1}(hh) / B(h) and
    R_{kj} = r_j^{k-1}, k = 1 … p, where rks ends with r = 1 for the newest point. The predictor solves
    the first p-1 conditions on its old points (ρ = 1/2 for p = 2); the corrector all p, including the
    new point (ρ = 1/2 for p = 1).
    """
    p = len(rks)
    B_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1  # hh φ_2(hh), then hh φ_{k+1}(hh) by φ_{k+1} = (φ_k - 1/k!)/hh
    b, factorial = [], 1
    for k in range(1, p + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[r ** (k - 1) for r in rks] for k in range(1, p + 1)])
    if corrector:
        return [0.5] if p == 1 else np.linalg.solve(R, np.array(b)).tolist()
    if p == 1:
        return []
    return [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], np.array(b[:-1])).tolist()


def _update(lv: LevelTable, s: int, order: int, corrector: bool) -> list[float]:
    """Weights of x_t on (x_s[, m_t], m_s, m_{s-1}, …, m_{s-order+1}) for the UniP (UniC) step s -> t = s+1."""
    t = s + 1
    h = lv.h(s)
    hh = -h
    alpha_t = lv.alpha[t]
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    w_x = lv.sigma[t] / lv.sigma[s]
    w_m = [-alpha_t * h_phi_1] + [0.0] * (order - 1)  # x_t' = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m_s
    old = [s - k for k in range(1, order)]
    if (not corrector and order == 1) or h == 0:
        return [w_x, *w_m] if not corrector else [w_x, 0.0, *w_m]  # (h = 0: x_t = x_s, nothing to correct)
    if corrector and not math.isfinite(h):
        rhos, B_h, rks = [0.5], -1.0, [1.0]  # from ᾱ = 0: e^{-h} - 1 = -1
    else:
        rks = [(lv.lam[j] - lv.lam[s]) / h for j in old] + [1.0]
        rhos = _rhos(rks, hh, corrector)
        B_h = math.expm1(hh)
    # - α_t B(h) Σ_k ρ_k (m_{s_k} - m_s) / r_k
    for k, rho in enumerate(rhos[: len(old)]):
        w = -alpha_t * B_h * rho / rks[k]
        w_m[k + 1] += w
        w_m[0] -= w
    if not corrector:
        return [w_x, *w_m]
    # UniC: - α_t B(h) ρ_last (m_t - m_s)
    w_new = -alpha_t * B_h * rhos[-1]
    w_m[0] -= w_new
    return [w_x, w_new, *w_m]


def unipc_coefficients(levels: Levels, order: int = 2) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Float64 tables of a UniPC-bh2 run.

    Returns:
        (pred [N, order+1], corr [N, order+2], orders). Predictor step i: x_{i+1} = pred[i] · (x_i^c, m_i,
        m_{i-1}, …). Corrector at level i ≥ 1 (row 0 unused): x_i^c = corr[i] · (x_{i-1}^c, m_i, m_{i-1}, …),
        of the order of the predictor step that produced x_i. Predictor orders ramp up 1, 2, … and fall
        to N - i near the end (UniPC's lower-order final steps); into ᾱ = 1 the last step is x = m_{N-1}.
    """
    lv = level_table(levels)
    orders = multistep_orders(lv, order, lower_order_final=True)
    pred = torch.zeros(lv.N, order + 1, dtype=torch.float64)
    corr = torch.zeros(lv.N, order + 2, dtype=torch.float64)
    for i, p in enumerate(orders):
        row = _update(lv, i, p, corrector=False)
        pred[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        if i > 0:
            row = _update(lv, i - 1, orders[i - 1], corrector=True)
            corr[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return pred, corr, orders


def unipc_multistep_table(levels: Levels, order: int = 2) -> torch.Tensor:
    """The UniPC run as one multistep table on x̂₀: float64 [N, order + 3], row i = (a, k_0, …, k_order, 0)
    with x_{i+1} = a x_i + Σ_l k_l m_{i-l} (the history form of :mod:`ddim.engine`).

    The corrector and the predictor step that produced x_i start from the same point x_{i-1}^c with the
    same weight σ_i/σ_{i-1}, so x_i^c = x_i + corr_i·(m_i, m_{i-1}, …) - pred_{i-1}·(m_{i-1}, …): the
    corrected point is the network's input plus x̂₀ terms, and x_{i+1} = pred_i·(x_i^c, m_i, …) becomes
    a = pred_i[0], k_l = pred_i[0] (corr_i[1+l] - pred_{i-1}[l]) + pred_i[1+l] (pred_{i-1}[0] read as 0).
    """
    pred, corr, _ = unipc_coefficients(levels, order)
    N = pred.shape[0]
    zero = torch.zeros(N, 1, dtype=torch.float64)
    p = torch.cat([pred, zero], dim=1)  # pred_i on (x_i^c, m_i, …, m_{i-order}), as corr_i's columns
    q = torch.zeros(N, order + 1, dtype=torch.float64)
    q[1:, 1:] = pred[:-1, 1:]  # what x_i already holds of (m_i, m_{i-1}, …, m_{i-order}): pred_{i-1}'s
    k = p[:, :1] * (corr[:, 1:] - q) + p[:, 1:]
    k[0] = p[0, 1:]  # step 0 starts from x_0 itself (nothing to correct)
    return torch.cat([p[:, :1], k, zero], dim=1)


@table_sampler("unipc", history=UNIPC_ORDER)
def unipc_table(levels: Levels, eta: float, variance: str) -> torch.Tensor:
    """UniPC with B(h) = e^h - 1 (Zhao et al. 2023, Alg. 1–3): UniC corrector + UniP predictor, data prediction.

    At level i: m_i = x̂₀(x_i, t_i); x_i^c = UniC(x_{i-1}^c, m_i, m_{i-1}, …) for i ≥ 1; x_{i+1} =
    UniP(x_i^c, m_i, m_{i-1}, …) of order up to :data:`UNIPC_ORDER`. The last step, to ᾱ_final, is first
    order (to ᾱ = 1: x = m_{N-1}) and is not corrected (that would need another call). One network call
    per step. Deterministic: ``eta`` must be 0. The engine's table: (a, k_0, 0, k_1, k_2, 0) of
    :func:`unipc_multistep_table`.
    """
    table = unipc_multistep_table(levels, UNIPC_ORDER)
    zero = torch.zeros(table.shape[0], 1, dtype=torch.float64)
    return torch.cat([table[:, :2], zero, table[:, 2:]], dim=1)
