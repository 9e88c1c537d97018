"""Reading a model's answer as a choice: log-probabilities into a distribution over the actions.

Two readings, recorded as the answer's *scoring*:

``first-token``
    Under a constraint that only lets the model write one of the actions, the first generated token's top
    log-probabilities come from the *masked* distribution, and the mass of an action is spread over every
    token that begins it (``isol``, ``is``, ``i`` all begin "isolate"). :func:`first_token_candidates` reads
    those alternatives from a response in any of the shapes servers use; :func:`first_token_reading` sums
    them per action and says how much of the mass fell on tokens that begin an action at all (its
    *coverage*, before renormalisation: about 1 when the constraint shaped the log-probabilities, much less
    when a server took them before its constraint or ignored it). A token that begins several actions
    (``stay`` of "stay home" and "stay at work") makes the reading *ambiguous*: the first token cannot say
    which action the model prefers, and lpm never splits that mass by a rule; the backend scores each
    whole action instead.
``sequence``
    The log-probability of each whole action as the assistant's complete answer, normalised over the
    actions (:func:`normalise_logprobs`): read position by position from token ids where the server can
    (:func:`answer_tree`, :func:`tree_nodes`, :func:`token_logprobs`, :func:`tree_logprobs`), else from its
    prompt log-probabilities (:func:`action_logprobs`); the same numbers.

:func:`match_action` checks that an answer text is an action. A response without log-probabilities raises
:class:`NoLogprobs`; one that cannot be read as a choice raises :class:`BadAnswer` (the backends retry it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SCORINGS = ("first-token", "sequence", "samples")
"""How an answer's probabilities were read: first-token log-probabilities under the constraint, whole-action
log-probabilities, or the shares of sampled answers."""

_LOGPROB_SLACK = 1e-4
"""A log-probability may exceed 0 by this much (float rounding on the server); more is a bad answer."""


class NoLogprobs(Exception):
    """The server answered without log-probabilities (``auto`` mode falls back to sampling)."""


class BadAnswer(Exception):
    """The answer cannot be read as a choice (retried)."""


@dataclass(frozen=True)
class FirstToken:
    """The first token's alternatives read per action.

    probs: probability of each action (sums to 1), or None when ``ambiguous`` > 0 (the caller must score the
    whole actions). coverage: probability mass of the alternatives that begin an action, before
    renormalisation (0..1). ambiguous: the part of that mass on tokens that begin more than one action.
    """

    probs: list[float] | None
    coverage: float
    ambiguous: float


def _probability(alt: dict[str, Any]) -> float | None:
    """The probability of one alternative (from ``logprob`` or ``prob``); BadAnswer for absurd values."""
    if alt.get("logprob") is not None:
        value = alt["logprob"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadAnswer(f"a log-probability is not a number: {value!r}")
        if not (math.isfinite(value) or value == -math.inf) or value > _LOGPROB_SLACK:
            raise BadAnswer(f"a log-probability is not in [-inf, 0]: {value!r}")
        return math.exp(min(float(value), 0.0))
    if alt.get("prob") is not None:
        value = alt["prob"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise BadAnswer(f"a probability is not in [0, 1]: {value!r}")
        return float(value)
    return None


def first_token_candidates(
    choice: dict[str, Any], response: dict[str, Any] | None = None
) -> list[tuple[str, float]]:
    """(token, probability) pairs of the first generated token's top alternatives.

    Reads the OpenAI chat shape (``logprobs.content[0].top_logprobs[*].token/logprob``, also llama.cpp's
    server), llama.cpp's ``probs`` / ``top_probs`` with ``tok_str`` / ``prob``, and the older top-level
    ``completion_probabilities`` of ``response``. Raises :class:`NoLogprobs` when there are none and
    :class:`BadAnswer` when they are malformed (a log-probability above 0, a probability sum above 1).
    """
    entries: Any = None
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        entries = lp.get("content")
    elif isinstance(lp, list):
        entries = lp
    if not entries and response:
        entries = response.get("completion_probabilities")
    if not entries:
        raise NoLogprobs("the response has no log-probabilities")
    if not isinstance(entries, list) or not isinstance(entries[0], dict):
        raise BadAnswer(f"the log-probabilities are not a list of token entries: {str(entries)[:200]}")
    first = entries[0]
    alts = first.get("top_logprobs") or first.get("top_probs") or first.get("probs")
    if not alts:
        raise NoLogprobs("the first token has no top log-probabilities")
    if not isinstance(alts, list):
        raise BadAnswer(f"the first token's alternatives are not a list: {str(alts)[:200]}")
    out = []
    for alt in alts:
        if not isinstance(alt, dict):
            raise BadAnswer(f"a first-token alternative is not an object: {str(alt)[:200]}")
        token = alt.get("token", alt.get("tok_str"))
        p = _probability(alt)
        if token is None or p is None:
            continue
        out.append((str(token), p))
    if not out:
        raise NoLogprobs("the first token's alternatives carry no probabilities")
    if sum(p for _, p in out) > 1.0 + 1e-3:
        raise BadAnswer(f"the first token's alternatives sum to {sum(p for _, p in out):.4f} > 1")
    return out


def first_token_reading(candidates: Sequence[tuple[str, float]], actions: Sequence[str]) -> FirstToken:
    """The first token's alternatives summed per action (see :class:`FirstToken`).

    A token counts for an action when it is a non-empty prefix of it. Raises :class:`BadAnswer` when no
    token begins any action.
    """
    mass = [0.0] * len(actions)
    ambiguous = 0.0
    for token, p in candidates:
        hits = [i for i, a in enumerate(actions) if token and a.startswith(token)]
        if len(hits) == 1:
            mass[hits[0]] += p
        elif hits:
            ambiguous += p
    coverage = sum(mass) + ambiguous
    if not coverage > 0:
        tokens = [t for t, _ in candidates[:5]]
        raise BadAnswer(f"no first-token alternative begins an action (top tokens: {tokens})")
    probs = None if ambiguous > 0 else [m / coverage for m in mass]
    return FirstToken(probs, min(coverage, 1.0), ambiguous)


def action_logprobs(replies: Sequence[Any]) -> list[float]:
    """Log-probability of each whole answer, from the ``prompt_logprobs`` of one conversation per action.

    replies: vLLM's ``prompt_logprobs`` of the same conversation ending in each action as the complete
    assistant message (its end-of-turn token included, so an action that is the start of another, "go" and
    "go out", is not favoured): a list with ``None`` first and then one ``{token_id: {"logprob": …}}`` per
    token. Each answer's log-probability is the sum over its tokens after the longest prefix all the
    conversations share; tokens shared by every action add the same to each and cancel when normalised
    (:func:`normalise_logprobs`).
    """

    def token(entry: Any) -> tuple[str, float]:
        # asked with prompt_logprobs=0, each position holds exactly the prompt's own token
        if not isinstance(entry, dict) or len(entry) != 1:
            raise BadAnswer(f"a prompt log-probability entry is not one token object: {str(entry)[:200]}")
        token_id, info = next(iter(entry.items()))
        if not isinstance(info, dict) or _probability(info) is None or "logprob" not in info:
            raise BadAnswer(f"a prompt token has no log-probability: {str(entry)[:200]}")
        return str(token_id), float(info["logprob"])

    tokens = []
    for reply in replies:
        if not isinstance(reply, list) or len(reply) < 2:
            raise BadAnswer("the prompt log-probabilities are missing or not a list")
        tokens.append([token(e) for e in reply[1:]])
    shared = len(answer_tree([[token_id for token_id, _ in t] for t in tokens])[0])
    return [sum(lp for _, lp in t[shared:]) for t in tokens]


def answer_tree(conversations: Sequence[Sequence[Any]]) -> tuple[list[Any], list[tuple[Any, ...]]]:
    """The token tree of the actions' complete conversations (one per action, each ending in its action as
    the whole assistant message, end-of-turn included; token ids as the server tokenized them): the tokens
    they all share, and each one's rest after them. The rests are what whole-action scoring sums; the
    shared tokens add the same to every action and cancel when normalised."""
    if len(conversations) < 2:
        raise BadAnswer("whole-action scoring needs two actions or more")
    shared = 0
    while all(len(c) > shared for c in conversations) and len({c[shared] for c in conversations}) == 1:
        shared += 1
    rests = [tuple(c[shared:]) for c in conversations]
    if any(not r for r in rests):
        raise BadAnswer("two actions gave the same conversation")
    return list(conversations[0][:shared]), rests


def tree_nodes(rests: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Every proper prefix of the rests (the empty one first, then by length) -> the tokens that follow it
    in some rest: the positions whose next-token log-probabilities whole-action scoring reads."""
    nodes: dict[tuple[int, ...], set[int]] = {}
    for rest in rests:
        for k in range(len(rest)):
            nodes.setdefault(rest[:k], set()).add(rest[k])
    return {node: sorted(nodes[node]) for node in sorted(nodes, key=len)}


def token_logprobs(choice: Any, wanted: Sequence[int]) -> dict[int, float] | None:
    """The log-probability of each ``wanted`` token id at the first generated position of a completion
    choice asked with ``logprob_token_ids`` and ``return_tokens_as_token_ids`` (keys ``token_id:N``); None
    when any of them is missing (a server that ignores ``logprob_token_ids``). BadAnswer for a malformed
    entry or a log-probability above 0."""
    if not isinstance(choice, dict):
        raise BadAnswer(f"a completion choice is not an object: {str(choice)[:200]}")
    logprobs = choice.get("logprobs")
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(top, list) or not top or not isinstance(top[0], dict):
        return None
    out: dict[int, float] = {}
    for key, value in top[0].items():
        if not (isinstance(key, str) and key.startswith("token_id:")):
            continue
        try:
            token, lp = int(key[len("token_id:") :]), float(value)
        except (TypeError, ValueError):
            raise BadAnswer(f"a token log-probability is not a number: {key}: {str(value)[:100]}") from None
        if not lp <= 1e-6:  # NaN included
            raise BadAnswer(f"a log-probability is not in [-inf, 0]: {key}: {lp!r}")
        out[token] = lp
    return out if all(t in out for t in wanted) else None


def tree_logprobs(rests: Sequence[tuple[int, ...]], read: Any) -> list[float]:
    """Each rest's log-probability, the sum over its tokens of ``read[prefix][token]`` (the next-token
    log-probability of ``token`` after the shared tokens and ``prefix``)."""
    return [sum(read[rest[:k]][rest[k]] for k in range(len(rest))) for rest in rests]


def normalise_logprobs(logprobs: Sequence[float]) -> list[float]:
    """Probabilities proportional to ``exp(logprobs)`` (computed stably); BadAnswer when all are -inf."""
    top = max(logprobs)
    if top == -math.inf:
        raise BadAnswer("every action has probability 0")
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def match_action(text: str | None, actions: Sequence[str]) -> int:
    """Index of the action ``text`` is (surrounding whitespace and quotes ignored); BadAnswer otherwise."""
    if text is not None and not isinstance(text, str):
        raise BadAnswer(f"the answer is not text: {str(text)[:200]}")
    clean = (text or "").strip().strip("\"'").strip()
    for i, a in enumerate(actions):
        if clean == a:
            return i
    raise BadAnswer(f"answer {text!r} is not one of {list(actions)}")
