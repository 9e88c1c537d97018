"""Shared rendering of tables for the CLI (rich)."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table

console = Console(width=None if Console().is_terminal else 120)


def frame_table(
    frame: pd.DataFrame, *, title: str | None = None, index: bool = False, floats: str = "{:.3f}"
) -> Table:
    """A rich table of a pandas frame; integers get thousands separators, floats ``floats``."""
    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    if index:
        frame = frame.reset_index()
    for col in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[col]) and not pd.api.types.is_bool_dtype(frame[col])
        table.add_column(str(col), justify="right" if numeric else "left")
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, bool) or v is None:
                cells.append(str(v))
            elif isinstance(v, int) or (hasattr(v, "dtype") and pd.api.types.is_integer_dtype(type(v))):
                cells.append(f"{int(v):,}")
            elif isinstance(v, float):
                cells.append(floats.format(v))
            else:
                cells.append(str(v))
        table.add_row(*cells)
    return table
