"""A scripted OpenAI-compatible chat server on 127.0.0.1 for unit tests of the backend and decisions.

Each request to ``/v1/chat/completions`` is answered by a *behaviour*: the next one of ``script`` (a list,
consumed in order) or ``script(body, index)`` (a callable), else ``default``:

``good``          constrained answer with first-token top logprobs (the mass of each action over two tokens)
``llamacpp``      the same in llama.cpp's older shape (``probs`` with ``tok_str`` / ``prob``)
``nologprobs``    a constrained answer without logprobs (``n`` choices when asked)
``offchoice``     free text that is not an action, logprobs on free-text tokens
``zeromass``      an action as text, but no top token begins any action
``error500``      HTTP 500;   ``error404``  HTTP 404 (model not found)
``drop``          closes the connection without answering
``hang``          reads the request and never answers (until the server stops)
``slow``          ``good`` after ``slow_s`` seconds
``unconstrained`` an action as text, but 90% of the first token's mass on free text (a server that ignores the
                  constraint, or reads log-probabilities before it)
``nullchoice``    ``choices: [null]``;   ``wrongshape``  ``choices`` is a string (chat and completions)
``badusage``      ``usage.prompt_tokens`` is text;   ``absurd``  a log-probability of +5
``dupindex``      every choice of a completion of token ids has index 0

Whole-action scoring reads, where the server can (``token_logprobs=True``, the default, as vLLM),
``POST /tokenize`` of a conversation (three fixed tokens, one standing for the messages before the last,
one per word of the last (assistant) message, an end-of-turn token) and ``POST /v1/completions`` of token
ids with ``logprob_token_ids``: each asked word token after a prompt gets :meth:`word_logprob`, the end of
turn -0.5 (+5 under ``absurd``), any other token -30 (keys ``token_id:N``). With ``token_logprobs=False``,
and under ``nologprobs``, ``unconstrained`` and ``llamacpp``, both paths answer HTTP 404 (a server without
them). A request with ``prompt_logprobs`` (whole-action scoring on such a server) gets, under ``good``, ``badusage`` and ``absurd``
(an end-of-turn log-probability of +5), vLLM's shape: ``prompt_logprobs`` of the
conversation, ``None`` first, then one ``{id: {logprob}}`` per token: three fixed tokens for the prompt,
one per word of the final (assistant) message, each with :meth:`word_logprob`, and an end-of-turn token;
under ``nologprobs``, ``unconstrained`` and ``llamacpp`` no ``prompt_logprobs`` (a server without them).

``GET /v1/models`` lists ``model``. The probability of the first action for a prompt is fixed by a hash of its messages (:meth:`expected`).
The server counts requests and the most it had in flight at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeServer:
    #: the fake tokenizer's vocabulary, shared by every fake server (replicas tokenize alike): a token for
    #: the messages before the answer (``PROMPT_TOKENS`` + a hash of them) and one per word (:meth:`word_token`)
    _conversations: dict[int, str] = {}
    _words: dict[int, str] = {}
    PROMPT_TOKENS = 20_000_000

    def __init__(
        self,
        script: list[str] | Callable[[dict, int], str] | None = None,
        *,
        default: str = "good",
        delay: float = 0.0,
        slow_s: float = 2.0,
        model: str = "fake-model",
        metrics: bool = False,
        token_logprobs: bool = True,
    ):
        self.script = list(script) if isinstance(script, list) else script
        self.default = default
        self.delay = delay
        self.slow_s = slow_s
        self.model = model
        self.metrics = metrics
        self.token_logprobs = token_logprobs
        self.paths: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.behaviours: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._url: str | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> FakeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/metrics" and server.metrics:
                    data = server.metrics_text().encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif self.path.rstrip("/").endswith("/models"):
                    server._send(
                        self, 200, {"object": "list", "data": [{"id": server.model, "object": "model"}]}
                    )
                else:
                    server._send(self, 404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                server._handle(self, body, self.path)

        class Quiet(ThreadingHTTPServer):
            request_queue_size = 256  # many clients connect at once

            def handle_error(self, request: Any, client_address: Any) -> None:  # dropped connections
                pass

        self._httpd = Quiet(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self._url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        return self

    def stop(self) -> None:
        self._stopped.set()  # releases hanging requests
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL (kept after :meth:`stop`, for checking messages that name it)."""
        assert self._url is not None, "the server was never started"
        return self._url

    @property
    def requests(self) -> int:
        return len(self.bodies)

    # -- answers --------------------------------------------------------------------------------
    @staticmethod
    def expected(messages: list[dict[str, str]], actions: list[str]) -> list[float]:
        """The distribution the ``good`` behaviour encodes for these messages."""
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
        p = 0.05 + 0.9 * digest[0] / 255
        rest = (1 - p) / (len(actions) - 1)
        return [p] + [rest] * (len(actions) - 1)

    def metrics_text(self) -> str:
        """vLLM-style Prometheus counters (``metrics=True``): each request so far had 50 prompt tokens, of which
        40 were found in the prefix cache, and generated 3 tokens."""
        n = len(self.bodies)
        label = '{engine="0",model_name="' + self.model + '"}'
        return "\n".join(
            [
                "# HELP vllm:prompt_tokens_total Prompt tokens.",
                f"vllm:prompt_tokens_total{label} {50.0 * n}",
                f"vllm:generation_tokens_total{label} {3.0 * n}",
                f"vllm:prefix_cache_queries_total{label} {50.0 * n}",
                f"vllm:prefix_cache_hits_total{label} {40.0 * n}",
                "",
            ]
        )

    @staticmethod
    def word_logprob(word: str, prompt: list[dict[str, str]] | None = None) -> float:
        """The log-probability the fake gives one word token of an answer to ``prompt`` (the messages before
        the answer) in whole-action scoring: a hash of both, so answers differ by prompt."""
        key = json.dumps(prompt or [], sort_keys=True) + "\x00" + word
        return -(1.0 + hashlib.sha256(key.encode()).digest()[0] / 64)

    @classmethod
    def sequence_expected(cls, actions: list[str], prompt: list[dict[str, str]] | None = None) -> list[float]:
        """The distribution whole-action scoring must find against the fake for ``prompt``."""
        import re

        lps = [sum(cls.word_logprob(w, prompt) for w in re.findall(r"\s*\S+", a)) for a in actions]
        weights = [math.exp(lp) for lp in lps]
        return [w / sum(weights) for w in weights]

    def _behaviour(self, body: dict[str, Any], index: int) -> str:
        if callable(self.script):
            return self.script(body, index)
        if self.script:
            return self.script.pop(0)
        return self.default

    def _handle(self, handler: BaseHTTPRequestHandler, body: dict[str, Any], path: str = "") -> None:
        with self._lock:
            index = len(self.bodies)
            self.bodies.append(body)
            self.paths.append(path)
            behaviour = self._behaviour(body, index)
            self.behaviours.append(behaviour)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            if behaviour == "slow":
                time.sleep(self.slow_s)
                behaviour = "good"
            if behaviour == "hang":
                self._stopped.wait()
                handler.close_connection = True
                return
            if behaviour == "drop":
                handler.close_connection = True
                handler.connection.shutdown(2)
                return
            if behaviour.startswith("error"):
                code = int(behaviour[5:])
                self._send(
                    handler,
                    code,
                    {"error": {"message": f"scripted {code}", "type": "server_error", "code": code}},
                )
                return
            if (
                path.endswith("/tokenize")
                or path.endswith("/completions")
                and not path.endswith("chat/completions")
            ):
                if not self.token_logprobs or behaviour in ("nologprobs", "unconstrained", "llamacpp"):
                    self._send(handler, 404, {"error": {"message": f"no route {path}", "code": 404}})
                elif path.endswith("/tokenize"):
                    self._send(handler, 200, self._tokenize(body))
                else:
                    self._send(handler, 200, self._token_completion(body, behaviour))
                return
            self._send(handler, 200, self._completion(body, behaviour))
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def word_token(word: str) -> int:
        """The fake's token id of one word (with its leading space): a hash, so the same word is the same token."""
        return 1000 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:3], "big")

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        import re

        messages = body["messages"]
        key = json.dumps(messages[:-1], sort_keys=True)
        prompt = self.PROMPT_TOKENS + int.from_bytes(hashlib.sha256(key.encode()).digest()[:3], "big")
        with self._lock:
            self._conversations[prompt] = key
            words = re.findall(r"\s*\S+", messages[-1].get("content") or "")
            for w in words:
                self._words[self.word_token(w)] = w
        tokens = [1, 2, 3, prompt, *(self.word_token(w) for w in words), 2]
        return {"count": len(tokens), "max_model_len": 2048, "tokens": tokens, "token_strs": None}

    def _token_completion(self, body: dict[str, Any], behaviour: str) -> dict[str, Any]:
        if behaviour == "nullchoice":
            return {"id": "x", "object": "text_completion", "choices": [None]}
        if behaviour == "wrongshape":
            return {"id": "x", "object": "text_completion", "choices": "isolate"}
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = []
        for i, tokens in enumerate(prompts):
            messages = json.loads(self._conversations[tokens[3]])
            top = {}
            for t in body.get("logprob_token_ids") or []:
                if t == 2:
                    lp = 5.0 if behaviour == "absurd" else -0.5
                elif t in self._words:
                    lp = self.word_logprob(self._words[t], messages)
                else:
                    lp = -30.0
                top[f"token_id:{t}"] = lp
            choices.append(
                {
                    "index": 0 if behaviour == "dupindex" else i,
                    "text": "x",
                    "finish_reason": "length",
                    "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-1.0], "top_logprobs": [top]},
                }
            )
        used = sum(len(t) for t in prompts)
        return {
            "id": f"cmpl-{len(self.bodies)}",
            "object": "text_completion",
            "model": body.get("model", self.model),
            "choices": choices,
            "usage": {
                "prompt_tokens": "many" if behaviour == "badusage" else used,
                "completion_tokens": len(prompts),
                "total_tokens": used + len(prompts),
            },
        }

    def _prompt_logprobs(self, body: dict[str, Any], behaviour: str) -> dict[str, Any]:
        import re

        words = re.findall(r"\s*\S+", body["messages"][-1].get("content") or "")
        entries: list[Any] = [None] + [{str(i): {"logprob": -0.1, "rank": 1}} for i in (1, 2, 3)]
        for w in words:  # a word's token id is a hash of it, so the same word is the same token
            token_id = 1000 + int.from_bytes(hashlib.sha256(w.encode()).digest()[:3], "big")
            entries.append(
                {str(token_id): {"logprob": self.word_logprob(w, body["messages"][:-1]), "rank": 5}}
            )
        entries.append({"2": {"logprob": 5.0 if behaviour == "absurd" else -0.5, "rank": 1}})  # end of turn
        out = {
            "id": f"chatcmpl-{len(self.bodies)}",
            "object": "chat.completion",
            "model": body.get("model", self.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
            ],
            "prompt_logprobs": entries,
            "usage": {
                "prompt_tokens": "many" if behaviour == "badusage" else len(entries) - 1,
                "completion_tokens": 1,
                "total_tokens": len(entries),
            },
        }
        if behaviour in (
            "nologprobs",
            "unconstrained",
            "llamacpp",
        ):  # servers without prompt log-probabilities
            del out["prompt_logprobs"]
        return out

    def _completion(self, body: dict[str, Any], behaviour: str) -> dict[str, Any]:
        if behaviour == "nullchoice":
            return {"id": "x", "object": "chat.completion", "choices": [None]}
        if behaviour == "wrongshape":
            return {"id": "x", "object": "chat.completion", "choices": "isolate"}
        if body.get("prompt_logprobs") is not None:
            return self._prompt_logprobs(body, behaviour)
        actions = (body.get("structured_outputs") or {}).get("choice")
        if actions is None and "grammar" in body:  # root ::= "a" | "b"
            actions = [json.loads(part.strip()) for part in body["grammar"].split("::=", 1)[1].split("|")]
        actions = actions or ["yes", "no"]
        probs = self.expected(body["messages"], actions)
        n = int(body.get("n") or 1)
        if n > 1 or body.get("temperature", 1) > 0:  # sampling: deterministic counts close to probs
            counts = [round(p * n) for p in probs]
            counts[0] += n - sum(counts)
            texts = [a for a, c in zip(actions, counts, strict=True) for _ in range(max(c, 0))][:n]
        else:
            texts = [actions[max(range(len(actions)), key=lambda i: probs[i])]]
        if behaviour == "offchoice":
            texts = ["I think I would rather not say."] * len(texts)
        top: list[tuple[str, float]] = []
        for a, p in zip(actions, probs, strict=True):  # each action's mass over a long and a short prefix
            top += [(a[:4], 0.7 * p), (a[:1], 0.3 * p)] if len(a) > 1 else [(a, p)]
        top.append(("<|im_end|>", 1e-9))
        if behaviour in ("offchoice", "zeromass"):
            top = [("I", 0.6), ("This", 0.4)]
        if behaviour == "unconstrained":
            top = [("I", 0.6), ("This", 0.3)] + [(a[:1], 0.1 / len(actions)) for a in actions]
        choices = []
        for i, text in enumerate(texts):
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
            if body.get("logprobs") and behaviour in (
                "good", "offchoice", "zeromass", "unconstrained", "badusage", "absurd"
            ):  # fmt: skip
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": top[0][0],
                            "logprob": math.log(top[0][1]),
                            "bytes": None,
                            "top_logprobs": [
                                {
                                    "token": t,
                                    "logprob": 5.0 if behaviour == "absurd" else math.log(p),
                                    "bytes": None,
                                }
                                for t, p in top
                            ],
                        }
                    ]
                }
            elif body.get("logprobs") and behaviour == "llamacpp":
                choice["logprobs"] = {
                    "content": [
                        {
                            "id": 1,
                            "tok_str": top[0][0],
                            "prob": top[0][1],
                            "probs": [{"tok_str": t, "prob": p} for t, p in top],
                        }
                    ]
                }
            choices.append(choice)
        return {
            "id": f"chatcmpl-{len(self.bodies)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": choices,
            "usage": {
                "prompt_tokens": "many" if behaviour == "badusage" else 50,
                "completion_tokens": 3 * len(texts),
                "total_tokens": 50 + 3 * len(texts),
            },
        }
