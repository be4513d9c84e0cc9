"""Sample-quality metrics on features: Fréchet distance, KID, precision and recall, and cached
reference features of a data set.

The Fréchet distance and KID come from torchmetrics (``FrechetInceptionDistance`` and
``KernelInceptionDistance`` accept any feature module; here a pass-through, since the features are
computed once per image set and cached). Precision and recall (Kynkäänniemi et al. 2019, k-NN
manifolds) are written out below: torchmetrics has no implementation, and torch-fidelity's needs
torchvision, which would replace the torch build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddim.evaluation.extractors import FeatureExtractor

__all__ = [
    "Reference",
    "fid",
    "kid",
    "precision_recall",
    "quality_metrics",
    "floor_metrics",
    "reference_features",
    "default_cache_dir",
    "images_hash",
]

METRICS = ("fd", "kid", "kid_std", "precision", "recall")


class _PassThrough(nn.Module):
    """The "feature extractor" handed to torchmetrics: the features are already computed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_tensor(f: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(f) if not torch.is_tensor(f) else f).detach().cpu().double()
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"{name} must be [N >= 2, D], got {tuple(t.shape)}")
    return t


def fid(fake: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between feature sets [N1, D] and [N2, D]
    (float64, torchmetrics' ``FrechetInceptionDistance``). "FID" when the features are Inception's.

    Local arithmetic on the given features: in a process group torchmetrics would otherwise gather its
    state from every rank at ``compute()`` (``sync_on_compute``), waiting for ranks that never call it."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake, real = _as_tensor(fake, "fake"), _as_tensor(real, "real")
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"feature sizes differ: fake {fake.shape[1]}, real {real.shape[1]}")
    metric = FrechetInceptionDistance(feature=_PassThrough(fake.shape[1]), sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid(
    fake: torch.Tensor | np.ndarray,
    real: torch.Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel inception distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic kernel
    (xᵀy/D + 1)³, averaged over ``subsets`` random subsets of min(``subset_size``, N1, N2) per set.

    Returns (mean, std over subsets). Seeded: the same features give the same numbers.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = _as_tensor(fake, "fake"), _as_tensor(real, "real")
    size = min(subset_size, fake.shape[0], real.shape[0])
    with warnings.catch_warnings():  # its note that it keeps every feature: intended here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_PassThrough(fake.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for c in x.split(chunk):
        d = torch.cdist(c, x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself, at distance 0
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each query row: inside any ball (ref_j, radii_j)?"""
    return torch.cat([(torch.cdist(c, ref) <= radii[None]).any(1) for c in query.split(chunk)])


def precision_recall(
    fake: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray, *, k: int = 3, seed: int = 0
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: the fraction of fake points inside the real manifold (quality); recall:
    the fraction of real points inside the fake manifold (coverage). The larger set is first
    subsampled (seeded) to the size of the smaller, since ball radii shrink as a set grows.
    """
    fake, real = _as_tensor(fake, "fake"), _as_tensor(real, "real")
    m = min(fake.shape[0], real.shape[0])
    if m <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {m}")
    g = torch.Generator().manual_seed(seed)
    if fake.shape[0] > m:
        fake = fake[torch.randperm(fake.shape[0], generator=g)[:m]]
    if real.shape[0] > m:
        real = real[torch.randperm(real.shape[0], generator=g)[:m]]
    precision = _covered(fake, real, _kth_radius(real, k)).double().mean()
    recall = _covered(real, fake, _kth_radius(fake, k)).double().mean()
    return float(precision), float(recall)


@dataclass
class Reference:
    """Features of a reference data set under one extractor.

    Attributes:
        name: the data set's name ("mnist5k", a path...).
        key: ``<name>-<hash of the images>__<extractor key>``: the cache file's stem.
        features: float32 [N, D].
        mu, sigma: float64 mean [D] and covariance [D, D] (the Fréchet statistics).
        info: JSON-able description (data set, extractor, N, D).
    """

    name: str
    key: str
    features: torch.Tensor
    mu: np.ndarray
    sigma: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """``$DDIM_CACHE``, else ``~/.cache/ddim`` (reference features live in its ``reference/``)."""
    env = os.environ.get("DDIM_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddim"


def images_hash(images: torch.Tensor, length: int = 12) -> str:
    """Hex digest of an image set's 8-bit values and shape (changes when the data change)."""
    u8 = torch.round((images.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).contiguous()
    h = hashlib.sha256(str(tuple(u8.shape)).encode())
    h.update(u8.numpy().tobytes())
    return h.hexdigest()[:length]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "data"


def reference_features(
    images: torch.Tensor,
    extractor: FeatureExtractor,
    *,
    name: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Reference:
    """Features and Fréchet statistics of a data set's images [N, C, H, W] in [-1, 1], cached as
    ``<cache_dir>/reference/<name>-<images hash>__<extractor key>.npz`` (features, mu, sigma, info).

    ``cache_dir`` None: :func:`default_cache_dir`. A cache file is reused only when the data set's
    images and the extractor's weights hash to the same key.
    """
    from ddim.generate import save_npz

    key = f"{_slug(name)}-{images_hash(images)}__{extractor.key}"
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "reference" / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return Reference(
                    name,
                    key,
                    torch.from_numpy(z["features"]),
                    z["mu"],
                    z["sigma"],
                    json.loads(str(np.asarray(z["info"]).reshape(-1)[0])),
                )
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    feats = extractor(images, progress=progress)
    f64 = feats.double().numpy()
    mu, sigma = f64.mean(0), np.cov(f64, rowvar=False)
    info = {"data": name, "n": int(feats.shape[0]), "dim": int(feats.shape[1]), "extractor": extractor.name}
    info["extractor_key"] = extractor.key
    save_npz(path, features=feats.numpy(), mu=mu, sigma=sigma, info=np.array(json.dumps(info)))
    return Reference(name, key, feats, mu, sigma, info)


def quality_metrics(
    fake: torch.Tensor, reference: Reference, *, k: int = 3, kid_subsets: int = 100, seed: int = 0
) -> dict[str, float]:
    """``fd`` (Fréchet distance), ``kid``, ``kid_std``, ``precision``, ``recall`` of fake features [N, D]
    against a reference."""
    real = reference.features
    out = {"fd": fid(fake, real)}
    out["kid"], out["kid_std"] = kid(fake, real, subsets=kid_subsets, seed=seed)
    out["precision"], out["recall"] = precision_recall(fake, real, k=k, seed=seed)
    return out


def floor_metrics(reference: Reference, n: int, *, seed: int = 0, **kwargs: Any) -> dict[str, float]:
    """The metrics of ``n`` images drawn (seeded) from the reference set itself: what a perfect
    sampler would score with ``n`` samples (the Fréchet distance is biased upwards at small n)."""
    g = torch.Generator().manual_seed(seed + 1)
    m = min(n, reference.features.shape[0])
    idx = torch.randperm(reference.features.shape[0], generator=g)[:m]
    return quality_metrics(reference.features[idx], reference, seed=seed, **kwargs)
