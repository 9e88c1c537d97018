"""Several servers of one model (``--llm-url A,B``): requests spread over the replicas, a failed request sent
to another replica before it counts as a failed attempt, every replica checked at start, and the cache key
and the run folder independent of which replica answered (lpm.backend, lpm.endpoint)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from fake_server import FakeServer

from lpm.archetype import ArchetypeSpec
from lpm.backend import OpenAIBackend
from lpm.cache import ResponseCache
from lpm.cli import main
from lpm.decision import Decider
from lpm.endpoint import Endpoint, redact_url
from lpm.errors import InputError, LLMError, ServerError
from lpm.prompt import PromptTemplate

CONTEXT = {"week": 10, "cases": 2345, "cases_change": 12}
ACTIONS = ["isolate", "go out"]


@pytest.fixture(scope="module")
def spec() -> ArchetypeSpec:
    return ArchetypeSpec.load("covid_isolation")


@pytest.fixture(scope="module")
def rows(spec, small_pop) -> list[dict[str, str]]:
    return spec.group(small_pop).rows()[:20]


def closed_url() -> str:
    """The URL of a server that was stopped: its port refuses connections."""
    with FakeServer() as server:
        return server.url


def decider(urls: list[str], cache: ResponseCache | None = None, **kw) -> Decider:
    """A Decider reading the first token (one request per archetype) from the replicas at ``urls``."""
    backend_kw = {k: kw.pop(k) for k in ("retries", "max_concurrency", "timeout") if k in kw}
    backend = OpenAIBackend(",".join(urls), "fake-model", backoff=0.01, **backend_kw)
    return Decider(backend, cache, progress=False, scoring="first-token", **kw)


def expected(spec: ArchetypeSpec, rows: list[dict[str, str]]) -> torch.Tensor:
    prompt = PromptTemplate.load(spec)
    return torch.tensor([FakeServer.expected(prompt.render(r, CONTEXT), ACTIONS) for r in rows])


def test_requests_are_spread_over_the_replicas(spec, rows):
    with FakeServer(delay=0.05) as a, FakeServer(delay=0.05) as b:
        d = decider([a.url, b.url], max_concurrency=4)
        out = d.decide(spec, rows, CONTEXT)
        sent = (a.requests, b.requests)
    assert sum(sent) == len(rows) and min(sent) >= len(rows) // 4, sent  # both answer, about evenly
    assert d.backend.stats.replicas == {a.url: sent[0], b.url: sent[1]}
    assert d.backend.stats.failovers == 0 and d.backend.stats.retries == 0
    assert torch.allclose(out.probs, expected(spec, rows), atol=1e-6)


@pytest.mark.parametrize("fault", ["refused", "error500", "error429", "drop"])
def test_a_failing_replica_sends_its_requests_to_the_other(spec, rows, fault):
    """With no retries at all, every decision still comes from the working replica, never a default."""
    with FakeServer(default="good" if fault == "refused" else fault) as bad, FakeServer() as good:
        bad_url = closed_url() if fault == "refused" else bad.url
        d = decider([bad_url, good.url], retries=0, on_failure="return")
        out = d.decide(spec, rows, CONTEXT)
        assert good.requests == len(rows)
        if fault != "refused":
            assert bad.requests > 0  # it was asked, and failed
    assert out.failed == [] and not torch.isnan(out.probs).any()
    assert torch.allclose(out.probs, expected(spec, rows), atol=1e-6)
    assert d.backend.stats.failovers > 0 and d.backend.stats.retries == 0


def test_a_silent_replica_costs_one_timeout_and_the_other_answers(spec, rows):
    with FakeServer(default="hang") as silent, FakeServer() as good:
        d = decider([silent.url, good.url], timeout=1.0, retries=0, max_concurrency=4)
        began = time.monotonic()
        out = d.decide(spec, rows, CONTEXT)
        took = time.monotonic() - began
        assert silent.requests <= 4  # its first turn only; after its stall nothing more is sent there
    assert took < 5, took
    assert out.failed == [] and torch.allclose(out.probs, expected(spec, rows), atol=1e-6)
    assert d.backend.stats.errors == {"timeout": 1}


def test_when_every_replica_fails_the_usual_error_is_reported(spec, rows):
    urls = [closed_url(), closed_url()]
    with pytest.raises(ServerError, match="every replica of --llm-url") as info:
        decider(urls, retries=1).decide(spec, rows[:3], CONTEXT)
    assert "is unreachable" in str(info.value) and all(u in str(info.value) for u in urls)

    with FakeServer(default="error500") as a, FakeServer(default="error500") as b:
        with pytest.raises(LLMError, match="after 2 attempts"):
            decider([a.url, b.url], retries=1).decide(spec, rows[:3], CONTEXT)
        assert a.requests + b.requests == 3 * 2 * 2  # each attempt asked both replicas
        out = decider([a.url, b.url], retries=0, on_failure="return").decide(spec, rows[:3], CONTEXT)
    assert out.failed == [0, 1, 2] and torch.isnan(out.probs).all()  # reported, not filled in

    with FakeServer(default="hang") as a, FakeServer(default="hang") as b:
        began = time.monotonic()
        with pytest.raises(ServerError, match="no replica of --llm-url .* answered a request within 1 s"):
            decider([a.url, b.url], timeout=1.0).decide(spec, rows, CONTEXT)
        assert time.monotonic() - began < 5


def test_run_on_llm_failure_heuristic_when_every_replica_fails(tmp_path, monkeypatch):
    from lpm.run import RunConfig, run

    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))

    async def no_pause(self, attempt: int) -> None:  # the run's backend waits 0.5 s, 1 s, 2 s between retries
        return None

    monkeypatch.setattr(OpenAIBackend, "_pause", no_pause)
    with FakeServer(default="error500") as a, FakeServer(default="error500") as b:
        config = RunConfig.build(
            scenario="covid", policy="llm", agents=5_000, weeks=1, llm_url=f"{a.url},{b.url}",
            on_llm_failure="heuristic",
        )  # fmt: skip
        out = run(config, tmp_path / "r", progress=False)
        assert a.requests > 0 and b.requests > 0
    assert out.summary["llm"]["failovers"] > 0 and out.summary["llm"]["retries"] > 0
    assert out.summary["fallbacks"] == 100  # every archetype decided by the heuristic, and counted


def test_every_replica_must_answer_and_serve_the_same_model():
    with FakeServer(model="m-a") as a, FakeServer(model="m-b") as b, FakeServer(model="m-a") as c:
        secret_b = b.url.replace("http://", "http://alice:s3cret@")
        for model in (None, "m-a"):
            with pytest.raises(InputError, match="replicas must serve the same model|--llm-model") as info:
                Endpoint.resolve(f"{a.url},{secret_b}", model)
            assert f"--llm-url replica {b.url} serves m-b" in str(info.value)
            assert "s3cret" not in str(info.value)
        endpoint = Endpoint.resolve(f"{a.url},{c.url}", None)
        assert endpoint.model == "m-a" and endpoint.urls == [a.url, c.url]
        down = closed_url().replace("http://", "http://alice:s3cret@")
        with pytest.raises(ServerError) as info:
            Endpoint.resolve(f"{a.url},{down}", "m-a")
        assert f"--llm-url replica {redact_url(down)}:" in str(info.value) and "s3cret" not in str(info.value)


def test_the_cache_key_does_not_depend_on_the_replica(spec, rows, tmp_path):
    with FakeServer() as a, FakeServer() as b:
        both, only_a, only_b = (
            OpenAIBackend(u, "fake-model") for u in (f"{a.url},{b.url}", a.url, f"{b.url}/")
        )
        assert both.identity() == only_a.identity() == only_b.identity()
        cache = ResponseCache(tmp_path)
        decider([a.url, b.url], cache).decide(spec, rows, CONTEXT)
        assert a.requests > 0 and b.requests > 0
        before = a.requests + b.requests
        out = decider([b.url], ResponseCache(tmp_path)).decide(spec, rows, CONTEXT)
        assert all(out.cached) and a.requests + b.requests == before  # all from the cache


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:1/v1,,http://127.0.0.1:2/v1", "has an empty element"),
        ("http://127.0.0.1:1/v1,", "has an empty element"),
        ("http://127.0.0.1:1/v1,http://127.0.0.1:1/v1/", "names http://127.0.0.1:1/v1 twice"),
        ("http://127.0.0.1:1/v1,127.0.0.1:2/v1", "must be an http\\(s\\) URL .* got '127.0.0.1:2/v1'"),
        ("http://127.0.0.1:1/v1,http://:2/v1", "must be an http\\(s\\) URL .* got 'http://:2/v1'"),
        ("http://127.0.0.1:1/v1,http://h:port/v1", "got 'http://h:port/v1'"),
    ],
)
def test_a_bad_list_of_urls_is_a_clear_error(url, message):
    with pytest.raises(InputError, match=f"--llm-url.*{message}"):
        Endpoint.resolve(url, "m")
    secret = url.replace("http://127.0.0.1:1", "http://alice:s3cret@127.0.0.1:1")
    with pytest.raises(InputError) as info:
        Endpoint.resolve(secret, "m")
    assert "s3cret" not in str(info.value)


def test_the_cli_names_the_bad_element(capsys):
    code = main(
        ["run", "covid", "--policy", "llm", "--agents", "1000", "--llm-url", "http://a:1/v1,,http://b:1/v1"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--llm-url" in err and "empty element" in err and "Traceback" not in err


def test_a_run_records_the_replicas_without_credentials(tmp_path, monkeypatch):
    from lpm.run import RunConfig, run

    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "cache"))
    with FakeServer() as a, FakeServer() as b:
        secret_a = a.url.replace("http://", "http://alice:s3cret@")
        out = run(
            RunConfig.build(
                scenario="covid", policy="llm", agents=5_000, weeks=1, llm_url=f"{secret_a},{b.url}"
            ),
            tmp_path / "r",
            progress=False,
        )
        sent = (a.requests, b.requests)
    assert min(sent) > 0
    llm = out.summary["llm"]
    assert llm["replicas"] == [a.url, b.url] and llm["url"] == f"{a.url},{b.url}"
    assert llm["replica_requests"] == {a.url: sent[0], b.url: sent[1]} and llm["failovers"] == 0
    for path in out.folder.iterdir():
        if path.suffix in (".json", ".md"):
            assert "s3cret" not in path.read_text(), path.name
    assert json.loads((out.folder / "config.json").read_text())["run"]["llm_url"] == f"{a.url},{b.url}"
