"""Faults of the model server, each a clear error and nothing left running: a server that never answers, a
plain web server where a model server should be, and lpm dying while its own server starts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_server import FakeServer

from lpm.archetype import ArchetypeSpec
from lpm.cli import app, main
from lpm.decision import Decider
from lpm.endpoint import Endpoint
from lpm.errors import InputError, ServerError
from lpm.population import Population
from lpm.server import check_server

CONTEXT = ["--context", "week=10", "--context", "cases=2345", "--context", "cases_change=12"]


def lpm_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lpm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


# -- a server that takes requests and never answers ------------------------------------------------------


def test_a_decision_step_against_a_silent_server_takes_one_timeout():
    """Before: every archetype batch waited retries x 60 s (about four minutes each), then said "raise the
    timeout", which no command could set. Now the first request without an answer stops the step."""
    spec = ArchetypeSpec.load("covid_isolation")
    rows = spec.group(Population.synthesize("nyc", agents=2000, seed=0)).rows()
    with FakeServer(default="hang") as server:
        endpoint = Endpoint.resolve(server.url, server.model, timeout=1.0, max_concurrency=4)
        decider = Decider(endpoint.backend(), None, progress=False)
        began = time.monotonic()
        with pytest.raises(ServerError) as info:
            decider.decide(spec, rows, {"week": 10, "cases": 2345, "cases_change": 12})
        took = time.monotonic() - began
        assert server.requests <= 4  # the first turn only: the others were never sent
    assert took < 8, took  # before: 4 attempts x every turn of 4 requests x 1 s
    assert f"the model server at {server.url} did not answer a request within 1 s (--llm-timeout)" in str(
        info.value
    )
    assert "--llm-timeout SECONDS" in info.value.hint


def test_lpm_decide_with_llm_timeout_names_the_url_and_the_timeout(tmp_path):
    pop = Population.synthesize("nyc", agents=2000, seed=0).save(tmp_path / "pop.parquet")
    env = {"LPM_CACHE_DIR": str(tmp_path / "cache")}
    with FakeServer(default="hang") as server:
        began = time.monotonic()
        res = lpm_cli(
            "decide", "covid_isolation", "-p", str(pop), *CONTEXT,
            "--llm-url", server.url, "--llm-model", server.model, "--llm-timeout", "1",
            env=env,
        )  # fmt: skip
        took = time.monotonic() - began
    assert res.returncode == 2, res.stderr
    assert f"error: the model server at {server.url} did not answer a request within 1 s" in res.stderr
    assert "hint:" in res.stderr and "--llm-timeout SECONDS" in res.stderr
    assert "Traceback" not in res.stderr
    assert took < 60, took  # start-up of the CLI included; the step itself takes about one second


def test_llm_timeout_is_checked_and_leaves_the_resume_fingerprint_alone():
    from lpm.run import RunConfig

    with pytest.raises(InputError, match="--llm-timeout must be > 0 seconds, got -1"):
        Endpoint.resolve("http://127.0.0.1:9/v1", "m", timeout=-1)
    with pytest.raises(InputError, match="llm_timeout"):
        RunConfig.build(scenario="covid", policy="llm", llm_timeout=0)
    quick = RunConfig.build(scenario="covid", policy="llm", llm_timeout=5)
    assert quick.fingerprint() == RunConfig.build(scenario="covid", policy="llm").fingerprint()


def test_every_command_that_asks_a_model_takes_llm_timeout():
    from typer.testing import CliRunner

    for command in ("decide", "probe", "run", "compare", "calibrate"):
        res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--llm-timeout" in res.output, command


# -- a plain web server where a model server should be ----------------------------------------------------


@contextmanager
def web_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real ``http.server`` on 127.0.0.1 in a thread; yields its ``/v1`` base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Quiet:
    def log_message(self, *args: object) -> None:
        pass


class Files(Quiet, SimpleHTTPRequestHandler):
    """``python -m http.server`` in the current folder: 404 (HTML) for /v1/models, 501 for POST."""


class HtmlEverywhere(Quiet, BaseHTTPRequestHandler):
    """A web application that answers an HTML page, 200, on every path and method."""

    def _page(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html><body>Welcome</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _page  # noqa: N815


@pytest.mark.parametrize(
    ("handler", "answered"), [(Files, "404, content-type text/html"), (HtmlEverywhere, "200")]
)
def test_a_plain_web_server_is_not_an_openai_compatible_server(
    handler, answered, tmp_path, monkeypatch, capsys
):
    """Before: "serves no models" (Endpoint.resolve), and `lpm serve --check` called it healthy."""
    monkeypatch.chdir(tmp_path)
    with web_server(handler) as url:
        says = f"{url} is not an OpenAI-compatible server (GET {url}/models answered {answered}"
        with pytest.raises(ServerError) as info:
            check_server(url)
        assert says in str(info.value) and "/v1" in info.value.hint
        with pytest.raises(ServerError, match="is not an OpenAI-compatible server"):
            Endpoint.resolve(url, None)
        assert main(["serve", "--check", url]) == 2
        printed = capsys.readouterr()
        assert f"error: {says}" in printed.err and "healthy" not in printed.out
        # with a model named, nothing asks /models first: the first request says it instead of retrying
        backend = Endpoint.resolve(url, "m").backend()
        with pytest.raises(
            ServerError, match=f"not an OpenAI-compatible server \\(POST {url}/chat/completions"
        ):
            asyncio.run(backend.choose([{"role": "user", "content": "x?"}], ["a", "b"]))


def test_serve_check_names_what_a_real_server_serves(capsys):
    with FakeServer() as server:
        assert check_server(server.url) == {"url": server.url, "healthy": True, "models": [server.model]}
        assert main(["serve", "--check", server.url]) == 0
    assert f"healthy, serving {server.model}" in capsys.readouterr().out


# -- lpm dies while its own server starts ------------------------------------------------------------------

STARTER = """
import asyncio, signal, sys, threading, time

from lpm.backend import LocalServerBackend
from lpm.server import ModelServer


class Sleeper(ModelServer):
    '''A "server" that never answers: a long sleep.'''

    def command(self):
        return [sys.executable, "-c", "import time; time.sleep(600)"]


log, how = sys.argv[1], sys.argv[2]
if how != "sigterm":  # as the CLI does: SIGTERM unwinds like Ctrl-C
    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
server = Sleeper("llamacpp", log_path=log, startup_timeout=300)


def report():
    while server.pid is None:
        time.sleep(0.05)
    print(server.pid, flush=True)


threading.Thread(target=report, daemon=True).start()
try:
    if how == "deciding":  # started by a backend's first request, in a thread of its own
        backend = LocalServerBackend(server)
        try:
            asyncio.run(backend.choose([{"role": "user", "content": "a or b?"}], ["a", "b"]))
        finally:
            server.stop()
    else:
        server.start()
except KeyboardInterrupt:
    sys.exit(130)
"""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[1] == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("how", ["interrupt", "deciding", "sigterm", "sigkill"])
def test_no_server_process_outlives_lpm(how, tmp_path):
    """Before: SIGTERM while lpm's server started left the server running. Now: interrupted (the CLI turns
    SIGTERM into KeyboardInterrupt), start() stops the process group, also when a backend started it in a
    thread; killed outright (SIGTERM without a handler, SIGKILL), the group's guard stops it."""
    script = tmp_path / "starter.py"
    script.write_text(STARTER)
    lpm = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "server.log"), how], stdout=subprocess.PIPE, text=True
    )
    try:
        guard = int(lpm.stdout.readline())
        deadline = time.monotonic() + 20
        while not (server := _children(guard)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server, "the guard started no server"
        lpm.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
        code = lpm.wait(timeout=30)
        assert code == (130 if how in ("interrupt", "deciding") else -signal.SIGKILL if how == "sigkill" else
                        -signal.SIGTERM)  # fmt: skip
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in (guard, *server)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in (guard, *server)), (how, guard, server)
    finally:
        if lpm.poll() is None:
            lpm.kill()
            lpm.wait()


def test_check_server_names_a_server_that_takes_the_connection_and_says_nothing():
    import socket

    with socket.socket() as listener:  # the kernel completes the handshake; nothing ever reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        began = time.monotonic()
        with pytest.raises(
            ServerError, match=f"The server at {url} did not answer GET {url}/models within 0.5 s"
        ):
            check_server(url, timeout=0.5)
        assert time.monotonic() - began < 3
