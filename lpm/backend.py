"""LLM backends: turn chat messages and an action set into a probability vector over the actions.

Two ways to read a choice distribution (:class:`lpm.decoding.Decoding` holds the settings), both under a
constraint that only lets the model write one of the actions, in the format of the server kind
(:mod:`lpm.server_kind`: vLLM ``structured_outputs.choice`` or a llama.cpp GBNF ``grammar``):

``logprobs``
    One greedy request with ``logprobs=True, top_logprobs=20``; the first generated token's alternatives
    are summed per action (:func:`lpm.logprobs.first_token_reading`). Their *coverage* (the mass on tokens
    that begin an action, before renormalisation) must reach ``min_coverage``. Where a first token begins
    several actions (``stay`` of "stay home" and "stay at work"), or with ``scoring="sequence"``, each whole
    action is scored instead, the conversation ending in that action as the complete answer: on vLLM read
    position by position from token ids (``/tokenize``, then ``/v1/completions`` with ``logprob_token_ids``,
    :func:`lpm.logprobs.answer_tree`), which keeps the prefix cache; else from the server's prompt
    log-probabilities (:func:`lpm.logprobs.action_logprobs`, one request per action); the answer records
    which reading (``scoring``).
``sample``
    ``n`` samples at temperature 1 under the same constraint; the probability of an action is its share.

``auto`` tries ``logprobs`` for each request and samples that request instead when the server returns no
log-probabilities or their coverage is too low; :class:`Answer` records the mode used and why it switched
(``fallback``). Every failure of a request (a bad answer, a malformed response, a client exception) is
retried, then raised as :class:`LLMError`; an unreachable server raises :class:`ServerError`. A request the
server does not answer within ``timeout`` seconds (``--llm-timeout``) is not retried: the server is taken as
stalled, and every request of the same event loop (one decision step), sent or waiting, fails at once with a
:class:`ServerError` naming the URL and the timeout, so a silent server costs a step about ``timeout``
seconds, not retries × batches × ``timeout``.

Replicas: :class:`OpenAIBackend` takes several URLs of servers of the same model (``--llm-url A,B``, e.g. one
vLLM per GPU). Each request goes to the replica with the fewest requests in flight (ties in turn). A request
that fails there for a reason another server may not share (connection refused or dropped, HTTP 5xx, 408, 409
or 429, no answer within ``timeout``) is sent to the next replica it has not tried, before it counts as a
failed attempt; the retries and errors above apply once every replica failed it. A replica that gave no answer
in time is left out for the rest of the event loop, and the loop stops as above only when every replica did.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai

from lpm.decoding import Decoding
from lpm.errors import InputError, LLMError, LpmError, ServerError
from lpm.logprobs import (
    BadAnswer,
    NoLogprobs,
    action_logprobs,
    answer_tree,
    first_token_candidates,
    first_token_reading,
    match_action,
    normalise_logprobs,
    token_logprobs,
    tree_logprobs,
    tree_nodes,
)
from lpm.server_kind import ServerKind, server_kind

MAX_TOKEN_IDS = 128
"""The most token ids one read of whole-action scoring asks for (vLLM's ``MAX_LOGPROB_TOKEN_IDS``)."""

DEFAULT_DECODING = Decoding()
"""Mode ``auto``, 20 samples, 20 top log-probabilities, sampling temperature 1."""


@dataclass
class Answer:
    """One decision of the model.

    probs: probability of each action, in the order of ``actions``; sums to 1.
    mode: ``logprobs`` or ``sample``, the mode actually used.
    raw: the model's answer text (``logprobs``) or the list of sampled answers (``sample``).
    attempts: requests sent for this answer, retries included.
    ambiguous: first-token mass on tokens that began more than one action (``logprobs`` only).
    coverage: first-token mass on tokens that begin an action, before renormalisation (0..1); also kept
        when a request switched to sampling for low coverage; None when no first token was read.
    scoring: how ``probs`` were read (:data:`lpm.logprobs.SCORINGS`): ``first-token``, ``sequence``
        (each whole action) or ``samples``.
    fallback: why mode ``auto`` sampled this request (``""`` when it did not).
    """

    probs: list[float]
    mode: str
    raw: str | list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    ambiguous: float = 0.0
    coverage: float | None = None
    scoring: str = "first-token"
    fallback: str = ""


class Backend(abc.ABC):
    """Base of the LLM backends. A subclass implements :meth:`choose` as a coroutine and sets ``model``.

    Checked at construction: a subclass whose ``choose`` is not ``async`` cannot be instantiated.
    """

    model: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Backend:
        if not inspect.iscoroutinefunction(cls.choose):
            raise TypeError(f"{cls.__name__}.choose must be an async method (async def choose(...))")
        return super().__new__(cls)

    @abc.abstractmethod
    async def choose(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding = DEFAULT_DECODING
    ) -> Answer:
        """Ask the model once, decoding as ``decoding`` says; return the probability of each action.

        Raises LLMError / ServerError.
        """

    def identity(self) -> dict[str, Any]:
        """What identifies the model and the answer format in a cache key (no URL, no key)."""
        return {"backend": type(self).__name__, "model": self.model}

    def request_params(self, actions: Sequence[str], decoding: Decoding) -> dict[str, Any]:
        """The decoding parameters that :meth:`choose` sends for ``decoding`` (part of the cache key).

        This default, :meth:`Decoding.requests`, is right for a backend that sends the decoding's own
        requests; a backend that sends something else says what here.
        """
        return decoding.requests(actions)

    def check(self, decoding: Decoding) -> None:
        """Refuse a decoding this backend cannot honour (:class:`InputError`); called once by the Decider."""
        return None

    async def aclose(self) -> None:
        """Release connections (called at the end of each event loop the backend was used in)."""
        return None


class _Retrying:
    """Exponential-backoff retries shared by the backends: ``backoff * 2**k`` seconds before retry k+1."""

    retries: int
    backoff: float

    def _check_retry_args(self, retries: int, backoff: float, max_concurrency: int) -> None:
        if retries < 0:
            raise InputError(f"retries must be >= 0, got {retries}")
        if backoff < 0:
            raise InputError(f"backoff must be >= 0 seconds, got {backoff}")
        if max_concurrency < 1:
            raise InputError(f"max_concurrency must be >= 1, got {max_concurrency}")

    async def _pause(self, attempt: int) -> None:
        await asyncio.sleep(self.backoff * 2**attempt)


@dataclass
class _Replica:
    """One server of a backend's replicas, in one event loop."""

    url: str
    client: Any
    in_flight: int = 0
    stall: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a request to this server got no answer in time: its requests go to the other replicas."""
    stalled: ServerError | None = None


@dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    semaphore: asyncio.Semaphore
    replicas: list[_Replica]
    turn: int = 0
    stalled: ServerError | None = None
    """Set when every replica got a request it did not answer in time: the requests of this loop stop."""

    def error(self) -> ServerError:
        """A fresh copy of the stalled server's error (each request raises its own)."""
        assert self.stalled is not None
        return ServerError(str(self.stalled), hint=self.stalled.hint)

    def check(self) -> None:
        """Raise the stalled server's error, if a request of this loop got no answer in time."""
        if self.stalled is not None:
            raise self.error()

    def pick(self, tried: list[_Replica]) -> _Replica | None:
        """The replica to send a request to: of those not stalled and not in ``tried``, the one with the
        fewest requests in flight, ties in turn; None when none is left."""
        left = [i for i, r in enumerate(self.replicas) if r.stalled is None and r not in tried]
        if not left:
            return None
        self.turn += 1
        n = len(self.replicas)
        return self.replicas[min(left, key=lambda i: (self.replicas[i].in_flight, (i - self.turn) % n))]


@dataclass
class BackendStats:
    """Requests sent (retries included) and retries, since the backend was made.

    replicas: requests sent to each server (its URL without credentials). failovers: requests sent again to
    another replica after one failed them (counted in ``requests``, not in ``retries``).
    """

    requests: int = 0
    retries: int = 0
    fallbacks: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)
    failovers: int = 0


class OpenAIBackend(Backend, _Retrying):
    """Any OpenAI-compatible server (vLLM, llama.cpp's server, a hosted API) through ``openai.AsyncOpenAI``.

    base_url: e.g. ``http://127.0.0.1:8000/v1``; several servers of the same model (replicas) as a
    comma-separated list or a sequence of URLs (:func:`replica_urls`). model: the served model name.
    api_key_env: environment variable holding the API key ("EMPTY" when unset, as local servers expect);
    api_key: the key itself, which wins over ``api_key_env`` (the random key of a server lpm starts).
    max_concurrency: requests in flight at once. timeout: seconds to wait for the answer to one request
    (``--llm-timeout``); none in time stops every request of the event loop (see the module docstring).
    retries: extra attempts after a failed one; backoff: seconds before the first retry, doubled each time.
    server: the server kind (:data:`lpm.server_kind.SERVER_KINDS`), which says how an answer is constrained:
    ``vllm`` (``structured_outputs.choice``) or ``llamacpp`` (GBNF ``grammar``).
    weights: what identifies the served weights in cache keys: a content fingerprint
    (:func:`lpm.model.weights_fingerprint`) for a server lpm starts, the revision a user gives for another
    server; None when unknown (then the served name alone identifies the model).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        api_key: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        server: str | ServerKind = "vllm",
        weights: str | None = None,
    ):
        self._check_retry_args(retries, backoff, max_concurrency)
        if not timeout > 0:
            raise InputError(f"--llm-timeout must be > 0 seconds, got {timeout:g}")
        self.server: ServerKind = server_kind(server)
        self.urls = replica_urls(base_url)
        self.base_url = ",".join(self.urls)
        """The URL, or the replicas' URLs joined by commas."""
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = api_key
        self.weights = weights
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.stats = BackendStats()
        self._state: _LoopState | None = None
        self._prompt_logprobs_only = False  # set when the server cannot read token ids (an older vLLM)

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.model, "server": self.server.name, "weights": self.weights}

    def _loop_state(self) -> _LoopState:
        # httpx connections and asyncio semaphores belong to one event loop; make fresh ones per loop.
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            key = self._api_key or os.environ.get(self.api_key_env) or "EMPTY"
            replicas = [
                _Replica(
                    url, openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=self.timeout)
                )
                for url in self.urls
            ]
            self._state = _LoopState(loop, asyncio.Semaphore(self.max_concurrency), replicas)
        return self._state

    async def aclose(self) -> None:
        state, self._state = self._state, None
        if state is not None and state.loop is asyncio.get_running_loop():
            for replica in state.replicas:
                await replica.client.close()

    def _servers(self) -> str:
        """How messages name where requests go: the server at the URL, or the replicas."""
        if len(self.urls) == 1:
            return f"the model server at {self.base_url}"
        return f"every replica of --llm-url ({', '.join(self.urls)})"

    async def choose(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding = DEFAULT_DECODING
    ) -> Answer:
        mode = decoding.mode
        if mode == "sample":
            return await self._with_retries(self._sample, messages, actions, decoding)
        try:
            return await self._with_retries(self._logprobs, messages, actions, decoding)
        except NoLogprobs as exc:  # LowCoverage included
            reason = exc
        if mode == "auto" and isinstance(reason, NoPromptLogprobs):  # read the first token instead
            try:
                answer = await self._with_retries(
                    self._logprobs, messages, actions, decoding.model_copy(update={"scoring": "first-token"})
                )
                answer.fallback = str(reason)
                return answer
            except NoLogprobs as exc:
                reason = exc
        if mode == "logprobs":
            raise LLMError(
                f"{self.base_url}: {reason}",
                hint="use --llm-mode sample (or auto) with this server"
                + (
                    "; its log-probabilities did not follow the answer constraint"
                    if isinstance(reason, LowCoverage)
                    else ", or --scoring first-token"
                    if isinstance(reason, NoPromptLogprobs)
                    else ""
                ),
            ) from None
        # auto: this request only is sampled instead, and says why
        self.stats.fallbacks += 1
        answer = await self._with_retries(self._sample, messages, actions, decoding)
        answer.fallback = str(reason)
        answer.coverage = reason.coverage if isinstance(reason, LowCoverage) else None
        return answer

    async def _with_retries(
        self, call: Any, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding
    ) -> Answer:
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                await self._pause(attempt - 1)
            try:
                answer = await call(messages, actions, decoding)
                answer.attempts = attempt + 1
                return answer
            except (NoLogprobs, LpmError):
                raise  # not a transient failure (a stalled server included): the caller decides
            except openai.APIStatusError as exc:
                if exc.status_code < 500 and exc.status_code not in (408, 409, 429):
                    raise LLMError(  # 4xx: asking again will not help
                        f"{self.base_url} refused the request for model {self.model!r}: HTTP {exc.status_code} "
                        f"{_short(exc.message)}",
                        hint="check --llm-model (the served model name), the API key and the server's log",
                    ) from None
                last = exc
            except Exception as exc:  # noqa: BLE001 - bad answers, malformed responses, client exceptions
                last = exc
            name = type(last).__name__
            self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
        if isinstance(last, openai.APIConnectionError) and _refused(last):
            raise ServerError(
                f"{self._servers()} is unreachable ({_short(str(last.__cause__ or last))}) "
                f"after {self.retries + 1} attempts",
                hint="start one with `lpm serve` and pass its URL with --llm-url, or leave --llm-url out to "
                "let lpm start a local server",
            )
        kind = "" if isinstance(last, BadAnswer) else f"{type(last).__name__}: "
        raise LLMError(f"{self.base_url}: {kind}{_short(str(last))} (after {self.retries + 1} attempts)")

    async def _create(self, endpoint: str = "chat", **kwargs: Any) -> dict[str, Any]:
        """The JSON answer to one request (``endpoint``: ``chat``, ``completions`` or ``tokenize``; see
        :meth:`_send`), from the first replica (in :meth:`_LoopState.pick`'s order) that answers it; a
        failure another server may not share sends it to the next replica, and the last such failure is
        raised when every replica failed it."""
        state = self._loop_state()
        tried: list[_Replica] = []
        failure: BaseException | None = None
        async with state.semaphore:
            while True:
                state.check()  # a request that waited for its turn while every server stalled is not sent
                replica = state.pick(tried)
                if replica is None:
                    assert failure is not None
                    raise failure
                if tried:
                    self.stats.failovers += 1
                tried.append(replica)
                try:
                    raw = await self._send(state, replica, kwargs, endpoint)
                    break
                except openai.APIStatusError as exc:
                    if endpoint != "chat" and (
                        exc.status_code in (400, 404, 405, 422, 501) or not _is_json(exc.response)
                    ):  # not a route of this server: whole-action scoring reads prompt log-probabilities
                        raise NoTokenLogprobs(
                            f"HTTP {exc.status_code} from {_path(replica.url, endpoint)}"
                        ) from None
                    if not _is_json(exc.response):  # a plain web server, or a wrong path
                        from lpm.server import not_openai_compatible

                        raise not_openai_compatible(
                            replica.url, f"POST {_path(replica.url, endpoint)}", exc.response
                        ) from None
                    if exc.status_code < 500 and exc.status_code not in (408, 409, 429):
                        raise  # the request itself is refused: another replica would refuse it too
                    failure = exc
                except openai.APIConnectionError as exc:  # refused, dropped
                    failure = exc
                except ServerError as exc:  # this replica stalled (every replica did: state.check raises)
                    if replica.stalled is None:
                        raise
                    failure = failure or exc  # a replica's own failure is retried; a stall is not
        if not _is_json(raw.http_response):
            if endpoint != "chat":
                raise NoTokenLogprobs(f"{_path(replica.url, endpoint)} answered with no JSON")
            from lpm.server import not_openai_compatible

            raise not_openai_compatible(
                replica.url, f"POST {_path(replica.url, endpoint)}", raw.http_response
            )
        try:  # the JSON as sent: llama.cpp's own fields survive, whatever the openai client's models say
            data = json.loads(raw.text)
        except ValueError as exc:
            raise BadAnswer(f"the response is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise BadAnswer(f"the response is not a JSON object: {_short(str(data))}")
        return data

    async def _send(
        self, state: _LoopState, replica: _Replica, kwargs: dict[str, Any], endpoint: str = "chat"
    ) -> Any:
        """Send one request to ``replica`` and return its raw response (within ``timeout``): a chat
        completion (``chat``), a completion of token ids (``completions``) or vLLM's ``POST /tokenize`` of
        a conversation (``tokenize``, beside the URL's ``/v1``)."""
        self.stats.requests += 1
        name = redact_url(replica.url) or replica.url
        self.stats.replicas[name] = self.stats.replicas.get(name, 0) + 1
        replica.in_flight += 1
        client = replica.client
        if endpoint == "chat":
            request = client.chat.completions.with_raw_response.create(model=self.model, **kwargs)
        elif endpoint == "completions":
            request = client.completions.with_raw_response.create(model=self.model, **kwargs)
        else:
            request = _raw_post(
                client.post(
                    _path(replica.url, endpoint), cast_to=httpx.Response, body={"model": self.model, **kwargs}
                )
            )
        try:
            return await self._in_time(state, replica, request)
        finally:
            replica.in_flight -= 1

    async def _in_time(self, state: _LoopState, replica: _Replica, request: Any) -> Any:
        """The result of ``request`` (a coroutine sending one request to ``replica``) if the server answers
        within ``timeout`` seconds. Otherwise the replica is stalled for this event loop: ``request`` is
        cancelled, and so is every other request in flight to it; each raises a :class:`ServerError` naming
        the URL and the timeout. When every replica stalled (the only one included), the loop is stalled.
        """
        sent = asyncio.ensure_future(request)
        stall = asyncio.ensure_future(replica.stall.wait())
        try:
            done, _ = await asyncio.wait(
                (sent, stall), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            sent.cancel()  # no-op when done
            stall.cancel()
        if sent in done and not isinstance(sent.exception(), openai.APITimeoutError):
            return sent.result()
        if replica.stalled is None:  # this request is the one that got no answer in time
            self.stats.errors["timeout"] = self.stats.errors.get("timeout", 0) + 1
            replica.stalled = ServerError(
                f"the model server at {replica.url} did not answer a request within {self.timeout:g} s "
                "(--llm-timeout); the other requests of this step were stopped",
                hint=f"check that it works (`lpm serve --check {replica.url}`, its log); give a slow server "
                "a longer --llm-timeout SECONDS",
            )
            replica.stall.set()
            if state.stalled is None and all(r.stalled is not None for r in state.replicas):
                state.stalled = replica.stalled
                if len(state.replicas) > 1:
                    state.stalled = ServerError(
                        f"no replica of --llm-url ({', '.join(self.urls)}) answered a request within "
                        f"{self.timeout:g} s (--llm-timeout); the other requests of this step were stopped",
                        hint=replica.stalled.hint,
                    )
        if state.stalled is not None:
            raise state.error()
        raise ServerError(str(replica.stalled), hint=replica.stalled.hint)

    async def _logprobs(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding
    ) -> Answer:
        if decoding.scoring == "sequence":
            return await self._whole(messages, actions, decoding)
        data = await self._create(
            messages=messages,
            **decoding.logprobs_request(actions),
            extra_body=self.server.constraint_payload(actions),
        )
        choice = _first_choice(data)
        text = _content(choice)
        reading = first_token_reading(first_token_candidates(choice, data), actions)
        if reading.coverage < decoding.min_coverage:
            raise LowCoverage(reading.coverage, decoding.min_coverage)
        match_action(text, actions)  # the constraint held: the greedy answer is an action
        prompt_tokens, completion_tokens = _usage(data)
        if reading.probs is None:  # a first token shared by several actions: score the whole actions
            whole = await self._whole(messages, actions, decoding)
            whole.prompt_tokens += prompt_tokens
            whole.completion_tokens += completion_tokens
            whole.ambiguous, whole.coverage = reading.ambiguous, reading.coverage
            return whole
        return Answer(
            reading.probs,
            "logprobs",
            text or "",
            prompt_tokens,
            completion_tokens,
            ambiguous=reading.ambiguous,
            coverage=reading.coverage,
        )

    async def _whole(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding
    ) -> Answer:
        """Each whole action's probability as the complete answer (normalised over the actions), the
        conversation ending in that answer: read one position at a time where the server can
        (:meth:`_whole_by_tokens`), else from the prompt log-probabilities, one request per action."""
        if self.server.token_logprobs and not self._prompt_logprobs_only:
            try:
                return await self._whole_by_tokens(messages, actions, decoding)
            except NoTokenLogprobs:  # an older vLLM: the prompt log-probabilities give the same numbers
                self._prompt_logprobs_only = True
        if not self.server.prompt_logprobs:
            raise LLMError(
                f"scoring whole actions ({', '.join(actions)}) needs prompt log-probabilities, which "
                f"{self.server.label} does not return",
                hint="word the actions so that their first tokens differ, or use --llm-mode sample",
            )
        payload = self.server.sequence_payload()
        replies = await asyncio.gather(
            *(
                self._create(
                    messages=[*messages, {"role": "assistant", "content": action}],
                    **decoding.sequence_request(),
                    extra_body=payload,
                )
                for action in actions
            )
        )
        lists = [reply.get("prompt_logprobs") for reply in replies]
        if all(lp is None for lp in lists):
            raise NoPromptLogprobs(
                f"{self.base_url} returned no prompt log-probabilities (needed to score whole actions)"
            )
        probs = normalise_logprobs(action_logprobs(lists))
        best = actions[max(range(len(actions)), key=probs.__getitem__)]
        used = sum(_usage(reply)[0] for reply in replies)
        return Answer(probs, "logprobs", best, used, 0, scoring="sequence")

    async def _whole_by_tokens(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding
    ) -> Answer:
        """Whole-action scoring that keeps the server's prefix cache: the same numbers as the prompt
        log-probabilities (``log P(action's tokens, end of turn, … | prompt)``), read position by position.

        The server tokenizes each action's complete conversation (``POST /tokenize``, no model call);
        after the tokens they all share (:func:`~lpm.logprobs.answer_tree`), each position of an action's
        rest is a prefix whose next-token log-probabilities one completion of token ids returns for the
        tokens that follow it (``logprob_token_ids``, the model's full-vocabulary values, no constraint).
        The shared prefix is asked first and alone, so that the other positions, asked together in one
        request, find it in the prefix cache. NoTokenLogprobs where the server has no such request."""
        replies = await asyncio.gather(
            *(
                self._create(
                    "tokenize",
                    messages=[*messages, {"role": "assistant", "content": action}],
                    add_generation_prompt=False,
                    continue_final_message=False,
                )
                for action in actions
            )
        )
        conversations = []
        for reply in replies:
            tokens = reply.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise NoTokenLogprobs("the server's /tokenize gave no token ids")
            conversations.append(tokens)
        shared, rests = answer_tree(conversations)
        nodes = tree_nodes(rests)
        wanted = sorted({t for follow in nodes.values() for t in follow})
        if len(wanted) > MAX_TOKEN_IDS:
            raise NoTokenLogprobs(f"{len(wanted)} token ids to read, more than {MAX_TOKEN_IDS}")
        ask = {
            **decoding.sequence_request(),
            "logprobs": 1,
            "extra_body": {"logprob_token_ids": wanted, "return_tokens_as_token_ids": True},
        }
        prefixes = list(nodes)
        first = await self._create("completions", prompt=shared + list(prefixes[0]), **ask)
        answers = [first]
        if len(prefixes) > 1:
            answers.append(
                await self._create("completions", prompt=[shared + list(p) for p in prefixes[1:]], **ask)
            )
        read: dict[tuple[int, ...], dict[int, float]] = {}
        for answer, asked in zip(answers, [prefixes[:1], prefixes[1:]], strict=False):
            choices = _choices(answer)
            if len(choices) != len(asked):
                raise BadAnswer(f"{len(choices)} completion choices for {len(asked)} prompts")
            for choice in choices:
                index = choice.get("index") if isinstance(choice, dict) else None
                if not isinstance(index, int) or not 0 <= index < len(asked):
                    raise BadAnswer(f"a completion choice has no valid index: {_short(str(choice))}")
                got = token_logprobs(choice, nodes[asked[index]])
                if got is None:
                    raise NoTokenLogprobs("the server returned no log-probabilities for the asked token ids")
                read[asked[index]] = got
        if len(read) != len(prefixes):
            raise BadAnswer(f"the completions answered {len(read)} of {len(prefixes)} prompts")
        probs = normalise_logprobs(tree_logprobs(rests, read))
        best = actions[max(range(len(actions)), key=probs.__getitem__)]
        used = sum(_usage(answer)[0] for answer in answers)
        return Answer(probs, "logprobs", best, used, 0, scoring="sequence")

    async def _sample(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding
    ) -> Answer:
        n = decoding.n_samples
        answers: list[str] = []
        counts = [0] * len(actions)
        prompt_tokens = completion_tokens = 0
        for _ in range(n):  # a server that ignores n returns fewer choices: ask again for the rest
            data = await self._create(
                messages=messages,
                **decoding.sample_request(actions, n=n - len(answers)),
                extra_body=self.server.constraint_payload(actions),
            )
            for choice in _choices(data)[: n - len(answers)]:
                text = _content(choice)
                counts[match_action(text, actions)] += 1
                answers.append(text or "")
            used = _usage(data)
            prompt_tokens += used[0]
            completion_tokens += used[1]
            if len(answers) >= n:
                break
        return Answer(
            [c / n for c in counts], "sample", answers, prompt_tokens, completion_tokens, scoring="samples"
        )


class NoTokenLogprobs(Exception):
    """The server cannot read given tokens' log-probabilities position by position (no ``/tokenize`` or no
    ``logprob_token_ids``): whole-action scoring reads the prompt log-probabilities instead."""


@dataclass
class _Raw:
    """A plain POST's response (an ``httpx.Response``) in the shape of the openai client's raw responses."""

    http_response: Any
    text: str


async def _raw_post(request: Any) -> _Raw:
    response = await request
    return _Raw(response, response.text)


class NoPromptLogprobs(NoLogprobs):
    """The server returned no prompt log-probabilities, which whole-action scoring needs."""


class LowCoverage(NoLogprobs):
    """The first token's mass on tokens that begin an action is below the decoding's ``min_coverage``."""

    def __init__(self, coverage: float, least: float):
        super().__init__(
            f"only {coverage:.3f} of the first token's probability fell on tokens that begin an action "
            f"(least accepted: {least:g})"
        )
        self.coverage = coverage


class LangChainBackend(Backend, _Retrying):
    """Any LangChain chat model, e.g. ``langchain_openai.ChatOpenAI(base_url=..., model=..., logprobs=True)``.

    ``logprobs`` mode reads ``response_metadata["logprobs"]`` (ChatOpenAI fills it when built with
    ``logprobs=True, top_logprobs=20``); ``sample`` mode asks ``n_samples`` times and counts the answers.
    Every request is decoded as the chat model is configured (its temperature, max_tokens, logprobs …):
    of a :class:`Decoding` only the mode and ``n_samples`` are used, and the cache key records the chat
    model's own settings instead (:meth:`request_params`).
    server: ``vllm`` or ``llamacpp`` binds that server kind's answer constraint as ``extra_body``
    (OpenAI-style models); ``None`` sends no constraint, so answers are only matched against the actions.
    """

    def __init__(
        self,
        chat_model: Any,
        *,
        model: str | None = None,
        server: str | ServerKind | None = "vllm",
        max_concurrency: int = 16,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        if not (hasattr(chat_model, "invoke") and hasattr(chat_model, "bind")):
            raise InputError(
                f"LangChainBackend needs a LangChain chat model, got {type(chat_model).__name__}"
            )
        self.server: ServerKind | None = None if server is None else server_kind(server)
        self._check_retry_args(retries, backoff, max_concurrency)
        self.chat_model = chat_model
        self.model = model or str(
            getattr(chat_model, "model_name", None)
            or getattr(chat_model, "model", None)
            or type(chat_model).__name__
        )
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.backoff = backoff
        self.stats = BackendStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def identity(self) -> dict[str, Any]:
        return {
            "backend": "langchain",
            "class": type(self.chat_model).__name__,
            "model": self.model,
            "server": None if self.server is None else self.server.name,
        }

    def request_params(self, actions: Sequence[str], decoding: Decoding) -> dict[str, Any]:
        """The chat model's own request settings (what LangChain sends), the mode, and in modes that
        sample the number of invocations; the decoding's temperature and top_logprobs are not sent."""
        out: dict[str, Any] = {"mode": decoding.mode, "chat_model": chat_settings(self.chat_model)}
        if decoding.mode in ("auto", "logprobs"):
            out["min_coverage"] = decoding.min_coverage
        if decoding.mode in ("auto", "sample"):
            out["invocations"] = decoding.n_samples
        return out

    def check(self, decoding: Decoding) -> None:
        if decoding.mode == "sample":
            self._check_sampling()
        elif decoding.scoring == "sequence":
            raise InputError(
                "a LangChain chat model gives no prompt log-probabilities, so it cannot score whole actions "
                "(the default scoring)",
                hint="use scoring='first-token' (--scoring first-token) or mode 'sample' with LangChain",
            )

    def _bound(self, actions: Sequence[str]) -> Any:
        if self.server is None:
            return self.chat_model
        return self.chat_model.bind(extra_body=self.server.constraint_payload(actions))

    async def _invoke(self, runnable: Any, messages: list[dict[str, str]]) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.max_concurrency)
        assert self._semaphore is not None
        async with self._semaphore:
            self.stats.requests += 1
            # the synchronous invoke in a worker thread: LangChain models may keep one async HTTP client per
            # process (ChatOpenAI does), which breaks when a later call runs in a new event loop
            return await asyncio.to_thread(runnable.invoke, messages)

    async def choose(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding = DEFAULT_DECODING
    ) -> Answer:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                await self._pause(attempt - 1)
            try:
                answer = await self._once(messages, actions, decoding)
                answer.attempts = attempt + 1
                return answer
            except NoLogprobs as exc:
                raise LLMError(
                    f"{self.model}: {exc}",
                    hint="build the chat model with logprobs=True, or use --mode sample",
                ) from None
            except LpmError:
                raise
            except Exception as exc:  # noqa: BLE001 - LangChain models raise provider-specific errors
                last = exc
                name = type(exc).__name__
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
        raise LLMError(f"{self.model}: {_short(str(last))} (after {self.retries + 1} attempts)")

    async def _once(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding
    ) -> Answer:
        runnable = self._bound(actions)
        if decoding.mode in ("auto", "logprobs"):
            reply = await self._invoke(runnable, messages)
            meta = getattr(reply, "response_metadata", {}) or {}
            if meta.get("logprobs"):
                reading = first_token_reading(first_token_candidates({"logprobs": meta["logprobs"]}), actions)
                if reading.coverage < decoding.min_coverage:
                    raise LowCoverage(reading.coverage, decoding.min_coverage)
                match_action(reply.content, actions)
                if reading.probs is None or decoding.scoring == "sequence":
                    raise LLMError(
                        f"{self.model}: scoring whole actions ({', '.join(actions)}) is not available through "
                        "LangChain",
                        hint="word the actions so that their first tokens differ, or use --llm-mode sample",
                    )
                pt, ct = _lc_usage(reply)
                return Answer(
                    reading.probs,
                    "logprobs",
                    str(reply.content),
                    pt,
                    ct,
                    ambiguous=reading.ambiguous,
                    coverage=reading.coverage,
                )
            if decoding.mode == "logprobs":
                raise NoLogprobs("the model returned no logprobs")
        self._check_sampling()
        n = decoding.n_samples
        replies = await asyncio.gather(*(self._invoke(runnable, messages) for _ in range(n)))
        counts = [0] * len(actions)
        pt = ct = 0
        for reply in replies:
            counts[match_action(str(reply.content), actions)] += 1
            p, c = _lc_usage(reply)
            pt, ct = pt + p, ct + c
        return Answer(
            [c / n for c in counts], "sample", [str(r.content) for r in replies], pt, ct, scoring="samples"
        )

    def _check_sampling(self) -> None:
        """Refuse to count answers of a chat model that decodes greedily (they would all be the same)."""
        temperature = chat_settings(self.chat_model).get("temperature")
        if temperature is not None and float(temperature) == 0:
            raise InputError(
                f"{self.model}: sample mode counts answers of a chat model at temperature 0, which are all the "
                "greedy one, so every probability would be 0 or 1",
                hint="build the chat model with temperature=1 for sample mode, or use logprobs mode",
            )


def chat_settings(chat_model: Any) -> dict[str, Any]:
    """The request parameters a LangChain chat model sends on its own, as JSON values: LangChain's
    ``_get_invocation_params()`` (model, temperature, max_tokens, logprobs …; no URL, no key) and the
    arguments of ``chat_model.bind(...)``. ``{}`` for an object that does not say."""
    from langchain_core.runnables import RunnableBinding

    get = getattr(chat_model, "_get_invocation_params", None)
    settings = dict(get()) if callable(get) else {}
    if isinstance(chat_model, RunnableBinding):
        settings |= chat_model.kwargs
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _lc_usage(reply: Any) -> tuple[int, int]:
    usage = getattr(reply, "usage_metadata", None) or {}
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


def redact_url(url: str | None) -> str | None:
    """``url`` without user name, password, query or fragment (what may be written to disk); each URL of a
    comma-separated list of replicas so."""
    if not url:
        return url
    if "," in url:
        return ",".join(redact_url(u) or "" for u in url.split(","))
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        netloc = host + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a port that is no number: what follows the credentials
        netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def replica_urls(url: str | Sequence[str], option: str = "--llm-url") -> list[str]:
    """The base URLs in ``url``: one URL, or several servers of the same model (replicas) as a comma-separated
    list or a sequence; each without its trailing slash. An empty element, a URL given twice or anything but
    an http(s) URL with a host is an :class:`InputError` naming ``option`` and the element (without
    credentials)."""
    items = [u.strip() for u in (url.split(",") if isinstance(url, str) else url)]
    given = ",".join(items)
    among = f" in {option} {redact_url(given)}" if len(items) > 1 else ""
    example = f"{option} http://10.0.0.1:8000/v1,http://10.0.0.2:8000/v1"
    urls: list[str] = []
    for item in items:
        if not item:
            raise InputError(
                f"{option} {redact_url(given)!r} has an empty element (two commas in a row, or one at an end)",
                hint=f"separate the replicas' URLs with single commas: {example}",
            )
        parts = urlsplit(item)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is no number
            port_ok = True
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            raise InputError(
                f"{option} must be an http(s) URL such as http://127.0.0.1:8000/v1, got "
                f"{redact_url(item)!r}{among}"
            )
        if item.rstrip("/") in urls:
            raise InputError(
                f"{option} {redact_url(given)} names {redact_url(item.rstrip('/'))} twice",
                hint="give each replica (server of the same model) once",
            )
        urls.append(item.rstrip("/"))
    return urls


def _refused(exc: BaseException) -> bool:
    """Whether a connection error is a refused or unroutable connection (not a drop or a timeout).

    Matched by the name of the HTTP library's ``ConnectError`` (the openai client may use httpx or httpx2).
    """
    cause = exc.__cause__
    return cause is not None and any(c.__name__ == "ConnectError" for c in type(cause).__mro__)


async def _in_own_thread(work: Any) -> None:
    """Await ``work()`` run in a daemon thread of its own. Not the event loop's executor, which the loop
    joins when it closes: an interrupted step (Ctrl-C, SIGTERM) would wait there for a server start to end,
    before anything could stop the server. Abandoned so, ``work`` ends when the server is stopped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():  # the step was cancelled meanwhile
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name="lpm-server-start", daemon=True).start()
    await done


def _path(url: str, endpoint: str) -> str:
    """Where ``endpoint`` is sent for the server at ``url`` (its ``/v1`` base): ``tokenize`` beside it."""
    if endpoint == "tokenize":
        base = url.rstrip("/")
        return (base[: -len("/v1")] if base.endswith("/v1") else base) + "/tokenize"
    return f"{url}/{'chat/completions' if endpoint == 'chat' else 'completions'}"


def _is_json(response: Any) -> bool:
    """Whether an HTTP response says its body is JSON (what every answer of an OpenAI-compatible server is)."""
    return "json" in response.headers.get("content-type", "")


def _choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The response's choices, each a JSON object; BadAnswer for any other shape."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise BadAnswer(f"the response has no choices: {_short(str(data))}")
    if not all(isinstance(c, dict) for c in choices):
        raise BadAnswer(f"a choice of the response is not an object: {_short(str(choices))}")
    return choices


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    return _choices(data)[0]


def _content(choice: dict[str, Any]) -> str | None:
    """The text of a chat choice (``message.content``); BadAnswer when the message is malformed."""
    message = choice.get("message")
    if message is None:
        return None
    if not isinstance(message, dict):
        raise BadAnswer(f"the choice's message is not an object: {_short(str(message))}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise BadAnswer(f"the choice's content is not text: {_short(str(content))}")
    return content


def _usage(data: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) token counts of a response; 0 where it gives none, BadAnswer where one is not a
    whole number >= 0."""
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        raise BadAnswer(f"the response's usage is not an object: {_short(str(usage))}")
    out = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name) or 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadAnswer(f"the response's usage.{name} is not a token count: {value!r}")
        out.append(value)
    return out[0], out[1]


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LocalServerBackend(Backend):
    """An :class:`OpenAIBackend` for a local :class:`lpm.server.ModelServer` that is started only when
    the first request is sent, so a run answered entirely from the cache starts no server.

    local_server: a ModelServer not yet started (its URL, port and API key are fixed at construction); the
    caller stops it. The server is started at most once: when that start fails, every request of the run
    gets the same :class:`ServerError` at once, without another attempt. weights: the fingerprint of the
    served weights (cache keys). Other keyword arguments go to :class:`OpenAIBackend` (its server kind is
    the ModelServer's). Cache keys are those of OpenAIBackend.
    """

    def __init__(self, local_server: Any, *, weights: str | None = None, **kwargs: Any):
        self.local_server = local_server
        self.inner = OpenAIBackend(
            local_server.url,
            local_server.model,
            server=local_server.kind,
            api_key=local_server.api_key,
            weights=weights,
            **kwargs,
        )
        self.model = self.inner.model
        self._lock = threading.Lock()
        self._start_error: LpmError | None = None
        self.on_start: Any = None
        """Optional callable run (in a worker thread) right before the server starts."""

    def _ensure_started(self) -> None:
        with self._lock:
            if self._start_error is not None:
                raise self._start_error
            if self.local_server.running:
                return
            try:
                if self.on_start is not None:
                    self.on_start(self.local_server)
                self.local_server.start()
            except LpmError as exc:
                self._start_error = exc
                raise

    async def choose(
        self, messages: list[dict[str, str]], actions: Sequence[str], decoding: Decoding = DEFAULT_DECODING
    ) -> Answer:
        if self._start_error is not None:
            raise self._start_error
        if not self.local_server.running:
            await _in_own_thread(self._ensure_started)
        return await self.inner.choose(messages, actions, decoding)

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def request_params(self, actions: Sequence[str], decoding: Decoding) -> dict[str, Any]:
        return self.inner.request_params(actions, decoding)

    async def aclose(self) -> None:
        await self.inner.aclose()
