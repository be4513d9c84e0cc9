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

For evaluation, :mod:`ddim.sharded_eval` (:func:`sharded_features`, :func:`sharded_feature_stats`,
:func:`map_images`) spreads a folder's (or an ``.npz``'s) images, read by :mod:`ddim.image_sets`, over the
ranks and gathers the results; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim import distributed as ddist
from ddim.checkpoint import write_json
from ddim.image_sets import (
    _SEED_FILE,
    MANIFEST,
    ArrayImages,
    FolderImages,
    ImageSet,
    image_files,
    open_images,
)
from ddim.images import save_png, to_uint8
from ddim.noise import check_seed_range
from ddim.sharded_eval import ShardedFeatures, map_images, sharded_feature_stats, sharded_features

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

_STALE_TMP = re.compile(r"^\.seed_-?\d+\.png\..*\.tmp$")
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
        calls = getattr(result, "calls", None)  # adaptive steps: each image's calls
        stats = ddist.gather_objects((made, seconds, calls), ctx=self.ctx)
        if stats is None:
            return None
        total = sum(m for m, _, _ in stats)
        wall = max(s for _, s, _ in stats)
        rate = total / wall if wall > 0 else 0.0
        procs = f" on {self.ctx.world_size} processes" if self.ctx.distributed else ""
        if self.kind == "folder":
            where = f"{self.out}/ ({self.n} files"
            where += f", {self.skipped} of them already there)" if self.skipped else ")"
        else:
            where = str(self.out)
        if calls is None:
            per = f"{result.nfe} network evaluations per image"
        else:
            every = [c for _, _, cs in stats for c in cs or []]
            mean = sum(every) / len(every) if every else 0.0
            per = (
                f"{mean:.1f} network evaluations per image on average "
                f"({min(every, default=0)}–{max(every, default=0)}; adaptive, rtol {result.info['rtol']:g}, "
                f"atol {result.info['atol']:g})"
            )
        return f"{total} images{procs}, {per}, {wall:.2f} s ({rate:.1f} images/s) -> {where}"


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
