"""Prompt templates: a system and a user message with ``{name}`` variables, rendered per archetype.

A prompt file (beside its spec or in ``prompts/``; or the same fields inline in the spec) is YAML with two string fields, ``system`` and ``user``, and optionally
``agent_user``: the user message of per-agent prompts (policy ``agent-llm``), which may also name
agent-level population columns such as ``{age}`` or ``{zip}``. Every other ``{name}`` must be an attribute
of the archetype spec (rendered by its label, e.g. ``20-29``) or one of the spec's context variables
(rendered after the spec's rounding, e.g. ``2300``). ``{{`` and ``}}`` write
literal braces. Values are inserted verbatim: braces or quotes inside a value are never interpreted.

Shared text goes first and archetype-specific text last, so the model server's prefix cache reuses the
common part across archetypes.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import yaml
from langchain_core.prompts import ChatPromptTemplate

from lpm.archetype import ArchetypeSpec, InlinePrompt
from lpm.errors import InputError

#: The fields of a prompt file, in the order their messages are sent.
FIELDS = ("system", "user")
#: Optional field: the user message of per-agent prompts.
AGENT_FIELD = "agent_user"

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


class PromptTemplate:
    """The prompt of one archetype spec. Build with :meth:`load`; render one archetype with :meth:`render`.

    >>> spec = ArchetypeSpec.load("covid_isolation")
    >>> prompt = PromptTemplate.load(spec)
    >>> sorted(prompt.variables)
    ['age_group', 'borough', 'cases', 'cases_change', 'sex', 'week']
    """

    def __init__(self, spec: ArchetypeSpec, path: Path, texts: dict[str, str]):
        self.spec = spec
        self.path = path
        self.texts = dict(texts)
        self.variables: set[str] = set()
        for field in FIELDS:
            self.variables |= _variables(path, field, texts[field])
        allowed = set(spec.attribute_names) | set(spec.context)
        unknown = sorted(self.variables - allowed)
        if unknown:
            shown = ", ".join(f"{{{name}}}" for name in unknown)
            raise InputError(
                f"{path}: variable {shown} is neither an attribute nor a context variable of {spec.where}",
                hint=f"attributes: {', '.join(spec.attribute_names)}; context: {', '.join(spec.context) or '-'}; "
                "write {{ and }} for literal braces",
            )
        self._template = ChatPromptTemplate.from_messages(
            [(field, texts[field]) for field in FIELDS], template_format="f-string"
        )
        self.agent_columns: list[str] = []
        """Population columns the per-agent user message names beyond the spec's attributes."""
        self._agent_template: ChatPromptTemplate | None = None
        if AGENT_FIELD in texts:
            agent_vars = _variables(path, AGENT_FIELD, texts[AGENT_FIELD])
            self.agent_columns = sorted(agent_vars - allowed)
            self._agent_names = agent_vars | _variables(path, "system", texts["system"])
            self._agent_template = ChatPromptTemplate.from_messages(
                [("system", texts["system"]), ("user", texts[AGENT_FIELD])], template_format="f-string"
            )

    @classmethod
    def load(cls, spec: ArchetypeSpec) -> PromptTemplate:
        """Read ``spec.prompt`` (a file, or the prompt written inline in the spec) and check it against
        ``spec``; errors name the file and the field or variable."""
        if isinstance(spec.prompt, InlinePrompt):
            texts = spec.prompt.model_dump(exclude_none=True)
            return cls(spec, Path(f"{spec.where}: field 'prompt'"), texts)
        path = Path(spec.prompt)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InputError(f"{path}: cannot read prompt file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: a prompt file must be a YAML mapping with 'system' and 'user' fields")
        for key in raw:
            if key not in (*FIELDS, AGENT_FIELD):
                raise InputError(
                    f"{path}: field {key!r}: unknown key",
                    hint=f"a prompt file has {' and '.join(FIELDS)}, and optionally {AGENT_FIELD}",
                )
        if AGENT_FIELD in raw and (not isinstance(raw[AGENT_FIELD], str) or not raw[AGENT_FIELD].strip()):
            raise InputError(
                f"{path}: field {AGENT_FIELD!r} must be non-empty text, got {raw[AGENT_FIELD]!r}"
            )
        for field in FIELDS:
            if field not in raw:
                raise InputError(f"{path}: field {field!r} is missing")
            if not isinstance(raw[field], str) or not raw[field].strip():
                raise InputError(f"{path}: field {field!r} must be non-empty text, got {raw[field]!r}")
        return cls(spec, path, {f: raw[f] for f in (*FIELDS, AGENT_FIELD) if f in raw})

    def values(
        self, attributes: dict[str, str], context: dict[str, Any], *, names: set[str] | None = None
    ) -> dict[str, Any]:
        """The value of every variable as it enters the prompt (context rounded by the spec)."""
        out: dict[str, Any] = {}
        for name in sorted(self.variables if names is None else names):
            if name in self.spec.context:
                if name not in context:
                    raise InputError(
                        f"{self.path}: context variable {name!r} has no value",
                        hint=f"give it, e.g. --context {name}=… ({self.spec.context[name].description})",
                    )
                out[name] = self.spec.context_value(name, context[name])
            else:
                if name not in attributes:
                    raise InputError(
                        f"{self.path}: attribute {name!r} has no value in archetype {attributes}"
                    )
                out[name] = attributes[name]
        return out

    def render(
        self, attributes: dict[str, str], context: dict[str, Any], *, per_agent: bool = False
    ) -> list[dict[str, str]]:
        """OpenAI chat messages (``[{"role": "system", ...}, {"role": "user", ...}]``) for one archetype.

        attributes: label of each spec attribute (a row of :meth:`Grouping.rows`); extra keys are ignored.
        context: value of each context variable the prompt uses; extra keys are ignored.
        per_agent: use the ``agent_user`` message (attributes then also carry the agent's own columns).
        """
        if per_agent:
            if self._agent_template is None:
                raise InputError(
                    f"{self.path}: field {AGENT_FIELD!r} is missing; per-agent prompts (policy agent-llm) need it"
                )
            values = self.values(attributes, context, names=self._agent_names)
            messages = self._agent_template.format_messages(**values)
            return [{"role": _ROLES[m.type], "content": str(m.content)} for m in messages]
        messages = self._template.format_messages(**self.values(attributes, context))
        return [{"role": _ROLES[m.type], "content": str(m.content)} for m in messages]


def _variables(path: Path, field: str, text: str) -> set[str]:
    """Names of the ``{name}`` variables of one template text; anything but a plain name is an error."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise InputError(
            f"{path}: field {field!r}: {exc}", hint="write {{ and }} for literal braces"
        ) from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise InputError(
                f"{path}: field {field!r}: variable {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a plain name",
                hint="use {name} with a spec attribute or context variable; write {{ and }} for literal braces",
            )
        names.add(name)
    return names
