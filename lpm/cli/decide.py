"""``lpm decide``: ask the model for the decisions of every archetype of a population, once."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from lpm.archetype import ArchetypeSpec
from lpm.cache import CACHE_MODES, ResponseCache
from lpm.cli.display import console, frame_table
from lpm.cli.options import (
    api_key_env_option,
    cache_dir_option,
    cache_option,
    concurrency_option,
    elicitation_option,
    llm_model_option,
    llm_url_option,
    mode_option,
    parse_pairs,
    revision_option,
    samples_option,
    scoring_option,
    server_option,
    weights_option,
)
from lpm.decision import Decider
from lpm.endpoint import default_mode, llm_backend
from lpm.errors import InputError
from lpm.population import Population


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
        llm_url: str = llm_url_option(),
        llm_model: str = llm_model_option(),
        weights: Path = weights_option(),
        revision: str = revision_option(),
        api_key_env: str = api_key_env_option(),
        server: str = server_option(),
        cache: str = cache_option(),
        cache_dir: Path = cache_dir_option(),
        mode: str = mode_option(),
        n_samples: int = samples_option(),
        scoring: str = scoring_option(),
        elicitation: str = elicitation_option(),
        concurrency: int = concurrency_option(),
        as_json: bool = typer.Option(
            False, "--json", help="print the rows as a JSON list instead of a table"
        ),
    ) -> None:
        """Print each archetype's probability of every action, the mode used and whether it was cached."""
        s = ArchetypeSpec.load(spec)
        values = parse_pairs(context, "--context", "week=10")
        if cache not in CACHE_MODES:
            raise InputError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
        pop = Population.load(population)
        rows = s.group(pop).rows()
        response_cache = ResponseCache(cache_dir, mode=cache)
        err = Console(stderr=True)
        with llm_backend(
            llm_url,
            llm_model,
            weights=weights,
            revision=revision,
            cache_mode=cache,
            server=server,
            api_key_env=api_key_env,
            max_concurrency=concurrency,
            on_start=lambda local: err.print(
                f"starting a local {local.kind.label} server (logs: {local.log_path}) ..."
            ),
        ) as (backend, info):
            decider = Decider(
                backend,
                response_cache,
                mode=default_mode(mode, server),
                n_samples=n_samples,
                scoring=scoring,
                elicitation=elicitation,
                progress=not as_json,
            )
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
