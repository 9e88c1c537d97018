"""Archetype specs: which attributes a prompt mentions, its actions, context and cadence; grouping.

A spec is a YAML file in ``archetypes/``. Agents that share the values of the spec's attributes form
one archetype; the model is asked once per archetype that actually occurs in the population.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lpm.errors import InputError, validation_message
from lpm.paths import project_root
from lpm.population import Population, smallest_int_dtype


class RoundRule(BaseModel):
    """How a context value is rounded before it enters a prompt, so nearby steps share cache entries.

    Exactly one of ``significant`` (significant figures) or ``decimals`` (digits after the point).
    """

    model_config = ConfigDict(extra="forbid")
    significant: int | None = Field(default=None, ge=1, le=15, description="significant figures to keep")
    decimals: int | None = Field(default=None, ge=0, le=15, description="decimal places to keep")

    @model_validator(mode="after")
    def _one(self) -> RoundRule:
        if (self.significant is None) == (self.decimals is None):
            raise ValueError("give exactly one of 'significant' or 'decimals'")
        return self

    def apply(self, value: float) -> float | int:
        """Round ``value``; whole results come back as ``int`` so prompts read "2300", not "2300.0"."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"context value must be finite, got {value}")
        if self.decimals is not None:
            out = round(value, self.decimals)
        elif value == 0:
            out = 0.0
        else:
            digits = self.significant - 1 - math.floor(math.log10(abs(value)))
            out = round(value, digits)
        return int(out) if float(out).is_integer() else out


class ContextVar(BaseModel):
    """A scenario quantity the prompt may mention, e.g. reported cases in the past week."""

    model_config = ConfigDict(extra="forbid")
    description: str = Field(description="what the value means, with its unit")
    round: RoundRule | None = Field(
        default_factory=lambda: RoundRule(significant=2), description="rounding of numbers; null keeps them"
    )
    probe: list[float | str] | None = Field(
        default=None,
        min_length=1,
        description="typical values, low to high, that `lpm probe` sweeps (numbers in the variable's unit, or text)",
    )

    @field_validator("probe")
    @classmethod
    def _finite(cls, value: list[float | str] | None) -> list[float | str] | None:
        bad = [v for v in value or [] if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"probe values must be finite, got {bad}")
        return value

    @model_validator(mode="after")
    def _text_needs_no_rounding(self) -> ContextVar:
        text = [v for v in self.probe or [] if isinstance(v, str)]
        if text and self.round is not None:
            raise ValueError(
                f"probe values {text[:3]} are text, but the variable rounds numbers; "
                "give numbers, or round: null for a text variable"
            )
        return self

    def render(self, value: Any) -> float | int | str:
        """The value as it enters a prompt: numbers rounded by ``round``; text only where ``round`` is null.

        Raises ValueError for text (or a flag) given to a variable that rounds numbers."""
        if self.round is None:
            return value
        if isinstance(value, str | bool):
            raise ValueError(
                f"{value!r} is not a number, but the variable rounds numbers (round: "
                f"{self.round.model_dump(exclude_none=True)}); give a number, or declare round: null for text"
            )
        return self.round.apply(value)


class Attribute(BaseModel):
    """A grouping attribute: a categorical population column, or a numeric one cut into ``bins``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    bins: list[float] | None = Field(default=None, description="edges: value v falls in [edge_i, edge_i+1)")
    labels: list[str] | None = Field(default=None, description="one label per bin (default 'lo-hi')")

    @field_validator("bins")
    @classmethod
    def _numbers(cls, value: list[float] | None) -> list[float] | None:
        bad = [i for i, edge in enumerate(value or []) if math.isnan(edge)]
        if bad:
            raise ValueError(
                f"bin edge {bad[0]} is not a number (nan); edges are numbers, or .inf / -.inf for an open end"
            )
        return value

    @model_validator(mode="after")
    def _bins(self) -> Attribute:
        if self.bins is not None:
            if len(self.bins) < 2 or any(hi <= lo for lo, hi in zip(self.bins, self.bins[1:], strict=False)):
                raise ValueError("bins must be at least two strictly increasing edges")
            n = len(self.bins) - 1
            if self.labels is None:
                self.labels = [_bin_label(lo, hi) for lo, hi in zip(self.bins, self.bins[1:], strict=False)]
            elif len(self.labels) != n:
                raise ValueError(f"{n} bins need {n} labels, got {len(self.labels)}")
        elif self.labels is not None:
            raise ValueError("labels are only allowed together with bins")
        return self


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _bin_label(lo: float, hi: float) -> str:
    """Default label of the bin [lo, hi): ``18-64``, ``65+`` (open above), ``under 18`` (open below)."""
    if math.isinf(hi):
        return "any" if math.isinf(lo) else f"{_num(lo)}+"
    if math.isinf(lo):
        return f"under {_num(hi)}"
    return f"{_num(lo)}-{_num(hi - 1)}"


class Cadence(StrEnum):
    """How often agents decide: once (at the first step), every simulated day, week or calendar month."""

    once = "once"
    daily = "daily"
    weekly = "weekly"
    monthly = "monthly"


class InlinePrompt(BaseModel):
    """A prompt written inside the spec instead of a file in ``prompts/`` (same fields as a prompt file)."""

    model_config = ConfigDict(extra="forbid")
    system: str = Field(min_length=1)
    user: str = Field(min_length=1)
    agent_user: str | None = Field(default=None, min_length=1)


class ArchetypeSpec(BaseModel):
    """One archetype spec file. Load with :meth:`load`; group a population with :meth:`group`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    prompt: InlinePrompt | Path = Field(
        description="prompt template file (in prompts/, beside the spec, or absolute), or the prompt inline"
    )
    attributes: list[Attribute] = Field(min_length=1)
    members: dict[str, bool | str | list[str]] = Field(
        default_factory=dict, description="only agents matching every entry decide, e.g. {labor_force: true}"
    )
    actions: list[str] = Field(min_length=2)
    context: dict[str, ContextVar] = Field(default_factory=dict)
    cadence: Cadence = Cadence.weekly
    source: Path | None = Field(default=None, exclude=True, description="file the spec was read from")
    _where: str = PrivateAttr(default="")

    @field_validator("attributes", mode="before")
    @classmethod
    def _short_attributes(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("actions")
    @classmethod
    def _actions(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or any(not a.strip() for a in value):
            raise ValueError(f"actions must be distinct, non-empty strings, got {value}")
        padded = [a for a in value if a != a.strip()]
        if padded:
            raise ValueError(
                f"action {padded[0]!r} begins or ends with a space, so no answer would ever match it; "
                f"write {padded[0].strip()!r}"
            )
        return value

    @model_validator(mode="after")
    def _unique_attributes(self) -> ArchetypeSpec:
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"attributes repeat a name: {names}")
        return self

    @field_validator("context")
    @classmethod
    def _context_apart_from_attributes(
        cls, value: dict[str, ContextVar], info: ValidationInfo
    ) -> dict[str, ContextVar]:
        attributes = [a.name for a in info.data.get("attributes", [])]
        both = [name for name in value if name in attributes]
        if both:
            raise ValueError(
                f"context variable {both[0]!r} has the name of attribute {both[0]!r}: in the prompt "
                f"{{{both[0]}}} would show the context value instead of the archetype's; rename the context variable"
            )
        return value

    # -- files ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> ArchetypeSpec:
        """Read and validate a spec file. A bare name (``covid_isolation``) is looked up in ``archetypes/``."""
        path = resolve_spec_path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({exc})") from None
        return cls.from_mapping(raw, where=path)

    @classmethod
    def from_mapping(cls, raw: Any, *, where: str | Path, base: Path | None = None) -> ArchetypeSpec:
        """Validate a spec given as a mapping (a parsed file, or written inline in a scenario).

        where: the file (or file and field) named by errors, and the spec's ``source``. A relative prompt
        path is looked up in ``prompts/``, then in ``base`` (default: the folder of ``where`` if it is a file).
        """
        if not isinstance(raw, dict):
            raise InputError(f"{where}: an archetype spec must be a mapping, got {type(raw).__name__}")
        try:
            spec = cls.model_validate(raw)
        except ValidationError as exc:
            raise InputError(f"{where}: {validation_message(exc)}") from None
        spec.source = Path(where) if Path(where).is_file() else None
        if base is None and spec.source is not None:
            base = spec.source.parent
        if isinstance(spec.prompt, Path) and not spec.prompt.is_absolute():
            places = [project_root() / "prompts"] + ([base] if base is not None else [])
            found = [p / spec.prompt for p in places if (p / spec.prompt).is_file()]
            if not found:
                raise InputError(
                    f"{where}: field 'prompt': prompt file {spec.prompt} does not exist "
                    f"(looked in {' and '.join(str(p) for p in places)})"
                )
            spec.prompt = found[0]
        elif isinstance(spec.prompt, Path) and not spec.prompt.is_file():
            raise InputError(f"{where}: field 'prompt': prompt file {spec.prompt} does not exist")
        spec._where = str(where)
        return spec

    @property
    def where(self) -> str:
        """The file (or scenario file and field) errors about this spec name."""
        return self._where or (str(self.source) if self.source else f"archetype spec {self.name!r}")

    @property
    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]

    # -- context --------------------------------------------------------------------------------
    def context_value(self, name: str, value: Any, *, given: str = "context") -> float | int | str:
        """Context variable ``name`` at ``value`` as it enters a prompt (:meth:`ContextVar.render`).

        A name the spec does not declare, or a value its variable refuses (text where it rounds numbers, a
        non-finite number), is an :class:`InputError` naming the variable, the value, the spec and its
        declared names. given: where the value came from, as errors name it (``--context``, ``context``).
        """
        if name not in self.context:
            close = difflib.get_close_matches(name, list(self.context), n=1)
            raise InputError(
                f"{given} {name}={value}: {self.where} declares no context variable {name!r}"
                + (f" (did you mean {close[0]!r}?)" if close else ""),
                hint=f"its context variables: {', '.join(self.context) or 'none'}",
            )
        try:
            return self.context[name].render(value)
        except (TypeError, ValueError) as exc:
            problem = str(exc) if isinstance(exc, ValueError) else f"{value!r} is not a number ({exc})"
            raise InputError(
                f"{given} {name}={value}: context variable {name!r} of {self.where}: {problem}",
                hint=f"{name}: {self.context[name].description}",
            ) from None

    def check_context(self, context: Mapping[str, Any], *, given: str = "context") -> dict[str, Any]:
        """Every value of ``context`` as it enters a prompt, each checked by :meth:`context_value`."""
        return {name: self.context_value(name, value, given=given) for name, value in context.items()}

    # -- grouping -------------------------------------------------------------------------------
    def check(self, pop: Population) -> None:
        """Raise :class:`InputError` if ``pop`` lacks a column this spec needs or a column has the wrong kind."""
        for i, attr in enumerate(self.attributes):
            if attr.name not in pop:
                raise InputError(
                    f"{self.where}: field 'attributes[{i}]': the population has no attribute {attr.name!r}",
                    hint=f"population columns: {', '.join(pop.columns)}",
                )
            if attr.bins is None and not pop.is_categorical(attr.name):
                raise InputError(
                    f"{self.where}: field 'attributes[{i}]': {attr.name!r} is numeric; give it bins"
                )
            if attr.bins is not None and pop.is_categorical(attr.name):
                raise InputError(
                    f"{self.where}: field 'attributes[{i}]': {attr.name!r} is categorical; drop its bins"
                )
        for name, want in self.members.items():
            if name not in pop:
                raise InputError(
                    f"{self.where}: field 'members.{name}': the population has no attribute {name!r}"
                )
            if pop.is_categorical(name):
                wanted = [want] if isinstance(want, str) else want
                if isinstance(wanted, bool) or not set(wanted) <= set(pop.labels(name)):
                    raise InputError(
                        f"{self.where}: field 'members.{name}': {want!r} is not among its labels {pop.labels(name)}"
                    )
            elif not isinstance(want, bool):
                raise InputError(f"{self.where}: field 'members.{name}': a flag column takes true or false")

    def member_mask(self, pop: Population) -> torch.Tensor | None:
        """Bool (N,) mask of agents that decide under this spec, or None when all do."""
        mask = None
        for name, want in self.members.items():
            col = pop[name]
            if pop.is_categorical(name):
                labels = pop.labels(name)
                codes = torch.tensor([labels.index(w) for w in ([want] if isinstance(want, str) else want)])
                part = torch.isin(col, codes.to(col.dtype))
            else:
                part = col.bool() if want else ~col.bool()
            mask = part if mask is None else mask & part
        return mask

    def group(self, pop: Population) -> Grouping:
        """Group id of every agent (-1 for non-members) and the table of the K archetypes that occur.

        O(N): one combined code per agent, a bincount over the code space and a lookup table. Archetypes
        are numbered in the lexicographic order of their attribute codes (first attribute slowest), the
        order of a sorted ``pandas.groupby`` on the same columns.
        """
        self.check(pop)
        n = len(pop)
        codes, sizes, labels = [], [], []
        for i, attr in enumerate(self.attributes):
            col = pop[attr.name]
            if attr.bins is None:
                labs = pop.labels(attr.name)
                code = col
            else:
                edges = torch.tensor(attr.bins, dtype=torch.float64, device=col.device)
                code = torch.bucketize(col.to(torch.float64), edges, right=True) - 1
                outside = (code < 0) | (code >= len(attr.bins) - 1)
                if bool(outside.any()):
                    bad = col[outside][:3].tolist()
                    raise InputError(
                        f"{self.where}: field 'attributes[{i}].bins': values of {attr.name!r} such as {bad} "
                        f"fall outside [{attr.bins[0]}, {attr.bins[-1]})"
                    )
                labs = list(attr.labels or [])
            codes.append(code)
            sizes.append(len(labs))
            labels.append(labs)
        space = math.prod(sizes)
        device = pop[self.attributes[0].name].device
        # combined code in the smallest dtype holding the code space (uint8 for K <= 256): less memory traffic
        dtype = torch.uint8 if space <= 256 else smallest_int_dtype(0, space - 1)
        combined = torch.zeros(n, dtype=dtype, device=device)
        for code, size in zip(codes, sizes, strict=True):
            combined.mul_(size).add_(code.to(dtype))
        mask = self.member_mask(pop)
        members = combined if mask is None else combined[mask]
        if space <= 4 * max(n, 1) + 1024:
            present_counts = torch.bincount(members, minlength=space)
            present = torch.nonzero(present_counts).squeeze(1)
            counts = present_counts[present]
            lut = torch.full((space,), -1, dtype=torch.int64, device=device)
            lut[present] = torch.arange(len(present), device=device)
            ids = lut.take(combined.long())
        else:  # a huge code space: sort instead of a dense table
            present, inverse, counts = torch.unique(members.long(), return_inverse=True, return_counts=True)
            ids = torch.full((n,), -1, dtype=torch.int64, device=device)
            if mask is None:
                ids = inverse
            else:
                ids[mask] = inverse
        if mask is not None:
            ids = torch.where(mask, ids, -1)
        k = int(present.numel())
        # decode the K occurring combinations back into labels
        rest = present.cpu().clone()
        columns: dict[str, list[str]] = {}
        for attr, size, labs in zip(
            reversed(self.attributes), reversed(sizes), reversed(labels), strict=True
        ):
            columns[attr.name] = [labs[c] for c in (rest % size).tolist()]
            rest //= size
        table = pd.DataFrame({a: columns[a] for a in self.attribute_names})
        table["agents"] = counts.cpu().numpy()
        table.index.name = "archetype"
        return Grouping(
            ids=ids.to(smallest_int_dtype(-1, max(k - 1, 0))),
            k=k,
            counts=counts,
            table=table,
            labels=dict(zip(self.attribute_names, labels, strict=True)),
        )


@dataclass
class Grouping:
    """Result of :meth:`ArchetypeSpec.group`.

    ids: (N,) int, archetype of each agent, -1 for agents outside the spec's members.
    k: number of archetypes that occur. counts: (K,) agents per archetype.
    table: K rows, one column per attribute (labels) and ``agents``.
    labels: every label each attribute can take, in code order (also those that occur in no archetype).
    """

    ids: torch.Tensor
    k: int
    counts: torch.Tensor
    table: pd.DataFrame
    labels: dict[str, list[str]] = field(default_factory=dict)

    def rows(self) -> list[dict[str, str]]:
        """The K attribute combinations as dicts of label strings, in archetype order."""
        attrs = [c for c in self.table.columns if c != "agents"]
        return self.table[attrs].to_dict("records")


def resolve_spec_path(path: str | Path) -> Path:
    """A spec path as given, or ``archetypes/<name>.yaml`` for a bare name."""
    p = Path(path)
    if p.is_file():
        return p
    if p.suffix == "" and len(p.parts) == 1:
        candidate = project_root() / "archetypes" / f"{p.name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(x.stem for x in (project_root() / "archetypes").glob("*.yaml"))
    raise InputError(f"{path}: no such archetype spec", hint=f"shipped specs: {', '.join(known)}")
