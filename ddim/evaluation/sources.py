"""Which real images an evaluation compares with, and which feature extractor, for a given model.

Defaults: for a model trained on MNIST-5k (the embedded default), the reference set of Table 1 is
all 5,000 MNIST-5k digits and the inversion set of Table 2 is the 500 held-out digits (never trained
on); features come from the shipped digit classifier for 1-channel models and from FID's
Inception-V3 otherwise. Other models name their data with a spec as ``ddim.data.load_data`` takes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ddim.data import ImageData, load_data, mnist5k_split
from ddim.evaluation.extractors import FeatureExtractor, load_extractor

__all__ = [
    "reference_data",
    "samples_reference_data",
    "heldout_data",
    "heldout_subset",
    "default_features",
    "extractor_for",
]


def _trained_on_mnist(config: dict[str, Any]) -> bool:
    return config.get("data", {}).get("name") == "mnist5k"


def _check_shape(data: ImageData, model: torch.nn.Module, what: str) -> ImageData:
    cfg = model.config
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if tuple(data.images.shape[1:]) != want:
        raise ValueError(f"{what} images are {tuple(data.images.shape[1:])} but the model makes {want} images")
    return data


def reference_data(model: torch.nn.Module, config: dict[str, Any], spec: str | None = None) -> tuple[ImageData, str]:
    """(data, name) of the reference set for sample quality.

    ``spec`` as for :func:`ddim.data.load_data`; None: all of MNIST-5k for models trained on it,
    else the data the model was trained on (``config["train"]["data"]``) when it can still be loaded.
    """
    size = model.config.image_size
    if spec is not None:
        return _check_shape(load_data(spec, image_size=size), model, "--data"), spec
    if _trained_on_mnist(config):
        return _check_shape(mnist5k_split("all"), model, "MNIST-5k"), "mnist5k"
    train_spec = config.get("train", {}).get("data")
    if train_spec:
        try:
            return _check_shape(load_data(train_spec, image_size=size), model, "training data"), str(train_spec)
        except (ValueError, RuntimeError, OSError):
            pass
    raise ValueError("no reference data for this model: pass --data (a .npz file, an image folder, 'mnist', 'digits')")


def samples_reference_data(spec: str | None, shape: tuple[int, int, int]) -> tuple[ImageData, str]:
    """(data, name) of the reference set for a set of samples shaped ``shape`` (C, H, W), without a model.

    ``spec`` as for :func:`ddim.data.load_data` (a folder is resized to the samples' size); None: all
    5,000 MNIST-5k digits (the reference of Table 1 for the embedded model, under the same name, so
    the cached features are shared) when the samples are 1×28×28, else an error asking for a spec.

    Raises:
        ValueError: no default for this shape, a bad spec, or reference images of another shape.
    """
    c, h, w = shape
    if spec is None:
        if tuple(shape) != (1, 28, 28):
            raise ValueError(
                f"the samples are {c}×{h}×{w}; the default reference (MNIST-5k) is 1×28×28: "
                "pass --data (a .npz file, an image folder, 'mnist-all', 'digits')"
            )
        data, name = mnist5k_split("all"), "mnist5k"
    else:
        data, name = load_data(spec, image_size=h), spec
    got = tuple(data.images.shape[1:])
    if got != tuple(shape):
        raise ValueError(f"reference images {name} are {'×'.join(map(str, got))} but the samples are {c}×{h}×{w}")
    return data, name


def heldout_data(model: torch.nn.Module, config: dict[str, Any], spec: str | None = None) -> tuple[ImageData, str]:
    """(data, name) of real images the model did not train on, for inversion.

    ``spec`` as for :func:`ddim.data.load_data`; None: the 500 held-out MNIST-5k digits for models
    trained on MNIST-5k; other models must name their held-out images.
    """
    if spec is not None:
        return _check_shape(load_data(spec, image_size=model.config.image_size), model, "--data"), spec
    if _trained_on_mnist(config):
        if config.get("data", {}).get("subset") not in (None, "train"):
            raise ValueError("this model was trained on more than the MNIST-5k training split: pass --data")
        return _check_shape(mnist5k_split("holdout"), model, "MNIST-5k"), "the MNIST-5k held-out digits"
    raise ValueError("inversion needs real images the model did not train on: pass --data SPEC")


def heldout_subset(data: ImageData, n: int) -> ImageData:
    """``n`` images spread evenly over a held-out set (every class, when the set is sorted by class, as
    MNIST-5k is); all of it when ``n`` >= its size."""
    from ddim.evaluation.table2 import evenly_spaced

    if n >= len(data):
        return data
    return data.subset(torch.tensor(evenly_spaced(len(data), n)), f"{n} evenly spaced")


def default_features(model: torch.nn.Module) -> str:
    """ "classifier" for 1-channel models (the digit classifier), else "inception"."""
    return "classifier" if model.config.in_channels == 1 else "inception"


def extractor_for(
    model: torch.nn.Module, spec: str | None = None, inception_weights: str | os.PathLike | None = None
) -> FeatureExtractor:
    """The extractor a spec names (see :func:`ddim.evaluation.extractors.load_extractor`), or the model's default."""
    return load_extractor(spec or default_features(model), inception_weights=inception_weights)
