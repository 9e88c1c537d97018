"""``lpm compare SCENARIO --policies heuristic,llm --seeds 0,1``: policies side by side against the real data."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer

from lpm.cli.display import console
from lpm.cli.options import (
    elicitation_option,
    llm_timeout_option,
    llm_url_option,
    parse_date,
    parse_list,
    parse_pairs,
    revision_option,
    scoring_option,
    weights_option,
)
from lpm.server_kind import SERVER_KINDS


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_command(
        scenario: str = typer.Argument(
            ..., help="a scenario: a name from `lpm scenarios`, or path/to/file.py:Class"
        ),
        policies: str = typer.Option(
            "heuristic,llm", "--policies", help="comma-separated: heuristic, llm, agent-llm"
        ),
        seeds: str = typer.Option("0", "--seeds", help="comma-separated paired seeds, e.g. 0,1,2"),
        agents: int = typer.Option(None, "--agents", "-n", help="agents (default: the whole city)"),
        start: str = typer.Option(None, "--start", help="date of the first step, YYYY-MM-DD"),
        steps: int = typer.Option(
            None, "--steps", help="steps to simulate (default: the scenario's horizon)"
        ),
        days: int = typer.Option(None, "--days", help="or the horizon in days"),
        weeks: int = typer.Option(None, "--weeks", help="or in weeks"),
        months: int = typer.Option(None, "--months", help="or in calendar months"),
        test: str = typer.Option(
            None,
            "--test",
            metavar="START:END",
            help="the window the error is computed on (default: the whole run)",
        ),
        settings: list[str] = typer.Option(
            [],
            "--set",
            metavar="NAME=VALUE",
            help="a setting of the scenario's configuration; repeat for each",
        ),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        llm_url: str = llm_url_option(),
        llm_model: str = typer.Option(None, "--llm-model", help="served model name"),
        weights: Path = weights_option(),
        revision: str = revision_option(),
        api_key_env: str = typer.Option(
            "OPENAI_API_KEY", "--api-key-env", help="variable holding the API key"
        ),
        server: str = typer.Option("vllm", "--server", help=f"kind of LLM server: {', '.join(SERVER_KINDS)}"),
        llm_mode: str = typer.Option("auto", "--llm-mode", help="auto, logprobs or sample"),
        scoring: str = scoring_option(),
        elicitation: str = elicitation_option(),
        cache: str = typer.Option("use", "--cache", help="response cache: use, refresh, off or replay"),
        llm_timeout: float = llm_timeout_option(),
        granularity: bool = typer.Option(
            False, "--granularity", help="also sweep the archetype granularity (LLM policy, small population)"
        ),
        granularity_agents: int = typer.Option(500, "--granularity-agents", help="agents of the sweep"),
        audit: int = typer.Option(0, "--audit", help="shadow audit on this many random agents (0: none)"),
        audit_extra: str = typer.Option(
            "age,zip", "--audit-extra", help="columns the per-agent prompt adds ('' : none, the control)"
        ),
        out: Path = typer.Option(None, "--out", "-o", help="folder (default runs/compare-<scenario>-<time>)"),
    ) -> None:
        """Run a scenario under each policy with paired seeds; report error against the real data and cost."""
        from lpm.compare import CompareConfig, audit_lines, compare, granularity_table, parse_window, table

        config = CompareConfig.build(
            scenario=scenario,
            policies=parse_list(policies, "--policies"),
            seeds=parse_list(seeds, "--seeds", int),
            agents=agents,
            start=parse_date(start, "--start"),
            steps=steps,
            days=days,
            weeks=weeks,
            months=months,
            scenario_config=parse_pairs(settings, "--set", "beta=0.05"),
            test=parse_window(test),
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
            llm_timeout=llm_timeout,
            granularity=granularity,
            granularity_agents=granularity_agents,
            audit=audit,
            audit_extra=parse_list(audit_extra, "--audit-extra"),
        )
        if out is None:
            name = Path(scenario.split(":")[0]).stem
            out = Path("runs") / f"compare-{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"

        def on_run(r: dict) -> None:
            errors = ", ".join(f"{q} MAPE {e['mape_percent']}%" for q, e in r["error"].items())
            console.print(
                f"{r['policy']} · seed {r['seed']}: wall {r['wall_seconds']:.1f} s, LLM queries {r['llm_queries']:,}, "
                f"cache hits {r['cache_hits']:,}, tokens {r['tokens']:,}; {errors} (test window) -> {r['folder']}",
                soft_wrap=True,
            )

        def on_point(p: dict) -> None:
            errors = ", ".join(f"{q} MAPE {e['mape_percent']}%" for q, e in p["error"].items())
            console.print(
                f"granularity {p['granularity']}: {p['archetypes']:,} archetypes, queries {p['asked']:,} "
                f"(sent {p['sent']:,}); {errors}",
                soft_wrap=True,
            )

        result = compare(
            config,
            out,
            on_run=on_run,
            on_point=on_point,
            on_server_start=lambda s: console.print(
                f"starting the local model server (a cache miss; logs: {s.log_path}) ..."
            ),
        )
        console.print(
            f"\n{result['scenario']} · {result['agents']:,} agents · {result['steps']} {result['step_unit']}s "
            f"({result['first_date']} .. {result['last_date']}) · test window {result['test']['first']} .. "
            f"{result['test']['last']} · mean ± sd over seeds {config.seeds}",
            soft_wrap=True,
        )
        for line in table(result):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        if result.get("granularity"):
            console.print("")
            for line in granularity_table(result["granularity"]):
                console.print(line, highlight=False, soft_wrap=True, markup=False)
        if result.get("audit"):
            console.print("")
            for line in audit_lines(result["audit"]):
                console.print(f"shadow audit, {line}", highlight=False, soft_wrap=True, markup=False)
        console.print(f"report: {Path(out) / 'report.md'}")
