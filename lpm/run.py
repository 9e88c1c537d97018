"""A run: a scenario on the NYC population under a policy, written to a run folder.

The folder holds ``config.json`` (the resolved configuration), ``trajectory.parquet`` (step × quantity ×
breakdown), ``decisions.parquet`` (step × decision × archetype × action probability, mode, cache hit),
``summary.json``, the PNG plots the scenario declares, ``decisions.png`` and ``report.md``;
``checkpoint.pt`` lets an interrupted run resume. Everything scenario-specific (the horizon's unit, the
quantities, totals, plots and real series) is read off the scenario's declarations.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from lpm.decoding import DEFAULT_SCORING, Scoring
from lpm.elicitation import ElicitationName
from lpm.errors import InputError, Interrupted, validation_message
from lpm.paths import check_new_folder, make_folder, os_error
from lpm.population import Population
from lpm.server_kind import SERVER_KINDS
from lpm.synthesis import MAX_AGENTS, MAX_SEED

PolicyName = Literal["heuristic", "llm", "agent-llm"]
CacheMode = Literal["use", "refresh", "off", "replay"]

SUMMARY_KEYS = (
    "agents",
    "steps",
    "wall_seconds",
    "step_seconds",
    "llm_queries",
    "cache_hits",
    "tokens",
    "fallbacks",
)


class RunConfig(BaseModel):
    """Everything that determines a run; saved as ``config.json`` in the run folder."""

    model_config = ConfigDict(extra="forbid")
    scenario: str = Field(
        min_length=1, description="a built-in scenario (lpm scenarios), or path/to/file.py:ClassName"
    )
    policy: PolicyName = Field(
        default="heuristic", description="heuristic rules, one LLM query per archetype, or per agent"
    )
    agents: int | None = Field(
        default=None, gt=0, le=MAX_AGENTS, description="agents (default: the whole city, ≈ 8.34 M)"
    )
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="seed of the population and of every random draw"
    )
    start: dt.date | None = Field(
        default=None, description="date of the first step (default: the scenario's)"
    )
    steps: int | None = Field(default=None, gt=0, description="steps to simulate, in the scenario's unit")
    days: int | None = Field(default=None, gt=0, description="or the horizon in days from the start")
    weeks: int | None = Field(default=None, gt=0, description="or in weeks")
    months: int | None = Field(default=None, gt=0, description="or in calendar months")
    scenario_config: dict[str, Any] = Field(
        default_factory=dict, description="scenario settings overriding its defaults (--set NAME=VALUE)"
    )
    device: Literal["cpu", "cuda"] = "cpu"
    llm_url: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL, or replicas' URLs separated by commas; default: start a local "
        "server",
    )
    llm_model: str | None = Field(
        default=None, description="served model name (default: the local default model)"
    )
    llm_weights: str | None = Field(
        default=None, description="model folder or .gguf file the local server serves (--model)"
    )
    llm_revision: str | None = Field(
        default=None, description="version of the model at llm_url, for the cache key (--model-revision)"
    )
    api_key_env: str = Field(default="OPENAI_API_KEY", description="environment variable holding the API key")
    server: Literal[SERVER_KINDS] = Field(  # type: ignore[valid-type]
        default="vllm", description="kind of the local LLM server lpm starts (or of the one at llm_url)"
    )
    llm_mode: Literal["auto", "logprobs", "sample"] = "auto"
    llm_scoring: Scoring = Field(
        default=DEFAULT_SCORING, description="how a logprobs answer is read (lpm.decoding.SCORING_CHOICES)"
    )
    llm_elicitation: ElicitationName = Field(
        default="choice", description="how the question is put (lpm.elicitation.ELICITATIONS)"
    )
    cache: CacheMode = "use"
    on_llm_failure: Literal["error", "heuristic"] = Field(
        default="error",
        description="stop on a failed model call, or use the heuristic for that archetype (counted)",
    )
    llm_timeout: float = Field(
        default=60.0, gt=0, description="seconds to wait for the answer to one model request (--llm-timeout)"
    )

    @model_validator(mode="after")
    def _options(self) -> RunConfig:
        horizons = [k for k in ("steps", "days", "weeks", "months") if getattr(self, k) is not None]
        if len(horizons) > 1:
            raise ValueError(f"give one horizon, not {' and '.join('--' + h for h in horizons)}")
        if self.policy == "heuristic" and (
            self.llm_url or self.llm_model or self.llm_weights or self.llm_revision
        ):
            raise ValueError("--llm-url/--llm-model/--model/--model-revision need --policy llm or agent-llm")
        if "start" in self.scenario_config:
            raise ValueError("give the start date with --start, not --set start=…")
        return self

    @field_serializer("llm_url")
    def _redacted(self, url: str | None) -> str | None:
        from lpm.endpoint import redact_url

        return redact_url(url)  # a URL's credentials never reach a file

    @classmethod
    def build(cls, **values: Any) -> RunConfig:
        """Validate, turning pydantic's errors into one :class:`InputError` that names the field."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise InputError(validation_message(exc, noun="run option", top="run options")) from None

    @property
    def uses_llm(self) -> bool:
        return self.policy != "heuristic"

    def make_scenario(self) -> Any:
        """The scenario object this configuration names (validated: an unknown scenario or parameter is an
        :class:`InputError` naming it)."""
        from lpm.scenarios import make_scenario

        values = dict(self.scenario_config)
        if self.start is not None:
            values["start"] = self.start
        return make_scenario(self.scenario, values)

    def steps_for(self, scenario: Any) -> int:
        """Steps of this run: the horizon given, converted to the scenario's steps, else its default."""
        return scenario.steps_for(steps=self.steps, days=self.days, weeks=self.weeks, months=self.months)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (the horizon may grow; the cache mode, where
        the model is and how long a request may wait change no answer)."""
        data = self.model_dump(mode="json")
        for key in ("steps", "days", "weeks", "months", "cache", "llm_url", "llm_weights", "llm_timeout"):
            data.pop(key)
        return data


@dataclass
class RunOutput:
    folder: Path
    summary: dict[str, Any] | None  # None on a rank other than 0 of a run under torchrun
    result: Any  # lpm.engine.RunResult


#: Called when lpm starts the local model server (the CLI prints a line); ``None`` says nothing.
Announce = Callable[[Any], None]


def run(
    config: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_server_start: Announce | None = None,
    endpoint: Any = None,
    nproc: int = 1,
) -> RunOutput:
    """Run ``config`` and write its folder ``out``; with ``resume`` continue from its checkpoint.

    Without ``config.llm_url`` an LLM policy starts the local model server (at the first cache miss) and
    stops it at the end; ``on_server_start(server)`` is called just before. ``endpoint``: an
    :class:`lpm.endpoint.Endpoint` resolved by the caller (``lpm compare`` shares one local server between
    runs) instead of the one the configuration names. ``progress`` shows a progress
    bar on stderr. ``nproc`` > 1 splits the agents over that many processes (:mod:`lpm.distributed`;
    heuristic policy, CPU), with the same results as one.
    """
    from lpm.engine import CHECKPOINT, Simulation

    started = time.perf_counter()
    folder = Path(out)
    scenario = config.make_scenario()  # validates before anything is written
    steps = config.steps_for(scenario)
    _check_horizon(scenario, steps)
    check_device(config.device, "run option 'device'")
    resolved = config.model_copy(update={"start": scenario.config.start, "steps": steps})
    resolved = resolved.model_copy(update={k: None for k in ("days", "weeks", "months")})
    if nproc != 1 or _distributed().torchrun_rank() is not None:
        return _run_sharded(resolved, scenario, folder, steps, nproc, resume, started)
    # built where it runs: beyond the city's size in chunks, on a GPU without passing through host memory
    pop = Population.synthesize(
        "nyc", agents=config.agents, seed=config.seed, device=config.device, progress=progress
    )
    with _policy(resolved, on_server_start, endpoint) as (policy, llm_info):
        sim = Simulation(scenario, pop, policy, seed=config.seed, device=config.device)
        note = _data_note(scenario, sim.world, steps)
        # only once every check above has passed
        created = _claim_folder(folder, resolved, resume, llm_info.get("identity"))
        bar = _progress(progress)
        try:
            with bar if bar is not None else nullcontext():
                if bar is not None:
                    task = bar.add_task(
                        f"{scenario.name} · {config.policy} · {len(pop):,} agents",
                        total=steps,
                        unit=f"{scenario.step_unit}s",
                    )
                    sim.callback = lambda t, _sim: bar.update(task, completed=t + 1)
                sim.wall_origin = started
                result = sim.run(steps, out_dir=folder, resume=resume)
        except BaseException as exc:
            if not resume and not (folder / CHECKPOINT).exists():  # failed before its first step
                _unclaim(folder, created)  # leave nothing behind
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM under the CLI
                if (folder / CHECKPOINT).exists():
                    raise Interrupted(
                        f"{folder}: interrupted after step {Simulation.checkpointed(folder)} of {steps}; "
                        "the run folder keeps its checkpoint",
                        hint=f"continue it with the same command and --resume --out {folder}",
                    ) from None
                raise Interrupted(
                    "interrupted before the first step completed; nothing was written"
                ) from None
            raise
    wall = result.prior_wall_seconds + time.perf_counter() - started
    summary = _summary(resolved, scenario, result, wall, llm_info)
    summary["notes"] = [note] if note else []
    try:
        _write(folder, resolved, scenario, llm_info, result, summary)
    except OSError as exc:
        error = os_error(folder, exc, "the run's results")
        error.hint = f"the checkpoint is kept: make room, then the same command with --resume --out {folder} writes them"
        raise error from None
    return RunOutput(folder=folder, summary=summary, result=result)


def _run_sharded(
    config: RunConfig, scenario: Any, folder: Path, steps: int, nproc: int, resume: bool, started: float
) -> RunOutput:
    """:func:`run` over ``nproc`` processes (each rank checkpoints in ``folder/rank-<r>``). Under
    ``torchrun`` this process is one rank: rank 0 claims and writes the folder, the others return an
    output without a summary."""
    from lpm.engine import CHECKPOINT

    distributed = _distributed()
    rank = distributed.torchrun_rank()

    if config.uses_llm:
        raise InputError(
            f"run option 'nproc': lpm run over {nproc} processes takes the heuristic policy only, not {config.policy!r}",
            hint="drop --nproc, or use --policy heuristic (lpm.distributed.run takes any policy)",
        )
    if rank is None:
        distributed.check_nproc(nproc, config.agents, config.device)
    created = _claim_folder(folder, config, resume) if not rank else False
    try:
        result = distributed.run(
            functools.partial(_rank_parts, config),
            steps,
            nproc=nproc if rank is None or nproc != 1 else None,
            seed=config.seed,
            device=config.device,
            out_dir=folder,
            resume=resume,
        )
    except BaseException:
        if not resume and not (folder / "rank-0" / CHECKPOINT).exists():  # failed before its first step
            _unclaim(folder, created)
        raise
    if rank:
        return RunOutput(folder=folder, summary=None, result=result)
    wall = result.prior_wall_seconds + time.perf_counter() - started
    summary = _summary(config, scenario, result, wall, {})
    summary["processes"] = nproc if rank is None else int(os.environ["WORLD_SIZE"])
    summary["comm_seconds"] = round(float(result.comm_seconds), 3)
    summary["notes"] = []
    try:
        _write(folder, config, scenario, {}, result, summary)
    except OSError as exc:
        error = os_error(folder, exc, "the run's results")
        error.hint = f"the checkpoints are kept: make room, then the same command with --resume --out {folder} writes them"
        raise error from None
    return RunOutput(folder=folder, summary=summary, result=result)


def _distributed() -> Any:
    from lpm import distributed  # imports torch.distributed: only for a sharded run

    return distributed


def _rank_parts(config: RunConfig, rank: int) -> tuple[Any, Population, Any]:
    """What each rank of a sharded run builds: the scenario, the whole population, the heuristic policy. The
    population is drawn on the rank's device, as a one-process run draws it on its device: a GPU's random
    numbers are not the CPU's, so a population drawn on the CPU would be other agents than the one-process
    run's on a GPU."""
    from lpm.policy import HeuristicPolicy

    device = _distributed().rank_device(config.device, rank)
    pop = Population.synthesize("nyc", agents=config.agents, seed=config.seed, device=device)
    return config.make_scenario(), pop, HeuristicPolicy()


#: Longest horizon a run may have, in years from its start.
MAX_YEARS = 10


def _check_horizon(scenario: Any, steps: int) -> None:
    """Refuse a horizon that ends more than MAX_YEARS after the start, giving the range."""
    start = pd.Timestamp(scenario.config.start)
    limit = start + pd.DateOffset(years=MAX_YEARS)
    try:
        last = scenario.date(steps - 1)
    except (OverflowError, ValueError, pd.errors.OutOfBoundsDatetime):
        last = None
    if last is None or last > limit:
        unit = scenario.step_unit
        most = 12 * MAX_YEARS if unit == "month" else (limit - start).days // (7 if unit == "week" else 1)
        ends = "beyond the calendar" if last is None else f"on {last.date()}"
        raise InputError(
            f"horizon: {steps:,} {scenario.step_unit}s from {start.date()} would end {ends}; runs are at most "
            f"{MAX_YEARS} years long (1 to {most:,} {scenario.step_unit}s here)"
        )


def _data_note(scenario: Any, world: Any, steps: int) -> str | None:
    """A note when the run goes on past its real data (those steps are compared with nothing)."""
    first, last = scenario.date(0), scenario.date(steps - 1)
    real = scenario.real_data(world, first, last)
    if real.empty:
        known = scenario.real_data(world, pd.Timestamp("1900-01-01"), pd.Timestamp("2200-01-01"))
        if known.empty:
            return None  # a scenario without real data
        return f"the real data cover {known['date'].min().date()} .. {known['date'].max().date()}; this run ({first.date()} .. {last.date()}) is compared with nothing"
    end = real["date"].max()
    if end < last:
        return f"the real data end on {end.date()}; the steps after it (to {last.date()}) are compared with nothing"
    return None


def _claim_folder(
    folder: Path, config: RunConfig, resume: bool, identity: dict[str, Any] | None = None
) -> bool:
    """Refuse to overwrite another run; on resume, insist on the same configuration and the same model
    (``identity``: the backend's, the model part of its cache keys). Returns whether the folder was created
    here."""
    saved = folder / "config.json"
    if resume:
        if not saved.is_file():
            raise InputError(
                f"{folder}: nothing to resume (no config.json)", hint="run without --resume first"
            )
        try:
            record = json.loads(saved.read_text())
            old = RunConfig.model_validate(record["run"])
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise InputError(f"{saved}: not a run configuration of this lpm ({exc})") from None
        theirs_model = record.get("identity")
        if theirs_model != identity:
            raise InputError(
                f"{folder}: --resume with another model: the run was decided by {_model_name(theirs_model)}, "
                f"this command asks {_model_name(identity)}",
                hint="resume with the same --llm-url/--llm-model/--model (and --model-revision), or use a new --out",
            )
        mine, theirs = config.fingerprint(), old.fingerprint()
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in diff)
            raise InputError(
                f"{folder}: --resume of a run with another configuration ({shown})", hint="use a new --out"
            )
        return False
    check_new_folder(folder, what="the run folder")
    created = make_folder(folder, field="--out")
    record = {"run": config.model_dump(mode="json"), "identity": identity}
    try:
        (folder / "config.json").write_text(json.dumps(record, indent=2))
    except OSError as exc:
        _unclaim(folder, created)
        raise os_error(folder / "config.json", exc, "the run configuration") from None
    return created


def _unclaim(folder: Path, created: bool) -> None:
    """Undo :func:`_claim_folder` for a run that never completed a step."""
    if created:
        shutil.rmtree(folder, ignore_errors=True)
        return
    from lpm.engine import JOURNAL

    for name in ("config.json", JOURNAL):
        (folder / name).unlink(missing_ok=True)


def _model_name(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "no model (heuristic)"
    weights = identity.get("weights")
    return f"{identity.get('model')!r} ({identity.get('server')}, weights {weights or 'unnamed'})"


def check_device(device: str, option: str) -> None:
    """A clear error, before anything is built or written, when ``device`` is 'cuda' and torch sees no
    GPU; ``option`` names what asked for it."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"{option}: 'cuda' was asked for, but torch sees no CUDA GPU", hint="use --device cpu"
        )


@contextmanager
def _policy(
    config: RunConfig, on_server_start: Announce | None, endpoint: Any = None
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The policy of ``config``; for LLM policies also the server (started here if needed) and the decider."""
    from lpm.policy import AgentLLMPolicy, ArchetypeLLMPolicy, HeuristicPolicy

    if not config.uses_llm:
        yield HeuristicPolicy(), {}
        return
    from lpm.cache import ResponseCache
    from lpm.decision import Decider
    from lpm.endpoint import Endpoint, default_mode, llm_backend

    own = endpoint is None
    if own:
        endpoint = Endpoint.for_config(config)
    with llm_backend(endpoint, on_start=on_server_start, own=own) as (backend, info):
        mode = default_mode(config.llm_mode, config.server)
        decider = Decider(
            backend,
            ResponseCache(mode=config.cache),
            mode=mode,
            scoring=config.llm_scoring,
            elicitation=config.llm_elicitation,
            on_failure="return" if config.on_llm_failure == "heuristic" else "error",
            progress=False,
            per_agent=config.policy == "agent-llm",
        )
        fallback = HeuristicPolicy() if config.on_llm_failure == "heuristic" else None
        cls = AgentLLMPolicy if config.policy == "agent-llm" else ArchetypeLLMPolicy
        info |= {"mode": mode, "scoring": config.llm_scoring, "elicitation": config.llm_elicitation}
        yield cls(decider, fallback=fallback), info


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from lpm.progress import count_bar

    return count_bar()


def _summary(
    config: RunConfig, scenario: Any, result: Any, wall: float, llm: dict[str, Any]
) -> dict[str, Any]:
    from lpm.probe import decision_spread
    from lpm.report import real_error

    traj = result.trajectory
    totals = traj.groupby("quantity", observed=True)["value"].sum()
    figures = (llm or {}).get("server_figures")
    if figures:  # the server's tokens per second of the time the run waited for decisions
        tokens = (figures.get("prompt_tokens") or 0) + (figures.get("generation_tokens") or 0)
        decide = float(result.decide_seconds)
        figures["tokens_per_second"] = round(tokens / decide, 1) if tokens and decide > 0 else None
    summary = {
        "scenario": scenario.name,
        "scenario_class": f"{type(scenario).__module__}.{type(scenario).__qualname__}",
        "policy": config.policy,
        "agents": int(result.agents),
        "steps": int(result.steps),
        "step_unit": scenario.step_unit,
        "first_date": str(traj["date"].min().date()),
        "last_date": str(traj["date"].max().date()),
        "wall_seconds": round(wall, 3),
        "step_seconds": round(float(result.step_seconds), 3),
        "decide_seconds": round(float(result.decide_seconds), 3),
        "agent_steps_per_second": round(result.agents * result.steps / max(result.step_seconds, 1e-9)),
        "engine_agent_steps_per_second": round(
            result.agents * result.steps / max(result.step_seconds - result.decide_seconds, 1e-9)
        ),
        "resumed_from_step": int(result.resumed_from),
        **{k: int(v) for k, v in result.counters.items()},
        "archetypes": {name: len(table) for name, table in result.archetypes.items()},
        "decisions": result.decision_counters,
        "decision_spread": decision_spread(result.decisions),
        "llm": llm or None,
        "totals": {q.name: float(totals.get(q.name, 0.0)) for q in scenario.quantities if q.total},
        "real_error": real_error(scenario, traj, result.real),
        "lpm": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return summary


def _write(
    folder: Path, config: RunConfig, scenario: Any, llm: dict[str, Any], result: Any, summary: dict[str, Any]
) -> None:
    from lpm import report

    (folder / "config.json").write_text(
        json.dumps(
            {
                "run": config.model_dump(mode="json"),
                "scenario": scenario.config.model_dump(mode="json"),
                "llm": llm or None,
                "identity": (llm or {}).get("identity"),
            },
            indent=2,
        )
    )
    result.trajectory.to_parquet(folder / "trajectory.parquet", index=False)
    result.decisions.to_parquet(folder / "decisions.parquet", index=False)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    plots = report.plots(folder, scenario, result)
    report.write_report(folder, config, scenario, summary, plots, result)
