"""``lpm probe``: how much the model's answers respond to the situation (one variable at a time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from lpm.archetype import ArchetypeSpec
from lpm.cli import options as o
from lpm.cli.asking import ModelOptions
from lpm.cli.display import console, frame_table
from lpm.cli.options import parse_pairs
from lpm.errors import InputError
from lpm.paths import check_new_folder, make_folder


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """``["cases=10,1000", "sex=male"]`` -> ``{"cases": [10, 1000], "sex": ["male"]}`` (numbers as numbers)."""
    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not sep or not name or not parts:
            raise InputError(f"--vary {item!r}: expected NAME=v1,v2,..., e.g. --vary cases=100,1000,10000")
        if name in out:
            raise InputError(f"--vary {item!r}: {name!r} is given twice; list all its values in one --vary")
        out[name] = [parse_pairs([f"{name}={p}"], "--vary", "cases=100,1000")[name] for p in parts]
    return out


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe_command(
        spec: str = typer.Argument(..., help="archetype spec file, or the name of one in archetypes/"),
        vary: list[str] = typer.Option(
            [],
            "--vary",
            metavar="NAME=v1,v2,...",
            help="values to sweep a context variable (or attribute labels) over, replacing the spec's probe "
            "values; repeat for each variable",
        ),
        base: list[str] = typer.Option(
            [],
            "--base",
            metavar="NAME=VALUE",
            help="the base value of a variable (default: the middle of its sweep); repeat for each",
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="folder for probe.csv, probe.json, probe.png (default probe-<spec>)"
        ),
        population: Path = typer.Option(
            None,
            "--population",
            "-p",
            help="population Parquet file whose attribute labels are swept (default: synthetic NYC)",
        ),
        llm_url: str = o.llm_url_option(),
        llm_model: str = o.llm_model_option(),
        weights: Path = o.weights_option(),
        revision: str = o.revision_option(),
        api_key_env: str = o.api_key_env_option(),
        server: str = o.server_option(),
        cache: str = o.cache_option(),
        cache_dir: Path = o.cache_dir_option(),
        mode: str = o.mode_option(),
        n_samples: int = o.samples_option(),
        scoring: str = o.scoring_option(),
        elicitation: str = o.elicitation_option(),
        concurrency: int = o.concurrency_option(),
        llm_timeout: float = o.llm_timeout_option(),
    ) -> None:
        """Sweep each context variable and attribute of a spec around a base situation, one at a time, and
        show how much the probability of each action moves: are the model's answers informative?"""
        from lpm import probe as probing
        from lpm.population import Population

        s = ArchetypeSpec.load(spec)
        varied = parse_vary(vary)
        base_values = parse_pairs(base, "--base", "cases=1000")
        asked = ModelOptions.pick(locals())
        folder = Path(out) if out is not None else Path(f"probe-{s.name}")
        check_new_folder(folder)
        pop = (
            Population.load(population)
            if population is not None
            else Population.synthesize("nyc", agents=probing.PROBE_AGENTS, seed=0)
        )
        labels = probing.attribute_labels(s, pop)
        # bad names and values fail before a server starts
        probing.plan(s, labels, base=base_values, vary=varied)
        for name in s.context:
            for value in varied.get(name, []):
                s.context_value(name, value, given="--vary")
            if name in base_values:
                s.context_value(name, base_values[name], given="--base")
        with asked.decider() as (decider, info, response_cache):
            result = probing.probe(s, decider, population=pop, base=base_values, vary=varied)
        ranges = result.ranges()
        for sweep in result.sweeps:
            part = result.table[result.table["variable"] == sweep.name]
            wide = part.pivot(index="value", columns="action", values="probability")
            wide = wide.loc[sweep.values, result.actions]
            shown = wide.rename(columns=lambda a: f"P({a})").reset_index()
            shown["value"] = [f"{v} (base)" if v == result.base[sweep.name] else str(v) for v in sweep.values]
            shown["mode"] = (
                part.drop_duplicates("value").set_index("value").loc[sweep.values, "mode"].tolist()
            )
            spread = ranges[ranges["variable"] == sweep.name].set_index("action")["range"]
            ranges_text = ", ".join(f"P({a}) {spread[a]:.3f}" for a in result.actions)
            console.print(f"\n[bold]{sweep.name}[/] ({sweep.kind}), range over the sweep: {ranges_text}")
            console.print(frame_table(shown.rename(columns={"value": sweep.name})))
        console.print(
            f"{s.name}, model {info['model']}: {result.requests} requests sent, {result.cached} answers from the "
            f"cache ({response_cache.directory}), {result.tokens:,} tokens, {result.wall_s:.1f} s"
        )
        console.print(f"[bold]verdict:[/] {result.verdict()}")
        if "sample" in set(result.table["mode"]):
            console.print(
                f"(some answers were sampled: their shares carry noise of about 0.5/sqrt({n_samples}) = "
                f"{0.5 / n_samples**0.5:.2f} at p = 0.5, which the ranges include)"
            )
        make_folder(folder, field="--out")
        result.table.to_csv(folder / "probe.csv", index=False)
        summary = result.summary() | {
            "model": info["model"],
            "url": info.get("url"),
            "weights": info.get("weights"),
            "elicitation": elicitation,
            "scoring": scoring,
            "source": str(s.source),
        }
        (folder / "probe.json").write_text(json.dumps(summary, indent=2))
        probing.plot(result, folder / "probe.png")
        console.print(f"wrote {folder / 'probe.csv'}, {folder / 'probe.json'}, {folder / 'probe.png'}")
