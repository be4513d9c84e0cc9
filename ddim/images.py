"""Image conversion and writing: model space [-1, 1] <-> uint8, grids, atomic PNG writes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from ddim.checkpoint import atomic_write

__all__ = ["to_uint8", "from_uint8", "make_grid", "save_png", "save_grid", "image_channels", "to_8bit"]

#: Pillow modes that hold one grey channel (with or without alpha); everything else loads as RGB.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def image_channels(mode: str) -> int:
    """Channels an image of Pillow ``mode`` loads with: 1 for the grey modes (:data:`GRAY_MODES`), else 3."""
    return 1 if mode in GRAY_MODES else 3


def to_8bit(im, channels: int, name: object = "image"):
    """A Pillow image as 8-bit "L" (``channels`` 1) or "RGB" (3), its full range kept.

    16-bit grey ("I;16*", and "I" with values in 0..65535, as Pillow opens 16-bit PNGs and TIFFs) is
    scaled by 255/65535 and rounded; Pillow's own ``convert`` would clip it to 255 (a near-white
    image). 16-bit colour PNGs already open as 8-bit "RGB"/"RGBA". Alpha is dropped, as ``convert``
    does. Raises ValueError naming ``name`` for 32-bit float images and for "I" values outside
    0..65535, whose scale cannot be known.
    """
    from PIL import Image

    mode = im.mode
    if mode == "F":
        raise ValueError(
            f"{name}: 32-bit float images are not supported (their range is unknown); save it as 8- or 16-bit"
        )
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(f"{name}: 32-bit integer image with values outside 0..65535; save it as 8- or 16-bit")
        im = Image.fromarray(np.round(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8), "L")
    try:
        return im.convert("L" if channels == 1 else "RGB")
    except (ValueError, OSError) as e:
        raise ValueError(
            f"{name}: cannot convert a {mode!r} image to {'grey' if channels == 1 else 'RGB'} ({e})"
        ) from e


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] floats in model space -> uint8 [N, H, W, C] = round(clamp(x/2 + 0.5, 0, 1) · 255)."""
    u = torch.round((x.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).numpy()


def from_uint8(u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] (or [N, H, W]) -> float32 [N, C, H, W] in [-1, 1]."""
    a = np.asarray(u8)
    if a.ndim == 3:
        a = a[..., None]
    return torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def make_grid(images: np.ndarray, nrow: int = 8, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows·(H+pad)+pad, nrow·(W+pad)+pad, C] grid image."""
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write one uint8 [H, W, C] image as PNG, atomically (byte-identical for identical input)."""
    data = _png_bytes(image)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Write model-space images [N, C, H, W] as one PNG grid."""
    save_png(make_grid(to_uint8(x), nrow=nrow), path)
