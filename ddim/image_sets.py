"""A set of images to evaluate: a folder (``seed_*.png`` in seed order, then other images by name), a
list of files, or an array, read in batches as float tensors in [-1, 1] (:func:`open_images`)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ddim.images import from_uint8, image_channels, to_8bit

__all__ = ["IMAGE_SUFFIXES", "MANIFEST", "ArrayImages", "FolderImages", "ImageSet", "image_files", "open_images"]

#: The settings file of a folder output (``ddim sample --out DIR/``, see :mod:`ddim.shard`).
MANIFEST = "ddim-sample.json"
_SEED_FILE = re.compile(r"^seed_(-?\d+)\.png$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The images of a folder (``seed_*.png`` in seed order, then other images by name) or a list of paths.

    Only files ending in an image suffix (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``) count:
    the settings file ``ddim-sample.json``, hidden and temporary files (``.seed_*.png.*.tmp``, which
    a run in progress or a killed one leaves), subfolders and anything else are skipped.

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no images.
    """
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.exists():
            raise ValueError(f"{folder} does not exist")
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder of images")
        seeded, other = [], []
        for entry in os.scandir(folder):
            name = entry.name
            if name.startswith(".") or name == MANIFEST or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if not entry.is_file():
                continue
            m = _SEED_FILE.match(name)
            (seeded if m else other).append((int(m.group(1)) if m else 0, name, folder / name))
        files = [p for *_, p in sorted(seeded)] + [p for *_, p in sorted(other)]
        if not files:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    return [Path(p) for p in source]


def _image_header(path: Path) -> tuple[int, tuple[int, int]]:
    """(channels as loaded: 1 for grayscale modes, else 3; (width, height)) from a file's header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return image_channels(im.mode), im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


class FolderImages:
    """Image files read on demand: ``len()``, ``shape`` (C, H, W) and ``load(indices)``.

    ``channels``/``size`` default to the first file's (grayscale -> 1, anything else -> 3; its
    width). With ``exact=True`` nothing is resized: every file must have the first file's width and
    height (``size`` must then be None), and :meth:`load` raises a ValueError naming the first file
    that differs. Otherwise images are converted and resized (bicubic) to ``size`` × ``size``, as
    :func:`ddim.generate.load_images` does.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        *,
        channels: int | None = None,
        size: int | None = None,
        exact: bool = False,
        name: str | None = None,
    ) -> None:
        self.files = [Path(p) for p in files]
        if not self.files:
            raise ValueError("no image files given")
        if exact and size is not None:
            raise ValueError("exact=True keeps the files' own size; leave size None")
        c, (w, h) = _image_header(self.files[0])
        self.channels = channels or c
        self.exact = exact
        self.hw = (h, w) if exact else (size or w, size or w)
        self.name = name or str(self.files[0].parent)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the loaded images."""
        return (self.channels, *self.hw)

    def signature(self) -> str:
        """A digest of the file names (ranks compare it to be sure they share out the same list)."""
        return hashlib.sha1("\n".join(str(p) for p in self.files).encode()).hexdigest()

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """Images ``indices`` as float32 [B, C, H, W] in [-1, 1]."""
        from ddim.generate import load_images

        paths = [self.files[i] for i in indices]
        if not self.exact:
            return load_images(paths, self.channels, self.hw[0])
        from PIL import Image, UnidentifiedImageError

        h, w = self.hw
        arrs = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    if im.size != (w, h):
                        raise ValueError(
                            f"{p} is {im.size[0]}×{im.size[1]} but {self.files[0].name} is {w}×{h}: "
                            "the images of one sample set must all have the same size"
                        )
                    a = np.asarray(to_8bit(im, self.channels, p))
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read image {p}: {e}") from e
            arrs.append(a[..., None] if a.ndim == 2 else a)
        return from_uint8(np.stack(arrs))


class ArrayImages:
    """uint8 images [N, H, W, C] held in memory (an ``.npz``'s ``images``), with :class:`FolderImages`' interface."""

    def __init__(self, images: np.ndarray, name: str = "array") -> None:
        a = np.asarray(images)
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4 or a.shape[0] == 0 or a.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: images must be [N, H, W] or [N, H, W, C] with C in (1, 3), got {a.shape}")
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating) or not (0 <= a.min() <= a.max() <= 1):  # NaN fails too
                raise ValueError(f"{name}: images must be uint8, or floats in [0, 1]; got {a.dtype}")
            a = np.round(a * 255).astype(np.uint8)
        self.images, self.name = a, name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        n, h, w, c = self.images.shape
        return (c, h, w)

    def signature(self) -> str:
        return f"{self.name}:{self.images.shape}"

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return from_uint8(self.images[np.asarray(indices, dtype=np.int64)])


ImageSet = FolderImages | ArrayImages


def open_images(
    source: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray | ImageSet,
    *,
    channels: int | None = None,
    size: int | None = None,
    exact: bool = False,
) -> ImageSet:
    """An image set to read by index: a folder (see :func:`image_files`), a list of image paths, an
    ``.npz`` file with ``images`` (uint8 [N, H, W] or [N, H, W, C]), or a uint8 array; an image set
    is returned as is. ``channels``, ``size`` and ``exact``: see :class:`FolderImages` (folders and
    lists only).

    Raises:
        ValueError: a missing path, an empty folder, an unreadable first image or ``.npz`` file.
    """
    if isinstance(source, (FolderImages, ArrayImages)):
        return source
    if isinstance(source, np.ndarray):
        return ArrayImages(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".npz":
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                images = z["images"] if "images" in names else None
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: cannot read as .npz ({e})") from e
        if images is None:
            raise ValueError(f"{path}: no array named 'images' (found: {sorted(names)})")
        return ArrayImages(images, str(path))
    files = image_files(source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else None
    return FolderImages(files, channels=channels, size=size, exact=exact, name=name)
