"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng, Lu, Bao & Zhu, NeurIPS 2023, "DPM-Solver-v3:
Improved Diffusion ODE Solver with Empirical Model Statistics", arXiv 2310.13268, Sec. 3.2-3.3).

Notation (as :mod:`ddim.solvers.base`): α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ). The solver works on

    f(x, λ) = (σ ε̂ - l_λ x) / α = (1 - l_λ) x / α - x̂₀,

the noise prediction "linearised" by l_λ (l = 1: minus the data prediction, DPM-Solver++; l = 0: the
noise prediction, DPM-Solver), and on f's derivative along the probability-flow ODE, f' = df/dλ. Three
per-element coefficients per level, computed once per model on data samples x_λ = α x₀ + σ ε:

- l_λ = E[diag ∇_x(σ ε̂)] = 1 - α E[diag ∇_x x̂₀] (Eq. 9: the best linear part of σ ε̂ in x), with
  Hutchinson's estimate diag J ≈ v ⊙ (Jᵀ v) for Rademacher v (one backward pass per sample);
- s_λ, b_λ = the least-squares fit f' ≈ s_λ f + b_λ (Eq. 10): s = Cov(f', f) / Var(f), b = E f' - s E f,
  with f' from a centred difference along the ODE's tangent, (x̂₀ at λ+δ and x + δ·dx/dλ, minus the
  same at -δ) over 2δ, and dx/dλ = α (x̂₀ - α x).

The statistics are tied to the denoiser as it is sampled (guidance scale, x̂₀ clipping): compute them
with the same settings. :class:`ModelStats` keeps them on a grid of λ (int timesteps of the model's
schedule); the solver interpolates them linearly in λ. Saved as safetensors beside the model's
weights (``model.ems.safetensors`` next to ``model.safetensors``) by ``ddim stats``, found by
:func:`ddim.load` and used by ``sampler="dpmv3"`` (:mod:`ddim.solvers.dpmv3`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ddim.calls import _batch_kwargs, _unwrap
from ddim.prediction import Denoiser, Model
from ddim.schedule import NoiseSchedule
from ddim.timesteps import timesteps as make_timesteps

__all__ = [
    "ModelStats",
    "compute_stats",
    "degenerate_stats",
    "save_stats",
    "load_stats",
    "stats_path",
    "attach_stats",
    "stats_for",
]

#: Suffix of a statistics file beside a weights file: ``model.safetensors`` -> ``model.ems.safetensors``.
STATS_SUFFIX = ".ems.safetensors"


_UIDS = itertools.count()


@dataclass(frozen=True)
class ModelStats:
    """DPM-Solver-v3's l, s, b on a grid of log-SNR levels.

    Attributes:
        lam: float64 [K], strictly increasing λ = log(α/σ) of the grid.
        l, s, b: float64 [K, *shape]: the coefficient of each element at each grid level; ``shape`` is
            the sample shape [C, H, W] (or () for one value shared by every element).
        meta: strings saying how they were computed (model, guidance, clipping, samples, seed).
        uid: a number no other ModelStats of this process has (solvers key their tables by it).
    """

    lam: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the paper's name
    s: torch.Tensor
    b: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_UIDS), compare=False, repr=False)

    def __post_init__(self) -> None:
        K = self.lam.numel()
        if self.lam.ndim != 1 or K < 2 or not bool((self.lam[1:] > self.lam[:-1]).all()):
            raise ValueError("ModelStats.lam must be a strictly increasing 1-D tensor of at least 2 levels")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if v.shape[:1] != (K,) or v.shape[1:] != self.l.shape[1:]:
                raise ValueError(f"ModelStats.{name} must be [K={K}, *shape] like l, got {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"ModelStats.{name} has NaN or Inf values")

    @property
    def shape(self) -> tuple[int, ...]:
        """The sample shape the statistics are for (() = the same for every element)."""
        return tuple(self.l.shape[1:])

    def at(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(l, s, b) at the levels ``lam`` (float64 [M]), linear in λ between grid levels and constant
        beyond its ends: three float64 [M, *shape]."""
        lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
        grid = self.lam.to(torch.float64)
        q = lam.clamp(float(grid[0]), float(grid[-1]))
        hi = torch.searchsorted(grid, q).clamp(1, grid.numel() - 1)
        lo = hi - 1
        w = ((q - grid[lo]) / (grid[hi] - grid[lo])).reshape(-1, *([1] * len(self.shape)))
        return tuple(v[lo] + w * (v[hi] - v[lo]) for v in (self.l, self.s, self.b))  # type: ignore[return-value]


def degenerate_stats() -> ModelStats:
    """l = 1, s = b = 0 everywhere: f = -x̂₀, and DPM-Solver-v3 becomes a multistep predictor-corrector
    on the data prediction (the paper's "degenerated" case). What ``dpmv3`` uses without statistics."""
    one = torch.ones(2, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    return ModelStats(torch.tensor([-30.0, 30.0], dtype=torch.float64), one, zero, zero.clone(), {"kind": "degenerate"})


# ============================================================================ computing them
def _lam(ab: float) -> float:
    return 0.5 * (math.log(ab) - math.log1p(-ab))


def _slice_kwargs(kw: Mapping[str, Any] | None, sl: slice, n: int) -> dict[str, Any] | None:
    """Model kwargs of samples ``sl``: tensors with a first dimension of n are sliced, the rest kept."""
    if kw is None:
        return None
    return {k: v[sl] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v for k, v in kw.items()}


class _Guided:
    """Classifier-free guidance as one differentiable callable (the Denoiser's own guided call writes
    into a reused buffer, which autograd refuses): u + w (c - u) from one forward of [x; x]."""

    def __init__(self, model: Model, cond: Mapping[str, Any], uncond: Mapping[str, Any], scale: float) -> None:
        self.model, self.cond, self.uncond, self.scale = model, cond, uncond, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), **_batch_kwargs(self.cond, self.uncond, x.shape[0]))
        out = out if isinstance(out, torch.Tensor) else _unwrap(out)
        c, u = out.chunk(2)
        return torch.lerp(u, c, self.scale)


def compute_stats(
    model: Model,
    schedule: NoiseSchedule,
    data: torch.Tensor,
    *,
    levels: int | Sequence[int] = 48,
    model_kwargs: Mapping[str, Any] | None = None,
    uncond_kwargs: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    prediction: str = "epsilon",
    batch: int = 128,
    seed: int = 0,
    delta: float = 0.01,
    ridge: float = 0.1,
    smooth: int = 1,
    progress: bool = False,
    **denoiser_kwargs: Any,
) -> ModelStats:
    """DPM-Solver-v3's empirical model statistics of ``model`` on ``data`` (see the module docstring).

    Args:
        model, schedule, prediction, guidance_scale: as :func:`ddim.sample`.
        data: [n, ...] clean samples x₀ (e.g. a few hundred training images in [-1, 1]); any float dtype.
        levels: the grid: an int K (K timesteps uniform in log-SNR from T-1 to 0, the "logsnr" spacing)
            or an explicit list of timesteps (default 48).
        model_kwargs, uncond_kwargs: the network's keyword arguments; tensors whose first dimension is n
            (e.g. class labels) are taken per sample, the rest as they are.
        batch: samples per network call (default 128).
        seed: seeds the noises ε and the Hutchinson probes (the same seed gives the same statistics).
        delta: the centred difference for f' uses the nearest timesteps at least this far in λ on
            either side (default 0.01; near t = T-1 one timestep moves λ by only ~0.006, and float32
            rounding of x̂₀ = (x - σ ε̂)/α, amplified by 1/α, would dominate a shorter difference).
        ridge: s = Cov(f', f) / (Var(f) + ridge · mean Var(f) + 1e-12), per level (default 0.1): elements
            whose f barely varies (an image's always-dark border, every pixel at low SNR, where x̂₀ is
            nearly the class mean) get s ≈ 0 instead of a ratio of two noises.
        smooth: passes of a [1, 2, 1]/4 filter over neighbouring levels applied to s and b (default 1).
        progress: show a bar over the grid levels.
        denoiser_kwargs: further :class:`~ddim.prediction.Denoiser` settings (clip_sample,
            use_clipped_model_output, …): use the ones you sample with.

    Returns:
        :class:`ModelStats` with ``shape`` = data.shape[1:]. Cost: K · n · (one forward and backward
        + two forwards) network evaluations.
    """
    if not isinstance(data, torch.Tensor) or data.ndim < 2 or data.shape[0] < 2:
        raise ValueError(f"data must be a tensor [n >= 2, ...] of clean samples, got {getattr(data, 'shape', data)}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
        raise ValueError(f"delta must be a number > 0, got {delta!r}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be an int >= 0, got {smooth!r}")
    T = schedule.T
    ts = make_timesteps(schedule, int(levels), "logsnr") if isinstance(levels, int) else torch.as_tensor(levels)
    ts = torch.sort(ts.to(torch.int64).unique(), descending=True).values  # noisiest first
    if ts.numel() < 2 or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"levels must give at least 2 distinct timesteps in [0, {T - 1}], got {ts.tolist()}")
    ab_all = schedule.alphas_cumprod.double()
    if bool((ab_all[ts] <= 0).any()) or bool((ab_all[ts] >= 1).any()):
        raise ValueError("the statistics need levels with 0 < ᾱ < 1 (no zero-terminal-SNR level)")
    n = data.shape[0]
    try:
        mdtype = next(model.parameters()).dtype  # type: ignore[union-attr]
        mdevice = next(model.parameters()).device  # type: ignore[union-attr]
    except (AttributeError, StopIteration):
        mdtype, mdevice = data.dtype if data.dtype.is_floating_point else torch.float32, data.device
    x0_data = data.to(device=mdevice, dtype=mdtype)

    def denoiser(sl: slice) -> Denoiser:
        cond = _slice_kwargs(model_kwargs, sl, n)
        uncond = _slice_kwargs(uncond_kwargs, sl, n)
        if guidance_scale == 1.0:
            return Denoiser(model, schedule, prediction, model_kwargs=cond, **denoiser_kwargs)
        Denoiser(model, schedule, prediction, guidance_scale=guidance_scale, model_kwargs=cond, uncond_kwargs=uncond)
        guided = _Guided(model, cond or {}, uncond or {}, guidance_scale)
        return Denoiser(guided, schedule, prediction, **denoiser_kwargs)

    denoiser(slice(0, 1))  # checks the settings before any work
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(data.shape[1:])
    lam_grid, l_rows, moments = [], [], []
    for t in tqdm(ts.tolist(), disable=not progress, desc="statistics", leave=False):
        ab = float(ab_all[t])
        a, sg, lam = math.sqrt(ab), math.sqrt(1 - ab), _lam(ab)
        t_hi, t_lo = max(t - 1, 0), min(t + 1, T - 1)  # higher and lower λ, at least delta away
        while t_hi > 0 and _lam(float(ab_all[t_hi])) - lam < delta:
            t_hi -= 1
        while t_lo < T - 1 and lam - _lam(float(ab_all[t_lo])) < delta:
            t_lo += 1
        lam_hi, lam_lo = _lam(float(ab_all[t_hi])), _lam(float(ab_all[t_lo]))
        acc = torch.zeros(10, *shape, dtype=torch.float64)  # Σ d, x, m, D, xx, xm, xD, mm, mD, DD
        for start in range(0, n, batch):
            sl = slice(start, min(start + batch, n))
            x0 = x0_data[sl]
            eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device=mdevice, dtype=mdtype)
            probe = (torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1).to(device=mdevice, dtype=mdtype)
            denoise = denoiser(sl)
            x = (a * x0 + sg * eps).detach().requires_grad_(True)
            with torch.enable_grad():
                m, _ = denoise(x, t)
                (jt_v,) = torch.autograd.grad((m * probe).sum(), x)
            x, m = x.detach(), m.detach()
            with torch.no_grad():
                vel = a * (m - a * x)  # dx/dλ of the probability-flow ODE
                m_hi, _ = denoise(x + vel * (lam_hi - lam), t_hi)
                m_lo, _ = denoise(x + vel * (lam_lo - lam), t_lo)
                D = (m_hi - m_lo) / (lam_hi - lam_lo)  # dx̂₀/dλ along the ODE
            u = [v.double().cpu() for v in (x, m, D)]
            acc[0] += (probe.double().cpu() * jt_v.double().cpu()).sum(0)
            acc[1:4] += torch.stack([v.sum(0) for v in u])
            k = 4
            for i in range(3):
                for j in range(i, 3):
                    acc[k] += (u[i] * u[j]).sum(0)
                    k += 1
        acc /= n
        lam_grid.append(lam)
        l_rows.append(1.0 - a * acc[0])
        moments.append(acc[1:])
    order = torch.argsort(torch.tensor(lam_grid, dtype=torch.float64))  # increasing λ
    lam_t = torch.tensor(lam_grid, dtype=torch.float64)[order]
    l_t = torch.stack(l_rows)[order]
    mom = torch.stack(moments)[order]  # [K, 9, *shape]
    alpha = torch.sigmoid(2 * lam_t).sqrt().reshape(-1, *([1] * len(shape)))
    coef = (1.0 - l_t) / alpha  # a = (1 - l)/α: f = a x - m
    dcoef = torch.gradient(coef, spacing=(lam_t,), dim=0)[0]  # d/dλ of (1 - l)/α
    mean = mom[:, 0:3]
    second = dict(zip([(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)], mom[:, 3:].unbind(1), strict=True))

    def cov(i: int, j: int) -> torch.Tensor:
        key = (min(i, j), max(i, j))
        return second[key] - mean[:, i] * mean[:, j]

    # f = c_f · (x, m, D), f' = c_d · (x, m, D)
    c_f = (coef, -torch.ones_like(coef), torch.zeros_like(coef))
    c_d = (dcoef - coef * alpha**2, coef * alpha, -torch.ones_like(coef))
    var_f = sum(c_f[i] * c_f[j] * cov(i, j) for i in range(3) for j in range(3))
    cov_df = sum(c_d[i] * c_f[j] * cov(i, j) for i in range(3) for j in range(3))
    mean_f = sum(c_f[i] * mean[:, i] for i in range(3))
    mean_d = sum(c_d[i] * mean[:, i] for i in range(3))
    var_f = var_f.clamp(min=0.0)
    dims = tuple(range(1, var_f.ndim))
    floor = ridge * (var_f.mean(dim=dims, keepdim=True) if dims else var_f) + 1e-12
    s_t = cov_df / (var_f + floor)
    b_t = mean_d - s_t * mean_f
    for _ in range(smooth):  # [1, 2, 1]/4 over neighbouring levels, the ends kept
        s_t, b_t = (
            torch.cat([v[:1], (v[:-2] + 2 * v[1:-1] + v[2:]) / 4, v[-1:]]) if v.shape[0] > 2 else v for v in (s_t, b_t)
        )
    meta = {
        "kind": "dpm-solver-v3 ems",
        "n": str(n),
        "levels": json.dumps(ts.tolist()),
        "guidance_scale": repr(float(guidance_scale)),
        "prediction": prediction,
        "seed": str(seed),
        "delta": repr(float(delta)),
        "ridge": repr(float(ridge)),
        "smooth": str(smooth),
        "denoiser": json.dumps({k: v for k, v in denoiser_kwargs.items() if isinstance(v, (bool, int, float, str))}),
    }
    return ModelStats(lam_t, l_t, s_t, b_t, meta)


# ============================================================================ files and the model registry
def stats_path(weights: str | os.PathLike) -> Path:
    """Where the statistics of a model live: ``X.ems.safetensors`` beside weights ``X.safetensors``, or
    ``DIR/model.ems.safetensors`` for a model folder DIR."""
    p = Path(weights)
    if p.is_dir():
        p = p / "model.safetensors"
    name = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(name + STATS_SUFFIX)


def save_stats(stats: ModelStats, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``stats`` to a safetensors file atomically (l, s, b in ``dtype``, default float32; λ in float64)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"lam": stats.lam.double().contiguous()}
    tensors.update({k: getattr(stats, k).to(dtype).contiguous() for k in ("l", "s", "b")})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in stats.meta.items()})
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike) -> ModelStats:
    """Read a statistics file written by :func:`save_stats` (values as float64). Raises FileNotFoundError
    or ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} is missing (make it with `ddim stats`)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            t = {k: fh.get_tensor(k).double() for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return ModelStats(t["lam"], t["l"], t["s"], t["b"], meta)
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        raise ValueError(f"statistics file {path} is corrupt or not DPM-Solver-v3 statistics: {e}") from e


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach_stats(model: Model, stats: ModelStats | str | os.PathLike | None) -> None:
    """Give ``model`` its statistics for ``sampler="dpmv3"``: a :class:`ModelStats`, a file (read on first
    use) or None (forget them). :func:`ddim.load` does this for a model with a statistics file beside it."""
    if stats is None:
        _ATTACHED.pop(model, None)
        return
    if not isinstance(stats, ModelStats):
        stats = Path(stats)
    _ATTACHED[model] = stats


def stats_for(model: Model) -> ModelStats | None:
    """The statistics attached to ``model`` (or to the module a compiled model wraps), else None."""
    for m in (model, getattr(model, "_orig_mod", None)):
        if m is None:
            continue
        try:
            found = _ATTACHED.get(m)
        except TypeError:  # not weak-referenceable
            found = None
        if isinstance(found, Path):
            found = _ATTACHED[m] = load_stats(found)
        if found is not None:
            return found
    return None
