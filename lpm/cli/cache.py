"""``lpm cache stats|clear``: the response cache."""

from __future__ import annotations

from pathlib import Path

import typer

from lpm.cache import ResponseCache
from lpm.cli.display import console


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Inspect or clear the response cache.", no_args_is_help=True)
    app.add_typer(group, name="cache")
    dir_option = typer.Option(None, "--cache-dir", help="cache folder (default: $LPM_CACHE_DIR/responses)")

    @group.command("stats")
    def stats(cache_dir: Path = dir_option) -> None:
        """Entries, hits, misses, tokens saved, corrupt entries found, size on disk."""
        with ResponseCache(cache_dir) as cache:
            s = cache.stats()
        console.print(f"response cache {s['directory']}")
        console.print(
            f"  {s['entries']:,} entries, {s['bytes'] / 2**20:,.1f} MiB; {s['hits']:,} hits, {s['misses']:,} misses, "
            f"{s['tokens_saved']:,} tokens saved, {s['corrupt']:,} corrupt entries replaced"
        )

    @group.command("clear")
    def clear(cache_dir: Path = dir_option) -> None:
        """Delete every cached response and reset the counters."""
        with ResponseCache(cache_dir) as cache:
            removed = cache.clear()
        if removed is None:
            console.print(f"cleared {cache.directory} (its database was damaged and was deleted)")
        else:
            console.print(f"cleared {cache.directory} ({removed:,} items)")
