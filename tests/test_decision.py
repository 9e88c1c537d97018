"""Decisions of archetypes through cache and backend, against the scripted fake server."""

from __future__ import annotations

import math

import pytest
import torch
from fake_server import FakeServer

from lpm.archetype import ArchetypeSpec
from lpm.backend import Backend, LocalServerBackend, OpenAIBackend
from lpm.cache import ResponseCache
from lpm.decision import Decider, Decisions
from lpm.errors import CacheMissError, InputError, LLMError, ServerError
from lpm.prompt import PromptTemplate

CONTEXT = {"week": 10, "cases": 2345, "cases_change": 12}


@pytest.fixture(scope="module")
def spec() -> ArchetypeSpec:
    return ArchetypeSpec.load("covid_isolation")


@pytest.fixture(scope="module")
def rows(spec, small_pop) -> list[dict[str, str]]:
    return spec.group(small_pop).rows()


def decider(server: FakeServer, cache: ResponseCache | None = None, **kw) -> Decider:
    """A Decider against the fake server reading the first token (one request per archetype) unless ``scoring``
    says otherwise."""
    kw.setdefault("scoring", "first-token")
    backend_kw = {k: kw.pop(k) for k in ("retries", "max_concurrency", "timeout") if k in kw}
    backend = OpenAIBackend(server.url, server.model, backoff=0.01, **backend_kw)
    return Decider(backend, cache, progress=False, **kw)


def test_decide_returns_input_order_and_sums_to_one(spec, rows, tmp_path):
    few = rows[:12][::-1]
    with FakeServer() as server:
        out = decider(server, ResponseCache(tmp_path)).decide(spec, few, CONTEXT)
        assert server.requests == len(few)
    assert isinstance(out, Decisions)
    assert out.probs.shape == (12, 2) and out.probs.dtype == torch.float32
    assert torch.allclose(out.probs.sum(1), torch.ones(12))
    prompt = PromptTemplate.load(spec)
    for i, row in enumerate(few):  # each row's own prompt, in input order
        want = FakeServer.expected(prompt.render(row, CONTEXT), spec.actions)
        assert out.probs[i].tolist() == pytest.approx(want, abs=1e-6)
    assert out.mode == ["logprobs"] * 12 and out.cached == [False] * 12
    assert out.requests == 12 and out.prompt_tokens == 12 * 50 and out.failed == []
    frame = out.to_frame()
    assert list(frame.columns) == [
        "age_group", "sex", "borough", "p_isolate", "p_go out", "mode", "scoring", "coverage", "cached"
    ]  # fmt: skip
    assert out.scoring == ["first-token"] * 12 and all(c == pytest.approx(1.0) for c in out.coverage)
    assert frame["age_group"].tolist() == [r["age_group"] for r in few]


def test_second_identical_decide_is_all_cached(spec, rows, tmp_path):
    with FakeServer() as server:
        d = decider(server, ResponseCache(tmp_path))
        first = d.decide(spec, rows, CONTEXT)
        sent = server.requests
        second = d.decide(spec, rows, CONTEXT)  # the sync wrapper, called again
        assert server.requests == sent == len(rows)
    assert second.requests == 0 and all(second.cached) and second.prompt_tokens == 0
    assert torch.equal(first.probs, second.probs)
    assert second.mode == first.mode
    stats = ResponseCache(tmp_path).stats()
    assert stats["hits"] == len(rows) and stats["tokens_saved"] == len(rows) * 53


def test_rounding_shares_cache_entries(spec, rows, tmp_path):
    with FakeServer() as server:
        d = decider(server, ResponseCache(tmp_path))
        d.decide(spec, rows[:5], CONTEXT)
        again = d.decide(spec, rows[:5], {**CONTEXT, "cases": 2301})  # rounds to 2300 as well
        assert server.requests == 5 and all(again.cached)


def test_duplicate_rows_send_one_request(spec, rows):
    with FakeServer() as server:
        out = decider(server).decide(spec, [rows[0], rows[1], rows[0]], CONTEXT)
        assert server.requests == 2
    assert out.requests == 2 and torch.equal(out.probs[0], out.probs[2])


def test_concurrency_bound_is_respected(spec, rows):
    with FakeServer(delay=0.05) as server:
        decider(server, max_concurrency=3).decide(spec, rows[:15], CONTEXT)
        assert server.requests == 15 and server.max_in_flight == 3


def test_failures_raise_naming_archetypes_and_never_fill_zeros(spec, rows, tmp_path):
    def script(body, index):  # every request about the Bronx fails
        return "error500" if "Bronx" in body["messages"][-1]["content"] else "good"

    few = rows[:20]
    bronx = [i for i, r in enumerate(few) if r["borough"] == "Bronx"]
    assert bronx
    with FakeServer(script) as server:
        with pytest.raises(LLMError) as info:
            decider(server, ResponseCache(tmp_path), retries=2).decide(spec, few, CONTEXT)
        assert server.requests == len(few) + 2 * len(bronx)  # 3 attempts per failing archetype
        assert f"{len(bronx)} of 20 archetypes left undecided" in str(info.value)
        assert "borough=Bronx" in str(info.value)
        # the successful answers were cached; a later run asks only for the failed ones
        server.script = lambda body, index: "good"
        before = server.requests
        out = decider(server, ResponseCache(tmp_path)).decide(spec, few, CONTEXT)
        assert server.requests - before == len(bronx)
        assert sum(out.cached) == len(few) - len(bronx)

    with FakeServer(script) as server:
        out = decider(server, retries=0, on_failure="return").decide(spec, few, CONTEXT)
    assert out.failed == bronx
    assert torch.isnan(out.probs[bronx]).all()
    ok = [i for i in range(len(few)) if i not in bronx]
    assert torch.allclose(out.probs[ok].sum(1), torch.ones(len(ok)))
    assert all(out.mode[i] == "" for i in bronx)


def test_every_client_failure_is_reported_never_raised_raw(spec, rows):
    """A null choice, a string of choices, a text token count, or an exception of the backend itself: each
    archetype ends as a failed row (on_failure="return") or one LLMError naming it, never a crash."""
    few = rows[:4]
    for behaviour in ("nullchoice", "wrongshape", "badusage", "absurd"):
        with FakeServer(default=behaviour) as server:
            out = decider(server, retries=0, on_failure="return").decide(spec, few, CONTEXT)
        assert out.failed == [0, 1, 2, 3] and torch.isnan(out.probs).all()

    class Broken(Backend):
        model = "broken"

        async def choose(self, messages, actions, decoding=None):
            raise KeyError("choices")  # a bug or an exception type no one foresaw

    out = Decider(Broken(), progress=False, on_failure="return").decide(spec, few, CONTEXT)
    assert out.failed == [0, 1, 2, 3]
    with pytest.raises(LLMError, match="KeyError"):
        Decider(Broken(), progress=False).decide(spec, few, CONTEXT)


def test_a_failed_local_server_start_is_attempted_once(spec, rows):
    """One decision step of 20 archetypes against a local server that cannot start: one start attempt, and
    every request gets its error at once."""

    class Unstartable:
        url, model, kind, api_key, running = "http://127.0.0.1:9/v1", "m", "vllm", None, False
        starts = 0

        def start(self):
            Unstartable.starts += 1
            raise ServerError("the vllm server exited with status 1 during start-up")

    backend = LocalServerBackend(Unstartable(), retries=3, backoff=0.01)
    with pytest.raises(ServerError, match="during start-up"):
        Decider(backend, progress=False).decide(spec, rows[:20], CONTEXT)
    assert Unstartable.starts == 1
    with pytest.raises(ServerError):  # a later step of the same run does not try again either
        Decider(backend, progress=False).decide(spec, rows[:20], CONTEXT)
    assert Unstartable.starts == 1


def test_unreachable_server_raises_server_error(spec, rows):
    with FakeServer() as server:
        url = server.url
    with pytest.raises(ServerError, match=url.replace(".", r"\.")):
        Decider(OpenAIBackend(url, "m", retries=0), progress=False).decide(spec, rows[:3], CONTEXT)


def test_corrupt_cache_entry_is_recomputed(spec, rows, tmp_path):
    with FakeServer() as server:
        d = decider(server, ResponseCache(tmp_path))
        first = d.decide(spec, rows[:4], CONTEXT)
        store = ResponseCache(tmp_path).store
        entry_keys = [k for k in store.iterkeys() if k.startswith("r:")]
        value = store.get(entry_keys[0])
        store.set(entry_keys[0], value.replace(b'"probs":[', b'"probs":[0.5,'))
        again = d.decide(spec, rows[:4], CONTEXT)
        assert server.requests == 5 and sum(again.cached) == 3
    assert torch.allclose(first.probs, again.probs)
    assert ResponseCache(tmp_path).stats()["corrupt"] == 1


def test_replay_miss_names_archetypes_and_sends_nothing(spec, rows, tmp_path):
    with FakeServer() as server:
        decider(server, ResponseCache(tmp_path)).decide(spec, rows[:3], CONTEXT)
        replay = decider(server, ResponseCache(tmp_path, mode="replay"))
        out = replay.decide(spec, rows[:3], CONTEXT)
        assert all(out.cached)
        with pytest.raises(CacheMissError) as info:
            replay.decide(spec, rows[:5], CONTEXT)
        assert server.requests == 3
    assert "2 of 5 archetypes" in str(info.value)
    assert f"age_group={rows[3]['age_group']}" in str(info.value)


def test_auto_mode_records_sampling_fallback(spec, rows, tmp_path):
    with FakeServer(default="nologprobs") as server:
        out = decider(server, ResponseCache(tmp_path), n_samples=10).decide(spec, rows[:4], CONTEXT)
    assert set(out.mode) == {"sample"}
    assert torch.allclose(out.probs.sum(1), torch.ones(4))
    assert all(math.isclose(p * 10, round(p * 10), abs_tol=1e-5) for p in out.probs[:, 0].tolist())


def test_decider_arguments_are_validated(spec):
    backend = OpenAIBackend("http://127.0.0.1:1/v1", "m")
    with pytest.raises(InputError, match="mode"):
        Decider(backend, mode="greedy")
    with pytest.raises(InputError, match=r"'n_samples'.*\(got 0\)"):
        Decider(backend, mode="sample", n_samples=0)
    with pytest.raises(InputError, match="on_failure"):
        Decider(backend, on_failure="zero")
    with pytest.raises(InputError, match="Backend"):
        Decider(object())


def test_cache_key_holds_only_what_the_mode_sends(spec, rows, tmp_path):
    """n_samples is not sent in logprobs mode, so it does not split cache entries there; in sample mode it
    is sent (``n``), so it does."""
    with FakeServer() as server:
        decider(server, ResponseCache(tmp_path), mode="logprobs", n_samples=5).decide(spec, rows[:3], CONTEXT)
        again = decider(server, ResponseCache(tmp_path), mode="logprobs", n_samples=7).decide(
            spec, rows[:3], CONTEXT
        )
        assert server.requests == 3 and all(again.cached)
        decider(server, ResponseCache(tmp_path), mode="sample", n_samples=5).decide(spec, rows[:3], CONTEXT)
        other = decider(server, ResponseCache(tmp_path), mode="sample", n_samples=7).decide(
            spec, rows[:3], CONTEXT
        )
        assert server.requests == 9 and not any(other.cached)
        assert [b.get("n") for b in server.bodies[3:]] == [5] * 3 + [7] * 3


@pytest.mark.asyncio
async def test_adecide_inside_a_running_loop(spec, rows):
    with FakeServer() as server:
        d = decider(server)
        out = await d.adecide(spec, rows[:3], CONTEXT)
        also = d.decide(spec, rows[:3], CONTEXT)  # the sync wrapper from inside a loop runs in a thread
    assert torch.equal(out.probs, also.probs)


# -- the CLI ------------------------------------------------------------------------------------
def lpm_cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "lpm", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_cli_decide_json_then_replay_without_server(small_pop, tmp_path):
    import json

    pop_file = small_pop.save(tmp_path / "pop.parquet")
    env = {"LPM_CACHE_DIR": str(tmp_path / "cache")}
    args = [
        "decide",
        "covid_isolation",
        "-p",
        str(pop_file),
        "--context",
        "week=10",
        "--context",
        "cases=2345",
        "--context",
        "cases_change=12",
        "--json",
    ]
    with FakeServer() as server:
        res = lpm_cli(*args, "--llm-url", server.url, "--llm-model", server.model, env=env)
        assert res.returncode == 0, res.stderr
        assert server.requests == 400  # the default, whole-action scoring: 2 tokenizations + 2 completions
    rows = json.loads(res.stdout)
    assert len(rows) == 100 and not any(r["cached"] for r in rows)
    assert all(abs(r["p_isolate"] + r["p_go out"] - 1) < 1e-6 for r in rows)
    assert set(rows[0]) == {
        "age_group", "sex", "borough", "p_isolate", "p_go out", "mode", "scoring", "coverage", "cached"
    }  # fmt: skip
    assert {r["scoring"] for r in rows} == {"sequence"} and all(math.isnan(r["coverage"]) for r in rows)
    prompt = PromptTemplate.load(ArchetypeSpec.load("covid_isolation"))
    context = {"week": 10, "cases": 2345, "cases_change": 12}
    for r in rows[:5]:  # each row's own prompt, read whole
        messages = prompt.render(r, context)
        want = FakeServer.sequence_expected(["isolate", "go out"], messages)
        assert abs(r["p_isolate"] - want[0]) < 1e-6

    # replay: no --llm-url, no server started; the cache key holds the model name, not the URL
    res = lpm_cli(*args, "--cache", "replay", "--llm-model", server.model, env=env)
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)
    assert all(r["cached"] for r in again)
    assert [r["p_isolate"] for r in again] == [r["p_isolate"] for r in rows]

    res = lpm_cli(
        *args[:-1], "--context", "week=11", "--cache", "replay", "--llm-model", server.model, env=env
    )
    assert res.returncode == 2 and "cache mode replay" in res.stderr and "Traceback" not in res.stderr

    res = lpm_cli("cache", "stats", env=env)
    assert res.returncode == 0 and "100 entries" in res.stdout and "100 hits" in res.stdout
    res = lpm_cli("cache", "clear", env=env)
    assert res.returncode == 0
    assert "0 entries" in lpm_cli("cache", "stats", env=env).stdout


def test_cli_decide_table_and_bad_context(small_pop, tmp_path):
    pop_file = small_pop.save(tmp_path / "pop.parquet")
    with FakeServer() as server:
        res = lpm_cli(
            "decide",
            "covid_isolation",
            "-p",
            str(pop_file),
            "--context",
            "week=10",
            "--context",
            "cases=2345",
            "--context",
            "cases_change=12",
            "--llm-url",
            server.url,
            "--cache",
            "off",
        )
        assert res.returncode == 0, res.stderr
        assert "p_isolate" in res.stdout and "100 requests sent" in res.stdout
        res = lpm_cli(
            "decide",
            "covid_isolation",
            "-p",
            str(pop_file),
            "--context",
            "week=10",
            "--llm-url",
            server.url,
            "--llm-model",
            server.model,
            "--cache",
            "off",
        )
        assert res.returncode == 2 and "'cases'" in res.stderr
        res = lpm_cli(
            "decide",
            "covid_isolation",
            "-p",
            str(pop_file),
            "--context",
            "week",
            "--llm-url",
            server.url,
            "--llm-model",
            server.model,
        )
        assert res.returncode == 2 and "NAME=VALUE" in res.stderr
        context = ["--context", "week=10", "--context", "cases=2345", "--context", "cases_change=12"]
        res = lpm_cli(
            "decide",
            "covid_isolation",
            "-p",
            str(pop_file),
            *context,
            "--llm-url",
            server.url,
            "--server",
            "ollama",
        )
        assert res.returncode == 2 and "--server must be one of vllm, llamacpp, got 'ollama'" in res.stderr
        assert server.requests == 400  # nothing sent for the refused calls
