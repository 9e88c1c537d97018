"""The scenario contract: what a scenario declares about itself, and the calls the engine makes.

A scenario is one class. Its class attributes declare everything lpm needs to know about it; the run, the
report, the policies and the CLI read only these declarations:

``name``, ``description``
    how users name it (``lpm run NAME``) and what it models.
``step_unit``, ``horizon``
    a step is a ``day``, ``week`` or ``month``; ``horizon`` is the default number of steps.
``Config``
    the validated configuration (a frozen pydantic model with a ``start`` date and the parameters,
    one line each with its unit); ``learnable`` names the float fields that become differentiable tensors
    (``params``) and :meth:`Scenario.parameter_ranges` reads their ranges off the field constraints.
``needs``
    the population columns the scenario reads (checked before a run starts).
``quantities``
    what a step records (:class:`Quantity`), each broken down by a categorical population attribute
    (``by="borough"``) or not at all (``by=None``), whether its run total is reported, and the real
    series it is judged against.
``decisions``
    what agents decide (:class:`Decision`): an archetype spec (its attributes, prompt, actions and
    cadence), the action order the step reads, and the default heuristic rules.
``plots``
    the report's plots (:class:`Plot`): a recorded quantity per panel of its breakdown, against the real
    series when there is one.
``differentiable``
    whether :meth:`Scenario.step` supports the differentiable sampler.
``shardable``
    whether a run may split the agents over processes (:mod:`lpm.distributed`): ``setup`` builds the
    world from the whole population, every per-agent tensor of the world has the population's length
    and is cut with it, and every sum over agents a step needs is a sampler's ``tally``, ``count`` or
    ``total`` (False by default).
``calibration``
    optional: a ``calibration.json`` written by ``lpm calibrate`` (a path beside the scenario's file). Its
    ``parameters`` are the scenario's defaults: a learnable parameter the configuration does not set
    takes the calibrated value, and the Config field's own default is the value from the literature the
    calibration started from (``Scenario(..., calibrated=False)`` uses those).

The engine (:mod:`lpm.engine`) calls, once per run, ``setup(pop, device) -> world`` (what the run needs
that does not change: index tensors and tables; the simulation owns it) and
``init_state(world, sampler) -> state`` (or ``init_state(world, sampler, params)`` when the initial state
depends on learnable parameters, e.g. a seeding that reads the detected share); then at every step ``t``: ``observe(world, state, t)`` (only when
a decision is due; the context of the prompts), and ``step(world, state, actions, params, t, sampler)``,
which returns the next state and the step's records by name. ``real_data(world, first, last)`` gives the
real series for the report. A scenario object is immutable configuration: many simulations may share it.
"""

from __future__ import annotations

import datetime as dt
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import annotated_types
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from lpm.archetype import ArchetypeSpec
from lpm.errors import InputError, validation_message
from lpm.population import Population

__all__ = [
    "Decision",
    "compared_period",
    "parameter",
    "period_sums",
    "real_frame",
    "Plot",
    "Quantity",
    "Scenario",
    "ScenarioConfig",
    "StepUnit",
]

StepUnit = Literal["day", "week", "month"]
STEP_UNITS = ("day", "week", "month")
#: The finest cadence each step unit allows (a decision cannot come more often than a step).
_CADENCES = {
    "day": ("once", "daily", "weekly", "monthly"),
    "week": ("once", "weekly", "monthly"),
    "month": ("once", "monthly"),
}
#: Random streams a scenario may use (0-15 belong to the engine: decision i draws from stream i).
FIRST_SCENARIO_STREAM = 16
MAX_DECISIONS = 16

#: A heuristic rule: (K archetype rows, K resolved contexts) -> (K,) probability of one action.
Rule = Callable[[pd.DataFrame, pd.DataFrame], Any]


@dataclass(frozen=True)
class Quantity:
    """A quantity a scenario records at every step.

    name: the key of the step's records. description: what it is, with its unit.
    by: the categorical population attribute it is broken down by (one value per label), or None for one
    value per step. total: report its sum over the run. real: where the real series it is compared with
    comes from (None: no real series).
    """

    name: str
    description: str
    by: str | None = "borough"
    total: bool = False
    real: str | None = None


@dataclass(frozen=True)
class Decision:
    """A choice agents make, asked once per occurring archetype per decision step.

    name: the key of ``actions`` in :meth:`Scenario.step` (e.g. ``"isolation"``).
    spec: the archetype spec: a name in ``archetypes/``, a YAML file (a relative path is looked up beside the
    scenario's file first), or the spec itself as a mapping (its prompt may be inline too). Its actions
    must equal ``actions`` and its cadence (``once``, ``daily``, ``weekly``, ``monthly``) says when agents
    decide.
    actions: the action order :meth:`Scenario.step` reads (``sampler.chose(actions[name], i)``).
    heuristic: the default rules of the heuristic policy: action -> rule giving each archetype's probability
    of that action (actions without a rule share the rest equally). Used by ``--policy heuristic`` and as
    the fallback of failed model calls.
    plot: the action whose probability ``decisions.png`` shows (default: the first).
    """

    name: str
    spec: str | Path | Mapping[str, Any]
    actions: tuple[str, ...]
    heuristic: Mapping[str, Rule]
    plot: str | None = None


@dataclass(frozen=True)
class Plot:
    """A plot of the run report: one panel per label of the quantity's breakdown.

    file: PNG file name in the run folder. quantity: the recorded quantity drawn (against its real series,
    dashed, when the scenario has one). ylabel: the y axis label. also: further recorded quantities drawn in
    the same panels. title: the figure's title (e.g. how the real series is scaled).
    """

    file: str
    quantity: str
    ylabel: str
    also: tuple[str, ...] = ()
    title: str = ""


class ScenarioConfig(BaseModel):
    """Base of a scenario's validated configuration: frozen, unknown keys rejected.

    ``start`` is the date of step 0; a subclass gives it a default and adds the parameters, one line each
    with its unit and range.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: dt.date


class Scenario(ABC):
    """Base of scenarios; see the module docstring for the declarations and the calls.

    ``Scenario(config)`` or ``Scenario(beta=0.05)``: the configuration is validated at construction
    (unknown keys and out-of-range values raise :class:`InputError` naming the parameter); after it the
    object is frozen. Per-run tensors belong in the object :meth:`setup` returns.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    step_unit: ClassVar[StepUnit]
    horizon: ClassVar[int]
    Config: ClassVar[type[ScenarioConfig]] = ScenarioConfig
    learnable: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    quantities: ClassVar[tuple[Quantity, ...]]
    decisions: ClassVar[tuple[Decision, ...]] = ()
    plots: ClassVar[tuple[Plot, ...]] = ()
    differentiable: ClassVar[bool] = True
    #: whether step() carries the "pruned" estimator's alternatives (lpm.sampling.PrunedSampler)
    pruned: ClassVar[bool] = False
    shardable: ClassVar[bool] = False
    calibration: ClassVar[str | None] = None

    def __init__(
        self,
        config: Mapping[str, Any] | ScenarioConfig | None = None,
        /,
        *,
        calibrated: bool = True,
        **overrides: Any,
    ):
        cls = type(self)
        check_declarations(cls)
        if isinstance(config, cls.Config) and not overrides:
            valid = config
        else:
            values = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
            defaults = cls.calibrated_defaults() if calibrated else {}
            try:
                valid = cls.Config.model_validate({**defaults, **values, **overrides})
            except ValidationError as exc:
                message = validation_message(
                    exc, noun="parameter", unknown="unknown parameter", top="parameters"
                )
                raise InputError(
                    f"{cls.where()}: {message}",
                    hint=f"parameters of {cls.name}: {', '.join(cls.Config.model_fields)}",
                ) from None
        object.__setattr__(self, "config", valid)
        object.__setattr__(self, "_frozen", True)

    config: ScenarioConfig

    def __setattr__(self, key: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"{type(self).__name__} is immutable configuration (shared by simulations); "
                f"keep per-run values such as {key!r} in the object setup() returns"
            )
        object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # -- where it is defined -------------------------------------------------------------------------
    @classmethod
    def where(cls) -> str:
        """``file.py: class Name``: how errors about this scenario name it."""
        try:
            path = Path(inspect.getsourcefile(cls) or "?")
        except TypeError:
            path = Path("?")
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            path = path.relative_to(Path.cwd())
        return f"{path}: class {cls.__name__}"

    # -- calendar --------------------------------------------------------------------------------------
    def date(self, t: int) -> pd.Timestamp:
        """Calendar date of step ``t``."""
        start = pd.Timestamp(self.config.start)
        if self.step_unit == "day":
            return start + pd.Timedelta(days=t)
        if self.step_unit == "week":
            return start + pd.Timedelta(weeks=t)
        return start + pd.DateOffset(months=t)

    def decides_at(self, cadence: str, t: int) -> bool:
        """Whether a decision of ``cadence`` is asked at step ``t`` (every decision is asked at step 0;
        ``monthly`` in a day or week scenario: at the first step of each calendar month)."""
        if t == 0 or cadence == "daily":
            return True
        if cadence == "once":
            return False
        if cadence == "weekly":
            return self.step_unit == "week" or t % 7 == 0
        return self.step_unit == "month" or self.date(t).month != self.date(t - 1).month

    def steps_for(
        self,
        *,
        steps: int | None = None,
        days: int | None = None,
        weeks: int | None = None,
        months: int | None = None,
    ) -> int:
        """Steps of a horizon given in steps or in calendar days, weeks or months from the start (at most
        one; none: the declared ``horizon``). A horizon that is not a whole number of steps is an error."""
        given = {
            k: v for k, v in dict(steps=steps, days=days, weeks=weeks, months=months).items() if v is not None
        }
        if len(given) > 1:
            raise InputError(f"give one horizon, not {' and '.join(given)}")
        bad = [f"--{k} must be >= 1, got {v}" for k, v in given.items() if v < 1]
        if bad:
            raise InputError(bad[0])
        if not given:
            return int(self.horizon)
        unit, amount = next(iter(given.items()))
        if unit == "steps":
            return int(amount)
        start = pd.Timestamp(self.config.start)
        end = start + (pd.DateOffset(months=amount) if unit == "months" else pd.Timedelta(**{unit: amount}))
        if self.step_unit == "month":
            n = (end.year - start.year) * 12 + end.month - start.month
        else:
            n = (end - start).days // (7 if self.step_unit == "week" else 1)
        if self.date(n) != end:
            raise InputError(
                f"the {self.name} scenario steps in {self.step_unit}s: {amount} {unit} is not a whole number "
                f"of steps",
                hint=f"give the horizon in {self.step_unit}s (or --steps)",
            )
        return n

    # -- declarations -----------------------------------------------------------------------------------
    @classmethod
    def calibration_path(cls) -> Path | None:
        """The declared ``calibration.json`` (beside the scenario's file), or None."""
        if cls.calibration is None:
            return None
        return Path(inspect.getsourcefile(cls) or ".").parent / cls.calibration

    @classmethod
    def calibrated_defaults(cls) -> dict[str, float]:
        """The calibrated default of each learnable parameter the declared calibration fitted (empty
        without one); a file that is missing or names an unknown parameter is an :class:`InputError`."""
        path = cls.calibration_path()
        return {} if path is None else dict(_calibrated(cls, path))

    def quantity(self, name: str) -> Quantity:
        """The declared quantity ``name``."""
        for q in self.quantities:
            if q.name == name:
                return q
        raise KeyError(f"{self.name} records no quantity {name!r}")

    @classmethod
    def specs(cls) -> dict[str, ArchetypeSpec]:
        """The archetype spec of each decision, loaded and checked (cached per class)."""
        return _specs(cls)

    def params(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The learnable parameters as float32 scalar tensors (what gradients reach), from the config."""
        return {
            name: torch.tensor(float(getattr(self.config, name)), dtype=torch.float32, device=device)
            for name in self.learnable
        }

    @classmethod
    def parameter_ranges(cls) -> dict[str, tuple[float, float]]:
        """(low, high) of each learnable parameter, read off its field's constraints (``inf`` if open)."""
        out = {}
        for name in cls.learnable:
            lo, hi = float("-inf"), float("inf")
            for meta in cls.Config.model_fields[name].metadata:
                if isinstance(meta, annotated_types.Gt | annotated_types.Ge):
                    lo = float(getattr(meta, "gt", getattr(meta, "ge", lo)))
                elif isinstance(meta, annotated_types.Lt | annotated_types.Le):
                    hi = float(getattr(meta, "lt", getattr(meta, "le", hi)))
            out[name] = (lo, hi)
        return out

    # -- one run --------------------------------------------------------------------------------------
    @abstractmethod
    def setup(self, pop: Population, device: torch.device) -> Any:
        """What a run needs that does not change: index tensors, tables (owned by the simulation)."""

    @abstractmethod
    def init_state(self, world: Any, sampler: Any) -> dict[str, torch.Tensor]:
        """The agents' state at step 0 (named tensors); draw with ``sampler.at(0)``, build categorical
        states with ``sampler.states``. A scenario whose initial state depends on learnable parameters
        declares a third argument ``params`` and gets the simulation's parameter tensors there."""

    def observe(self, world: Any, state: Mapping[str, torch.Tensor], t: int) -> dict[str, Any]:
        """The context of step ``t``: a value for every context variable of the decisions' specs (numbers,
        text, or :class:`lpm.policy.ByAttribute`). Called only at steps where a decision is due."""
        return {}

    @abstractmethod
    def step(
        self,
        world: Any,
        state: Mapping[str, torch.Tensor],
        actions: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
        t: int,
        sampler: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Move every agent from step ``t`` to ``t + 1``: the next state and the step's records.

        actions: each decision's current action per agent (read with ``sampler.chose(actions[name], i)``).
        params: the learnable parameters and the alignment offsets (tensors). sampler: draws and state
        operations (:class:`lpm.sampling.Sampler`), set to step ``t``. Records: one tensor per declared
        quantity, shaped (labels of its ``by``,) or () when ``by`` is None.
        """

    def real_data(self, world: Any, first: pd.Timestamp, last: pd.Timestamp) -> pd.DataFrame:
        """The real series (``date``, the breakdown attribute(s), ``quantity``, ``value``) between two
        dates, on the scale of the simulated population; empty when the scenario has none."""
        return pd.DataFrame(columns=["date", "quantity", "value"])


@cache
def _calibrated(cls: type[Scenario], path: Path) -> tuple[tuple[str, float], ...]:
    import json

    where = f"{path} (the calibration of {cls.where()})"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{where}: no such file", hint="run the command its README gives, or restore it"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: not a calibration.json ({exc})") from None
    params = saved.get("parameters") if isinstance(saved, dict) else None
    if not isinstance(params, dict) or not params:
        raise InputError(f"{where}: field 'parameters' is missing or empty")
    bad = [k for k, v in params.items() if k not in cls.learnable or not isinstance(v, int | float)]
    if bad:
        raise InputError(
            f"{where}: field 'parameters': {bad} are not numbers for learnable parameters of {cls.name}",
            hint=f"learnable: {', '.join(cls.learnable)}",
        )
    return tuple((k, float(v)) for k, v in params.items())


def parameter(config: ScenarioConfig, params: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """Setting ``name`` as a tensor: the run's learnable tensor when ``params`` has it (gradients reach
    it), else the configuration's value."""
    return params[name] if name in params else torch.tensor(float(getattr(config, name)))


def period_sums(series: torch.Tensor, period: int) -> torch.Tensor:
    """(P, ...) sums of a (T, ...) series over consecutive periods of ``period`` steps (a trailing part
    period is dropped)."""
    t = series.shape[0] // period * period
    return series[:t].reshape(t // period, period, *series.shape[1:]).sum(1)


def compared_period(scenario: Scenario, q: Quantity) -> int:
    """Steps per period a quantity is compared with its real series over: 7 (weekly sums) for a daily
    count (``total``), else 1 (each step's value)."""
    return 7 if scenario.step_unit == "day" and q.total else 1


def real_frame(
    frame: pd.DataFrame,
    *,
    quantity: str,
    value: str,
    labels: list[str],
    by: str = "borough",
    scale: float = 1.0,
) -> pd.DataFrame:
    """A real series in the shape :meth:`Scenario.real_data` returns: ``date``, ``by`` (categorical with
    ``labels``), ``quantity``, ``value`` (column ``value`` of ``frame`` × ``scale``), sorted by date and label."""
    out = pd.DataFrame(
        {
            "date": pd.to_datetime(frame["date"]).to_numpy(),
            by: pd.Categorical(frame[by], categories=labels),
            "quantity": quantity,
            "value": frame[value].to_numpy(dtype=float) * scale,
        }
    )
    return out.sort_values(["date", by]).reset_index(drop=True)


# -- checks of the declarations ----------------------------------------------------------------------------


@cache
def check_declarations(cls: type[Scenario]) -> None:
    """Raise :class:`InputError` naming the file, the class and the field of the first bad declaration."""
    where = cls.where()

    def fail(fld: str, message: str, hint: str | None = None) -> None:
        raise InputError(f"{where}: field {fld!r}: {message}", hint=hint)

    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise InputError(
            f"{where}: the class does not implement {missing}", hint="see lpm.scenarios.Scenario"
        )
    for attr in ("name", "step_unit", "horizon", "quantities"):
        if not hasattr(cls, attr):
            fail(attr, "missing: a scenario declares it as a class attribute", hint=_HINTS[attr])
    if not isinstance(cls.name, str) or not cls.name.replace("-", "_").isidentifier():
        fail("name", f"must be a short identifier such as 'covid', got {cls.name!r}")
    if cls.step_unit not in STEP_UNITS:
        fail("step_unit", f"must be one of {', '.join(STEP_UNITS)}, got {cls.step_unit!r}")
    if not isinstance(cls.horizon, int) or cls.horizon < 1:
        fail("horizon", f"must be a whole number of steps >= 1, got {cls.horizon!r}")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, ScenarioConfig)):
        fail("Config", "must be a subclass of lpm.scenarios.ScenarioConfig")
    for name in cls.learnable:
        info = cls.Config.model_fields.get(name)
        if info is None or info.annotation is not float:
            fail("learnable", f"{name!r} is not a float field of {cls.Config.__name__}")
    quantities = _tuple_of(cls.quantities, Quantity, "quantities", fail)
    if not quantities:
        fail("quantities", "declares no quantity")
    names = [q.name for q in quantities]
    if len(set(names)) != len(names):
        fail("quantities", f"names repeat: {names}")
    decisions = _tuple_of(cls.decisions, Decision, "decisions", fail)
    if len(decisions) > MAX_DECISIONS:
        fail("decisions", f"at most {MAX_DECISIONS} decisions, got {len(decisions)}")
    if len({d.name for d in decisions}) != len(decisions):
        fail("decisions", f"names repeat: {[d.name for d in decisions]}")
    for i, d in enumerate(decisions):
        if not d.heuristic or not any(a in d.actions for a in d.heuristic):
            fail(
                f"decisions[{i}].heuristic",
                f"decision {d.name!r} has no default heuristic rule for any of its actions {list(d.actions)}",
                hint="give {action: rule(rows, contexts) -> (K,) probabilities}",
            )
        unknown = sorted(set(d.heuristic) - set(d.actions))
        if unknown:
            fail(f"decisions[{i}].heuristic", f"rules for {unknown}, which are not actions of {d.name!r}")
        if d.plot is not None and d.plot not in d.actions:
            fail(f"decisions[{i}].plot", f"{d.plot!r} is not an action of {d.name!r}")
    for i, p in enumerate(_tuple_of(cls.plots, Plot, "plots", fail)):
        for q in (p.quantity, *p.also):
            if q not in names:
                fail(f"plots[{i}]", f"draws {q!r}, which is not a declared quantity ({', '.join(names)})")
    _specs(cls)


_HINTS = {
    "name": "e.g. name = 'sir'",
    "step_unit": "step_unit = 'day' (or 'week', 'month')",
    "horizon": "horizon = 56  # default number of steps",
    "quantities": "quantities = (Quantity('infected', 'agents infected', by='borough'),)",
}


def _tuple_of(value: Any, kind: type, fld: str, fail: Callable[..., None]) -> tuple:
    items = tuple(value) if isinstance(value, list | tuple) else (value,)
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            fail(f"{fld}[{i}]", f"must be an lpm.scenarios.{kind.__name__}, got {type(item).__name__}")
    return items


@cache
def _specs(cls: type[Scenario]) -> dict[str, ArchetypeSpec]:
    folder = Path(inspect.getsourcefile(cls) or ".").parent
    out = {}
    for i, d in enumerate(cls.decisions):
        where = f"{cls.where()}: field 'decisions[{i}].spec'"
        spec = load_spec(d.spec, where=where, folder=folder)
        if tuple(spec.actions) != tuple(d.actions):
            raise InputError(
                f"{cls.where()}: field 'decisions[{i}].actions': decision {d.name!r} reads the actions "
                f"{list(d.actions)}, its spec {spec.where} has {spec.actions}",
                hint="list the same actions in the same order in both",
            )
        check_cadence(cls, d.name, spec)
        out[d.name] = spec
    return out


def load_spec(spec: Any, *, where: str, folder: Path) -> ArchetypeSpec:
    """A decision's archetype spec: an :class:`ArchetypeSpec`, a mapping, a YAML file (relative paths
    beside the scenario's ``folder`` first) or a bare name in ``archetypes/``."""
    if isinstance(spec, ArchetypeSpec):
        return spec
    if isinstance(spec, Mapping):
        return ArchetypeSpec.from_mapping(dict(spec), where=where, base=folder)
    if isinstance(spec, str | Path):
        beside = folder / spec
        return ArchetypeSpec.load(beside if beside.is_file() else spec)
    raise InputError(f"{where}: must be a spec name, a YAML path or a mapping, got {type(spec).__name__}")


def check_cadence(cls: type[Scenario], decision: str, spec: ArchetypeSpec) -> None:
    """A decision cannot come more often than a step."""
    allowed = _CADENCES[cls.step_unit]
    if spec.cadence.value not in allowed:
        raise InputError(
            f"{spec.where}: field 'cadence': {spec.cadence.value!r} is finer than a step of {cls.where()} "
            f"(a {cls.step_unit}); decision {decision!r} may be {', '.join(allowed)}"
        )
