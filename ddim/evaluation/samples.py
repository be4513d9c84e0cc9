"""Sample quality of images already made: a folder written by ``ddim sample --out DIR/`` (one PNG per
seed, possibly by several processes) or an ``.npz`` with ``images``, against a reference set's
features. What ``ddim eval samples`` calls.

The metrics are Table 1's (:mod:`ddim.evaluation.metrics`): the Fréchet distance, KID and
precision/recall. Under ``torchrun`` each process reads and featurises its share of the images
(:func:`ddim.shard.sharded_features`); the Fréchet statistics are merged exactly from per-process
moments, and the features are gathered on rank 0 for KID and precision/recall (they need the feature
rows, not only their moments). Every rank returns the same numbers as a one-process run, up to float
rounding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddim import distributed as ddist
from ddim.evaluation.extractors import FeatureExtractor
from ddim.evaluation.metrics import Reference, kid, precision_recall
from ddim.metrics import frechet_from_stats
from ddim.shard import ImageSet, sharded_features

__all__ = ["COLUMNS", "evaluate_samples", "format_results", "write_results"]

#: The columns of ``write_results``' CSV (and the keys of ``evaluate_samples``' dict).
COLUMNS = (
    "source",
    "n",
    "image_shape",
    "reference",
    "reference_n",
    "features",
    "feature_dim",
    "fd",
    "kid",
    "kid_std",
    "precision",
    "recall",
    "processes",
    "feature_seconds",
    "seconds",
)


def evaluate_samples(
    source: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray | ImageSet,
    extractor: FeatureExtractor,
    reference: Reference | None,
    *,
    batch: int = 256,
    k: int = 3,
    kid_subsets: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Fréchet distance, KID and precision/recall of a set of samples against a reference.

    Args:
        source: a folder of images (``ddim sample --out DIR/``: ``seed_*.png``; the settings file,
            temporary and other non-image files are skipped), an ``.npz`` with ``images`` uint8
            [N, H, W, C] (or [N, H, W]), a list of image paths, a uint8 array, or an opened
            :data:`ddim.shard.ImageSet`. Images are read as they are (never resized here; a folder's
            images must all have one size); the extractor converts them to its own channels and size.
        extractor: maps float32 [B, C, H, W] in [-1, 1] to features [B, D], e.g.
            :func:`~ddim.evaluation.extractors.load_extractor`'s; it must be on this rank's device.
        reference: the reference set's features under the same extractor
            (:func:`~ddim.evaluation.metrics.reference_features`, cached). Used on rank 0 only;
            other ranks may pass None.
        batch: images read and featurised at a time per process (results do not depend on it).
        k: neighbours of precision/recall's k-NN balls (3).
        kid_subsets: KID's random subsets (100), each of min(1000, N, N_ref) rows.
        seed: seeds KID's subsets and precision/recall's subsampling (the same seed, the same numbers).
        progress: a progress bar over this process's images.

    Returns:
        On every rank, a dict: ``fd``, ``kid``, ``kid_std``, ``precision``, ``recall`` (floats),
        ``n`` (images), ``image_shape`` [C, H, W], ``source``, ``reference`` (name), ``reference_n``,
        ``features`` (the extractor's name), ``feature_dim`` D, ``processes``, ``feature_seconds``
        (reading and featurising, slowest process) and ``seconds`` (the whole evaluation).

    Raises:
        ValueError (on every rank): a missing or empty folder, images of different sizes, an
        unreadable image or ``.npz``, too few images (precision/recall need more than ``k``), a
        reference of another feature size.
    """
    tic = time.perf_counter()
    ctx = ddist.init()
    feats = sharded_features(source, lambda x: extractor(x), batch=batch, exact=True, gather="main", progress=progress)
    result, error = None, None
    if ctx.is_main:
        try:
            if reference is None:
                raise ValueError("evaluate_samples needs the reference on rank 0")
            real = reference.features
            dim = int(feats.mean.shape[0])
            if real.ndim != 2 or real.shape[1] != dim:
                raise ValueError(f"reference features are {tuple(real.shape)}; the samples' are [{feats.n}, {dim}]")
            result = {
                "source": _name(source),
                "n": feats.n,
                "image_shape": list(feats.shape),
                "reference": reference.name,
                "reference_n": int(real.shape[0]),
                "features": extractor.name,
                "feature_dim": dim,
                "fd": frechet_from_stats(feats.mean, feats.cov, reference.mu, reference.sigma),
            }
            result["kid"], result["kid_std"] = kid(feats.features, real, subsets=kid_subsets, seed=seed)
            result["precision"], result["recall"] = precision_recall(feats.features, real, k=k, seed=seed)
            result["processes"] = feats.processes
            result["feature_seconds"] = feats.seconds
            result["seconds"] = time.perf_counter() - tic
        except ValueError as e:
            error = str(e)
    result, error = ddist.broadcast_object((result, error), 0, ctx)
    if error is not None:
        raise ValueError(error)
    return {c: result[c] for c in COLUMNS}


def _name(source: Any) -> str:
    name = getattr(source, "name", None)
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(name, str):
        return name
    return type(source).__name__


def format_results(result: dict[str, Any]) -> str:
    """The results as a few lines of text (what ``ddim eval samples`` prints)."""
    shape = "×".join(str(v) for v in result["image_shape"])
    procs = f" on {result['processes']} processes" if result["processes"] > 1 else ""
    lines = [
        f"{result['n']} images ({shape}) in {result['source']}, against {result['reference']} "
        f"({result['reference_n']} images), {result['features']} features ({result['feature_dim']}-d):",
        f"  Fréchet distance  {result['fd']:.6g}",
        f"  KID               {result['kid']:.6g} ± {result['kid_std']:.2g}",
        f"  precision         {result['precision']:.4f}",
        f"  recall            {result['recall']:.4f}",
        f"features in {result['feature_seconds']:.2f} s{procs}, {result['seconds']:.2f} s in all",
    ]
    return "\n".join(lines)


def write_results(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the results as ``.json`` (one object) or ``.csv`` (a header and one row), atomically."""
    from ddim.evaluation.common import write_csv, write_json

    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        write_json(path, result)
    elif suffix == ".csv":
        row = {**result, "image_shape": "x".join(str(v) for v in result["image_shape"])}
        write_csv(path, [row], COLUMNS)
    else:
        raise ValueError(f"results go to a .json or .csv file, got {str(path)!r}")
