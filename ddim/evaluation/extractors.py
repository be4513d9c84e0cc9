"""Feature extractors for the sample-quality metrics: images in model space -> one vector per image.

Three kinds, one interface (:class:`FeatureExtractor`):

- :func:`classifier_extractor`: the digit classifier shipped with the package (128-d penultimate
  features, trained on the MNIST-5k training digits): the feature space for the default model.
- :func:`inception_extractor`: FID's Inception-V3 (2048-d pool features) from a weights file the
  user supplies; the standard for natural images and the only one comparable with published FIDs.
- :func:`module_extractor`: any ``torch.nn.Module`` mapping an image batch to [B, D].

Every image is first quantised to 8 bits (the values a PNG of it would hold), so generated and real
images are measured on the same grid, then converted to the extractor's channels, size and range.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeatureExtractor",
    "classifier_extractor",
    "inception_extractor",
    "module_extractor",
    "load_extractor",
    "module_hash",
    "quantize",
]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Model-space images [-1, 1] -> the same images on the 8-bit grid (still in [-1, 1])."""
    u = torch.round((x.float() / 2 + 0.5).clamp(0, 1) * 255)
    return u / 127.5 - 1.0


def module_hash(module: nn.Module, length: int = 12) -> str:
    """A short hex digest of a module's state dict (names, shapes, values): the cache key of its features."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


@dataclass
class FeatureExtractor:
    """Maps model-space images [N, C, H, W] (about [-1, 1]) to features float32 [N, D].

    Attributes:
        module: the network; called as ``module(x)`` on prepared batches, must return [B, D].
        name: what to call it in tables and reports.
        key: identifies the extractor in cache file names (name + hash of its weights).
        channels: channels the module takes (grayscale is repeated to 3; RGB becomes luminance for 1);
            None = as given.
        size: side the images are resized to (bilinear); None = as given.
        unit_range: the module takes [0, 1] (True) or [-1, 1] (False).
        batch_size: images per forward pass.
        predict: optional ``predict(features) -> labels`` (a classifier head on the features), for
            the accuracy of class-conditional samples.
        device: where the module runs (see :meth:`to`); features always come back on the CPU.
    """

    module: nn.Module
    name: str
    key: str
    channels: int | None = None
    size: int | None = None
    unit_range: bool = False
    batch_size: int = 250
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: str = "cpu"

    def to(self, device: str | torch.device) -> FeatureExtractor:
        """Move the module to ``device`` (in place); returns self."""
        self.module.to(device)
        self.device = str(device)
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Quantise to 8 bits and convert to the module's channels, size and range."""
        x = quantize(images)
        c = x.shape[1]
        if self.channels is not None and c != self.channels:
            if c == 1 and self.channels == 3:
                x = x.repeat(1, 3, 1, 1)
            elif c == 3 and self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            else:
                raise ValueError(f"extractor {self.name} takes {self.channels} channels; images have {c}")
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            down = x.shape[-1] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=down)
        return (x + 1) / 2 if self.unit_range else x

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Features float32 [N, D] of images [N, C, H, W], in batches of ``batch_size``."""
        return self.features_and_predictions(images, progress)[0]

    @torch.inference_mode()
    def features_and_predictions(
        self, images: torch.Tensor, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features [N, D], predicted labels [N] or None when there is no ``predict``)."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be [N >= 1, C, H, W], got {tuple(images.shape)}")
        self.module.eval()
        feats, preds = [], []
        chunks = images.split(self.batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc=f"features ({self.name})", unit="batch", leave=False)
        for chunk in chunks:
            x = self.prepare(chunk).to(self.device)
            f = self.module(x)
            if f.ndim != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(f"extractor {self.name} returned shape {tuple(f.shape)}; expected [B, D]")
            feats.append(f.float().cpu())
            if self.predict is not None:
                preds.append(self.predict(f).cpu())
        return torch.cat(feats), (torch.cat(preds) if preds else None)


class _ClassifierFeatures(nn.Module):
    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(x)


def classifier_extractor(path: str | os.PathLike | None = None, name: str = "digit classifier") -> FeatureExtractor:
    """The digit classifier's 128-d features (``path``: its weights; default the shipped file).

    Takes 1-channel 28×28 images in [-1, 1] (others are converted and resized); ``predict`` gives its labels.
    """
    from ddim.classifier import load_classifier

    clf = load_classifier(path)
    module = _ClassifierFeatures(clf)
    return FeatureExtractor(
        module,
        name,
        f"classifier-{module_hash(module)}",
        channels=clf.body[0].in_channels,
        size=28,
        unit_range=False,
        batch_size=500,
        predict=lambda f: clf.head(f).argmax(1),
    )


def inception_extractor(weights: str | os.PathLike | None = None, batch_size: int = 50) -> FeatureExtractor:
    """FID's Inception-V3 (2048-d pool features) with the weights in ``weights`` (default
    :func:`ddim.evaluation.inception.default_weights_path`). Grayscale images are repeated to RGB.

    Raises FileNotFoundError, with the name of the file needed and where it goes, when it is missing.
    """
    from ddim.evaluation.inception import load_fid_inception

    module = load_fid_inception(weights)
    key = f"inception-{module_hash(module)}"
    return FeatureExtractor(module, "Inception-V3 (FID)", key, channels=3, unit_range=True, batch_size=batch_size)


def module_extractor(
    module: nn.Module,
    name: str | None = None,
    *,
    channels: int | None = None,
    size: int | None = None,
    unit_range: bool = False,
    batch_size: int = 100,
) -> FeatureExtractor:
    """Any module mapping prepared images [B, C, H, W] to [B, D] (by default the images as the model
    makes them: its channels and size, in [-1, 1])."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    name = name or type(module).__name__
    safe = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-") or "module"
    return FeatureExtractor(
        module,
        name,
        f"{safe}-{module_hash(module)}",
        channels=channels,
        size=size,
        unit_range=unit_range,
        batch_size=batch_size,
    )


def load_extractor(spec: str = "classifier", *, inception_weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """An extractor from a command-line spec.

    ``"classifier"``: the shipped digit classifier. ``"classifier-check"``: the shipped checking network (another
    architecture and seed, for checking choices made in the first one's features). ``"inception"``: FID's
    Inception-V3 from ``inception_weights``. A path to a TorchScript file (``torch.jit.save``): that module.
    ``"pkg.mod:fn"``: ``fn()`` imported from an installed module, returning an ``nn.Module``. The last two take
    images in [-1, 1] at the model's size and must return [B, D].
    """
    if spec == "classifier":
        return classifier_extractor()
    if spec == "classifier-check":
        from ddim.classifier import check_classifier_path

        return classifier_extractor(check_classifier_path(), "checking classifier")
    if spec == "inception":
        return inception_extractor(inception_weights)
    p = Path(spec)
    if p.suffix in (".pt", ".pth", ".ts", ".jit"):
        if not p.is_file():
            raise FileNotFoundError(f"feature extractor file {p} does not exist")
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any unreadable file gets one message
            raise ValueError(f"feature extractor {p} is not a TorchScript module (torch.jit.save): {e}") from e
        return module_extractor(module, p.stem)
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"feature extractor {spec!r}: cannot import {attr} from {mod_name}: {e}") from e
        module = factory() if not isinstance(factory, nn.Module) else factory
        return module_extractor(module, attr)
    raise ValueError(
        f"features {spec!r} is not 'classifier', 'classifier-check', 'inception', a TorchScript file (.pt) or "
        "'package.module:factory'"
    )
