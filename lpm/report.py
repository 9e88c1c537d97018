"""Plots (PNG) and ``report.md`` of a run folder, drawn from the scenario's declarations.

Each :class:`lpm.scenarios.Plot` becomes one figure with a panel per label of its quantity's breakdown
(simulated solid, the real series dashed, further quantities lighter); every decision gets a panel in
``decisions.png`` (the probability of its plotted action per decision step, one line per label of the
spec's first attribute, the mean over archetypes weighted by their agents).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lpm.probe import decision_spread  # noqa: E402
from lpm.scenarios.base import compared_period  # noqa: E402

DECISIONS_PLOT = "decisions.png"


def number(x: float) -> str:
    """A figure for people: thousands separators for large values, four significant digits otherwise."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def real_error(scenario: Any, trajectory: pd.DataFrame, real: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """How far each quantity with a real series is from it, over the dates both cover.

    Daily quantities that are totals (flows such as reported cases) are compared as weekly sums (full weeks
    from the first step); others per step. Per quantity: ``periods`` compared, ``mape_percent`` (mean over
    periods × breakdown labels of |simulated − real| / real, where real > 0), ``rmse``, and the ``simulated``
    and ``real`` values over what was compared: their sums for totals, their means otherwise (``over``).
    """
    out: dict[str, dict[str, Any]] = {}
    for q in scenario.quantities:
        if not q.real or not len(real):
            continue
        keys = ["date", q.by] if q.by else ["date"]
        sim = trajectory[trajectory["quantity"].astype(str) == q.name][["step", *keys, "value"]]
        obs = real[real["quantity"].astype(str) == q.name][[*keys, "value"]]
        both = sim.merge(obs, on=keys, suffixes=("_sim", "_real"))
        if both.empty:
            continue
        weekly = compared_period(scenario, q) == 7
        if weekly:
            both = both.assign(period=both["step"] // 7)
            full = both.groupby("period")["step"].nunique()
            both = both[both["period"].isin(full[full == 7].index)]
            both = both.groupby(["period", *keys[1:]], observed=True)[["value_sim", "value_real"]].sum()
            both = both.reset_index()
        if both.empty:
            continue
        diff = both["value_sim"] - both["value_real"]
        positive = both["value_real"] > 0
        out[q.name] = {
            "compared": "weekly sums" if weekly else f"per {scenario.step_unit}",
            "periods": int(both["period" if weekly else "date"].nunique()),
            "mape_percent": round(
                float((diff[positive].abs() / both.loc[positive, "value_real"]).mean() * 100), 1
            ),
            "rmse": round(float((diff**2).mean() ** 0.5), 3),
            "over": "sum" if q.total else "mean",
            "simulated": round(float(both["value_sim"].sum() if q.total else both["value_sim"].mean()), 3),
            "real": round(float(both["value_real"].sum() if q.total else both["value_real"].mean()), 3),
        }
    return out


def plots(folder: Path, scenario: Any, result: Any) -> list[str]:
    """Write the run's PNG plots into ``folder``; returns their file names."""
    written = [_quantity_plot(folder, scenario, plot, result) for plot in scenario.plots]
    if len(result.decisions):
        written.append(_decisions_plot(folder, scenario, result))
    return written


def _quantity_plot(folder: Path, scenario: Any, plot: Any, result: Any) -> str:
    trajectory, real = result.trajectory, result.real
    by = scenario.quantity(plot.quantity).by
    groups: list[Any] = list(trajectory[by].cat.categories) if by else [None]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), sharex=True, squeeze=False)

    def part(frame: pd.DataFrame, quantity: str, group: Any) -> pd.DataFrame:
        rows = frame[frame["quantity"].astype(str) == quantity]
        return rows if group is None else rows[rows[by].astype(str) == str(group)]

    for ax, group in zip(axes[0], groups, strict=True):
        s = part(trajectory, plot.quantity, group)
        ax.plot(s["date"], s["value"], label=f"{plot.quantity} (simulated)", color="tab:blue")
        if len(real) and (by is None or by in real.columns):
            r = part(real, plot.quantity, group)
            if len(r):
                ax.plot(
                    r["date"],
                    r["value"],
                    label=f"{plot.quantity} (real)",
                    color="black",
                    alpha=0.7,
                    linestyle="--",
                )
        for other, color in zip(plot.also, ("tab:red", "tab:green", "tab:purple"), strict=False):
            o = part(trajectory, other, group)
            ax.plot(o["date"], o["value"], label=f"{other} (simulated)", color=color, alpha=0.5)
        ax.set_title(str(group) if group is not None else plot.quantity)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][0].set_ylabel(plot.ylabel)
    axes[0][-1].legend(fontsize=7)
    if plot.title:
        fig.suptitle(plot.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / plot.file, dpi=110)
    plt.close(fig)
    return plot.file


def _decisions_plot(folder: Path, scenario: Any, result: Any) -> str:
    decisions = result.decisions
    specs = {d.name: d for d in scenario.decisions}
    names = [n for n in decisions["decision"].cat.categories if n in specs]
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        decision = specs[name]
        action = decision.plot or decision.actions[0]
        d = decisions[(decisions["decision"] == name) & (decisions["action"] == action)]
        agents = result.archetypes[name]["agents"]
        d = d.assign(agents=d["archetype"].map(agents).astype(float))
        attributes = [c for c in result.archetypes[name].columns if c != "agents"]
        by = attributes[0] if attributes else None
        groups = d.groupby(by, observed=True, sort=True) if by else [(None, d)]
        for label, rows in groups:
            weighted = (rows["probability"] * rows["agents"]).groupby(rows["date"]).sum()
            mean = weighted / rows.groupby("date")["agents"].sum()
            ax.plot(mean.index, mean.to_numpy(), marker="o", label=None if label is None else str(label))
        if by:
            ax.legend(fontsize=7, ncol=2, title=by)
        ax.set_ylabel(f"P({action})")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: probability of '{action}' per decision step", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(folder / DECISIONS_PLOT, dpi=110)
    plt.close(fig)
    return DECISIONS_PLOT


def spread_section(spread: dict[str, Any], policy: str, specs: dict[str, str] | None = None) -> list[str]:
    """Lines of the report's "How much the decisions vary" section (:func:`lpm.probe.decision_spread`),
    with a warning for each decision whose probabilities are near-constant; it names the model only for
    the LLM policies. specs: each decision's archetype spec as ``lpm probe`` takes it (for the hint)."""
    decisions = spread.get("decisions") or {}
    if not decisions:
        return []
    threshold = spread["threshold"]
    lines = [
        "",
        "## How much the decisions vary",
        "",
        "Across archetypes: the mean over decision steps of the largest minus the smallest probability "
        "among the archetypes at a step. Across steps (the response to the situation): the largest minus the "
        "smallest archetype mean (unweighted) over the decision steps. Both are probabilities, 0 to 1.",
        "",
        "| decision | action | archetypes | decision steps | across archetypes | across steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in decisions.items():
        for action, a in d["actions"].items():
            steps = "-" if a["across_steps"] is None else f"{a['across_steps']:.3f}"
            lines.append(
                f"| {name} | {action} | {d['archetypes']:,} | {d['decision_steps']} "
                f"| {a['across_archetypes']:.3f} | {steps} |"
            )
    for name, d in decisions.items():
        if not d["near_constant"]:
            continue
        llm = policy != "heuristic"
        who = "The model's answers are" if llm else "The decisions are"
        reading = "the model's reading of the situation" if llm else "the situation"
        lines += [
            "",
            f"**Warning:** {who} near-constant: in {name} no action's probability varies by {threshold} or "
            f"more across the {d['archetypes']:,} archetypes or over the {d['decision_steps']} decision steps "
            f"(at most {d['largest']:.3f}); the run's behaviour barely depends on {reading}."
            + (
                f" `lpm probe {(specs or {}).get(name, 'SPEC')}` shows how the answers respond to each "
                "variable of the prompt."
                if llm
                else ""
            ),
        ]
    return lines


def write_report(
    folder: Path, config: Any, scenario: Any, summary: dict[str, Any], plots: list[str], result: Any
) -> Path:
    """A short Markdown report: configuration, summary figures, plots, decision modes, real-data sources."""
    lines = [
        f"# {summary['scenario']} run · policy {summary['policy']}",
        "",
        f"{scenario.description}" if scenario.description else "",
        "",
        f"{summary['agents']:,} agents, {summary['steps']} {summary['step_unit']}s "
        f"({summary['first_date']} to {summary['last_date']}), seed {config.seed}, device {config.device}.",
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
    ):
        if key in summary:
            value = summary[key]
            lines.append(f"| {key} | {value:,} |" if isinstance(value, int) else f"| {key} | {value} |")
    for name, k in (summary.get("archetypes") or {}).items():
        lines.append(f"| archetypes of decision {name} | {k:,} |")
    for key, value in (summary.get("totals") or {}).items():
        lines.append(f"| total {key} | {value:,.0f} |")
    if summary.get("llm"):
        llm = summary["llm"]
        lines += ["", f"Model: `{llm.get('model')}` at {llm.get('url')} (mode {llm.get('mode')})."]
        figures = llm.get("server_figures") or {}
        if figures:
            rate, speed = figures.get("prefix_cache_hit_rate"), figures.get("tokens_per_second")
            lines += [
                "",
                "Server, while this run waited for it: "
                f"{number(figures.get('prompt_tokens') or 0)} prompt and "
                f"{number(figures.get('generation_tokens') or 0)} generated tokens"
                + (f", {rate:.1%} of prompt tokens served from its prefix cache" if rate is not None else "")
                + (f", {speed:,.0f} tokens per second of waiting" if speed else "")
                + ".",
            ]
    sources = [(q.name, q.real) for q in scenario.quantities if q.real]
    if sources:
        lines += ["", "Real series: " + "; ".join(f"{name}: {src}" for name, src in sources) + "."]
    errors = summary.get("real_error") or {}
    if errors:
        lines += [
            "",
            "## Against the real series",
            "",
            "| quantity | compared | periods | mean abs. % error | RMSE | simulated | real | (over) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {name} | {e['compared']} | {e['periods']} | {e['mape_percent']} | {number(e['rmse'])} "
            f"| {number(e['simulated'])} | {number(e['real'])} | {e['over']} |"
            for name, e in errors.items()
        ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    decisions = result.decisions
    if len(decisions):
        modes = (
            decisions.drop_duplicates(["step", "decision", "archetype"])
            .groupby(["decision", "mode"], observed=True)
            .size()
        )
        lines += ["", "## Decisions", "", "| decision | mode | archetype decisions |", "| --- | --- | --- |"]
        lines += [f"| {d} | {m} | {int(c):,} |" for (d, m), c in modes.items()]
        specs = {d.name: str(d.spec) for d in scenario.decisions if isinstance(d.spec, str | Path)}
        spread = summary.get("decision_spread") or decision_spread(decisions)
        lines += spread_section(spread, summary["policy"], specs)
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(
            {"run": config.model_dump(mode="json"), "scenario": scenario.config.model_dump(mode="json")},
            indent=2,
        ),
        "```",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
