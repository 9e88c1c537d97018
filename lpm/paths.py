"""Where lpm finds its shipped folders (archetypes/, prompts/, populations/) and its cache."""

from __future__ import annotations

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
