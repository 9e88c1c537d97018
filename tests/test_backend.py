"""Backends against a scripted fake OpenAI-compatible server: parsing, retries and errors."""

from __future__ import annotations

import asyncio
import math
import socket

import pytest
from fake_server import FakeServer

from lpm.backend import (
    Answer,
    Backend,
    BadAnswer,
    LangChainBackend,
    NoLogprobs,
    OpenAIBackend,
    choice_distribution,
    first_token_candidates,
    gbnf_grammar,
    max_tokens,
)
from lpm.errors import InputError, LLMError, ServerError

ACTIONS = ["isolate", "go out"]
MESSAGES = [{"role": "system", "content": "You decide."}, {"role": "user", "content": "Isolate or go out?"}]


def backend(server: FakeServer, **kw) -> OpenAIBackend:
    kw.setdefault("backoff", 0.01)
    return OpenAIBackend(server.url, server.model, **kw)


def choose(b: Backend, **kw) -> Answer:
    async def go() -> Answer:
        try:
            return await b.choose(MESSAGES, ACTIONS, **kw)
        finally:
            await b.aclose()

    return asyncio.run(go())


# -- parsing ------------------------------------------------------------------------------------
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


def test_gbnf_grammar_escapes_literals():
    assert gbnf_grammar(["isolate", "go out"]) == 'root ::= "isolate" | "go out"'
    assert gbnf_grammar(['say "hi"', "a\\b"]) == 'root ::= "say \\"hi\\"" | "a\\\\b"'
    assert max_tokens(["isolate", "go out"]) == 8


# -- the OpenAI backend -------------------------------------------------------------------------
def test_logprobs_mode_against_fake_server():
    with FakeServer() as server:
        answer = choose(backend(server), mode="logprobs")
        body = server.bodies[0]
    assert answer.mode == "logprobs"
    assert answer.probs == pytest.approx(FakeServer.expected(MESSAGES, ACTIONS))
    assert sum(answer.probs) == pytest.approx(1.0)
    assert (answer.prompt_tokens, answer.completion_tokens, answer.attempts) == (50, 3, 1)
    assert body["structured_outputs"] == {"choice": ACTIONS}
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0
    assert "guided_choice" not in body


def test_llamacpp_constraint_and_response_shape():
    with FakeServer(default="llamacpp") as server:
        answer = choose(backend(server, constraint="llamacpp"), mode="logprobs")
        body = server.bodies[0]
    assert body["grammar"] == 'root ::= "isolate" | "go out"'
    assert "structured_outputs" not in body
    assert answer.probs == pytest.approx(FakeServer.expected(MESSAGES, ACTIONS))


def test_sample_mode_counts_answers():
    with FakeServer() as server:
        answer = choose(backend(server), mode="sample", n_samples=20)
        body = server.bodies[0]
    assert answer.mode == "sample" and len(answer.raw) == 20
    assert (
        body["n"] == 20 and body["temperature"] == 1.0 and body["structured_outputs"] == {"choice": ACTIONS}
    )
    p = FakeServer.expected(MESSAGES, ACTIONS)[0]
    assert answer.probs[0] == pytest.approx(round(p * 20) / 20)


def test_auto_falls_back_to_sampling_and_remembers():
    with FakeServer(default="nologprobs") as server:
        b = backend(server)
        first = choose(b, mode="auto", n_samples=10)
        second = choose(b, mode="auto", n_samples=10)
        assert first.mode == second.mode == "sample"
        # first call: one logprobs request, then one sampling request; second call samples directly
        assert [bool(x.get("logprobs")) for x in server.bodies] == [True, False, False]
        assert b.stats.fallbacks == 1


def test_logprobs_mode_without_logprobs_is_an_error():
    with FakeServer(default="nologprobs") as server, pytest.raises(LLMError, match="no log-probabilities"):
        choose(backend(server), mode="logprobs")


def test_transient_failures_are_retried_and_counted():
    with FakeServer(["error500", "drop", "good"]) as server:
        b = backend(server, retries=3)
        answer = choose(b, mode="logprobs")
        assert answer.attempts == 3 and b.stats.retries == 2 and server.requests == 3
        assert answer.probs == pytest.approx(FakeServer.expected(MESSAGES, ACTIONS))


@pytest.mark.parametrize("behaviour", ["error500", "offchoice", "zeromass", "drop"])
def test_persistent_failures_raise_after_retries(behaviour):
    with FakeServer(default=behaviour) as server:
        with pytest.raises(LLMError) as info:
            choose(backend(server, retries=2), mode="logprobs")
        assert server.requests == 3
    assert "after 3 attempts" in str(info.value)


def test_offchoice_samples_are_rejected():
    with FakeServer(default="offchoice") as server, pytest.raises(LLMError, match="not one of"):
        choose(backend(server, retries=1), mode="sample", n_samples=4)


def test_client_error_is_not_retried():
    with FakeServer(default="error404") as server:
        with pytest.raises(LLMError, match="HTTP 404") as info:
            choose(backend(server), mode="logprobs")
        assert server.requests == 1
    assert "--llm-model" in info.value.hint


def test_timeout_is_an_llm_error():
    with FakeServer(default="slow", slow_s=1.0) as server, pytest.raises(LLMError, match="did not answer"):
        choose(backend(server, timeout=0.2, retries=1), mode="logprobs")


def test_unreachable_server_names_url_and_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ServerError) as info:
        choose(OpenAIBackend(url, "m", retries=1, backoff=0.01), mode="logprobs")
    assert url in str(info.value)
    assert "lpm serve" in info.value.hint and "--llm-url" in info.value.hint


def test_backend_arguments_are_validated():
    with pytest.raises(InputError, match="constraint"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", constraint="ollama")
    with pytest.raises(InputError, match="max_concurrency"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", max_concurrency=0)
    with pytest.raises(InputError, match="http"):
        OpenAIBackend("127.0.0.1:8000", "m")


def test_backend_base_class_is_checked_at_construction():
    class Sync(Backend):
        def choose(self, messages, actions, *, mode="auto", n_samples=20):  # not async
            return None

    class Missing(Backend):
        pass

    with pytest.raises(TypeError, match="async"):
        Sync()
    with pytest.raises(TypeError):
        Missing()


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekret")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeServer() as server:
        choose(backend(server, api_key_env="MY_KEY"), mode="logprobs")
        choose(backend(server), mode="logprobs")
        assert [h["authorization"] for h in server.headers] == ["Bearer sekret", "Bearer EMPTY"]


# -- LangChain ----------------------------------------------------------------------------------
def test_langchain_backend_logprobs_and_sampling():
    from langchain_openai import ChatOpenAI

    with FakeServer() as server:
        lp_model = ChatOpenAI(
            base_url=server.url,
            api_key="x",
            model="fake-model",
            logprobs=True,
            top_logprobs=20,
            temperature=0,
            max_retries=0,
        )
        answer = choose(LangChainBackend(lp_model, backoff=0.01), mode="auto")
        assert answer.mode == "logprobs"
        assert answer.probs == pytest.approx(FakeServer.expected(MESSAGES, ACTIONS))
        assert server.bodies[0]["structured_outputs"] == {"choice": ACTIONS}

        plain = ChatOpenAI(
            base_url=server.url, api_key="x", model="fake-model", temperature=1.0, max_retries=0
        )
        before = server.requests
        answer = choose(LangChainBackend(plain, backoff=0.01), mode="sample", n_samples=5)
        assert answer.mode == "sample" and server.requests - before == 5
        assert sum(answer.probs) == pytest.approx(1.0)
        assert answer.prompt_tokens == 5 * 50
