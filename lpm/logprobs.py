"""Reading a model's answer as a choice: first-token log-probabilities into a distribution over the actions.

Under a constraint that only lets the model write one of the actions, the first generated token's top
log-probabilities come from the *masked* distribution, and the mass of an action is spread over every token
that begins it (``isol``, ``is``, ``i`` all begin "isolate"). :func:`first_token_candidates` reads those
alternatives from a response in any of the shapes servers use; :func:`choice_distribution` sums them per
action; :func:`match_action` checks that an answer text is an action. A response without log-probabilities
raises :class:`NoLogprobs`; one that cannot be read as a choice raises :class:`BadAnswer` (the backends
retry it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class NoLogprobs(Exception):
    """The server answered without log-probabilities (``auto`` mode falls back to sampling)."""


class BadAnswer(Exception):
    """The answer cannot be read as a choice (retried)."""


def first_token_candidates(
    choice: dict[str, Any], response: dict[str, Any] | None = None
) -> list[tuple[str, float]]:
    """(token, probability) pairs of the first generated token's top alternatives.

    Reads the OpenAI chat shape (``logprobs.content[0].top_logprobs[*].token/logprob``, also llama.cpp's
    server), llama.cpp's ``probs`` / ``top_probs`` with ``tok_str`` / ``prob``, and the older top-level
    ``completion_probabilities`` of ``response``. Raises :class:`NoLogprobs` when there are none.
    """
    entries: Any = None
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        entries = lp.get("content")
    elif isinstance(lp, list):
        entries = lp
    if not entries and response:
        entries = response.get("completion_probabilities")
    if not entries or not isinstance(entries, list) or not isinstance(entries[0], dict):
        raise NoLogprobs("the response has no log-probabilities")
    first = entries[0]
    alts = first.get("top_logprobs") or first.get("top_probs") or first.get("probs")
    if not alts:
        raise NoLogprobs("the first token has no top log-probabilities")
    out = []
    for alt in alts:
        token = alt.get("token", alt.get("tok_str"))
        if token is None:
            continue
        if alt.get("logprob") is not None:
            p = math.exp(float(alt["logprob"]))
        elif alt.get("prob") is not None:
            p = float(alt["prob"])
        else:
            continue
        out.append((str(token), p))
    if not out:
        raise NoLogprobs("the first token's alternatives carry no probabilities")
    return out


def choice_distribution(
    candidates: Sequence[tuple[str, float]], actions: Sequence[str]
) -> tuple[list[float], float]:
    """Probability of each action (A floats summing to 1) from the first token's alternatives, and the
    ambiguous share of their mass (0..1).

    A token counts for an action when it is a non-empty prefix of it; the mass of a token that is a prefix
    of several actions (``g`` for "go" and "give up") is split in proportion to their unambiguous mass
    (equally if none). Raises :class:`BadAnswer` when no token begins any action.
    """
    mass = [0.0] * len(actions)
    shared: list[tuple[list[int], float]] = []
    for token, p in candidates:
        hits = [i for i, a in enumerate(actions) if token and a.startswith(token)]
        if len(hits) == 1:
            mass[hits[0]] += p
        elif hits:
            shared.append((hits, p))
    ambiguous = sum(p for _, p in shared)
    base = list(mass)
    for hits, p in shared:
        weights = [base[i] for i in hits]
        total = sum(weights)
        for i, w in zip(hits, weights, strict=True):
            mass[i] += p * (w / total if total > 0 else 1 / len(hits))
    total = sum(mass)
    if not total > 0:
        tokens = [t for t, _ in candidates[:5]]
        raise BadAnswer(f"no first-token alternative begins an action (top tokens: {tokens})")
    return [m / total for m in mass], ambiguous / total


def match_action(text: str | None, actions: Sequence[str]) -> int:
    """Index of the action ``text`` is (surrounding whitespace and quotes ignored); BadAnswer otherwise."""
    clean = (text or "").strip().strip("\"'").strip()
    for i, a in enumerate(actions):
        if clean == a:
            return i
    raise BadAnswer(f"answer {text!r} is not one of {list(actions)}")
