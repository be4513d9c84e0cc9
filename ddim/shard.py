"""Sampling split across ranks, resumable folder output, and statistics over a folder of images.

``ddim sample --out DIR/`` writes one PNG per image, ``DIR/seed_XXXXXX.png``, each atomically
(temporary file, then rename) as soon as its batch is done. A run started again on the same
folder lists the images already there and generates only the missing seeds, so a killed run loses
at most the batches in flight and never duplicates an image. ``DIR/ddim-sample.json`` records the
settings the images were made with (model weights digest, sampler, steps, guidance, classes, first
seed, ...); a later run with other settings is refused instead of mixing two kinds of images.

Under ``torchrun`` the missing seeds are cut into the batches a single process would run (fixed
chunks of seed space: seeds ``k·batch .. (k+1)·batch - 1`` together) and whole chunks are dealt to
the ranks (chunk j to rank j mod N). Image i depends only on its seed (its noise is drawn per seed,
never per batch) and is computed in the same batch as in a single-process run, so the files are
byte-identical to it. What can still change the last bit of an image: another ``--batch`` (kernels
may round differently per batch size), another thread count, device, dtype, torch version or
``--compile``. For ``--out x.npz`` or ``x.png`` each rank samples its
share and rank 0 gathers them and writes the one file, identical to a single-process run.

For evaluation, :func:`sharded_features`, :func:`sharded_feature_stats` and :func:`map_images` spread
a folder's (or an ``.npz``'s) images over the ranks and gather the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim import distributed as ddist
from ddim.checkpoint import write_json
from ddim.images import from_uint8, image_channels, save_png, to_8bit, to_uint8
from ddim.noise import check_seed_range

__all__ = [
    "MANIFEST",
    "SampleJob",
    "seed_filename",
    "existing_seeds",
    "png_is_complete",
    "remove_stale",
    "image_files",
    "FolderImages",
    "ArrayImages",
    "ImageSet",
    "open_images",
    "map_images",
    "ShardedFeatures",
    "sharded_features",
    "sharded_feature_stats",
    "model_digest",
]

#: The settings file of a folder output.
MANIFEST = "ddim-sample.json"
_SEED_FILE = re.compile(r"^seed_(-?\d+)\.png$")
_STALE_TMP = re.compile(r"^\.seed_-?\d+\.png\..*\.tmp$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# `ddim sample` options that do not change any image (or are recorded otherwise).
_NOT_SETTINGS = frozenset({"n", "out", "batch", "progress", "model_path"})


def seed_filename(seed: int) -> str:
    """``seed_000042.png``: the file of the image of ``seed`` in a folder output."""
    return f"seed_{seed:06d}.png"


def existing_seeds(folder: str | os.PathLike, *, verify: bool = False) -> set[int]:
    """Seeds whose ``seed_XXXXXX.png`` is in ``folder``.

    ``ddim sample`` writes them atomically, but a file can still be damaged afterwards (a full disk,
    a copy cut short, an editor): with ``verify=True`` only files that decode as a whole PNG
    (:func:`png_is_complete`) count, so a resumed run makes the others again (replacing them).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    seeds = set()
    for entry in os.scandir(folder):
        m = _SEED_FILE.match(entry.name)
        if m and entry.is_file() and (not verify or png_is_complete(entry.path)):
            seeds.add(int(m.group(1)))
    return seeds


def png_is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a non-empty PNG whose every chunk is present and passes its CRC (Pillow's
    ``verify``; about 0.1 ms for a small image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return False
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.verify()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


def remove_stale(folder: str | os.PathLike) -> int:
    """Delete temporary files a killed run left behind (``.seed_XXXXXX.png.*.tmp``); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    count = 0
    for entry in os.scandir(folder):
        if _STALE_TMP.match(entry.name):
            try:
                os.unlink(entry.path)
                count += 1
            except FileNotFoundError:  # another rank got there first
                pass
    return count


def model_digest(model: Any) -> str | None:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes); None for a non-module."""
    if not isinstance(model, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, default=str))


def _manifest_error(folder: Path, manifest: dict[str, Any], has_images: bool) -> str | None:
    path = folder / MANIFEST
    if not path.is_file():
        if has_images:
            return (
                f"--out {folder} already holds seed_*.png images but no {MANIFEST}, so they may come from "
                "other settings; use a new folder or remove them"
            )
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"--out {folder}: cannot read {MANIFEST}: {e}"
    old = stored.get("settings", {})
    new = manifest["settings"]
    diff = [
        f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if diff:
        return (
            f"--out {folder} holds images sampled with other settings ({'; '.join(diff[:3])}); "
            "use a new folder, or the same settings to resume it"
        )
    return None


@dataclass
class SampleJob:
    """This rank's part of a sampling request for ``--out``; see the module docstring.

    Use: ``job = SampleJob.plan(out, n=..., seed=..., labels=..., model=model, settings=...)``, then
    ``result = generate(..., seeds=job.seeds, labels=job.labels, on_batch=job.on_batch,
    progress=job.progress and ...)`` and ``line = job.finish(result)`` (the summary, on rank 0; None
    elsewhere). Single-process the same calls do what ``write_images`` did, plus folder resumption.
    """

    out: Path
    kind: str  # "folder", "npz" or "png"
    n: int
    first_seed: int
    all_labels: torch.Tensor
    positions: list[int]  # positions (0..n-1) in the request of this rank's images
    skipped: int = 0
    ctx: ddist.Context = field(default_factory=ddist.Context)
    nrow: int | None = None
    written: int = 0
    chunks: int = 0  # batches the whole request needs (over all ranks)

    @property
    def seeds(self) -> list[int]:
        """Seeds this rank generates (may be empty)."""
        return [self.first_seed + i for i in self.positions]

    @property
    def labels(self) -> torch.Tensor:
        """Their labels (int64, -1 = unconditional)."""
        return self.all_labels[torch.as_tensor(self.positions, dtype=torch.long)]

    @property
    def idle_ranks(self) -> int:
        """How many ranks get no chunk (0 single-process, or when every rank has work)."""
        return max(0, self.ctx.world_size - self.chunks) if self.ctx.distributed and self.chunks else 0

    @property
    def progress(self) -> bool:
        """Whether this rank should show a progress bar (rank 0 only)."""
        return self.ctx.is_main

    @classmethod
    def plan(
        cls,
        out: str | os.PathLike,
        *,
        n: int,
        seed: int = 0,
        labels: torch.Tensor | None = None,
        model: Any = None,
        settings: dict[str, Any] | None = None,
        nrow: int | None = None,
        batch: int = 256,
    ) -> SampleJob:
        """Join the process group (under torchrun) and work out what this rank samples.

        The seeds to make are cut into the batches :func:`ddim.generate.generate` runs (fixed chunks
        of seed space, :func:`ddim.generate.seed_chunks`) and whole chunks are dealt to the ranks
        (chunk j to rank j mod N), so every image is made in the same batch, with the same
        neighbours, whatever the number of processes: the files are byte-identical to a
        one-process run with the same ``batch``. (Fewer chunks than ranks leaves ranks idle: give a
        smaller ``batch`` to spread a small request.)

        Args:
            out: ``*.png`` (one grid), ``*.npz``, or a folder (resumable, one PNG per seed).
            n, seed: the request: image i has seed ``seed + i``.
            batch: the ``batch`` that will be passed to ``generate``.
            labels: int64 [n]; None = all unconditional.
            model: its weights digest goes into a folder's settings file.
            settings: everything else that changes the images (sampler, steps, guidance, classes,
                dtype, ...), recorded in a folder's settings file; ``n``, ``out``, ``batch``,
                ``progress`` and ``model_path`` are left out (they do not change an image).

        Raises:
            ValueError: a bad ``out``, or a folder holding images made with other settings (on every
            rank when any rank found it so).
        """
        out = Path(out)
        suffix = out.suffix.lower()
        if suffix not in ("", ".png", ".npz"):
            raise ValueError(f"out must end in .png or .npz, or be a folder; got {str(out)!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        check_seed_range(seed, n)
        labels = torch.full((n,), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
        ctx = ddist.init(_module_device(model))
        kind = "folder" if suffix == "" else suffix[1:]
        positions = list(range(n))
        skipped = 0
        if kind == "folder":
            manifest = {
                "format": "ddim-sample-folder",
                "settings": _jsonable(
                    {
                        **{k: v for k, v in (settings or {}).items() if k not in _NOT_SETTINGS},
                        "seed": seed,
                        "model": model_digest(model),
                    }
                ),
            }
            error = None
            try:
                out.mkdir(parents=True, exist_ok=True)
                remove_stale(out)
                have = existing_seeds(out, verify=True)
                error = _manifest_error(out, manifest, bool(have))
            except OSError as e:
                error, have = ValueError(f"--out {out}: {e}"), set()
            try:
                ddist.check(ValueError(error) if isinstance(error, str) else error, ctx)
            except ddist.RankError as e:
                raise ValueError(str(e)) from None
            # every rank has looked; the settings file goes in before any image (the gather below
            # waits for it), so a run killed at any point can be resumed
            if ctx.local_rank == 0 and not (out / MANIFEST).is_file():
                write_json(out / MANIFEST, manifest)
            have = set().union(*ddist.all_gather_objects(have, ctx))
            missing = [i for i in range(n) if seed + i not in have]
            skipped = n - len(missing)
            todo = missing
        else:
            todo = positions
        positions = _deal_chunks(todo, seed, batch, ctx)
        from ddim.generate import seed_chunks

        chunks = len(seed_chunks([seed + i for i in todo], batch))
        return cls(out, kind, n, seed, labels, positions, skipped, ctx, nrow, chunks=chunks)

    def on_batch(self, first: int, images: torch.Tensor) -> None:
        """``generate``'s streaming hook: a folder output writes each finished image at once."""
        if self.kind != "folder":
            return
        u8 = to_uint8(images)
        seeds = self.seeds
        for j in range(u8.shape[0]):
            save_png(u8[j], self.out / seed_filename(seeds[first + j]))
        self.written += u8.shape[0]

    def finish(self, result: Any) -> str | None:
        """Write the merged ``.npz``/``.png`` (rank 0) and return the summary line (rank 0; else None)."""
        from ddim.generate import write_images, write_uint8

        tic = time.perf_counter()
        made = len(self.positions)
        if self.kind == "folder":
            if self.written != made:  # a caller that did not pass on_batch
                self.written = 0
                self.on_batch(0, result.images)
        elif not self.ctx.distributed:
            write_images(result, self.out, nrow=self.nrow)
        else:
            parts = ddist.gather_objects((self.positions, to_uint8(result.images)), ctx=self.ctx)
            error = None
            if parts is not None:
                try:
                    shape = next(u8.shape[1:] for _, u8 in parts if len(u8))
                    merged = np.empty((self.n, *shape), dtype=np.uint8)
                    for pos, u8 in parts:
                        merged[pos] = u8
                    write_uint8(
                        merged, self.all_labels, [self.first_seed + i for i in range(self.n)], self.out, self.nrow
                    )
                except (OSError, ValueError) as e:
                    error = e
            ddist.check(error, self.ctx)
        seconds = float(result.seconds) + (time.perf_counter() - tic if self.kind == "folder" else 0.0)
        stats = ddist.gather_objects((made, seconds), ctx=self.ctx)
        if stats is None:
            return None
        total = sum(m for m, _ in stats)
        wall = max(s for _, s in stats)
        rate = total / wall if wall > 0 else 0.0
        procs = f" on {self.ctx.world_size} processes" if self.ctx.distributed else ""
        if self.kind == "folder":
            where = f"{self.out}/ ({self.n} files"
            where += f", {self.skipped} of them already there)" if self.skipped else ")"
        else:
            where = str(self.out)
        return (
            f"{total} images{procs}, {result.nfe} network evaluations per image, {wall:.2f} s "
            f"({rate:.1f} images/s) -> {where}"
        )


def _deal_chunks(positions: list[int], seed: int, batch: int, ctx: ddist.Context) -> list[int]:
    """This rank's positions: the request's batches (seed-aligned chunks of ``positions``), chunk j to
    rank j mod N, concatenated in order."""
    from ddim.generate import seed_chunks

    if not ctx.distributed:
        return list(positions)
    chunks = seed_chunks([seed + i for i in positions], batch)
    return [p for sl in chunks[ctx.rank :: ctx.world_size] for p in positions[sl]]


def _module_device(model: Any) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


# ------------------------------------------------------------------ evaluation over a folder
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
