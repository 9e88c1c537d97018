"""``lpm decide``: ask the model for the decisions of every archetype of a population, once."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lpm.archetype import ArchetypeSpec
from lpm.cli import options as o
from lpm.cli.asking import ModelOptions
from lpm.cli.display import console, frame_table
from lpm.cli.options import parse_pairs
from lpm.errors import InputError
from lpm.population import Population
from lpm.prompt import PromptTemplate


def register(app: typer.Typer) -> None:
    @app.command("decide")
    def decide(
        spec: str = typer.Argument(..., help="archetype spec file, or the name of one in archetypes/"),
        population: Path = typer.Option(..., "--population", "-p", help="population Parquet file"),
        context: list[str] = typer.Option(
            [],
            "--context",
            "-c",
            metavar="NAME=VALUE",
            help="a context variable of the spec; repeat for each: --context week=10 --context cases=2300",
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
        as_json: bool = typer.Option(
            False, "--json", help="print the rows as a JSON list instead of a table"
        ),
    ) -> None:
        """Print each archetype's probability of every action, the mode used and whether it was cached."""
        s = ArchetypeSpec.load(spec)
        values = parse_pairs(context, "--context", "week=10")
        # before a server starts: undeclared names, text for numbers, values the prompt needs
        s.check_context(values, given="--context")
        missing = sorted(PromptTemplate.load(s).variables & set(s.context) - set(values))
        if missing:
            raise InputError(
                f"--context: the prompt of {s.where} uses context variable(s) "
                f"{', '.join(map(repr, missing))}, given no value",
                hint="give each, e.g. "
                + " ".join(f"--context {name}=… ({s.context[name].description})" for name in missing),
            )
        asked = ModelOptions.pick(locals())
        pop = Population.load(population)
        rows = s.group(pop).rows()
        with asked.decider(progress=not as_json) as (decider, info, response_cache):
            out = decider.decide(s, rows, values)
        model = info["model"]
        frame = out.to_frame()
        if as_json:
            typer.echo(json.dumps(frame.to_dict("records")))
            return
        console.print(frame_table(frame, title=f"{s.name}: {len(out)} archetypes, model {model}"))
        console.print(
            f"{out.requests} requests sent, {sum(out.cached)} answers from the cache ({response_cache.directory}), "
            f"{out.prompt_tokens + out.completion_tokens:,} tokens, {out.wall_s:.1f} s"
        )
