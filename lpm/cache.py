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

Value: bytes, never a pickle: the SHA-256 (64 hex digits) of the key and the body, a newline, and the body,
the canonical JSON of the probabilities, the raw answer, token counts, the mode, scoring, first-token
coverage and ambiguous mass, and why ``auto`` sampled. The checksum is checked before the body is parsed,
and the store (:class:`SafeDisk`) refuses to decode anything but raw SQLite values, so a cache folder that
someone else could write cannot make lpm run code. An entry with a bad checksum, a wrong shape or
probabilities that do not sum to 1 is deleted and counted as ``corrupt``; the caller asks the model again.

Modes: ``use`` reads and writes; ``refresh`` never reads, always writes (overwrites); ``off`` neither reads
nor writes; ``replay`` reads only, and a miss raises :class:`CacheMissError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diskcache

from lpm.backend import Answer
from lpm.errors import CacheError, CacheMissError, InputError
from lpm.logprobs import SCORINGS
from lpm.paths import cache_root

CACHE_MODES = ("use", "refresh", "off", "replay")
DATABASE = diskcache.core.DBNAME  # the SQLite file in the cache folder
FORMAT_VERSION = 3
"""Bump when the meaning of a cached answer or the content of its key changes, so old entries stop matching.
2: the key's decoding is the request arguments as sent (mode inside it) and the identity names the server
kind (``server``) instead of the ``constraint``. 3: values are checksummed JSON bytes (no pickle); the
identity holds the weights' fingerprint; the decoding holds the scoring and the least coverage; answers
record scoring, coverage and fallback."""

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


class UnsafeEntry(Exception):
    """A stored key or value that only a pickle could decode (never decoded)."""


class SafeDisk(diskcache.Disk):
    """diskcache's storage with every decoder but raw SQLite values refused: no pickle, no file reads.

    Keys are text and values bytes or integers, which SQLite holds as they are; :meth:`fetch` and
    :meth:`get` raise :class:`UnsafeEntry` for anything else, which :class:`ResponseCache` deletes as corrupt.
    """

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise UnsafeEntry("a key stored as a pickle")
        return super().get(key, raw)

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        if mode != diskcache.core.MODE_RAW:
            raise UnsafeEntry(f"a value stored in mode {mode}, not raw")
        return super().fetch(mode, filename, value, read)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if read or not isinstance(value, bytes | int):
            raise TypeError(f"the response cache stores bytes and integers, not {type(value).__name__}")
        return super().store(value, read, key=key)


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
            if self.directory.exists() and not self.directory.is_dir():
                raise CacheError(
                    f"{self.directory}: the response cache folder is a file",
                    hint="set LPM_CACHE_DIR or --cache-dir to a folder (or move that file)",
                )
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with self._guard():
                    self._store = diskcache.Cache(
                        str(self.directory), timeout=60, disk=SafeDisk, disk_min_file_size=2**31 - 1
                    )
            except OSError as exc:
                raise CacheError(
                    f"{self.directory}: cannot open the response cache ({exc})",
                    hint="set LPM_CACHE_DIR or --cache-dir to a writable folder",
                ) from None
        return self._store

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """A damaged or unusable database becomes a :class:`CacheError` that says how to recover."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            self.close()
            db = self.directory / DATABASE
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise CacheError(
                    f"{db}: the response cache stayed locked by another process for 60 s ({exc})",
                    hint="wait for the other lpm to finish, or give this one its own --cache-dir",
                ) from None
            raise CacheError(
                f"{db}: the response cache database is damaged ({exc})",
                hint=f"`lpm cache clear --cache-dir {self.directory}` deletes it (its answers are asked again), "
                "or use another --cache-dir / LPM_CACHE_DIR",
            ) from None

    # -- entries --------------------------------------------------------------------------------
    def get(self, key: str, *, label: str = "") -> Answer | None:
        """The cached answer for ``key``, or None (a miss, or modes ``refresh``/``off``).

        In mode ``replay`` a miss raises :class:`CacheMissError` naming ``label`` (the archetype).
        """
        if self.mode in ("off", "refresh"):
            return None
        with self._guard():
            return self._get(key, label)

    def _get(self, key: str, label: str) -> Answer | None:
        try:
            value = self.store.get(_ENTRY + key)
        except UnsafeEntry:
            value = b"unsafe"
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
        with self._guard():
            self.store.set(_ENTRY + key, _encode(key, answer))
            self.store.incr(_STAT + "writes")

    # -- housekeeping ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Entries, counters persisted across runs (hits, misses, tokens_saved, corrupt, writes), bytes."""
        with self._guard():
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        store = self.store
        entries = 0
        for (key,) in store._sql("SELECT key FROM Cache WHERE raw = 1").fetchall():  # no key is unpickled
            entries += isinstance(key, str) and key.startswith(_ENTRY)
        out: dict[str, Any] = {"directory": str(self.directory), "entries": entries}
        for name in _STATS:
            try:
                value = store.get(_STAT + name, 0)
            except UnsafeEntry:
                value = 0
            out[name] = int(value) if isinstance(value, int) else 0
        out["bytes"] = int(store.volume())
        return out

    def clear(self) -> int | None:
        """Delete every entry and reset the counters; returns the number of items removed, or None when
        the database was damaged and its files were deleted instead."""
        try:
            with self._guard():
                return int(self.store.clear())
        except CacheError:
            if not self.directory.is_dir():
                raise
        self.close()
        for name in (DATABASE, DATABASE + "-wal", DATABASE + "-shm"):
            (self.directory / name).unlink(missing_ok=True)
        return None

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


_FIELDS = ("probs", "raw", "prompt_tokens", "completion_tokens", "mode", "ambiguous", "coverage", "scoring",
           "fallback")  # fmt: skip


def _encode(key: str, answer: Answer) -> bytes:
    body = _canonical(
        {
            "probs": [float(p) for p in answer.probs],
            "raw": answer.raw,
            "prompt_tokens": int(answer.prompt_tokens),
            "completion_tokens": int(answer.completion_tokens),
            "mode": answer.mode,
            "ambiguous": float(answer.ambiguous),
            "coverage": None if answer.coverage is None else float(answer.coverage),
            "scoring": answer.scoring,
            "fallback": answer.fallback,
        }
    ).encode()
    return _checksum(key, body).encode() + b"\n" + body


def _checksum(key: str, body: bytes) -> str:
    return hashlib.sha256(key.encode() + b"\n" + body).hexdigest()


def _decode(key: str, value: Any) -> Answer | None:
    """The answer in a stored value, or None when the value is corrupt. The checksum is checked first;
    only a value whose checksum matches is parsed (as JSON)."""
    if not isinstance(value, bytes) or len(value) < 66 or value[64:65] != b"\n":
        return None
    checksum, body = value[:64], value[65:]
    if checksum != _checksum(key, body).encode():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or set(data) != set(_FIELDS):
        return None
    probs = data["probs"]
    if (
        not isinstance(probs, list)
        or len(probs) < 2
        or not all(isinstance(p, float) and math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs)
        or abs(sum(probs) - 1.0) > 1e-6
        or data["mode"] not in ("logprobs", "sample")
        or data["scoring"] not in SCORINGS
    ):
        return None
    return Answer(
        probs,
        data["mode"],
        data["raw"],
        data["prompt_tokens"],
        data["completion_tokens"],
        attempts=0,
        ambiguous=data["ambiguous"],
        coverage=data["coverage"],
        scoring=data["scoring"],
        fallback=data["fallback"],
    )
