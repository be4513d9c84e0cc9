"""Evaluation spread over the ranks of a ``torchrun`` job: a folder's (or an ``.npz``'s) images dealt to
the ranks and the results gathered (:func:`map_images`, :func:`sharded_features`,
:func:`sharded_feature_stats`, exact Fréchet statistics merged from per-rank moments)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddim import distributed as ddist
from ddim.image_sets import ImageSet, open_images

__all__ = ["ShardedFeatures", "map_images", "sharded_feature_stats", "sharded_features"]


def _open_everywhere(source: Any, ctx: ddist.Context, **kwargs: Any) -> ImageSet:
    """:func:`open_images` on every rank; every rank raises when any failed or they see different files."""
    images, error = None, None
    try:
        images = open_images(source, **kwargs)
    except ValueError as e:
        error = e
    _check(error, ctx)
    signatures = ddist.all_gather_objects(images.signature(), ctx)
    if len(set(signatures)) > 1:
        raise ValueError(f"the processes see different images in {images.name} (is it still being written?)")
    return images


def _check(error: BaseException | None, ctx: ddist.Context) -> None:
    """:func:`ddist.check`, with another rank's failure raised as a ValueError too."""
    try:
        ddist.check(error, ctx)
    except ddist.RankError as e:
        raise ValueError(str(e)) from None


def _batches(mine: list[int], batch: int, progress: bool, desc: str):
    bar = None
    if progress and mine:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=desc, unit="img", leave=False)
    for start in range(0, len(mine), batch):
        idx = mine[start : start + batch]
        yield idx
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()


def map_images(
    source: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray | ImageSet,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch: int = 256,
    channels: int | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """``fn`` over every image of ``source``, split across the ranks; the outputs of all images in
    :func:`image_files` order, on every rank.

    ``fn`` takes float32 [B, C, H, W] in [-1, 1] and returns a tensor [B, ...] (features, predicted
    classes, ...). ``source``: see :func:`open_images`. ``channels``/``size`` default to the first
    image's (images are converted and resized to them).
    """
    ctx = ddist.init()
    images = _open_everywhere(source, ctx, channels=channels, size=size)
    mine = ddist.shard(range(len(images)), ctx)
    outs, error = [], None
    try:
        for idx in _batches(mine, batch, False, "images"):
            x = images.load(idx)
            with torch.inference_mode():
                outs.append(fn(x).detach().cpu())
    except ValueError as e:
        error = e
    _check(error, ctx)
    local = torch.cat(outs) if outs else None
    parts = ddist.all_gather_objects((mine, local), ctx)
    ref = next(t for _, t in parts if t is not None)
    result = torch.empty((len(images), *ref.shape[1:]), dtype=ref.dtype)
    for idx, t in parts:
        if t is not None:
            result[torch.as_tensor(idx, dtype=torch.long)] = t
    return result


class _Moments:
    """Count, mean and centred second moment of feature rows, merged exactly (Chan et al.)."""

    def __init__(self, dim: int) -> None:
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def add_rows(self, f: np.ndarray) -> None:
        mean = f.mean(0)
        c = f - mean
        self.add(len(f), mean, c.T @ c)


@dataclass
class ShardedFeatures:
    """What :func:`sharded_features` returns (the same on every rank, but ``features``).

    Attributes:
        n: images over all ranks.
        mean: float64 [D]; cov: float64 [D, D], unbiased (the Fréchet statistics).
        features: float32 [n, D] in file order, on the ranks that ``gather`` names; None elsewhere.
        shape: (C, H, W) of the images as they were read.
        seconds: reading and featurising time of the slowest rank.
        processes: the number of ranks that shared the work.
    """

    n: int
    mean: np.ndarray
    cov: np.ndarray
    features: torch.Tensor | None
    shape: tuple[int, int, int]
    seconds: float
    processes: int


def sharded_features(
    source: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray | ImageSet,
    features: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch: int = 256,
    channels: int | None = None,
    size: int | None = None,
    exact: bool = False,
    gather: str = "none",
    progress: bool = False,
) -> ShardedFeatures:
    """``features`` of every image of ``source`` (see :func:`open_images`), each rank reading and
    featurising its share (file i to rank i mod N), with their mean and covariance merged exactly
    across the ranks.

    Args:
        features: float32 [B, C, H, W] in [-1, 1] -> [B, D] (an extractor from ``ddim.evaluation``).
        batch: images read and featurised at a time, per rank.
        channels, size, exact: how files are read; see :class:`FolderImages`.
        gather: where the features themselves go: ``"none"`` (only the D + D² statistics cross the
            network), ``"main"`` (rank 0; for KID, precision and recall) or ``"all"``.
        progress: a progress bar over this rank's images.

    Raises:
        ValueError, on every rank when any rank met it: a bad source, an unreadable image, an image
        of another size (``exact``), features that are not [B, D], fewer than 2 images.
    """
    if gather not in ("none", "main", "all"):
        raise ValueError(f"gather must be 'none', 'main' or 'all', got {gather!r}")
    ctx = ddist.init()
    images = _open_everywhere(source, ctx, channels=channels, size=size, exact=exact)
    mine = ddist.shard(range(len(images)), ctx)
    tic = time.perf_counter()
    local: _Moments | None = None
    kept: list[torch.Tensor] = []
    error = None
    try:
        for idx in _batches(mine, batch, progress, "features"):
            x = images.load(idx)
            with torch.inference_mode():
                out = features(x).detach().cpu()
            if out.ndim != 2 or out.shape[0] != len(idx):
                raise ValueError(f"features must return [B, D] = [{len(idx)}, D], got {tuple(out.shape)}")
            local = local or _Moments(out.shape[1])
            local.add_rows(np.asarray(out, dtype=np.float64))
            if gather != "none":
                kept.append(out.float())
    except ValueError as e:
        error = e
    _check(error, ctx)
    seconds = time.perf_counter() - tic
    stats = None if local is None else (local.n, local.mean, local.m2)
    parts = ddist.all_gather_objects((stats, seconds), ctx)
    dims = {p[1].shape[0] for p, _ in parts if p is not None}
    if len(dims) > 1:
        raise ValueError(f"features of different sizes on different ranks: {sorted(dims)}")
    total = _Moments(dims.pop())
    for p, _ in parts:
        if p is not None:
            total.add(*p)
    if total.n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {total.n}")
    feats = None
    if gather != "none":
        part = (mine, torch.cat(kept) if kept else None)
        shards = ddist.all_gather_objects(part, ctx) if gather == "all" else ddist.gather_objects(part, 0, ctx)
        if shards is not None:
            feats = torch.empty((len(images), len(total.mean)), dtype=torch.float32)
            for idx, t in shards:
                if t is not None:
                    feats[torch.as_tensor(idx, dtype=torch.long)] = t
    return ShardedFeatures(
        n=total.n,
        mean=total.mean,
        cov=total.m2 / (total.n - 1),
        features=feats,
        shape=tuple(images.shape),
        seconds=max(s for _, s in parts),
        processes=ctx.world_size,
    )


def sharded_feature_stats(
    source: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray | ImageSet,
    features: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch: int = 256,
    channels: int | None = None,
    size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of ``features`` over a folder's images.

    The drop-in for :func:`ddim.metrics.feature_stats` on a (sharded) sample folder: under torchrun
    each rank reads and featurises its share of the files and the per-rank moments are merged
    exactly on every rank, so only statistics, not features, cross the network. ``features`` takes
    float32 [B, C, H, W] in [-1, 1] and returns [B, D]; see :func:`sharded_features` for the rest.
    """
    r = sharded_features(source, features, batch=batch, channels=channels, size=size)
    return r.mean, r.cov
