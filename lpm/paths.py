"""Where lpm finds its shipped folders (archetypes/, prompts/, populations/) and its cache."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from lpm.errors import InputError


def project_root() -> Path:
    """The folder holding ``archetypes/``, ``prompts/`` and ``populations/``.

    ``$LPM_HOME`` overrides it; by default it is the checkout the package was installed from.
    """
    env = os.environ.get("LPM_HOME")
    root = Path(env) if env else Path(__file__).resolve().parents[1]
    if not (root / "populations").is_dir():
        raise InputError(
            f"lpm's data folders were not found under {root} (no populations/ folder)",
            hint="install lpm from its checkout (pip install -e .) or set LPM_HOME to that checkout",
        )
    return root


def cache_root() -> Path:
    """Per-user cache folder: ``$LPM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lpm`` or ``~/.cache/lpm``."""
    env = os.environ.get("LPM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lpm"


def os_error(path: Path | str, exc: OSError, what: str) -> InputError:
    """An :class:`InputError` for an ``OSError`` met while writing ``what`` at ``path`` (full disk, no
    permission, a file where a folder belongs), naming the path and what to do."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a part of the path is a file, not a folder",
        errno.EISDIR: "it is a folder",
    }.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return InputError(
        f"{path}: cannot write {what}: {reason}", hint="choose another path (--out) or free the space"
    )


def file_parent(path: Path | str, *, field: str) -> Path:
    """Check that a file can be created at ``path`` (its folder can be made, no file stands in the way,
    the path is not a folder) and make its folder; ``field`` names the option in errors."""
    path = Path(path)
    if path.is_dir():
        raise InputError(
            f"{field} {path}: is a folder; give a file path", hint=f"e.g. {path / 'population.parquet'}"
        )
    make_folder(path.parent, field=field, shown=path)
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{field} {path}: cannot write in {path.parent} (permission denied)")
    return path


def check_new_folder(path: Path | str, *, field: str = "--out", what: str = "the output folder") -> Path:
    """Check, writing nothing, that ``path`` can become a new output folder: no file stands in the way, it
    is absent or an empty folder, and the nearest existing folder above it is writable."""
    path = Path(path)
    _no_file_in_the_way(path, field, path)
    if path.is_dir() and any(path.iterdir()):
        raise InputError(
            f"{path}: {what} exists and is not empty; nothing was overwritten",
            hint=f"give another {field}"
            + (" (or --resume to continue that run)" if what == "the run folder" else ""),
        )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise InputError(f"{field} {path}: cannot write in {existing} (permission denied)")
    return path


def make_folder(path: Path | str, *, field: str, shown: Path | str | None = None) -> bool:
    """Make folder ``path`` (and its parents); returns whether it was created here. A file in the way or an
    unwritable place is an :class:`InputError` naming ``field`` and ``shown`` (default ``path``)."""
    path = Path(path)
    _no_file_in_the_way(path, field, shown or path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(path, exc, "the folder") from None
    return created


def _no_file_in_the_way(path: Path, field: str, shown: Path | str) -> None:
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise InputError(
                f"{field} {shown}: {part} is a file, not a folder",
                hint=f"choose another {field} or move {part}",
            )
