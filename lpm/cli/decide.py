"""``lpm decide``: ask the model for the decisions of every archetype of a population, once."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from lpm.archetype import ArchetypeSpec
from lpm.cache import CACHE_MODES, ResponseCache
from lpm.cli.display import console, frame_table
from lpm.cli.options import parse_pairs, revision_option, weights_option
from lpm.decision import Decider
from lpm.decoding import MODES
from lpm.endpoint import default_mode, llm_backend
from lpm.errors import InputError
from lpm.population import Population
from lpm.server_kind import SERVER_KINDS


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
        llm_url: str = typer.Option(
            None, "--llm-url", help="OpenAI-compatible base URL; default: start a local server"
        ),
        llm_model: str = typer.Option(
            None, "--llm-model", help="served model name (default: the server's only model)"
        ),
        weights: Path = weights_option(),
        revision: str = revision_option(),
        api_key_env: str = typer.Option(
            "OPENAI_API_KEY", "--api-key-env", help="environment variable with the API key"
        ),
        server: str = typer.Option(
            "vllm",
            "--server",
            help="kind of the local server lpm starts, or of the server at --llm-url (which answer constraint "
            f"it takes): {'|'.join(SERVER_KINDS)}",
        ),
        cache: str = typer.Option("use", "--cache", help=f"response cache mode: {'|'.join(CACHE_MODES)}"),
        cache_dir: Path = typer.Option(
            None, "--cache-dir", help="response cache folder (default: $LPM_CACHE_DIR/responses)"
        ),
        mode: str = typer.Option(
            "auto", "--mode", "--llm-mode", help=f"how a distribution is read: {'|'.join(MODES)}"
        ),
        n_samples: int = typer.Option(20, "--samples", help="answers per request in sample mode"),
        concurrency: int = typer.Option(16, "--concurrency", help="requests in flight at once"),
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
