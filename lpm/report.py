"""Plots (PNG) and ``report.md`` of a run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

#: What each scenario plots against the real series, and how it is labelled.
MAIN_PLOT = {
    "covid": ("reported_cases", "reported cases per day", "cases.png"),
    "labor": ("unemployment_rate", "unemployment rate, %", "unemployment.png"),
}
#: The action whose probability the decisions plot shows.
PLOTTED_ACTION = {"covid": "isolate", "labor": "stay home"}


def plots(
    folder: Path, scenario: str, trajectory: pd.DataFrame, real: pd.DataFrame, decisions: pd.DataFrame
) -> list[str]:
    """Write the run's PNG plots into ``folder``; returns their file names."""
    written = []
    quantity, ylabel, name = MAIN_PLOT[scenario]
    boroughs = (
        list(trajectory["borough"].cat.categories)
        if hasattr(trajectory["borough"], "cat")
        else sorted(trajectory["borough"].unique())
    )
    fig, axes = plt.subplots(1, len(boroughs), figsize=(4 * len(boroughs), 3.4), sharex=True)
    sim = trajectory[trajectory["quantity"] == quantity]
    real_q = real[real["quantity"] == quantity] if len(real) else real
    for ax, borough in zip(axes, boroughs, strict=True):
        s = sim[sim["borough"] == borough]
        ax.plot(s["date"], s["value"], label="simulated", color="tab:blue")
        if len(real_q):
            r = real_q[real_q["borough"].astype(str) == str(borough)]
            ax.plot(
                r["date"],
                r["value"],
                label="real (scaled to N)" if scenario == "covid" else "real",
                color="black",
                alpha=0.7,
                linestyle="--",
            )
        if scenario == "covid":
            inf = trajectory[(trajectory["quantity"] == "infections") & (trajectory["borough"] == borough)]
            ax.plot(inf["date"], inf["value"], label="infections (simulated)", color="tab:red", alpha=0.5)
        ax.set_title(str(borough))
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    written.append(name)

    if len(decisions):
        action = PLOTTED_ACTION.get(scenario, decisions["action"].iloc[0])
        d = decisions[decisions["action"] == action]
        by = "age_group" if "age_group" in d.columns else None
        fig, ax = plt.subplots(figsize=(7, 3.6))
        if by:
            for label, part in d.groupby(by, observed=True, sort=False):
                mean = part.groupby("date")["probability"].mean()
                ax.plot(mean.index, mean.to_numpy(), marker="o", label=str(label))
            ax.legend(fontsize=7, ncol=2, title=by)
        else:
            mean = d.groupby("date")["probability"].mean()
            ax.plot(mean.index, mean.to_numpy(), marker="o")
        ax.set_ylabel(f"P({action})")
        ax.set_ylim(0, 1)
        ax.set_title(f"probability of '{action}' per decision step (mean over archetypes)")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        fig.tight_layout()
        fig.savefig(folder / "decisions.png", dpi=110)
        plt.close(fig)
        written.append("decisions.png")
    return written


def write_report(
    folder: Path, config: Any, summary: dict[str, Any], plots: list[str], decisions: pd.DataFrame
) -> Path:
    """A short Markdown report: configuration, summary figures, plots, decision modes."""
    lines = [
        f"# {summary['scenario']} run · policy {summary['policy']}",
        "",
        f"{summary['agents']:,} agents, {summary['steps']} steps ({summary['first_date']} to {summary['last_date']}), "
        f"seed {config.seed}, device {config.device}.",
        "",
        "## Summary",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    for key in (
        "wall_seconds",
        "step_seconds",
        "decide_seconds",
        "agent_steps_per_second",
        "llm_queries",
        "cache_hits",
        "tokens",
        "fallbacks",
        "archetypes",
    ):
        if key in summary:
            value = summary[key]
            lines.append(f"| {key} | {value:,} |" if isinstance(value, int) else f"| {key} | {value} |")
    for key, value in (summary.get("totals") or {}).items():
        lines.append(f"| total {key} | {value:,.0f} |")
    if summary.get("llm"):
        lines += [
            "",
            f"Model: `{summary['llm'].get('model')}` at {summary['llm'].get('url')} (mode {summary['llm'].get('mode')}).",
        ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if len(decisions):
        modes = decisions.drop_duplicates(["step", "archetype"]).groupby("mode").size()
        lines += ["", "## Decisions", "", "| mode | archetype decisions |", "| --- | --- |"]
        lines += [f"| {m} | {int(c):,} |" for m, c in modes.items()]
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(config.model_dump(mode="json"), indent=2),
        "```",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
