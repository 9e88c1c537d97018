"""Reading first-token log-probabilities into a distribution over the actions (lpm.logprobs)."""

from __future__ import annotations

import math

import pytest

from lpm.logprobs import (
    BadAnswer,
    NoLogprobs,
    action_logprobs,
    first_token_candidates,
    first_token_reading,
    match_action,
    normalise_logprobs,
)

ACTIONS = ["isolate", "go out"]


def test_distribution_merges_tokens_by_prefix():
    # the shape measured with SmolLM2 under the choice constraint
    cands = [("isol", 0.619), ("i", 0.332), ("is", 0.031), ("g", 0.013), ("go", 0.005), ("<|im_end|>", 1e-6)]
    reading = first_token_reading(cands, ACTIONS)
    assert math.isclose(sum(reading.probs), 1.0)
    assert math.isclose(reading.probs[0], 0.982 / 1.0, rel_tol=1e-3)
    assert math.isclose(reading.probs[1], 0.018, rel_tol=1e-2)
    assert reading.ambiguous == 0
    assert reading.coverage == pytest.approx(1.0, abs=1e-5)


def test_coverage_is_the_mass_on_action_tokens_before_renormalising():
    # a server that took its log-probabilities before the constraint: most mass on free text
    cands = [("I", 0.5), ("This", 0.3), ("is", 0.1), ("go", 0.05)]
    reading = first_token_reading(cands, ACTIONS)
    assert reading.coverage == pytest.approx(0.15)
    assert reading.probs == pytest.approx([0.1 / 0.15, 0.05 / 0.15])


def test_a_token_that_begins_several_actions_is_never_split_by_rule():
    cands = [("g", 0.4), ("go", 0.3), ("giv", 0.1)]
    reading = first_token_reading(cands, ["go out", "give up"])
    assert reading.probs is None  # the backend must score the whole actions
    assert reading.ambiguous == pytest.approx(0.4)
    assert reading.coverage == pytest.approx(0.8)


def test_zero_mass_on_actions_is_a_bad_answer():
    with pytest.raises(BadAnswer, match="no first-token alternative"):
        first_token_reading([("I", 0.9), ("", 0.1)], ACTIONS)


@pytest.mark.parametrize(
    "alt, message",
    [
        ({"token": "i", "logprob": 3.0}, "not in \\[-inf, 0\\]"),
        ({"token": "i", "logprob": float("nan")}, "not in"),
        ({"token": "i", "logprob": "-0.1"}, "not a number"),
        ({"token": "i", "prob": 1.5}, "not in \\[0, 1\\]"),
    ],
)
def test_absurd_log_probabilities_are_bad_answers(alt, message):
    with pytest.raises(BadAnswer, match=message):
        first_token_candidates({"logprobs": {"content": [{"top_logprobs": [alt]}]}})


def test_alternatives_that_sum_above_one_are_a_bad_answer():
    alts = [{"token": "i", "logprob": math.log(0.8)}, {"token": "g", "logprob": math.log(0.7)}]
    with pytest.raises(BadAnswer, match="sum to 1.5"):
        first_token_candidates({"logprobs": {"content": [{"top_logprobs": alts}]}})


def test_malformed_logprob_shapes_are_bad_answers():
    for lp in (
        {"content": ["x"]},
        {"content": [{"top_logprobs": "x"}]},
        {"content": [{"top_logprobs": [3]}]},
    ):
        with pytest.raises(BadAnswer):
            first_token_candidates({"logprobs": lp})


def _prompt(*tokens):
    return [None] + [{str(t): {"logprob": lp, "rank": 1}} for t, lp in tokens]


def test_whole_action_log_probabilities_from_prompt_logprobs():
    # measured with SmolLM2 on vLLM 0.32 (prompt_logprobs=0, the action as the complete assistant message)
    head = ((1, -0.1), (198, -0.0001))
    isolate = _prompt(*head, (9033, -12.154), (381, -0.399), (2, -6.25), (198, -0.001))
    go_out = _prompt(*head, (2343, -12.279), (820, -0.853), (2, -9.982), (198, -0.0))
    go = _prompt(*head, (2343, -12.279), (2, -21.822), (198, -0.001))
    lps = action_logprobs([isolate, go_out, go])
    assert lps == pytest.approx([-18.804, -23.114, -34.102])
    probs = normalise_logprobs(lps)
    assert probs[0] == pytest.approx(1 / (1 + math.exp(lps[1] - lps[0]) + math.exp(lps[2] - lps[0])))
    # "go" is the start of "go out" but not favoured: its end of turn is unlikely
    assert probs[2] < probs[1]
    # tokens every action shares (here "stay") add the same and cancel
    stay_home = _prompt(*head, (36469, -10.28), (1478, -2.25), (2, -1.0))
    stay_at_work = _prompt(*head, (36469, -10.28), (418, -3.25), (746, -6.08), (2, -1.0))
    assert action_logprobs([stay_home, stay_at_work]) == pytest.approx([-3.25, -10.33])
    with pytest.raises(BadAnswer, match="same conversation"):
        action_logprobs([stay_home, stay_home])
    with pytest.raises(BadAnswer, match="one token object"):
        action_logprobs([stay_home, [None, {"1": {"logprob": -0.1}, "5": {"logprob": -1.0}}]])
    with pytest.raises(BadAnswer, match="missing"):
        action_logprobs([stay_home, None])
    with pytest.raises(BadAnswer, match="probability 0"):
        normalise_logprobs([-math.inf, -math.inf])


def test_candidates_in_every_response_shape():
    openai_shape = {
        "logprobs": {
            "content": [
                {
                    "token": "isol",
                    "logprob": 0.0,
                    "top_logprobs": [{"token": "isol", "logprob": math.log(0.5)}],
                }
            ]
        }
    }
    assert first_token_candidates(openai_shape) == [("isol", pytest.approx(0.5))]
    llama_probs = {"logprobs": {"content": [{"tok_str": "go", "probs": [{"tok_str": "go", "prob": 0.25}]}]}}
    assert first_token_candidates(llama_probs) == [("go", 0.25)]
    llama_top = {"logprobs": {"content": [{"token": "go", "top_probs": [{"token": "go", "prob": 0.75}]}]}}
    assert first_token_candidates(llama_top) == [("go", 0.75)]
    legacy = {"completion_probabilities": [{"content": "i", "probs": [{"tok_str": "i", "prob": 1.0}]}]}
    assert first_token_candidates({"text": "i"}, legacy) == [("i", 1.0)]
    with pytest.raises(NoLogprobs):
        first_token_candidates({"logprobs": None})


def test_match_action_ignores_quotes_and_whitespace_only():
    assert match_action(' "go out"\n', ACTIONS) == 1
    assert match_action("isolate", ACTIONS) == 0
    for text in ("Isolate", "go", None, "isolate go out"):
        with pytest.raises(BadAnswer, match="is not one of"):
            match_action(text, ACTIONS)


def test_whole_action_tree_reads_each_position_once():
    """Two conversations share the prompt and "stay"; each rest is read position by position, every
    position asked once for all the tokens that follow it, and summed per action."""
    from lpm.logprobs import answer_tree, tree_logprobs, tree_nodes

    prompt, stay, home, at, work, end = [1, 2, 3], 10, 11, 12, 13, 2
    shared, rests = answer_tree([[*prompt, stay, home, end], [*prompt, stay, at, work, end]])
    assert shared == [*prompt, stay] and rests == [(home, end), (at, work, end)]
    nodes = tree_nodes(rests)
    assert nodes == {(): [home, at], (home,): [end], (at,): [work], (at, work): [end]}
    read = {(): {home: -1.0, at: -2.0}, (home,): {end: -0.5}, (at,): {work: -0.1}, (at, work): {end: -0.2}}
    assert tree_logprobs(rests, read) == [-1.5, pytest.approx(-2.3)]
    with pytest.raises(BadAnswer, match="same conversation"):
        answer_tree([[1, 2, 3], [1, 2, 3]])
    with pytest.raises(BadAnswer, match="two actions"):
        answer_tree([[1, 2, 3]])
    # a prefix of another action ("go", "go out"): the end of turn after "go" is its own position
    shared, rests = answer_tree([[1, 5, end], [1, 5, 6, end]])
    assert rests == [(end,), (6, end)] and tree_nodes(rests) == {(): [end, 6], (6,): [end]}


def test_token_logprobs_reads_the_asked_ids():
    from lpm.logprobs import token_logprobs

    choice = {
        "index": 0,
        "logprobs": {"top_logprobs": [{"token_id:5": -1.25, "token_id:7": -3.0, "x": -0.1}]},
    }
    assert token_logprobs(choice, [5, 7]) == {5: -1.25, 7: -3.0}
    assert token_logprobs(choice, [5, 9]) is None  # a server that ignored logprob_token_ids
    assert token_logprobs({"index": 0, "logprobs": None}, [5]) is None
    with pytest.raises(BadAnswer, match="not in"):
        token_logprobs({"logprobs": {"top_logprobs": [{"token_id:5": 0.5}]}}, [5])
    with pytest.raises(BadAnswer, match="not in"):
        token_logprobs({"logprobs": {"top_logprobs": [{"token_id:5": float("nan")}]}}, [5])
    with pytest.raises(BadAnswer, match="not a number"):
        token_logprobs({"logprobs": {"top_logprobs": [{"token_id:5": "low"}]}}, [5])
    with pytest.raises(BadAnswer, match="not an object"):
        token_logprobs(None, [5])
