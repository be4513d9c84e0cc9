"""Interpolating latents x_T: with deterministic DDIM (η = 0), a path between two x_T gives a smooth
path between the two images (Song, Meng & Ermon 2021, Sec. 5.3, which uses spherical interpolation
because Gaussian x_T concentrate near a sphere)."""

from __future__ import annotations

import torch

__all__ = ["slerp"]


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """Spherical linear interpolation between z0 and z1, each treated as ONE flat vector.

    slerp(z0, z1, α) = sin((1-α)θ)/sin θ · z0 + sin(αθ)/sin θ · z1, θ = angle between z0 and z1.
    α = 0 gives z0 and α = 1 gives z1. When the vectors are (nearly) parallel or anti-parallel
    (sin θ < ``eps``) or one is zero, it falls back to linear interpolation (1-α) z0 + α z1.

    Args:
        z0, z1: floating tensors of the same shape (any shape, e.g. one x_T of [C, H, W] or a batch).
        alpha: a float (or 0-d tensor) -> one tensor shaped like z0; a 1-D tensor/list of K values
            -> a [K, *z0.shape] stack.

    Returns:
        In z0's dtype and device; weights computed in float64.

    Raises:
        TypeError for non-tensors or non-floating tensors; ValueError for different shapes, empty or
        non-finite z0/z1, or a non-finite alpha.
    """
    if not isinstance(z0, torch.Tensor) or not isinstance(z1, torch.Tensor):
        raise TypeError("z0 and z1 must be tensors")
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if not (z0.is_floating_point() and z1.is_floating_point()):
        raise TypeError("z0 and z1 must be floating tensors")
    if z0.numel() == 0:
        raise ValueError("z0 and z1 must not be empty")
    if not (bool(torch.isfinite(z0).all()) and bool(torch.isfinite(z1).all())):
        raise ValueError("z0 and z1 must be finite (they hold NaN or Inf)")
    a = torch.as_tensor(alpha, dtype=torch.float64).cpu()
    if a.ndim > 1:
        raise ValueError(f"alpha must be a float or a 1-D tensor, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("alpha must be finite")
    v0, v1 = z0.reshape(-1).double(), z1.to(z0.device).reshape(-1).double()
    n0, n1 = v0.norm(), v1.norm()
    cos = (v0 @ v1 / (n0 * n1)).clamp(-1.0, 1.0) if bool(n0 > 0) and bool(n1 > 0) else torch.tensor(1.0)
    theta = torch.arccos(cos).cpu()
    sin = torch.sin(theta)
    if float(sin) < eps:
        w0, w1 = 1.0 - a, a
    else:
        w0, w1 = torch.sin((1.0 - a) * theta) / sin, torch.sin(a * theta) / sin
    w0 = w0.to(z0.device).reshape(-1, *([1] * z0.ndim))
    w1 = w1.to(z0.device).reshape(-1, *([1] * z0.ndim))
    out = (w0 * z0.double().unsqueeze(0) + w1 * z1.to(z0.device).double().unsqueeze(0)).to(z0.dtype)
    return out[0] if a.ndim == 0 else out
