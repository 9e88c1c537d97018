"""``lpm run SCENARIO``: a built-in scenario or one of your own (``path/to/file.py:ClassName``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.markup import escape

from lpm.cli.display import console
from lpm.cli.options import (
    elicitation_option,
    llm_timeout_option,
    llm_url_option,
    parse_date,
    parse_pairs,
    revision_option,
    scoring_option,
    weights_option,
)
from lpm.server_kind import SERVER_KINDS


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        scenario: str = typer.Argument(
            ..., help="a scenario: a name from `lpm scenarios`, or path/to/file.py:ClassName"
        ),
        policy: str = typer.Option(
            "heuristic", "--policy", help="heuristic, llm (one query per archetype) or agent-llm"
        ),
        agents: int = typer.Option(None, "--agents", "-n", help="agents (default: the whole city, ≈ 8.34 M)"),
        start: str = typer.Option(
            None, "--start", help="date of the first step, YYYY-MM-DD (default: the scenario's)"
        ),
        steps: int = typer.Option(
            None, "--steps", help="steps to simulate (default: the scenario's horizon)"
        ),
        days: int = typer.Option(None, "--days", help="or the horizon in days"),
        weeks: int = typer.Option(None, "--weeks", help="or in weeks"),
        months: int = typer.Option(None, "--months", help="or in calendar months"),
        settings: list[str] = typer.Option(
            [],
            "--set",
            metavar="NAME=VALUE",
            help="a setting of the scenario's configuration (lpm scenarios NAME lists them); repeat for each",
        ),
        seed: int = typer.Option(0, "--seed", help="seed of the population and of every random draw"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        llm_url: str = llm_url_option(),
        llm_model: str = typer.Option(None, "--llm-model", help="served model name"),
        weights: Path = weights_option(),
        revision: str = revision_option(),
        api_key_env: str = typer.Option(
            "OPENAI_API_KEY", "--api-key-env", help="environment variable holding the API key"
        ),
        server: str = typer.Option(
            "vllm",
            "--server",
            help=f"kind of LLM server: {', '.join(SERVER_KINDS)} (the one lpm starts, or at --llm-url)",
        ),
        llm_mode: str = typer.Option("auto", "--llm-mode", help="auto, logprobs or sample"),
        scoring: str = scoring_option(),
        elicitation: str = elicitation_option(),
        cache: str = typer.Option("use", "--cache", help="response cache: use, refresh, off or replay"),
        llm_timeout: float = llm_timeout_option(),
        on_llm_failure: str = typer.Option(
            "error", "--on-llm-failure", help="error or heuristic (counted as fallbacks)"
        ),
        out: Path = typer.Option(
            None,
            "--out",
            "-o",
            help="run folder (default runs/<scenario>-<policy>-<time>; required under torchrun)",
        ),
        resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out"),
        nproc: int = typer.Option(
            1,
            "--nproc",
            help="processes to split the agents over (heuristic policy; one core each, or one GPU each with "
            "--device cuda; the same results as 1)",
        ),
    ) -> None:
        """Run a scenario on the NYC population and write its run folder (trajectory, decisions, plots, report)."""
        from lpm.errors import InputError
        from lpm.report import number
        from lpm.run import RunConfig, run

        config = RunConfig.build(
            scenario=scenario,
            policy=policy,
            agents=agents,
            seed=seed,
            start=parse_date(start, "--start"),
            steps=steps,
            days=days,
            weeks=weeks,
            months=months,
            scenario_config=parse_pairs(settings, "--set", "beta=0.05"),
            device=device,
            llm_url=llm_url,
            llm_model=llm_model,
            llm_weights=None if weights is None else str(weights),
            llm_revision=revision,
            api_key_env=api_key_env,
            server=server,
            llm_mode=llm_mode,
            llm_scoring=scoring,
            llm_elicitation=elicitation,
            cache=cache,
            on_llm_failure=on_llm_failure,
            llm_timeout=llm_timeout,
        )
        if out is None:
            if resume:
                raise InputError("--resume needs the --out folder of the run to continue")
            from lpm.distributed import torchrun_rank

            if torchrun_rank() is not None:  # each process would name the folder from its own clock
                raise InputError(
                    "--out: a run under torchrun needs its run folder named, the same on every node (the "
                    "default name holds the time, which each process reads from its own clock)",
                    hint="add --out runs/NAME to the command on every node",
                )
            name = config.make_scenario().name
            out = Path("runs") / f"{name}-{policy}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        result = run(
            config,
            out,
            resume=resume,
            nproc=nproc,
            on_server_start=lambda server: console.print(
                f"starting the local model server (a cache miss; logs: {server.log_path}) ..."
            ),
        )
        s = result.summary
        if s is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
        console.print(
            f"[bold]{s['scenario']}[/] · policy {s['policy']} · {s['agents']:,} agents · {s['steps']} "
            f"{s['step_unit']}s ({s['first_date']} .. {s['last_date']})"
        )
        console.print(
            f"wall {s['wall_seconds']:.1f} s, in steps {s['step_seconds']:.1f} s "
            f"({s['agent_steps_per_second']:,} agent-steps/s; {s['engine_agent_steps_per_second']:,} outside the policy); "
            f"LLM queries {s['llm_queries']}, "
            f"cache hits {s['cache_hits']}, tokens {s['tokens']:,}, fallbacks {s['fallbacks']}"
        )
        for key, value in (s.get("totals") or {}).items():
            console.print(f"total {key}: {value:,.0f}")
        for key, e in (s.get("real_error") or {}).items():
            console.print(
                f"{key} against the real series ({e['compared']}, {e['periods']} periods): mean abs. error "
                f"{e['mape_percent']}%, simulated {number(e['simulated'])} vs real {number(e['real'])} ({e['over']})"
            )
        for note in s.get("notes") or []:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        console.print(f"report: {result.folder / 'report.md'}")
