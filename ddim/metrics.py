"""Distances between sets of features: the Fréchet distance (FID's formula) and its statistics."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["feature_stats", "frechet_distance", "frechet_from_stats"]


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of features [N, D]."""
    f = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) (Heusel et al. 2017).

    tr((Σ₁Σ₂)^{1/2}) is the sum of the square roots of the eigenvalues of Σ₁Σ₂, which are real and
    non-negative for covariance matrices (tiny negative or imaginary round-off is dropped); this
    avoids a general matrix square root.
    """
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance(f1: torch.Tensor | np.ndarray, f2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between two feature sets [N1, D] and [N2, D]."""
    return frechet_from_stats(*feature_stats(f1), *feature_stats(f2))
