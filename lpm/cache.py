"""The response cache: one model answer per prompt, on disk, shared by runs and processes (diskcache).

Key: SHA-256 of the canonical JSON (sorted keys, no whitespace) of

- ``model``: the backend's identity: backend kind, served model name, server kind (which answer constraint
  it sends);
- ``messages``: the rendered chat messages (context values already rounded, so nearby steps share entries);
- ``actions``: the action set, in order;
- ``decoding``: the backend's :meth:`~lpm.backend.Backend.request_params`: the mode asked for (``auto``,
  ``logprobs``, ``sample``) and the decoding arguments of the request(s) that mode sends, the very dicts
  the backend sends (:class:`lpm.decoding.Decoding`: temperature, max_tokens, logprobs, top_logprobs, n;
  for LangChain the chat model's own settings and the number of invocations);
- ``version``: :data:`FORMAT_VERSION`.

Deliberately excluded: the server URL and API key (the same model behind another address gives the same
answer), concurrency, timeouts and retry settings (they change when, not what, the model answers), and the
archetype's name (two specs with the same prompt share an answer).

Value: probabilities, the raw answer, token counts, the mode used, and a checksum over all of them and the
key. An entry with a bad checksum, a wrong shape or probabilities that do not sum to 1 is deleted and
counted as ``corrupt``; the caller asks the model again.

Modes: ``use`` reads and writes; ``refresh`` never reads, always writes (overwrites); ``off`` neither reads
nor writes; ``replay`` reads only, and a miss raises :class:`CacheMissError`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import diskcache

from lpm.backend import Answer
from lpm.errors import CacheMissError, InputError
from lpm.paths import cache_root

CACHE_MODES = ("use", "refresh", "off", "replay")
FORMAT_VERSION = 2
"""Bump when the meaning of a cached answer or the content of its key changes, so old entries stop matching.
2: the key's decoding is the request arguments as sent (mode inside it) and the identity names the server
kind (``server``) instead of the ``constraint``."""

_ENTRY = "r:"  # response entries
_STAT = "s:"  # counters: hits, misses, tokens_saved, corrupt, writes
_STATS = ("hits", "misses", "tokens_saved", "corrupt", "writes")


def default_directory() -> Path:
    """``cache_root() / "responses"``; ``$LPM_CACHE_DIR`` moves it."""
    return cache_root() / "responses"


def cache_key(
    *,
    model: dict[str, Any],
    messages: list[dict[str, str]],
    actions: list[str],
    decoding: dict[str, Any],
) -> str:
    """The SHA-256 hex key of one request (see the module docstring for what goes in and what does not).

    decoding: what the backend sends for the mode asked for, with the mode
    (:meth:`lpm.backend.Backend.request_params`).
    """
    payload = {
        "model": model,
        "messages": messages,
        "actions": list(actions),
        "decoding": decoding,
        "version": FORMAT_VERSION,
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


class ResponseCache:
    """Model answers on disk. ``directory`` defaults to :func:`default_directory`; ``mode`` is one of
    ``use``, ``refresh``, ``off``, ``replay``. Safe to share between processes (SQLite underneath).
    """

    def __init__(self, directory: str | Path | None = None, mode: str = "use"):
        if mode not in CACHE_MODES:
            raise InputError(f"cache mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
        self.mode = mode
        self.directory = Path(directory) if directory is not None else default_directory()
        self._store: diskcache.Cache | None = None

    @property
    def store(self) -> diskcache.Cache:
        if self._store is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._store = diskcache.Cache(str(self.directory), timeout=60)
            except OSError as exc:
                raise InputError(
                    f"{self.directory}: cannot open the response cache ({exc})",
                    hint="set LPM_CACHE_DIR or --cache-dir to a writable folder",
                ) from None
        return self._store

    # -- entries --------------------------------------------------------------------------------
    def get(self, key: str, *, label: str = "") -> Answer | None:
        """The cached answer for ``key``, or None (a miss, or modes ``refresh``/``off``).

        In mode ``replay`` a miss raises :class:`CacheMissError` naming ``label`` (the archetype).
        """
        if self.mode in ("off", "refresh"):
            return None
        value = self.store.get(_ENTRY + key)
        answer = None
        if value is not None:
            answer = _decode(key, value)
            if answer is None:
                self.store.delete(_ENTRY + key)
                self.store.incr(_STAT + "corrupt")
        if answer is None:
            self.store.incr(_STAT + "misses")
            if self.mode == "replay":
                raise CacheMissError(
                    f"no cached answer for {label or 'key ' + key[:12]} in {self.directory} (cache mode replay)",
                    hint="run once with --cache use (and a model server) to fill the cache, or check that "
                    "the model, prompt, context and mode are the same as in the recorded run",
                )
            return None
        self.store.incr(_STAT + "hits")
        self.store.incr(_STAT + "tokens_saved", answer.prompt_tokens + answer.completion_tokens)
        return answer

    def put(self, key: str, answer: Answer) -> None:
        """Store ``answer`` under ``key`` (modes ``use`` and ``refresh``; a no-op otherwise)."""
        if self.mode not in ("use", "refresh"):
            return
        self.store.set(_ENTRY + key, _encode(key, answer))
        self.store.incr(_STAT + "writes")

    # -- housekeeping ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Entries, counters persisted across runs (hits, misses, tokens_saved, corrupt, writes), bytes."""
        store = self.store
        entries = sum(1 for k in store.iterkeys() if isinstance(k, str) and k.startswith(_ENTRY))
        out: dict[str, Any] = {"directory": str(self.directory), "entries": entries}
        for name in _STATS:
            out[name] = int(store.get(_STAT + name, 0))
        out["bytes"] = int(store.volume())
        return out

    def clear(self) -> int:
        """Delete every entry and reset the counters; returns the number of items removed."""
        return int(self.store.clear())

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.directory)!r}, mode={self.mode!r})"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encode(key: str, answer: Answer) -> dict[str, Any]:
    body = {
        "probs": [float(p) for p in answer.probs],
        "raw": answer.raw,
        "prompt_tokens": int(answer.prompt_tokens),
        "completion_tokens": int(answer.completion_tokens),
        "mode": answer.mode,
        "ambiguous": float(answer.ambiguous),
    }
    return {**body, "checksum": _checksum(key, body)}


def _checksum(key: str, body: dict[str, Any]) -> str:
    return hashlib.sha256((key + _canonical(body)).encode()).hexdigest()


def _decode(key: str, value: Any) -> Answer | None:
    """The answer in a stored value, or None when the value is corrupt."""
    fields = ("probs", "raw", "prompt_tokens", "completion_tokens", "mode", "ambiguous", "checksum")
    if not isinstance(value, dict) or set(value) != set(fields):
        return None
    body = {k: value[k] for k in fields if k != "checksum"}
    try:
        if value["checksum"] != _checksum(key, body):
            return None
    except (TypeError, ValueError):  # values that cannot be serialised
        return None
    probs = body["probs"]
    if (
        not isinstance(probs, list)
        or len(probs) < 2
        or not all(isinstance(p, float) and math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs)
        or abs(sum(probs) - 1.0) > 1e-6
        or body["mode"] not in ("logprobs", "sample")
    ):
        return None
    return Answer(
        probs,
        body["mode"],
        body["raw"],
        body["prompt_tokens"],
        body["completion_tokens"],
        attempts=0,
        ambiguous=body["ambiguous"],
    )
