"""Model server control: fast unit tests, and integration tests against real vLLM and llama.cpp servers."""

from __future__ import annotations

import socket
import sys
import threading
import time

import httpx
import pytest

from lpm.errors import ServerError
from lpm.server import (
    ModelServer,
    check_server,
    cpu_list_string,
    free_port,
    metrics,
    parse_prometheus,
)

CHOICES = ["isolate", "go out"]
QUESTION = [
    {
        "role": "user",
        "content": "There is an epidemic in your city. Do you isolate or go out? "
        "Answer with one of: isolate, go out.",
    }
]


# -- fast unit tests (no server) -------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_server_picks_a_port_and_names_urls() -> None:
    server = ModelServer("llamacpp", port=None)
    assert server.url == f"http://127.0.0.1:{server.port}/v1"
    assert server.root_url == f"http://127.0.0.1:{server.port}"
    assert not server.running
    server.stop()  # stopping a server never started is a no-op


@pytest.mark.parametrize(
    ("cores", "expected"), [([0, 1], "0-1"), ([0], "0"), ([3, 0, 1, 2, 7, 9, 10], "0-3,7,9-10")]
)
def test_cpu_list_string(cores: list[int], expected: str) -> None:
    assert cpu_list_string(cores) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "ollama"},
        {"kv_cache_gib": 0},
        {"kv_cache_gib": 1.5},
        {"threads": 10_000},
        {"max_model_len": 1},
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ServerError):
        ModelServer(**kwargs)


def test_commands_of_each_kind(tmp_path, monkeypatch) -> None:
    """Both launchers get the common options (llama.cpp's own parser accepts them), then their own."""
    import sys

    from lpm import server as server_module
    from lpm.llamacpp_server import build_parser

    monkeypatch.setattr(server_module, "gpu_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    llama = ModelServer("llamacpp", model=gguf, port=8123, threads=1, max_model_len=512)
    cmd = llama.command()
    assert cmd[:3] == [sys.executable, "-m", "lpm.llamacpp_server"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.model, args.served_model_name, args.port, args.max_model_len, args.threads) == (
        str(gguf),
        "tiny",
        8123,
        512,
        1,
    )
    assert "VLLM_CPU_KVCACHE_SPACE" not in llama.environment()  # the CPU settings are vLLM's

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    vllm = ModelServer("vllm", model=folder, port=8124, kv_cache_gib=3)
    cmd = vllm.command()
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert (
        cmd[cmd.index("--served-model-name") + 1] == "hf" and cmd[cmd.index("--max-model-len") + 1] == "2048"
    )
    assert "--structured-outputs-config" in cmd and cmd[-1] == "--enforce-eager" and "--threads" not in cmd
    assert vllm.environment()["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert repr(vllm).startswith("ModelServer(kind='vllm', model='hf'")


def test_running_server_at_a_url_starts_nothing() -> None:
    from lpm.endpoint import running_server
    from lpm.errors import InputError
    from lpm.model import DEFAULT_MODEL_NAME

    with running_server("http://127.0.0.1:9/v1", None) as found:
        assert found == ("http://127.0.0.1:9/v1", DEFAULT_MODEL_NAME, None)
    with pytest.raises(InputError, match="--server must be one of"), running_server(None, None, server="tgi"):
        pass


def test_cli_serve_names_the_server_option() -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "lpm", "serve", "--server", "tgi"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "--server must be one of vllm, llamacpp, got 'tgi'" in res.stderr


def test_check_server_unreachable_names_url_and_fix() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError) as caught:
        check_server(url, timeout=1)
    assert url in str(caught.value)
    assert "lpm serve" in (caught.value.hint or "")


def test_metrics_unreachable_raises() -> None:
    with pytest.raises(ServerError):
        metrics(f"http://127.0.0.1:{free_port()}/v1", timeout=1)


def test_parse_prometheus() -> None:
    text = (
        "# HELP vllm:request_success_total Count\n# TYPE vllm:request_success_total counter\n"
        'vllm:request_success_total{finished_reason="stop"} 3.0\n'
        'vllm:request_success_total{finished_reason="length"} 2.0\n'
    )
    samples = parse_prometheus(text)
    assert sum(samples.values()) == 5.0


def test_start_failure_shows_log_tail(tmp_path) -> None:
    missing = tmp_path / "missing.gguf"
    missing.write_bytes(b"not a gguf")
    server = ModelServer("llamacpp", model=missing, log_path=tmp_path / "log.txt", startup_timeout=60)
    with pytest.raises(ServerError) as caught:
        server.start()
    assert "exited" in str(caught.value)
    assert not server.running


class SlowStartServer(ModelServer):
    """A "server" that loads for 1.5 s, then serves its working directory (where ``v1/models`` is a file)."""

    def command(self) -> list[str]:
        serve = (
            "import http.server as h, time; time.sleep(1.5); "
            f"h.ThreadingHTTPServer(({self.host!r}, {self.port}), h.SimpleHTTPRequestHandler).serve_forever()"
        )
        return [sys.executable, "-c", serve]


def test_running_only_once_the_server_answers(tmp_path, monkeypatch) -> None:
    """While a launched server still loads, ``running`` is False: a local backend that sees it True sends its
    requests at once, to a port nothing answers yet (98 of 100 requests failed so, with a tiny model)."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text('{"data": [{"id": "slow"}]}')
    monkeypatch.chdir(tmp_path)  # the server's working directory
    server = SlowStartServer("llamacpp", log_path=tmp_path / "log.txt", startup_timeout=30)
    seen: list[tuple[bool, bool]] = []  # (launched, running) while start() waits
    starting = threading.Thread(target=server.start)
    starting.start()
    while starting.is_alive():
        seen.append((server.pid is not None, server.running))
        time.sleep(0.05)
    starting.join()
    try:
        assert (True, False) in seen and (True, True) not in seen
        assert server.running and server.startup_seconds is not None and server.startup_seconds >= 1.5
    finally:
        server.stop()
    assert not server.running


# -- integration: vLLM ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_vllm_lists_its_model(vllm_server: ModelServer) -> None:
    status = check_server(vllm_server.url)
    assert status["healthy"] is True
    assert status["models"] == [vllm_server.model]


@pytest.mark.integration
def test_vllm_choice_logprobs_and_request_counter(vllm_server: ModelServer) -> None:
    before = metrics(vllm_server.url)
    assert before["server"] == "vllm"
    body = {
        "model": vllm_server.model,
        "messages": QUESTION,
        "structured_outputs": {"choice": CHOICES},
        "logprobs": True,
        "top_logprobs": 10,
        "max_tokens": 3,
        "temperature": 0,
    }
    reply = httpx.post(f"{vllm_server.url}/chat/completions", json=body, timeout=120).json()
    choice = reply["choices"][0]
    assert choice["message"]["content"] in CHOICES
    first = choice["logprobs"]["content"][0]
    assert any(option.startswith(first["token"]) for option in CHOICES)
    # masked distribution: every token with real mass begins a choice (disallowed ones get -9999)
    allowed = [t for t in first["top_logprobs"] if t["logprob"] > -100]
    assert allowed and all(any(o.startswith(t["token"]) for o in CHOICES) for t in allowed)
    after = metrics(vllm_server.url)
    assert after["completion_requests"] == before["completion_requests"] + 1
    assert after["requests_finished"] == before["requests_finished"] + 1


# -- integration: llama.cpp ------------------------------------------------------------------------------


@pytest.mark.integration
def test_llamacpp_answers_under_a_grammar(llamacpp_server: ModelServer) -> None:
    assert check_server(llamacpp_server.url)["models"] == [llamacpp_server.model]
    grammar = "root ::= " + " | ".join(f'"{c}"' for c in CHOICES)
    body = {
        "model": llamacpp_server.model,
        "messages": QUESTION,
        "grammar": grammar,
        "logprobs": True,
        "top_logprobs": 10,
        "max_tokens": 8,  # one token per byte of the longest choice, at worst (sampling may split "isolate")
        "temperature": 1.0,
        "n": 3,
    }
    reply = httpx.post(f"{llamacpp_server.url}/chat/completions", json=body, timeout=60).json()
    assert len(reply["choices"]) == 3
    for choice in reply["choices"]:
        assert choice["message"]["content"] in CHOICES
        # llama-server's shape: id, token, bytes, logprob, top_logprobs (taken BEFORE the grammar mask)
        first = choice["logprobs"]["content"][0]
        assert {"id", "token", "logprob", "top_logprobs"} <= set(first)
