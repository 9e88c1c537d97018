"""Decoding settings of a decision request: one validated, immutable object that the backends send and the
response cache hashes.

:class:`Decoding` is built once (by :class:`lpm.decision.Decider`) and checked then: an unknown setting or
a value out of range raises :class:`lpm.errors.InputError` naming the setting and the bad value. The keyword
arguments of each request come from its methods (:meth:`Decoding.logprobs_request`,
:meth:`Decoding.sample_request`), and the cache key hashes :meth:`Decoding.requests`, made of the same
dicts, so a key cannot record a value that was not sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lpm.errors import InputError, validation_message

Mode = Literal["auto", "logprobs", "sample"]
MODES: tuple[str, ...] = get_args(Mode)
"""How a distribution is read: ``logprobs`` (first-token log-probabilities under the constraint),
``sample`` (``n_samples`` constrained answers counted), ``auto`` (logprobs, else sample)."""

LOGPROBS_TEMPERATURE = 0.0
"""Temperature of ``logprobs`` requests: greedy, so the answer text is the most likely action."""

Scoring = Literal["first-token", "sequence"]
SCORING_CHOICES: tuple[str, ...] = get_args(Scoring)
"""How a ``logprobs`` answer is read: the first token's alternatives under the constraint (and each whole
action where a first token begins several actions), or always each whole action (:mod:`lpm.logprobs`)."""

DEFAULT_SCORING = "sequence"
"""Whole-action scoring: the most informative reading measured by ``benchmarks/elicitation.py`` on the
probes of both specs with the default model (largest response to the situation: covid 0.038 against 0.021
for the first token, labor 0.163 against 0.099), at a tokenization per action and two completions per
prompt on vLLM (:meth:`lpm.backend.OpenAIBackend._whole_by_tokens`; one request per action where it reads
prompt log-probabilities). Where a server returns neither, mode ``auto`` reads the first token instead
(recorded)."""

MIN_COVERAGE = 0.9
"""Least first-token probability mass on tokens that begin an action for a ``logprobs`` answer to count.
Where the constraint shapes the log-probabilities (vLLM) that mass is 1 less what falls outside the top
alternatives (measured above 0.9999 with SmolLM2-135M-Instruct on the covid prompts); far less means the
server took them before its constraint or ignored it, and renormalising would invent the distribution."""


class Decoding(BaseModel):
    """How one decision request is decoded. Immutable; unknown settings are refused.

    The ``logprobs`` request is greedy and asks for the first token's ``top_logprobs`` alternatives; the
    ``sample`` request asks for ``n_samples`` answers at ``sample_temperature``. Both allow
    :func:`max_tokens` tokens, enough for the longest action.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Mode = Field(default="auto", description="auto, logprobs or sample (see MODES)")
    n_samples: int = Field(default=20, ge=1, description="answers per request in sample mode")
    top_logprobs: int = Field(
        default=20, ge=1, le=20, description="first-token alternatives in logprobs mode (OpenAI allows 20)"
    )
    sample_temperature: float = Field(
        default=1.0, gt=0, description="temperature of sample mode; 1: the model's own distribution"
    )
    scoring: Scoring = Field(
        default=DEFAULT_SCORING,
        description="first-token (whole actions only where a first token is shared) or sequence (always)",
    )
    min_coverage: float = Field(
        default=MIN_COVERAGE,
        ge=0,
        le=1,
        description="least first-token mass on action tokens; below it logprobs mode fails, auto samples",
    )

    def __init__(self, **settings: Any) -> None:
        try:
            super().__init__(**settings)
        except ValidationError as exc:
            raise InputError(
                validation_message(exc, noun="decoding setting"),
                hint=f"settings: {', '.join(type(self).model_fields)}; modes: {', '.join(MODES)}",
            ) from None

    def logprobs_request(self, actions: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments of a ``logprobs`` chat request (the answer constraint is added by the backend)."""
        return {
            "temperature": LOGPROBS_TEMPERATURE,
            "max_tokens": max_tokens(actions),
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }

    def sequence_request(self) -> dict[str, Any]:
        """Keyword arguments of one whole-action scoring request: a completion of token ids that reads the
        next token's log-probabilities, or a chat request whose conversation ends in the action as the
        assistant's answer (the server kind adds what makes it return the prompt's log-probabilities)."""
        return {"temperature": LOGPROBS_TEMPERATURE, "max_tokens": 1}

    def sample_request(self, actions: Sequence[str], n: int | None = None) -> dict[str, Any]:
        """Keyword arguments of a ``sample`` chat request for ``n`` answers (default ``n_samples``)."""
        return {
            "temperature": self.sample_temperature,
            "max_tokens": max_tokens(actions),
            "n": self.n_samples if n is None else n,
        }

    def requests(self, actions: Sequence[str]) -> dict[str, Any]:
        """The mode and the request(s) it may send: ``{"mode", "logprobs"?, "scoring"?, "sequence"?,
        "min_coverage"?, "sample"?}`` (``auto``: all)."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode in ("auto", "logprobs"):
            # the first-token request: sent by first-token scoring, and by auto where whole actions cannot be
            if self.scoring == "first-token" or self.mode == "auto":
                out["logprobs"] = self.logprobs_request(actions)
                out["min_coverage"] = self.min_coverage
            out["scoring"] = self.scoring
            out["sequence"] = self.sequence_request()
        if self.mode in ("auto", "sample"):
            out["sample"] = self.sample_request(actions)
        return out


def max_tokens(actions: Sequence[str]) -> int:
    """Tokens enough for the longest action: one per UTF-8 byte (a token is at least one byte), plus one."""
    return max(len(a.encode("utf-8")) for a in actions) + 1
