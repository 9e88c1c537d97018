"""Reading first-token log-probabilities into a distribution over the actions (lpm.logprobs)."""

from __future__ import annotations

import math

import pytest

from lpm.logprobs import BadAnswer, NoLogprobs, choice_distribution, first_token_candidates, match_action

ACTIONS = ["isolate", "go out"]


def test_distribution_merges_tokens_by_prefix():
    # the shape measured with SmolLM2 under the choice constraint
    cands = [("isol", 0.619), ("i", 0.332), ("is", 0.031), ("g", 0.013), ("go", 0.005), ("<|im_end|>", 1e-6)]
    probs, ambiguous = choice_distribution(cands, ACTIONS)
    assert math.isclose(sum(probs), 1.0)
    assert math.isclose(probs[0], 0.982 / 1.0, rel_tol=1e-3)
    assert math.isclose(probs[1], 0.018, rel_tol=1e-2)
    assert ambiguous == 0


def test_ambiguous_token_split_in_proportion_to_unambiguous_mass():
    cands = [("g", 0.4), ("go", 0.3), ("giv", 0.1)]
    probs, ambiguous = choice_distribution(cands, ["go out", "give up"])
    # "g" begins both: split 3:1 like the unambiguous masses 0.3 and 0.1
    assert probs[0] == pytest.approx((0.3 + 0.3) / 0.8)
    assert probs[1] == pytest.approx((0.1 + 0.1) / 0.8)
    assert ambiguous == pytest.approx(0.4 / 0.8)
    # no unambiguous mass at all: equal split
    probs, _ = choice_distribution([("g", 1.0)], ["go out", "give up"])
    assert probs == [0.5, 0.5]


def test_zero_mass_on_actions_is_a_bad_answer():
    with pytest.raises(BadAnswer, match="no first-token alternative"):
        choice_distribution([("I", 0.9), ("", 0.1)], ACTIONS)


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
