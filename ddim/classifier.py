"""A small digit classifier for MNIST-size images: accuracy of conditional samples, and the
feature space for Fréchet distances on the default model (the FID of this package's digits).

The shipped weights (``ddim/weights/classifier``) were trained with :func:`train_classifier`
on the 4,500 training digits of MNIST-5k; the 500 held-out digits measure its accuracy.

A second, independently trained network (:class:`CheckClassifier`: another architecture, another
seed; ``ddim/weights/classifier_check.safetensors``) is kept only to check choices made in the first
one's feature space (such as the default guidance), so that they are not tuned to one network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ddim.checkpoint import atomic_write

__all__ = [
    "DigitClassifier",
    "CheckClassifier",
    "train_classifier",
    "load_classifier",
    "default_classifier_path",
    "check_classifier_path",
]

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """CNN for [B, 1, 28, 28] images in [-1, 1]: ``forward`` gives logits [B, 10],
    :meth:`features` the 128-d penultimate activations used for Fréchet distances."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * 7 * 7, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 28, 28] -> float32 [B, 128]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.inference_mode()
    def predict_features(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode (features [N, 128], predicted labels [N]) for a big batch, in chunks."""
        self.eval()
        feats, preds = [], []
        for chunk in x.split(batch_size):
            f = self.body(chunk.float())
            feats.append(f)
            preds.append(self.head(f).argmax(1))
        return torch.cat(feats), torch.cat(preds)


class CheckClassifier(nn.Module):
    """The checking network: strided convolutions with GroupNorm and global average pooling (no max-pool,
    no BatchNorm, no flattened 7×7 map), 64-d features. Same interface as :class:`DigitClassifier`."""

    FEATURE_DIM = 64

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 24, 3, padding=1),
            nn.GroupNorm(4, 24),
            nn.SiLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1),
            nn.GroupNorm(8, 48),
            nn.SiLU(),
            nn.Conv2d(48, 48, 3, padding=1),
            nn.GroupNorm(8, 48),
            nn.SiLU(),
            nn.Conv2d(48, 96, 3, stride=2, padding=1),
            nn.GroupNorm(8, 96),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(96, self.FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.FEATURE_DIM, num_classes))

    features = DigitClassifier.features
    forward = DigitClassifier.forward
    predict_features = DigitClassifier.predict_features


ARCHS = {"a": DigitClassifier, "check": CheckClassifier}


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (padding with background -1)."""
    b = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
    arch: str = "a",
) -> DigitClassifier | CheckClassifier:
    """Train a :class:`DigitClassifier` (``arch="a"``) or :class:`CheckClassifier` (``"check"``) on images
    [N, 1, 28, 28] in [-1, 1] and int64 labels [N]."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ARCHS[arch](int(labels.max()) + 1, images.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    it = range(epochs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, unit="epoch")
    model.train()
    for _ in it:
        perm = torch.randperm(len(images), generator=gen)
        for idx in perm.split(batch_size):
            x = _shift(images[idx], gen)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def default_classifier_path() -> Path:
    return Path(__file__).parent / "weights" / "classifier.safetensors"


def check_classifier_path() -> Path:
    """The shipped checking network (:class:`CheckClassifier`)."""
    return Path(__file__).parent / "weights" / "classifier_check.safetensors"


def save_classifier(model: DigitClassifier | CheckClassifier, path: str | os.PathLike, half: bool = False) -> None:
    """Write the weights as safetensors (``half``: float16 storage; loaded back as float32)."""
    arch = "check" if isinstance(model, CheckClassifier) else "a"
    tensors = {
        k: (v.half() if half and v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {"format": "ddim-digit-classifier", "arch": arch}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_classifier(path: str | os.PathLike | None = None) -> DigitClassifier | CheckClassifier:
    """The shipped MNIST digit classifier (or one saved with :func:`save_classifier`), in eval mode."""
    from safetensors import safe_open

    path = Path(path) if path is not None else default_classifier_path()
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier weights {path} are missing")
    with safe_open(str(path), "pt") as f:
        arch = (f.metadata() or {}).get("arch", "a")
    if arch not in ARCHS:
        raise ValueError(f"{path}: unknown classifier architecture {arch!r}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    n_cls = state["head.1.weight"].shape[0]
    model = ARCHS[arch](n_cls, state["body.0.weight"].shape[1])
    model.load_state_dict(state)
    return model.eval()
