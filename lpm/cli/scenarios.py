"""``lpm scenarios [REF …]``: the scenarios lpm can run, and what each declares."""

from __future__ import annotations

import pandas as pd
import typer

from lpm.cli.display import console, frame_table


def register(app: typer.Typer) -> None:
    @app.command("scenarios")
    def scenarios(
        refs: list[str] = typer.Argument(
            None, help="scenarios to describe in full: names, or path/to/file.py:ClassName"
        ),
    ) -> None:
        """List the built-in and installed scenarios, or describe the ones named."""
        from lpm.scenarios import available_scenarios, scenario_class

        if not refs:
            rows = []
            for name, origin in available_scenarios().items():
                cls = scenario_class(name)
                rows.append(
                    {
                        "scenario": name,
                        "step": cls.step_unit,
                        "horizon": cls.horizon,
                        "decisions": ", ".join(d.name for d in cls.decisions) or "-",
                        "real data": ", ".join(q.name for q in cls.quantities if q.real) or "-",
                        "from": origin,
                        "description": cls.description,
                    }
                )
            console.print(frame_table(pd.DataFrame(rows), title="scenarios"))
            console.print("a scenario of your own: lpm run path/to/file.py:ClassName (see the README)")
            return
        for ref in refs:
            describe(scenario_class(ref))


def describe(cls) -> None:
    """Print what a scenario class declares."""
    console.print(f"[bold]{cls.name}[/] ({cls.where()})")
    if cls.description:
        console.print(f"  {cls.description}")
    console.print(f"  steps: one {cls.step_unit} each, {cls.horizon} by default")
    ranges = cls.parameter_ranges()
    calibrated = cls.calibrated_defaults()
    if calibrated:
        console.print(f"  calibrated defaults: {cls.calibration_path()} (the literature value in brackets)")
    params = pd.DataFrame(
        [
            {
                "parameter": name,
                "default": f"{calibrated[name]:.4g} ({info.default})"
                if name in calibrated
                else str(info.default),
                "learnable": f"{ranges[name][0]:g} .. {ranges[name][1]:g}" if name in ranges else "",
                "description": info.description or "",
            }
            for name, info in cls.Config.model_fields.items()
        ]
    )
    console.print(frame_table(params, title="configuration (lpm run … --set NAME=VALUE)"))
    quantities = pd.DataFrame(
        [
            {
                "quantity": q.name,
                "by": q.by or "-",
                "total": q.total,
                "real series": q.real or "-",
                "description": q.description,
            }
            for q in cls.quantities
        ]
    )
    console.print(frame_table(quantities, title="recorded quantities"))
    specs = cls.specs()
    decisions = pd.DataFrame(
        [
            {
                "decision": d.name,
                "spec": specs[d.name].name,
                "attributes": ", ".join(specs[d.name].attribute_names),
                "actions": ", ".join(d.actions),
                "cadence": specs[d.name].cadence.value,
                "heuristic rules": ", ".join(d.heuristic),
            }
            for d in cls.decisions
        ]
    )
    if len(decisions):
        console.print(frame_table(decisions, title="decisions"))
