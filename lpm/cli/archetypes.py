"""``lpm archetypes show``."""

from __future__ import annotations

from pathlib import Path

import typer

from lpm.archetype import ArchetypeSpec
from lpm.cli.display import console, frame_table
from lpm.population import Population


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Inspect archetype specs.", no_args_is_help=True)
    app.add_typer(group, name="archetypes")

    @group.command("show")
    def show(
        spec: str = typer.Argument(..., help="spec file, or the name of one in archetypes/"),
        population: Path = typer.Option(..., "--population", "-p", help="population Parquet file"),
    ) -> None:
        """Group a population by a spec's attributes and print K and the archetype table."""
        s = ArchetypeSpec.load(spec)
        pop = Population.load(population)
        grouping = s.group(pop)
        members = int(grouping.counts.sum())
        console.print(
            frame_table(
                grouping.table,
                index=True,
                title=f"{s.name}: K = {grouping.k} archetypes, {members:,} of {len(pop):,} agents decide",
            )
        )
        console.print(
            f"actions: {', '.join(s.actions)}; cadence: {s.cadence.value}; "
            f"context: {', '.join(s.context) or '-'}; prompt: {s.prompt}"
        )
