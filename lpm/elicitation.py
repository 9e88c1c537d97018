"""Elicitation: how the question is put to the model, and how its answer becomes a distribution over the
spec's actions.

``choice`` (the default)
    The spec's own prompt; the model answers with one of the actions (under the answer constraint).
``yes-no``
    Two actions only. The user message gains the question ``Would you choose "A" rather than "B"? Answer yes
    or no.``; the model answers ``yes`` or ``no`` and P(A) = P(yes).
``scale``
    Two actions only. The user message gains ``How likely are you to choose "A" rather than "B"? Answer with
    one number from 0 (certainly "B") to 10 (certainly "A").``; the model answers ``0`` … ``10`` and
    P(A) = E[k] / 10 over the model's distribution of the numbers (a verbalised likelihood: the digits
    ``1`` and ``10`` share a first token, so these answers are scored as whole answers).

The question is appended to the last user message (after the archetype-specific text, so the prefix cache
still serves the shared part); the request, its cache key and its answer are those of the asked answers,
and :meth:`Elicitation.to_actions` maps the answer's distribution back to the spec's actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lpm.errors import InputError

ElicitationName = Literal["choice", "yes-no", "scale"]
ELICITATIONS: tuple[str, ...] = get_args(ElicitationName)
"""The elicitation methods (see the module docstring)."""

SCALE = [str(k) for k in range(11)]


@dataclass(frozen=True)
class Elicitation:
    """One elicitation method for one action set (checked at construction)."""

    name: str
    actions: tuple[str, ...]

    @staticmethod
    def check_name(name: str) -> str:
        """``name`` if it is an elicitation method, else an :class:`InputError` listing them."""
        if name not in ELICITATIONS:
            raise InputError(f"elicitation must be one of {', '.join(ELICITATIONS)}, got {name!r}")
        return name

    def __post_init__(self) -> None:
        self.check_name(self.name)
        if self.name != "choice" and len(self.actions) != 2:
            raise InputError(
                f"elicitation {self.name!r} asks about one action against another; the action set "
                f"{list(self.actions)} has {len(self.actions)}",
                hint="use --elicitation choice for more than two actions",
            )

    @property
    def asked(self) -> list[str]:
        """The answers the model may give."""
        if self.name == "yes-no":
            return ["yes", "no"]
        if self.name == "scale":
            return list(SCALE)
        return list(self.actions)

    def question(self) -> str:
        """The text appended to the last user message ('' for ``choice``)."""
        a, b = self.actions[:2] if len(self.actions) >= 2 else (self.actions[0], "")
        if self.name == "yes-no":
            return f'Would you choose "{a}" rather than "{b}"? Answer yes or no.'
        if self.name == "scale":
            return (
                f'How likely are you to choose "{a}" rather than "{b}"? Answer with one number from 0 '
                f'(certainly "{b}") to 10 (certainly "{a}").'
            )
        return ""

    def messages(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """The chat messages to send: the question appended to the last user message."""
        out = [dict(m) for m in messages]
        question = self.question()
        if not question:
            return out
        last = max(i for i, m in enumerate(out) if m["role"] == "user")
        out[last]["content"] = out[last]["content"].rstrip() + "\n" + question
        return out

    def to_actions(self, probs: torch.Tensor) -> torch.Tensor:
        """(K, len(asked)) answer distributions -> (K, len(actions)) action distributions (NaN rows stay NaN)."""
        if self.name == "choice":
            return probs
        if self.name == "yes-no":
            first = probs[:, 0]
        else:
            levels = torch.arange(len(SCALE), dtype=probs.dtype) / (len(SCALE) - 1)
            first = probs @ levels
        return torch.stack([first, 1 - first], dim=1)
