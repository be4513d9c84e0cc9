"""Checking output paths before any work: a command that will write a file or a folder calls
:func:`check_file` or :func:`check_folder` first, so a path that cannot be written fails in a
second with a message naming the flag, not after an hour of sampling with a raw errno about a
hidden temporary file.

Both refuse an empty path and a path whose kind is wrong (a folder where a file goes, a file where
a folder goes, something that is neither), and probe the nearest existing folder on the way by
creating and removing a hidden file there (``.ddim-probe.*``): that is the one check that tells a
read-only mount, a full quota or missing permissions apart from a writable place, whoever runs it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_file", "check_folder", "check_memory", "physical_memory"]


def _named(flag: str, path: str | os.PathLike) -> str:
    return f"{flag} {os.fspath(path)}"


def _check_text(path: str | os.PathLike | None, flag: str) -> Path:
    if path is None or not os.fspath(path).strip():
        raise ValueError(f"{flag} is empty: give a path to write")
    if "\0" in os.fspath(path):
        raise ValueError(f"{flag} {os.fspath(path)!r} holds a NUL character")
    return Path(path)


def _probe_parent(p: Path, flag: str) -> None:
    """The nearest existing ancestor of ``p`` must be a folder this process can create files in."""
    anc = p.parent if str(p.parent) else Path(".")
    while not anc.exists():
        if anc.is_symlink():  # a dangling link: mkdir would fail on it
            raise ValueError(f"{_named(flag, p)}: {anc} is a broken symbolic link")
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{_named(flag, p)}: {anc} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=anc, prefix=".ddim-probe.", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"{_named(flag, p)}: cannot write in {anc} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def check_file(path: str | os.PathLike | None, *, flag: str = "out", suffixes: Sequence[str] | None = None) -> Path:
    """Check that a file can be written at ``path`` (atomically: a temporary file beside it, then a rename).

    Args:
        path: the output file.
        flag: how errors name it (e.g. ``"--out"``).
        suffixes: if given, the allowed endings (lower case, with the dot, e.g. ``(".png",)``).

    Returns:
        ``Path(path)``.

    Raises:
        ValueError naming ``flag``: an empty path, a wrong suffix, an existing folder or special file
        at ``path``, a file where a parent folder should be, or a parent folder that cannot be written.
    """
    p = _check_text(path, flag)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise ValueError(f"{_named(flag, p)}: the file name must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise ValueError(f"{_named(flag, p)} is a folder; give a file name" + _ending(suffixes))
    if p.exists() and not p.is_file():
        raise ValueError(f"{_named(flag, p)} exists and is not a regular file")
    _probe_parent(p, flag)
    return p


def _ending(suffixes: Sequence[str] | None) -> str:
    return f" ending in {' or '.join(suffixes)}" if suffixes else ""


def check_folder(path: str | os.PathLike | None, *, flag: str = "out") -> Path:
    """Check that ``path`` is (or can be made) a folder this process can write files in.

    Returns:
        ``Path(path)``; nothing is created.

    Raises:
        ValueError naming ``flag``: an empty path, an existing file at ``path`` or above it, or a
        folder that cannot be written.
    """
    p = _check_text(path, flag)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{_named(flag, p)} is a file; a folder is needed here")
    if p.is_dir():
        try:
            fd, tmp = tempfile.mkstemp(dir=p, prefix=".ddim-probe.", suffix=".tmp")
        except OSError as e:
            raise ValueError(f"{_named(flag, p)}: cannot write in it ({e.strerror or e})") from None
        os.close(fd)
        os.unlink(tmp)
        return p
    _probe_parent(p, flag)
    return p


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_memory(nbytes: int, what: str, hint: str = "") -> None:
    """Raise ValueError when ``what`` needs more than 90% of this machine's RAM (``nbytes``).

    Linux hands out memory lazily, so an oversized array is often "allocated" fine and the process
    is killed hours later when it is filled; this refuses such a request before any work.
    """
    total = physical_memory()
    if total is not None and nbytes > 0.9 * total:
        raise ValueError(
            f"{what} needs {nbytes / 2**30:.1f} GiB of memory and this machine has {total / 2**30:.1f} GiB"
            + (f"; {hint}" if hint else "")
        )
