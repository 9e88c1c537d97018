"""Decoding settings: validated once, immutable, and the source of the requests the backends send."""

from __future__ import annotations

import pydantic
import pytest

from lpm.decoding import MODES, Decoding, max_tokens
from lpm.errors import InputError

ACTIONS = ["isolate", "go out"]


def test_defaults_and_requests_per_mode():
    d = Decoding()
    assert (d.mode, d.n_samples, d.top_logprobs, d.sample_temperature) == ("auto", 20, 20, 1.0)
    logprobs = {"temperature": 0.0, "max_tokens": 8, "logprobs": True, "top_logprobs": 20}
    sample = {"temperature": 1.0, "max_tokens": 8, "n": 20}
    assert d.logprobs_request(ACTIONS) == logprobs
    assert d.sample_request(ACTIONS) == sample
    assert d.sample_request(ACTIONS, n=3) == {**sample, "n": 3}
    sequence = {"temperature": 0.0, "max_tokens": 1}
    assert d.requests(ACTIONS) == {
        "mode": "auto",
        "logprobs": logprobs,
        "scoring": "sequence",
        "sequence": sequence,
        "min_coverage": 0.9,
        "sample": sample,
    }
    assert Decoding(mode="logprobs", scoring="first-token", min_coverage=0.5).requests(ACTIONS) == {
        "mode": "logprobs",
        "logprobs": logprobs,
        "scoring": "first-token",
        "sequence": sequence,
        "min_coverage": 0.5,
    }
    # whole-action scoring sends no first-token request, so its settings are not in the key
    assert Decoding(mode="logprobs", scoring="sequence", min_coverage=0.5).requests(ACTIONS) == {
        "mode": "logprobs",
        "scoring": "sequence",
        "sequence": sequence,
    }
    assert Decoding(mode="sample", n_samples=5).requests(ACTIONS) == {
        "mode": "sample",
        "sample": {**sample, "n": 5},
    }
    assert MODES == ("auto", "logprobs", "sample")


def test_max_tokens_covers_the_longest_action_in_bytes():
    assert max_tokens(["isolate", "go out"]) == 8
    assert max_tokens(["é"]) == 3  # two UTF-8 bytes


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"mode": "greedy"},
            "decoding setting 'mode': Input should be 'auto', 'logprobs' or 'sample' (got 'greedy')",
        ),
        (
            {"n_samples": 0},
            "decoding setting 'n_samples': Input should be greater than or equal to 1 (got 0)",
        ),
        ({"n_samples": "3"}, "decoding setting 'n_samples': Input should be a valid integer (got '3')"),
        ({"n_samples": 2.0}, "decoding setting 'n_samples': Input should be a valid integer (got 2.0)"),
        (
            {"top_logprobs": 21},
            "decoding setting 'top_logprobs': Input should be less than or equal to 20 (got 21)",
        ),
        (
            {"sample_temperature": 0},
            "decoding setting 'sample_temperature': Input should be greater than 0 (got 0)",
        ),
        ({"temperature": 0.5}, "decoding setting 'temperature': unknown key (got 0.5)"),
    ],
)
def test_bad_settings_name_the_setting_and_the_value(settings, message):
    with pytest.raises(InputError) as info:
        Decoding(**settings)
    assert str(info.value) == message
    assert "n_samples" in info.value.hint


def test_immutable():
    d = Decoding(mode="sample", n_samples=4)
    with pytest.raises(pydantic.ValidationError):
        d.n_samples = 5
    assert d == Decoding(mode="sample", n_samples=4) and hash(d) == hash(Decoding(mode="sample", n_samples=4))
