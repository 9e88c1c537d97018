"""``lpm population synth|show``."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import typer

from lpm.cli.display import console, frame_table
from lpm.population import Population


def summary(pop: Population) -> pd.DataFrame:
    """Agents, share, labor-force members, ZIP areas, households, school classes and workplaces per
    borough (those the population has), plus a city row."""
    frame = pop.to_pandas()
    rows = frame.groupby("borough", observed=True).agg(agents=("borough", "size"))
    if "labor_force" in frame:
        rows["labor_force"] = frame.groupby("borough", observed=True)["labor_force"].sum()
    if "zip" in frame:
        rows["zip_areas"] = frame.groupby("borough", observed=True)["zip"].nunique()
    for column, label in (("household", "households"), ("school", "classes"), ("workplace", "workplaces")):
        if column in frame:  # ids are unique across boroughs; 0 means none for classes and workplaces
            ids = frame[column].where(frame[column] > 0) if column != "household" else frame[column]
            rows[label] = ids.groupby(frame["borough"], observed=True).nunique()
    rows.loc["city"] = rows.sum()
    rows["share"] = rows["agents"] / len(pop)
    if "households" in rows:
        rows["household_size"] = rows["agents"] / rows["households"]
    keep = ("share", "household_size")
    return rows.reset_index().astype({c: "int64" for c in rows.columns if c not in keep})


def show_population(pop: Population, *, title: str) -> None:
    console.print(frame_table(summary(pop), title=title))
    cols = ", ".join(f"{c} ({str(pop[c].dtype).removeprefix('torch.')})" for c in pop.columns)
    console.print(f"columns: {cols}")
    console.print(f"memory: {pop.nbytes / 2**20:,.1f} MiB ({pop.nbytes / len(pop):.1f} bytes per agent)")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Build and inspect synthetic populations.", no_args_is_help=True)
    app.add_typer(group, name="population")

    @group.command("synth")
    def synth(
        recipe: str = typer.Argument("nyc", help="population recipe in populations/ (nyc)"),
        agents: int = typer.Option(None, "--agents", "-n", help="number of agents (default: the whole city)"),
        seed: int = typer.Option(0, "--seed", help="random seed; the same seed gives the same population"),
        out: Path = typer.Option(..., "--out", "-o", help="Parquet file to write"),
        force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    ) -> None:
        """Synthesize a population from real marginals and write it as Parquet."""
        from lpm.errors import InputError
        from lpm.paths import file_parent

        file_parent(out, field="--out")  # before the work: a folder, a file in the way, no permission
        if out.exists() and not force:
            raise InputError(
                f"--out {out}: the file exists; nothing was overwritten", hint="pass --force to replace it"
            )
        start = time.perf_counter()
        with console.status(f"synthesizing {recipe} population"):
            pop = Population.synthesize(recipe, agents=agents, seed=seed)
            pop.save(out)
        took = time.perf_counter() - start
        show_population(pop, title=f"{recipe} population, seed {seed}")
        console.print(f"wrote {out} in {took:.1f} s")

    @group.command("show")
    def show(path: Path = typer.Argument(..., help="population Parquet file")) -> None:
        """Print the summary of a population file."""
        pop = Population.load(path)
        show_population(
            pop, title=f"{path} ({pop.meta.get('recipe', '?')}, seed {pop.meta.get('seed', '?')})"
        )
