"""``lpm sensitivity SCENARIO``: derivatives of outcomes by autograd next to finite differences, a table and a
tornado plot."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer

from lpm.cli.display import console, frame_table
from lpm.cli.options import parse_date, parse_list, parse_pairs
from lpm.paths import check_new_folder, make_folder
from lpm.sampling import DEFAULT_ESTIMATOR


def register(app: typer.Typer) -> None:
    @app.command("sensitivity")
    def sensitivity_command(
        scenario: str = typer.Argument(
            ..., help="a scenario: a name from `lpm scenarios`, or path/to/file.py:ClassName"
        ),
        agents: int = typer.Option(50_000, "--agents", "-n", help="agents of the synthetic population"),
        seeds: str = typer.Option(
            "0,1,2,3",
            "--seeds",
            help="comma-separated seeds: one autograd run and the finite differences each",
        ),
        population_seed: int = typer.Option(0, "--population-seed", help="seed of the population"),
        start: str = typer.Option(
            None, "--start", help="date of the first step, YYYY-MM-DD (default: the scenario's)"
        ),
        steps: int = typer.Option(
            None, "--steps", help="steps to simulate (default: the scenario's horizon)"
        ),
        days: int = typer.Option(None, "--days", help="or the horizon in days"),
        weeks: int = typer.Option(None, "--weeks", help="or in weeks"),
        months: int = typer.Option(None, "--months", help="or in calendar months"),
        outcomes: str = typer.Option(
            None,
            "--outcomes",
            help="comma-separated KIND:QUANTITY, kinds total, peak, peak_week (peak_month), final "
            "(default: the scenario's, e.g. total, peak and peak_week of reported_cases for covid)",
        ),
        parameters: str = typer.Option(
            None,
            "--parameters",
            help="comma-separated learnable parameters or offsets.DECISION:ACTION (default: every learnable one)",
        ),
        settings: list[str] = typer.Option(
            [],
            "--set",
            metavar="NAME=VALUE",
            help="a setting of the scenario's configuration (the point the derivatives are taken at); repeat",
        ),
        rel_step: float = typer.Option(
            0.05, "--rel-step", help="finite difference step, a share of each parameter's value"
        ),
        offset_step: float = typer.Option(0.2, "--offset-step", help="finite difference step of an offset"),
        estimator: str = typer.Option(
            DEFAULT_ESTIMATOR,
            "--estimator",
            help="auto (pruned for covid, expected for labor), pruned, households, expected, bernoulli or mean-field",
        ),
        replay: bool = typer.Option(
            False,
            "--replay",
            help="the finite differences replay each seed's base-run decisions (held fixed, as in autograd)",
        ),
        temperature: float = typer.Option(
            0.1, "--temperature", help="of the soft-argmax of peak_week / peak_month (on log values)"
        ),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        out: Path = typer.Option(
            None, "--out", "-o", help="output folder (default runs/sensitivity-<scenario>-<time>)"
        ),
    ) -> None:
        """Derivatives of outcomes (total, peak, peak date, final value) with respect to each parameter, by
        autograd and by finite differences (common random numbers), under the heuristic policy; writes
        sensitivity.csv, sensitivity.md and tornado.png."""
        from lpm.errors import InputError
        from lpm.population import Population
        from lpm.scenarios import make_scenario
        from lpm.sensitivity import markdown, sensitivity, tornado

        seed_list = parse_list(seeds, "--seeds", int)
        if agents < 1:
            raise InputError(f"--agents must be >= 1, got {agents}")
        values = parse_pairs(settings, "--set", "beta=0.05")
        if "start" in values:
            raise InputError("give the start date with --start, not --set start=…")
        if start:
            values["start"] = parse_date(start, "--start")
        base = make_scenario(scenario, values)
        horizon = base.steps_for(steps=steps, days=days, weeks=weeks, months=months)
        folder = out or Path("runs") / f"sensitivity-{base.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        check_new_folder(folder)
        pop = Population.synthesize("nyc", agents=agents, seed=population_seed)
        frame = sensitivity(
            lambda kw: make_scenario(scenario, {**values, **kw}),
            pop,
            outcomes=parse_list(outcomes, "--outcomes") or None,
            steps=horizon,
            seeds=seed_list,
            parameters=parse_list(parameters, "--parameters") or None,
            rel_step=rel_step,
            offset_step=offset_step,
            estimator=estimator,
            replay=replay,
            temperature=temperature,
            device=device,
        )
        make_folder(folder, field="--out")
        frame.to_csv(folder / "sensitivity.csv", index=False)
        (folder / "sensitivity.md").write_text(markdown(frame))
        tornado(frame, folder / "tornado.png")
        a = frame.attrs
        console.print(
            f"[bold]{a['scenario']}[/] · {a['agents']:,} agents · {a['steps']} {a['step_unit']}s from "
            f"{a['start']} · seeds {', '.join(map(str, a['seeds']))} · estimator {a['estimator']}"
        )
        console.print(f"note: {a['note']}.", highlight=False)
        for name, rows in frame.groupby("outcome", sort=False):
            shown = _shown(rows)
            first = rows.iloc[0]
            title = f"{name} = {first['outcome_value']:.4g} ± {first['outcome_sd']:.2g}"
            if isinstance(first["peak_date"], str):
                title += f" (hard peak: period from {first['peak_date']})"
            console.print(frame_table(shown, title=title, floats="{:.4g}"))
        console.print(f"table: {folder / 'sensitivity.md'} · plot: {folder / 'tornado.png'}")


def _shown(rows):
    """One outcome's rows for the console: by |elasticity|, autograd and finite difference with their SD."""
    import numpy as np

    rows = rows.assign(m=rows["elasticity"].abs()).sort_values("m", ascending=False, kind="stable")
    return rows.assign(
        autograd=[f"{g:.4g} ± {s:.2g}" for g, s in zip(rows["autograd"], rows["autograd_sd"], strict=True)],
        fd=[f"{g:.4g} ± {s:.2g}" for g, s in zip(rows["fd"], rows["fd_sd"], strict=True)],
        ratio=[f"{r:.3f}" if np.isfinite(r) else "–" for r in rows["ratio"]],
        elasticity=[f"{e:+.3g}" for e in rows["elasticity"]],
    )[["parameter", "value", "autograd", "fd", "ratio", "elasticity"]].rename(
        columns={"fd": "finite difference"}
    )
