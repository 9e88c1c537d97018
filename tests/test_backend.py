"""Backends against a scripted fake OpenAI-compatible server: requests, retries, errors and cache keys."""

from __future__ import annotations

import asyncio
import socket

import pytest
from fake_server import FakeServer

from lpm.backend import Answer, Backend, LangChainBackend, OpenAIBackend
from lpm.decision import Decider
from lpm.decoding import Decoding
from lpm.errors import InputError, LLMError, ServerError

ACTIONS = ["isolate", "go out"]
MESSAGES = [{"role": "system", "content": "You decide."}, {"role": "user", "content": "Isolate or go out?"}]


def backend(fake: FakeServer, **kw) -> OpenAIBackend:
    kw.setdefault("backoff", 0.01)
    return OpenAIBackend(fake.url, fake.model, **kw)


def choose(b: Backend, **settings) -> Answer:
    """One ``choose`` call decoded with ``Decoding(**settings)`` (mode, n_samples …); the first-token reading
    unless ``scoring`` says otherwise (these tests are about one request per answer)."""
    settings.setdefault("scoring", "first-token")

    async def go() -> Answer:
        try:
            return await b.choose(MESSAGES, ACTIONS, Decoding(**settings))
        finally:
            await b.aclose()

    return asyncio.run(go())


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
        answer = choose(backend(server, server="llamacpp"), mode="logprobs")
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


def test_auto_decides_per_request():
    """One answer without log-probabilities samples that request only; the next request tries logprobs again."""
    with FakeServer(["nologprobs", "nologprobs", "good"]) as server:
        b = backend(server)
        first = choose(b, mode="auto", n_samples=10)
        second = choose(b, mode="auto", n_samples=10)
        assert (first.mode, first.scoring, second.mode, second.scoring) == (
            "sample",
            "samples",
            "logprobs",
            "first-token",
        )
        assert "no log-probabilities" in first.fallback and second.fallback == ""
        assert [bool(x.get("logprobs")) for x in server.bodies] == [True, False, True]
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


@pytest.mark.parametrize(
    "behaviour, says",
    [
        ("nullchoice", "not an object"),
        ("wrongshape", "no choices"),
        ("badusage", "usage.prompt_tokens is not a token count"),
        ("absurd", "not in"),
    ],
)
def test_malformed_responses_are_retried_then_reported(behaviour, says):
    """Responses of the wrong shape go through retry, then one LLMError naming what was wrong (no crash)."""
    with FakeServer(default=behaviour) as server:
        with pytest.raises(LLMError, match=says) as info:
            choose(backend(server, retries=1), mode="auto")
        assert server.requests == 2
    assert "after 2 attempts" in str(info.value)


def test_low_coverage_is_an_error_in_logprobs_mode_and_a_recorded_switch_in_auto():
    with FakeServer(default="unconstrained") as server:
        with pytest.raises(LLMError, match="only 0.100 of the first token") as info:
            choose(backend(server), mode="logprobs")
        assert server.requests == 1  # not retried: the same request would read the same
        assert "sample" in info.value.hint
        answer = choose(backend(server), mode="auto", n_samples=10)
    assert (answer.mode, answer.scoring) == ("sample", "samples")
    assert answer.coverage == pytest.approx(0.1) and "0.100" in answer.fallback
    # a lower bar accepts the same reading, renormalised over the actions
    with FakeServer(default="unconstrained") as server:
        answer = choose(backend(server), mode="logprobs", min_coverage=0.05)
    assert answer.scoring == "first-token" and answer.probs == pytest.approx([0.5, 0.5])


def test_actions_sharing_a_first_token_are_scored_whole():
    """ "stay home" and "stay at work" begin with the same tokens: each whole action is scored as the complete
    answer, never split by a rule: read position by position (the server tokenizes each action's
    conversation, then one completion reads the shared prefix's next tokens and one the positions after
    it), or from prompt log-probabilities (one request per action) on a server without those reads."""
    actions = ["stay home", "stay at work"]

    async def go(b, decoding):
        try:
            return await b.choose(MESSAGES, actions, decoding)
        finally:
            await b.aclose()

    with FakeServer() as server:
        answer = asyncio.run(go(backend(server), Decoding(mode="logprobs", scoring="first-token")))
        bodies, paths = server.bodies, server.paths
    assert answer.scoring == "sequence" and answer.ambiguous > 0 and answer.coverage == pytest.approx(1.0)
    assert answer.probs == pytest.approx(FakeServer.sequence_expected(actions, MESSAGES))
    assert answer.probs != pytest.approx([0.5, 0.5])
    assert len(bodies) == 5 and paths[0].endswith("/chat/completions")  # the first-token request, then:
    assert sorted(paths[1:3]) == ["/tokenize", "/tokenize"] and paths[3:] == ["/v1/completions"] * 2
    assert sorted(b["messages"][-1]["content"] for b in bodies[1:3]) == sorted(actions)
    assert all(b["messages"][-1]["role"] == "assistant" for b in bodies[1:3])
    assert all(b["add_generation_prompt"] is False for b in bodies[1:3])
    assert all("prompt_logprobs" not in b for b in bodies[1:])
    shared = bodies[3]["prompt"]  # the tokens both conversations share: "stay" included
    assert isinstance(shared[0], int) and shared[-1] == FakeServer.word_token("stay")
    rests = bodies[4]["prompt"]  # each later position, the shared prefix first
    assert all(r[: len(shared)] == shared for r in rests) and len(rests) == 3  # " home", " at", " at work"
    assert bodies[3]["logprob_token_ids"] == bodies[4]["logprob_token_ids"]
    # a server without those reads (an older vLLM): the prompt log-probabilities, one request per action
    with FakeServer(token_logprobs=False) as server:
        answer = asyncio.run(go(backend(server), Decoding(mode="logprobs", scoring="first-token")))
        bodies = [
            b for b, p in zip(server.bodies, server.paths, strict=True) if p.endswith("chat/completions")
        ]
    assert answer.probs == pytest.approx(FakeServer.sequence_expected(actions, MESSAGES))
    assert len(bodies) == 3 and sorted(b["messages"][-1]["content"] for b in bodies[1:]) == sorted(actions)
    assert all(b["prompt_logprobs"] == 0 and b["add_generation_prompt"] is False for b in bodies[1:])
    # whole-action scoring asked for: no first-token request at all
    with FakeServer() as server:
        answer = choose(backend(server), mode="logprobs", scoring="sequence")
        assert server.requests == 4 and not any(p.endswith("chat/completions") for p in server.paths)
    assert answer.scoring == "sequence" and answer.coverage is None
    assert answer.probs == pytest.approx(FakeServer.sequence_expected(ACTIONS, MESSAGES))
    assert answer.raw == ACTIONS[max(range(2), key=answer.probs.__getitem__)]
    # a server kind without prompt log-probabilities says so instead of guessing
    with FakeServer() as server, pytest.raises(LLMError, match="prompt log-probabilities"):
        asyncio.run(go(backend(server, server="llamacpp"), Decoding(mode="logprobs", scoring="first-token")))


def test_default_whole_action_scoring_and_its_fallbacks_in_auto():
    """The default reading scores each whole action (a tokenization per action and two completions, no
    constraint needed; on a server without them, one request per action). A server without prompt
    log-probabilities: auto reads the first token instead, then samples, each recorded; logprobs mode says
    so."""
    with FakeServer() as server:
        answer = choose(backend(server), mode="auto", scoring="sequence")
        assert server.requests == 4 and all("prompt_logprobs" not in b for b in server.bodies)
    assert (answer.mode, answer.scoring, answer.fallback) == ("logprobs", "sequence", "")
    assert answer.probs == pytest.approx(FakeServer.sequence_expected(ACTIONS, MESSAGES))
    with FakeServer(token_logprobs=False) as server:
        answer = choose(backend(server), mode="auto", scoring="sequence")
        chat = [b for b, p in zip(server.bodies, server.paths, strict=True) if p.endswith("chat/completions")]
        assert len(chat) == 2 and all(b["prompt_logprobs"] == 0 for b in chat)
    assert (answer.mode, answer.scoring, answer.fallback) == ("logprobs", "sequence", "")
    assert answer.probs == pytest.approx(FakeServer.sequence_expected(ACTIONS, MESSAGES))
    with FakeServer(
        default="llamacpp"
    ) as server:  # no prompt log-probabilities, first-token ones in its shape
        answer = choose(backend(server), mode="auto", scoring="sequence")
    assert (answer.mode, answer.scoring) == ("logprobs", "first-token")
    assert "no prompt log-probabilities" in answer.fallback
    with FakeServer(default="nologprobs") as server:  # no log-probabilities of any kind
        answer = choose(backend(server), mode="auto", scoring="sequence", n_samples=10)
    assert (answer.mode, answer.scoring) == (
        "sample",
        "samples",
    ) and "no log-probabilities" in answer.fallback
    with (
        FakeServer(default="nologprobs") as server,
        pytest.raises(LLMError, match="prompt log-probabilities") as info,
    ):
        choose(backend(server), mode="logprobs", scoring="sequence")
    assert "--scoring first-token" in info.value.hint
    for behaviour, says in (
        ("absurd", "not in"),
        ("badusage", "token count"),
        ("nullchoice", "not an object"),
    ):
        for token_logprobs in (True, False):  # either reading
            with (
                FakeServer(default=behaviour, token_logprobs=token_logprobs) as server,
                pytest.raises(LLMError, match=says),
            ):
                choose(backend(server, retries=1), mode="auto", scoring="sequence")
    # the positions' completion answers one prompt twice and another not at all
    with FakeServer(default="dupindex") as server, pytest.raises(LLMError, match="answered 2 of 4 prompts"):
        choose(backend(server, retries=1), mode="auto", scoring="sequence")


def test_langchain_refuses_whole_action_scoring():
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", model="m", logprobs=True, max_retries=0)
    with pytest.raises(InputError, match="cannot score whole actions") as info:
        Decider(LangChainBackend(chat), progress=False)
    assert "--scoring first-token" in info.value.hint
    Decider(LangChainBackend(chat), progress=False, scoring="first-token")  # accepted


def test_langchain_sample_mode_refuses_a_greedy_chat_model():
    """At temperature 0 every sampled answer is the greedy one: the shares would be 0 or 1."""
    from langchain_openai import ChatOpenAI

    greedy = ChatOpenAI(
        base_url="http://127.0.0.1:9/v1", api_key="x", model="m", temperature=0, max_retries=0
    )
    with pytest.raises(InputError, match="temperature 0") as info:
        Decider(LangChainBackend(greedy), progress=False, mode="sample")
    assert "temperature=1" in info.value.hint
    warm = ChatOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", model="m", temperature=1, max_retries=0)
    Decider(LangChainBackend(warm), progress=False, mode="sample")  # accepted


def test_offchoice_samples_are_rejected():
    with FakeServer(default="offchoice") as server, pytest.raises(LLMError, match="not one of"):
        choose(backend(server, retries=1), mode="sample", n_samples=4)


def test_client_error_is_not_retried():
    with FakeServer(default="error404") as server:
        with pytest.raises(LLMError, match="HTTP 404") as info:
            choose(backend(server), mode="logprobs")
        assert server.requests == 1
    assert "--llm-model" in info.value.hint


def test_a_late_answer_is_a_server_error_naming_the_timeout():
    with FakeServer(default="slow", slow_s=1.0) as server:
        with pytest.raises(
            ServerError, match=r"did not answer a request within 0.2 s \(--llm-timeout\)"
        ) as info:
            choose(backend(server, timeout=0.2, retries=1), mode="logprobs")
        assert server.requests == 1  # not retried
        assert server.url in str(info.value) and "--llm-timeout SECONDS" in info.value.hint


def test_a_silent_server_stops_every_request_of_the_loop_at_once():
    """A server that takes requests and never answers costs about one timeout, not retries x batches of it:
    the requests waiting for their turn are never sent, and those in flight stop with the first."""
    import time

    async def many(b: OpenAIBackend) -> list:
        try:
            return await asyncio.gather(
                *(b.choose(MESSAGES, ACTIONS, Decoding(mode="auto")) for _ in range(10)),
                return_exceptions=True,
            )
        finally:
            await b.aclose()

    with FakeServer(default="hang") as server:
        b = backend(server, timeout=1.0, retries=3, max_concurrency=3)
        began = time.monotonic()
        out = asyncio.run(many(b))
        took = time.monotonic() - began
        assert server.requests <= 3 + 2  # the first turn (whole-action scoring: one request per action)
    assert took < 4.0, took  # before: 4 attempts x every turn of 3 requests x 1 s
    assert all(isinstance(e, ServerError) and "within 1 s" in str(e) for e in out)
    assert b.stats.errors == {"timeout": 1}


def test_a_stall_ends_with_its_event_loop():
    """The next decision step (a new event loop) asks the server again."""
    with FakeServer(["hang"]) as server:
        b = backend(server, timeout=2.0)
        with pytest.raises(ServerError):
            choose(b, mode="logprobs")
        assert choose(b, mode="logprobs").mode == "logprobs"
        assert server.requests == 2


def test_timeout_must_be_positive():
    with pytest.raises(InputError, match="--llm-timeout must be > 0 seconds, got 0"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", timeout=0)


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
    with pytest.raises(InputError, match="server must be one of vllm, llamacpp, got 'ollama'"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", server="ollama")
    with pytest.raises(InputError, match="max_concurrency"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", max_concurrency=0)
    with pytest.raises(InputError, match="http"):
        OpenAIBackend("127.0.0.1:8000", "m")


def test_backend_base_class_is_checked_at_construction():
    class Sync(Backend):
        def choose(self, messages, actions, decoding=None):  # not async
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


# -- what the cache key records is what is sent ---------------------------------------------------
def test_openai_request_params_are_the_requests_sent():
    settings = {
        "mode": "auto",
        "n_samples": 7,
        "top_logprobs": 5,
        "sample_temperature": 0.7,
        "scoring": "first-token",
    }
    with FakeServer(default="nologprobs") as server:  # auto: a logprobs request, then a sample request
        b = backend(server)
        choose(b, **settings)
        logprobs_body, sample_body = server.bodies
    params = b.request_params(ACTIONS, Decoding(**settings))
    assert params == {
        "mode": "auto",
        "logprobs": {"temperature": 0.0, "max_tokens": 8, "logprobs": True, "top_logprobs": 5},
        "scoring": "first-token",
        "sequence": {"temperature": 0.0, "max_tokens": 1},
        "min_coverage": 0.9,
        "sample": {"temperature": 0.7, "max_tokens": 8, "n": 7},
    }
    for body, sent in ((logprobs_body, params["logprobs"]), (sample_body, params["sample"])):
        assert set(body) == {"model", "messages", "structured_outputs", *sent}
        assert {k: body[k] for k in sent} == sent
    assert b.identity() == {"backend": "openai", "model": "fake-model", "server": "vllm", "weights": None}


def test_langchain_request_params_are_the_chat_models_own_settings():
    from langchain_openai import ChatOpenAI

    with FakeServer() as server:
        chat = ChatOpenAI(
            base_url=server.url, api_key="x", model="fake-model", temperature=0.3, max_retries=0
        )
        lc = LangChainBackend(chat, backoff=0.01, server="llamacpp")
        choose(lc, mode="sample", n_samples=2, sample_temperature=0.5)
        body = server.bodies[0]
        url = server.url
    params = lc.request_params(ACTIONS, Decoding(mode="sample", n_samples=2, sample_temperature=0.5))
    # the chat model's temperature was sent, not the decoding's: the key records the one sent
    assert params["chat_model"]["temperature"] == body["temperature"] == 0.3
    assert params == lc.request_params(ACTIONS, Decoding(mode="sample", n_samples=2))
    assert params["mode"] == "sample" and params["invocations"] == 2 and len(server.bodies) == 2
    assert body["grammar"] == 'root ::= "isolate" | "go out"'
    assert lc.identity() == {
        "backend": "langchain",
        "class": "ChatOpenAI",
        "model": "fake-model",
        "server": "llamacpp",
    }
    assert url not in str(params) and "x" not in params["chat_model"].values()  # no address, no key
    hotter = LangChainBackend(chat.bind(temperature=0.9), model="fake-model")
    assert (
        hotter.request_params(ACTIONS, Decoding(mode="sample", n_samples=2))["chat_model"]["temperature"]
        == 0.9
    )
    assert "invocations" not in lc.request_params(ACTIONS, Decoding(mode="logprobs"))
