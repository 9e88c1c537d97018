"""Comparison of policies: one scenario under each policy with paired seeds, judged against the real data.

:func:`compare` runs :func:`lpm.run.run` once per policy and seed into ``<out>/<policy>-seed<S>/`` (the same
seed gives every policy the same population and the same random numbers), computes each run's error against
the real series on the test window, and writes ``compare.json`` (every figure), ``report.md`` (the table,
mean ± sd over seeds) and ``compare-<quantity>.png`` (per breakdown label: each policy's mean over seeds with
its min–max band, the real series dashed). Optionally it sweeps the archetype granularity
(:func:`lpm.audit.granularity_sweep`, ``granularity.png``) and runs the shadow audit
(:func:`lpm.audit.shadow_audit`).

Every LLM run, the sweep and the audit share one model server: the one at ``llm_url``, or a local one that
:class:`SharedModel` starts at the first cache miss and stops at the end. An LLM run under ``cache="use"`` is
first tried from the cache alone (``replay``); at its first miss it is run again, against the server.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from lpm.decoding import DEFAULT_SCORING
from lpm.errors import CacheMissError, InputError, LpmError, validation_message
from lpm.paths import check_new_folder, make_folder
from lpm.run import CacheMode, PolicyName, RunConfig, RunOutput, run

__all__ = ["CompareConfig", "SharedModel", "compare", "parse_window", "window_error"]

#: The figures of a run that the table reports (from its summary).
COST_KEYS = ("llm_queries", "cache_hits", "tokens", "wall_seconds")
LLM_POLICIES = ("llm", "agent-llm")


def parse_window(text: str | None) -> tuple[dt.date, dt.date] | None:
    """``"2020-04-01:2020-04-30"`` -> the two dates (both included); None stays None (the parser of
    ``lpm calibrate``'s windows, :meth:`lpm.calibration.Window.parse`)."""
    if text is None:
        return None
    from lpm.calibration import Window

    window = Window.parse(text, "--test")
    return window.first.date(), window.last.date()


class CompareConfig(BaseModel):
    """Everything that determines a comparison; saved in ``compare.json``."""

    model_config = ConfigDict(extra="forbid")
    scenario: str = Field(min_length=1, description="a scenario name or path/to/file.py:ClassName")
    policies: list[PolicyName] = Field(min_length=1, description="the policies compared, in table order")
    seeds: list[int] = Field(default=[0], min_length=1, description="paired seeds: every policy runs each")
    agents: int | None = Field(default=None, gt=0, description="agents (default: the whole city)")
    start: dt.date | None = None
    steps: int | None = Field(default=None, gt=0)
    days: int | None = Field(default=None, gt=0)
    weeks: int | None = Field(default=None, gt=0)
    months: int | None = Field(default=None, gt=0)
    scenario_config: dict[str, Any] = Field(default_factory=dict)
    test: tuple[dt.date, dt.date] | None = Field(
        default=None, description="the window the error is computed on, both dates included (default: all)"
    )
    device: str = "cpu"
    llm_url: str | None = None
    llm_model: str | None = None
    llm_weights: str | None = None
    llm_revision: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    server: str = "vllm"
    llm_mode: str = "auto"
    llm_scoring: str = DEFAULT_SCORING
    llm_elicitation: str = "choice"
    cache: CacheMode = "use"
    llm_timeout: float = Field(
        default=60.0, gt=0, description="seconds to wait for one model request's answer"
    )
    granularity: bool = Field(default=False, description="also sweep the archetype granularity")
    granularity_agents: int = Field(default=500, gt=0, le=5000, description="agents of the sweep")
    audit: int = Field(default=0, ge=0, description="agents of the shadow audit (0: no audit)")
    audit_extra: list[str] = Field(
        default=["age", "zip"], description="columns the per-agent prompt adds to the archetype's"
    )

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        for name, values in (("policies", self.policies), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"--{name} repeats an entry: {values}")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be >= 0, got {self.seeds}")
        if (self.llm_url or self.llm_model or self.llm_weights or self.llm_revision) and not self.uses_llm:
            raise ValueError(
                "--llm-url/--llm-model/--model/--model-revision need an LLM policy (llm, agent-llm), "
                "--granularity or --audit"
            )
        return self

    @field_serializer("llm_url")
    def _redacted(self, url: str | None) -> str | None:
        from lpm.endpoint import redact_url

        return redact_url(url)  # a URL's credentials never reach a file

    @classmethod
    def build(cls, **values: Any) -> CompareConfig:
        try:
            return cls(**values)
        except ValidationError as exc:
            raise InputError(validation_message(exc, noun="compare option", top="compare options")) from None

    @property
    def uses_llm(self) -> bool:
        return bool(set(self.policies) & set(LLM_POLICIES)) or self.granularity or self.audit > 0

    def run_config(self, policy: str, seed: int, **update: Any) -> RunConfig:
        """The :class:`RunConfig` of one run (validated: a bad option is an :class:`InputError`)."""
        values: dict[str, Any] = dict(
            scenario=self.scenario,
            policy=policy,
            agents=self.agents,
            seed=seed,
            start=self.start,
            steps=self.steps,
            days=self.days,
            weeks=self.weeks,
            months=self.months,
            scenario_config=self.scenario_config,
            device=self.device,
            server=self.server,
            llm_mode=self.llm_mode,
            llm_scoring=self.llm_scoring,
            llm_elicitation=self.llm_elicitation,
            cache=self.cache,
            api_key_env=self.api_key_env,
            llm_timeout=self.llm_timeout,
        )
        return RunConfig.build(**(values | update))


class SharedModel:
    """The one model every LLM run, the sweep and the audit of a comparison ask (:class:`lpm.endpoint.Endpoint`).

    The server at ``config.llm_url``; with ``cache="replay"`` none (every answer must be cached); else a
    local :class:`lpm.server.ModelServer` started at the first cache miss (``on_start(server)`` just before)
    and stopped by :meth:`close`. Every run and request names the model the same way in its cache keys.
    A comparison that asks no model resolves none (``endpoint`` None).
    """

    def __init__(self, config: CompareConfig, on_start: Callable[[Any], None] | None = None):
        from lpm.endpoint import Endpoint

        self.config = config
        self.on_start = on_start
        self.endpoint = Endpoint.for_config(config) if config.uses_llm else None
        self.startup_seconds: float | None = None

    @property
    def running(self) -> bool:
        return self.endpoint is not None and self.endpoint.live_url() is not None

    def info(self) -> dict[str, Any]:
        """What compare.json records of the model (no key, no credentials)."""
        record = self.endpoint.info() if self.endpoint is not None else {"url": None, "model": None}
        return record | {"local_server_started": self.startup_seconds is not None}

    def start(self) -> None:
        """Start the local server now (nothing when there is none or it runs)."""
        local = self.endpoint.local if self.endpoint is not None else None
        if local is not None and not local.running:
            if self.on_start is not None:
                self.on_start(local)
            local.start()
            self.startup_seconds = local.startup_seconds

    def backend(self) -> Any:
        """A backend for the sweep and the audit (a local server starts at its first request)."""
        return self.endpoint.backend(self.on_start)

    def decider(self, per_agent: bool) -> Any:
        from lpm.cache import ResponseCache
        from lpm.decision import Decider
        from lpm.endpoint import default_mode

        return Decider(
            self.backend(),
            ResponseCache(mode=self.config.cache),
            mode=default_mode(self.config.llm_mode, self.config.server),
            scoring=self.config.llm_scoring,
            elicitation=self.config.llm_elicitation,
            progress=False,
            per_agent=per_agent,
        )

    def run(self, config: RunConfig, out: Path, **options: Any) -> tuple[RunOutput, bool]:
        """``lpm.run.run`` of an LLM ``config`` against this model; returns the output and whether every
        answer came from the cache alone (a replay run)."""
        assert self.endpoint is not None, "a comparison with an LLM policy resolves its model"
        config = config.model_copy(
            update={
                "llm_url": self.endpoint.url,
                "llm_model": self.endpoint.model,
                "llm_weights": self.config.llm_weights,
                "llm_revision": self.config.llm_revision,
            }
        )
        options = options | {"endpoint": self.endpoint}
        if self.config.cache == "replay":
            try:
                return run(config, out, **options), True
            except CacheMissError as exc:
                shutil.rmtree(out, ignore_errors=True)
                raise InputError(
                    f"--cache replay: policy {config.policy} (seed {config.seed}) needs decisions the cache does "
                    f"not hold: {exc}",
                    hint="run the comparison once with --cache use (and a model server) to fill the cache",
                ) from None
        if not self.running and self.config.cache == "use":
            try:  # from the cache alone (quietly): no server needed if every answer is there
                quiet = options | {"progress": False}
                return run(config.model_copy(update={"cache": "replay"}), out, **quiet), True
            except CacheMissError:
                shutil.rmtree(out, ignore_errors=True)
        self.start()
        return run(config, out, **options), False

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()


def _within(frame: pd.DataFrame, window: tuple[dt.date, dt.date]) -> pd.DataFrame:
    dates = frame["date"].dt.date
    return frame[(dates >= window[0]) & (dates <= window[1])]


def window_error(
    scenario: Any, trajectory: pd.DataFrame, real: pd.DataFrame, window: tuple[dt.date, dt.date]
) -> dict[str, dict[str, Any]]:
    """:func:`lpm.report.real_error` on the steps of ``window`` only (weekly sums count full weeks from the
    window's first step)."""
    from lpm.report import real_error

    part = _within(trajectory, window)
    if part.empty:
        return {}
    part = part.assign(step=part["step"] - part["step"].min())
    return real_error(scenario, part, _within(real, window) if len(real) else real)


def _stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def compare(
    config: CompareConfig,
    out: str | Path,
    *,
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    on_server_start: Callable[[Any], None] | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every policy with every seed, then the optional sweep and audit; write the comparison folder
    ``out`` and return what ``compare.json`` holds.

    on_run(figures) after each run (policy, seed, folder, costs, test-window error); on_server_start(server)
    before the local model server starts; on_point(row) after each point of the granularity sweep.
    """
    started = time.perf_counter()
    folder = Path(out)
    scenario = config.run_config(config.policies[0], config.seeds[0]).make_scenario()  # validates
    configs = {(p, s): config.run_config(p, s) for s in config.seeds for p in config.policies}
    steps = next(iter(configs.values())).steps_for(scenario)
    first, last = scenario.date(0).date(), scenario.date(steps - 1).date()
    window = config.test or (first, last)
    if window[0] < first or window[1] > last:
        raise InputError(
            f"--test {window[0]}:{window[1]}: the window must lie within the run, {first} to {last}",
            hint="change --test, or the run's --start and horizon",
        )
    if not [q for q in scenario.quantities if q.real]:
        raise InputError(
            f"{type(scenario).where()}: no quantity has a real series to compare policies against"
        )
    _check_agent_llm(config, scenario)
    check_new_folder(folder, what="the comparison folder")
    make_folder(folder, field="--out")

    runs: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int], RunOutput] = {}
    with _shared(config, on_server_start) as model:
        for seed in config.seeds:
            for policy in config.policies:
                rc = configs[(policy, seed)]
                sub = folder / f"{policy}-seed{seed}"
                options = {"progress": progress, "on_server_start": on_server_start}
                try:
                    if policy in LLM_POLICIES:
                        output, replayed = model.run(rc, sub, **options)
                    else:
                        output, replayed = run(rc, sub, **options), False
                except LpmError as exc:
                    if outputs:  # say what the stopped comparison leaves, and why the folder is not reused
                        kept = ", ".join(f"{p}-seed{s}" for p, s in outputs)
                        exc.hint = (exc.hint + "; " if exc.hint else "") + (
                            f"the comparison stopped: {folder} keeps the finished runs ({kept}) and no "
                            "compare.json; start it again with another --out"
                        )
                    raise
                outputs[(policy, seed)] = output
                s = output.summary
                figures = {
                    "policy": policy,
                    "seed": seed,
                    "folder": sub.name,
                    "from_cache_alone": replayed,
                    **{k: s[k] for k in COST_KEYS},
                    "archetypes": s["archetypes"],
                    "totals": s["totals"],
                    "error": window_error(scenario, output.result.trajectory, output.result.real, window),
                }
                runs.append(figures)
                if on_run is not None:
                    on_run(figures)
        granularity = audit = None
        if config.granularity:
            granularity = _granularity(config, scenario, steps, window, model, on_point)
        if config.audit:
            audit = _audit(config, scenario, steps, model)
        server = model.info() | {"startup_seconds": model.startup_seconds}
    result = {
        "config": config.model_dump(mode="json"),
        "scenario": scenario.name,
        "agents": int(next(iter(outputs.values())).summary["agents"]),
        "steps": steps,
        "step_unit": scenario.step_unit,
        "first_date": str(first),
        "last_date": str(last),
        "test": {"first": str(window[0]), "last": str(window[1])},
        "real": {q.name: q.real for q in scenario.quantities if q.real},
        "runs": runs,
        "policies": _per_policy(config, runs),
        "server": server if config.uses_llm else None,
        "granularity": granularity,
        "audit": audit,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    plots = _overlay_plots(folder, scenario, config, outputs, window)
    if granularity:
        plots.append(_granularity_plot(folder, granularity))
    result["plots"] = plots
    (folder / "compare.json").write_text(json.dumps(result, indent=2))
    (folder / "report.md").write_text(report_markdown(result))
    return result


@contextmanager
def _shared(config: CompareConfig, on_start: Callable[[Any], None] | None) -> Iterator[SharedModel]:
    model = SharedModel(config, on_start)
    try:
        yield model
    finally:
        model.close()


def _check_agent_llm(config: CompareConfig, scenario: Any) -> None:
    """The per-agent policy asks once per deciding agent: refuse more than it takes before any run."""
    if "agent-llm" not in config.policies:
        return
    from lpm.policy import AgentLLMPolicy
    from lpm.population import Population

    limit = AgentLLMPolicy.__dataclass_fields__["max_agents"].default
    pop = Population.synthesize("nyc", agents=config.agents, seed=config.seeds[0])
    for name, spec in scenario.specs().items():
        members = int((spec.group(pop).ids >= 0).sum())
        if members > limit:
            raise InputError(
                f"--policies agent-llm asks the model once per agent; {members:,} agents decide under "
                f"{name!r}, more than its limit of {limit:,}",
                hint="give --agents small enough, or leave agent-llm out",
            )


def _per_policy(config: CompareConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy in config.policies:
        mine = [r for r in runs if r["policy"] == policy]
        quantities = sorted({q for r in mine for q in r["error"]})
        out[policy] = {
            "seeds": [r["seed"] for r in mine],
            "error": {
                q: {
                    "compared": mine[0]["error"][q]["compared"],
                    "periods": mine[0]["error"][q]["periods"],
                    "mape_percent": _stats([r["error"][q]["mape_percent"] for r in mine]),
                    "rmse": _stats([r["error"][q]["rmse"] for r in mine]),
                }
                for q in quantities
            },
            "totals": {q: _stats([r["totals"][q] for r in mine]) for q in mine[0]["totals"]},
            **{k: _stats([float(r[k]) for r in mine]) for k in COST_KEYS},
        }
    return out


def _granularity(
    config: CompareConfig,
    scenario: Any,
    steps: int,
    window: tuple[dt.date, dt.date],
    model: SharedModel,
    on_point: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    from lpm.audit import granularity_sweep
    from lpm.population import Population

    pop = Population.synthesize("nyc", agents=config.granularity_agents, seed=config.seeds[0])
    return granularity_sweep(
        scenario,
        pop,
        model.decider,
        steps=steps,
        seed=config.seeds[0],
        error=lambda result: window_error(scenario, result.trajectory, result.real, window),
        device=config.device,
        on_point=on_point,
    )


def _audit(config: CompareConfig, scenario: Any, steps: int, model: SharedModel) -> dict[str, Any]:
    from lpm.audit import shadow_audit
    from lpm.population import Population

    pop = Population.synthesize("nyc", agents=config.agents, seed=config.seeds[0])
    extra = tuple(config.audit_extra)
    return {
        "seed": config.seeds[0],
        "agents_asked": config.audit,
        **shadow_audit(
            scenario,
            pop,
            model.decider(False),
            model.decider(bool(extra)),
            agents=config.audit,
            steps=steps,
            seed=config.seeds[0],
            extra=extra,
            device=config.device,
        ),
    }


# -- plots and report --------------------------------------------------------------------------------------


def _overlay_plots(
    folder: Path,
    scenario: Any,
    config: CompareConfig,
    outputs: dict[tuple[str, int], RunOutput],
    window: tuple[dt.date, dt.date],
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    any_output = next(iter(outputs.values()))
    real = any_output.result.real
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")
    for q in (q for q in scenario.quantities if q.real):
        traj = {key: o.result.trajectory for key, o in outputs.items()}
        sample = next(iter(traj.values()))
        groups: list[Any] = list(sample[q.by].cat.categories) if q.by else [None]
        fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.3), sharex=True, squeeze=False)

        def part(frame: pd.DataFrame, group: Any, name: str = q.name, by: str | None = q.by) -> pd.DataFrame:
            rows = frame[frame["quantity"].astype(str) == name]
            return rows if group is None else rows[rows[by].astype(str) == str(group)]

        for ax, group in zip(axes[0], groups, strict=True):
            for policy, color in zip(config.policies, colors, strict=False):
                series = pd.concat(
                    [part(traj[(policy, s)], group).set_index("date")["value"] for s in config.seeds], axis=1
                )
                ax.plot(series.index, series.mean(axis=1), color=color, label=policy, linewidth=1.2)
                if len(config.seeds) > 1:
                    ax.fill_between(
                        series.index, series.min(axis=1), series.max(axis=1), color=color, alpha=0.2
                    )
            r = part(real, group) if len(real) else real
            if len(r):
                ax.plot(r["date"], r["value"], color="black", linestyle="--", alpha=0.7, label="real")
            if config.test is not None:
                ax.axvspan(pd.Timestamp(window[0]), pd.Timestamp(window[1]), color="grey", alpha=0.1)
            ax.set_title(str(group) if group is not None else q.name, fontsize=9)
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        axes[0][0].set_ylabel(q.name.replace("_", " "))
        axes[0][-1].legend(fontsize=7)
        seeds = (
            f"mean over seeds {config.seeds}, band min–max"
            if len(config.seeds) > 1
            else f"seed {config.seeds[0]}"
        )
        shaded = "; shaded: test window" if config.test is not None else ""
        fig.suptitle(f"{scenario.name}: {q.name} by policy ({seeds}); real dashed{shaded}", fontsize=9)
        fig.tight_layout()
        name = f"compare-{q.name}.png"
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        files.append(name)
    return files


def _granularity_plot(folder: Path, rows: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = sorted({q for r in rows for q in r["error"]})
    rows = sorted(rows, key=lambda r: r["archetypes"])
    k = [r["archetypes"] for r in rows]
    gaps = [r.get("gap_to_per_agent") for r in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.8))
    for q in quantities:
        left.plot(k, [r["error"].get(q, {}).get("mape_percent") for r in rows], marker="o", label=q)
    left.set_xscale("log")
    left.set_xlabel("archetypes (log)")
    left.set_ylabel("mean abs. % error, test window")
    left.legend(fontsize=7)
    if any(g is not None for g in gaps):
        middle.plot(k, gaps, marker="o", color="tab:green")
    middle.set_xscale("log")
    middle.set_xlabel("archetypes (log)")
    middle.set_ylabel("decision gap to per agent (total variation)")
    right.plot(k, [r["asked"] for r in rows], marker="o", color="tab:red")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("archetypes (log)")
    right.set_ylabel("model queries (cold cache)")
    for r in rows:
        right.annotate(
            r["granularity"],
            (r["archetypes"], r["asked"]),
            xytext=(4, -8),
            textcoords="offset points",
            fontsize=6,
        )
    right.margins(x=0.25, y=0.15)
    fig.suptitle(
        "granularity sweep: error, decisions' distance to the per-agent answers and model queries against "
        "the number of archetypes",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(folder / "granularity.png", dpi=90)
    plt.close(fig)
    return "granularity.png"


def _pm(stats: dict[str, float], fmt: Callable[[float], str], seeds: int) -> str:
    return f"{fmt(stats['mean'])} ± {fmt(stats['sd'])}" if seeds > 1 else fmt(stats["mean"])


def table(result: dict[str, Any]) -> list[str]:
    """The policy table (Markdown rows): error on the test window, totals and costs, mean ± sd over seeds."""
    from lpm.report import number

    policies = result["policies"]
    first = next(iter(policies.values()))
    quantities = list(first["error"])
    totals = list(first["totals"])
    head = ["policy", "seeds"]
    head += [f"{q} MAPE % ({first['error'][q]['compared']})" for q in quantities]
    head += [f"{q} RMSE" for q in quantities]
    head += [f"total {t}" for t in totals]
    head += ["LLM queries", "cache hits", "tokens", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    pct = lambda x: f"{x:.1f}"  # noqa: E731
    wall = lambda x: f"{x:.1f}"  # noqa: E731
    for name, p in policies.items():
        n = len(p["seeds"])
        cells = [name, str(n)]
        cells += [_pm(p["error"][q]["mape_percent"], pct, n) for q in quantities]
        cells += [_pm(p["error"][q]["rmse"], number, n) for q in quantities]
        cells += [_pm(p["totals"][t], number, n) for t in totals]
        cells += [_pm(p[k], number, n) for k in ("llm_queries", "cache_hits", "tokens")]
        cells.append(_pm(p["wall_seconds"], wall, n))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def granularity_table(rows: list[dict[str, Any]]) -> list[str]:
    quantities = sorted({q for r in rows for q in r["error"]})
    head = ["granularity", "archetypes", "queries (cold)", "sent", "cache hits"]
    head += [f"{q} MAPE %" for q in quantities]
    first = rows[0].get("first_action") if rows else None
    gaps = any("gap_to_per_agent" in r for r in rows)
    head += ([f"P({first})"] if first else []) + (["gap to per agent"] if gaps else []) + ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            r["granularity"],
            f"{r['archetypes']:,}",
            f"{r['asked']:,}",
            f"{r['sent']:,}",
            f"{r['cache_hits']:,}",
        ]
        cells += [str(r["error"].get(q, {}).get("mape_percent", "-")) for q in quantities]
        cells += [f"{r['p_first']:.3f}"] if first else []
        cells += [f"{r['gap_to_per_agent']:.4f}" if "gap_to_per_agent" in r else "-"] if gaps else []
        cells.append(f"{r['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def audit_lines(audit: dict[str, Any]) -> list[str]:
    """One line per audited decision: ours beside the anchor."""
    lines = []
    for name, a in audit["decisions"].items():
        anchor = a["anchor"]
        lines.append(
            f"{name}: JSD {a['jsd_bits']:.4f} bits ({a['jsd_nats']:.4f} nats) at {a['fewer_calls']:,.0f}× fewer "
            f"calls ({a['members']:,} agents / {a['archetypes']:,} archetypes per decision step; "
            f"{a['sampled_agents']} agents sampled, {len(a['decision_steps'])} decision steps); "
            f"anchor: JSD {anchor['jsd']} at {anchor['fewer_calls']:.0f}× fewer calls ({anchor['source']}; "
            f"{anchor['note']})"
        )
    return lines


def report_markdown(result: dict[str, Any]) -> str:
    """``report.md`` of a comparison."""
    cfg = result["config"]
    lines = [
        f"# {result['scenario']}: policies compared",
        "",
        f"{result['agents']:,} agents, {result['steps']} {result['step_unit']}s ({result['first_date']} to "
        f"{result['last_date']}), policies {', '.join(cfg['policies'])}, paired seeds {cfg['seeds']} (each "
        f"seed: the same population and random numbers under every policy). Error against the real series on "
        f"the test window {result['test']['first']} to {result['test']['last']}; figures are mean ± sd over "
        "seeds (sample sd).",
        "",
        *table(result),
        "",
        "Real series: " + "; ".join(f"{q}: {src}" for q, src in result["real"].items()) + ".",
    ]
    if result.get("server"):
        s = result["server"]
        started = f", started in {s['startup_seconds']:.0f} s" if s["startup_seconds"] else ""
        lines += ["", f"Model: `{s['model']}` ({s['url'] or 'answers from the cache only'}{started})."]
    lines += ["", "## Runs", ""]
    lines += [
        f"- [{r['folder']}]({r['folder']}/report.md): wall {r['wall_seconds']:.1f} s, LLM queries "
        f"{r['llm_queries']:,}, cache hits {r['cache_hits']:,}, tokens {r['tokens']:,}"
        + (" (every answer from the cache)" if r["from_cache_alone"] else "")
        for r in result["runs"]
    ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]]
    if result.get("granularity"):
        lines += [
            "",
            "## Granularity of archetypes",
            "",
            f"The LLM policy with the decision's attributes from none to the full product, then per agent, on "
            f"{cfg['granularity_agents']:,} agents (seed {cfg['seeds'][0]}). One wording for every point: the "
            "prompt's sentence about the agent lists the kept attributes (per agent: also age and ZIP), so "
            "the full product is not the llm policy's own prompt. Queries (cold): archetype answers the run "
            "needs (K × decision steps); sent: requests sent now (the rest came from the cache). "
            "P(first action): the mean over deciding agents and decision steps of the probability their "
            "answer gives it; gap to per agent: the mean total variation distance between an agent's "
            "distribution in the point and its own per-agent answer (what grouping changes in the "
            "decisions, which the error of a small population may not show)."
            + (
                f" Kept in every point, because a context value depends on it: {', '.join(always)}."
                if (always := result["granularity"][0]["always"])
                else ""
            ),
            "",
            *granularity_table(result["granularity"]),
        ]
    if result.get("audit"):
        audit = result["audit"]
        lines += [
            "",
            "## Shadow audit",
            "",
            f"{audit['agents_asked']:,} agents sampled at random (seed {audit['seed']}) and asked with the "
            "per-agent prompt (the archetype's attributes plus "
            f"{', '.join(cfg['audit_extra']) or 'nothing: the control, whose divergence must be 0'}) at every "
            "decision step of the run; Jensen–Shannon divergence between each agent's answer and its "
            "archetype's, in bits (log base 2; nats = bits × ln 2), the mean over sampled agents and steps.",
            "",
            *[f"- {line}" for line in audit_lines(audit)],
        ]
        for name, a in audit["decisions"].items():
            rows = sorted(a["per_archetype"], key=lambda r: -r["jsd_bits"])[:10]
            if not rows:
                continue
            attrs = [k for k in rows[0] if k not in ARCHETYPE_FIGURES]
            lines += [
                "",
                f"Largest divergences of {name} (of {len(a['per_archetype'])} archetypes with sampled members):",
                "",
                "| "
                + " | ".join(
                    [*attrs, "agents", "sampled", "JSD bits", "max", "queries: archetype", "per agent"]
                )
                + " |",
                "|" + " --- |" * (len(attrs) + 6),
            ]
            lines += [
                "| "
                + " | ".join(
                    [
                        *(str(r[k]) for k in attrs),
                        f"{r['agents']:,}",
                        str(r["sampled"]),
                        f"{r['jsd_bits']:.4f}",
                    ]
                    + [f"{r['jsd_max_bits']:.4f}", str(r["archetype_queries"]), f"{r['per_agent_queries']:,}"]
                )
                + " |"
                for r in rows
            ]
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    return "\n".join(lines)


ARCHETYPE_FIGURES = (
    "agents",
    "sampled",
    "jsd_bits",
    "jsd_max_bits",
    "archetype_queries",
    "per_agent_queries",
)
