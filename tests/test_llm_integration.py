"""Decisions from a real local vLLM server (SmolLM2-135M-Instruct), counted by the server's own metrics."""

from __future__ import annotations

import pytest
import torch

from lpm.archetype import ArchetypeSpec
from lpm.backend import LangChainBackend, OpenAIBackend
from lpm.cache import ResponseCache
from lpm.decision import Decider
from lpm.logprobs import normalise_logprobs
from lpm.server import metrics, token_counters

pytestmark = pytest.mark.integration

CONTEXT = {"week": 10, "cases": 2345, "cases_change": 12}


def posts(url: str) -> float:
    """Chat/completion requests the server has received (its Prometheus counter)."""
    return float(metrics(url)["completion_requests"])


def test_archetype_decisions_then_cache_then_replay(vllm_server, small_pop, tmp_path):
    spec = ArchetypeSpec.load("covid_isolation")
    rows = spec.group(small_pop).rows()
    assert len(rows) >= 50
    backend = OpenAIBackend(vllm_server.url, vllm_server.model)
    decider = Decider(backend, ResponseCache(tmp_path), mode="auto", progress=False)

    before = posts(vllm_server.url)
    first = decider.decide(spec, rows, CONTEXT)
    sent = posts(vllm_server.url) - before
    # the default, whole-action scoring: one request per action, each whole answer read from the prompt's
    # log-probabilities (2 actions)
    assert first.requests == len(rows) and sent == 2 * len(rows) + first.retries
    assert set(first.mode) == {"logprobs"} and set(first.scoring) == {"sequence"}
    assert torch.allclose(first.probs.sum(1), torch.ones(len(rows)), atol=1e-5)
    assert first.failed == [] and not torch.isnan(first.probs).any()
    assert first.prompt_tokens > 50 * len(rows)

    mid = posts(vllm_server.url)
    second = decider.decide(spec, rows, CONTEXT)
    assert posts(vllm_server.url) == mid  # zero new requests, by the server's own count
    assert second.requests == 0 and all(second.cached)
    assert torch.equal(first.probs, second.probs)

    # replay needs no server at all: a bogus URL is never contacted
    replay = Decider(
        OpenAIBackend("http://127.0.0.1:9/v1", vllm_server.model, retries=0),
        ResponseCache(tmp_path, mode="replay"),
        progress=False,
    )
    third = replay.decide(spec, rows, CONTEXT)
    assert torch.equal(first.probs, third.probs) and all(third.cached)


def test_sample_mode_and_langchain_against_vllm(vllm_server, small_pop):
    """LangChain's ChatOpenAI and the OpenAI backend send the same logprobs request; read the same way they
    must give the same distribution.

    Both sides send one request at a time (``max_concurrency=1``): each request is then alone in the server's
    batch and finds the same prefix cache, so no batch noise can enter. Measured with
    ``benchmarks/llm_noise.py`` (vLLM 0.32.0 CPU build, SmolLM2-135M-Instruct in bfloat16, 2-core AMD EPYC,
    AVX-512) on these 3 prompts, 30 rounds each, twice: the first action's probability moved by exactly 0.0
    sent one at a time, 3 at once, among 15 other prompts, 0-150 ms after 15 sampling requests, and through
    LangChain; 0.0 between a cold and a warm prefix cache (90 prompts); 0.0 over 4 fresh servers x 5 rounds
    of this test's sequence with both sides sent concurrently (the old way). The earlier failure (2.5e-3
    against ``atol=1e-3``, both sides sent concurrently, on another checkout) did not reproduce there;
    batch-dependent kernels are its cause, and one request at a time removes it: on the 2-core Intel Xeon
    with AMX that CI runs on (2026-12-04, the same script) first-token answers sent one at a time, directly
    or through LangChain, moved by exactly 0.0 in 30 rounds, while sent 3 at once or among other prompts
    they moved by up to 6.6e-3 in every round. The tolerance is the larger of 1e-6 (a few float32 ulps) and three
    times the noise measured in this run between three identical direct passes, so a server that is not
    bit-deterministic on another CPU widens it by what it shows; past 4e-3 the test refuses, because a
    wrong reading moves the probabilities only a little more (same prompts): the top token alone by
    0.046-0.061, the second token raises BadAnswer, 20 samples by 0.0044-0.039 (and the mode is checked).
    """
    from langchain_openai import ChatOpenAI

    spec = ArchetypeSpec.load("covid_isolation")
    rows = spec.group(small_pop).rows()[:3]
    sampled = Decider(
        OpenAIBackend(vllm_server.url, vllm_server.model), mode="sample", n_samples=20, progress=False
    ).decide(spec, rows, CONTEXT)
    assert sampled.mode == ["sample"] * 3
    assert torch.allclose(sampled.probs.sum(1), torch.ones(3))
    assert torch.allclose(sampled.probs * 20, (sampled.probs * 20).round(), atol=1e-4)

    chat = ChatOpenAI(
        base_url=vllm_server.url,
        api_key="EMPTY",
        model=vllm_server.model,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
        max_tokens=8,
        max_retries=0,
    )
    one_at_a_time = {"mode": "logprobs", "scoring": "first-token", "progress": False}
    via_lc = Decider(LangChainBackend(chat, max_concurrency=1), **one_at_a_time).decide(spec, rows, CONTEXT)
    direct = [
        Decider(OpenAIBackend(vllm_server.url, vllm_server.model, max_concurrency=1), **one_at_a_time).decide(
            spec, rows, CONTEXT
        )
        for _ in range(3)
    ]
    assert via_lc.mode == direct[0].mode == ["logprobs"] * 3
    # this server's own noise, measured now: identical requests sent the same way, three times
    noise = max(float((a.probs - b.probs).abs().max()) for a in direct for b in direct)
    tolerance = max(1e-6, 3 * noise)
    assert tolerance < 4e-3, f"the server's answers move by {noise} between identical requests"
    gap = float((via_lc.probs - direct[0].probs).abs().max())
    assert gap <= tolerance, (gap, noise)


def test_llamacpp_server_gives_a_valid_distribution(llamacpp_server, small_pop, tmp_path):
    """llama.cpp serves the GGUF directly; its top_logprobs come from before the grammar, so lpm counts
    ``n`` grammar-constrained samples there (mode ``sample``)."""
    spec = ArchetypeSpec.load("covid_isolation")
    rows = spec.group(small_pop).rows()[:10]
    backend = OpenAIBackend(llamacpp_server.url, llamacpp_server.model, server="llamacpp")
    decider = Decider(backend, ResponseCache(tmp_path), mode="sample", n_samples=20, progress=False)
    out = decider.decide(spec, rows, CONTEXT)
    assert out.requests == 10 and set(out.mode) == {"sample"}
    assert torch.allclose(out.probs.sum(1), torch.ones(10), atol=1e-6)
    assert ((out.probs * 20).round() == out.probs * 20).all()  # counts of 20 samples
    again = decider.decide(spec, rows, CONTEXT)
    assert again.requests == 0 and all(again.cached)


def test_coverage_and_shared_first_tokens_on_the_real_server(vllm_server, monkeypatch):
    """vLLM takes its top log-probabilities after the choice constraint: the first token's mass on action
    tokens is ~1 (measured >= 0.9999). Actions sharing their first token ("stay home", "stay at work") are
    scored whole, not split by a rule as lpm used to. Read one position at a time with token ids (the
    default, and what first-token scoring falls back to here), each action's log-probability is the one
    the prompt log-probabilities give for the whole answer, within the server's noise.

    The noise, measured on a 2-core Intel Xeon with AMX (the CI kind; vLLM 0.32.0 CPU build, bfloat16),
    200 readings of this prompt against one prompt-log-probability reading: 176 equal to the last bit, 24
    off by 0.0083 and 0.0906 (the two actions' log-probabilities; P(stay home) 0.4301 instead of 0.4061).
    Those 24 are the later positions' request (four prompts in one completion) computed in another batch
    layout: the server adds the prompts one by one, and its steps take whichever have arrived. The
    prompt-log-probability reading was the same in all 200. So the tolerance is 0.3 (about 3 times 0.091)
    on each action's log-probability: a wrong reading moves one by more than 5 (measured here: without an
    end of turn, -5.52 and -5.35; the first token alone, -1.38 against -6.90)."""
    import asyncio

    import lpm.backend
    from lpm.decoding import Decoding

    messages = [
        {
            "role": "system",
            "content": "You decide for a resident of New York City during the COVID-19 epidemic.",
        },
        {"role": "user", "content": "2,000 cases were reported this week. Do you stay home or stay at work?"},
    ]
    read: list[list[float]] = []  # each reading's log-probabilities of the whole actions, before normalising
    tree_logprobs = lpm.backend.tree_logprobs

    def reading(*args):
        read.append(tree_logprobs(*args))
        return read[-1]

    monkeypatch.setattr(lpm.backend, "tree_logprobs", reading)

    async def ask(actions, **settings):
        backend = OpenAIBackend(vllm_server.url, vllm_server.model)
        try:
            return await backend.choose(messages, actions, Decoding(mode="logprobs", **settings))
        finally:
            await backend.aclose()

    plain = asyncio.run(ask(["isolate", "go out"], scoring="first-token"))
    assert plain.scoring == "first-token" and plain.coverage > 0.999 and plain.ambiguous == 0
    shared = asyncio.run(ask(["stay home", "stay at work"], scoring="first-token"))
    assert shared.scoring == "sequence" and shared.ambiguous > 0.5 and shared.coverage > 0.999
    # the default scoring: the same reading, position by position (token ids)
    whole = asyncio.run(ask(["stay home", "stay at work"]))
    assert whole.scoring == "sequence" and whole.coverage is None
    assert len(read) == 2
    # the same log-probabilities computed here from the raw prompt log-probabilities of each whole answer
    import httpx

    tokens = []
    for action in ["stay home", "stay at work"]:
        body = {
            "model": vllm_server.model,
            "messages": [*messages, {"role": "assistant", "content": action}],
            "add_generation_prompt": False,
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "temperature": 0,
        }
        answer = httpx.post(f"{vllm_server.url}/chat/completions", json=body, timeout=60).json()
        tokens.append([next(iter(t.values()))["logprob"] for t in answer["prompt_logprobs"][1:]])
    shared_len = 0  # the longest common prefix: the prompt, and "stay"
    while tokens[0][shared_len] == tokens[1][shared_len]:
        shared_len += 1
    totals = [sum(t[shared_len:]) for t in tokens]
    for logprobs, answer in zip(read, [shared, whole], strict=True):
        assert logprobs == pytest.approx(totals, abs=0.3), (logprobs, totals)
        assert answer.probs == pytest.approx(normalise_logprobs(logprobs), abs=1e-12)
    # the shared prefix is read first and alone, so each of the 5 later positions (" home" and its end of
    # turn, " at", " work" and its end of turn) finds its whole blocks in the prefix cache; the cache
    # keeps whole blocks only (128 tokens in the CPU build), so this prompt is made longer than two
    block = next(
        int(key.split('block_size="')[1].split('"')[0])
        for key in metrics(vllm_server.url)["samples"]
        if key.startswith("vllm:cache_config_info") and 'block_size="' in key
    )
    messages[0]["content"] = " ".join([messages[0]["content"]] * (2 * block // 10))
    before = token_counters(vllm_server.url)
    long = asyncio.run(ask(["stay home", "stay at work"]))
    after = token_counters(vllm_server.url)
    assert long.scoring == "sequence" and long.prompt_tokens > 6 * 2 * block
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= 5 * 2 * block
