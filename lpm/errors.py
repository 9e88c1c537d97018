"""Errors users see: each names what was wrong, where, and what to do."""

from __future__ import annotations


class LpmError(Exception):
    """Base of every error lpm raises on purpose.

    The CLI prints ``str(error)`` and ``hint`` without a traceback and exits with status 2.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class InputError(LpmError):
    """A file or argument given by the user is invalid (names the file and the field)."""


class ServerError(LpmError):
    """The model server is unreachable, unhealthy or failed to start."""


class ModelError(LpmError):
    """The model could not be found or prepared."""


class LLMError(LpmError):
    """A model call failed after its retries."""


class Interrupted(LpmError):
    """A run was stopped (Ctrl-C, SIGTERM) after it had checkpointed; the message says how to resume."""


class ShardError(LpmError):
    """A process of a sharded run (:mod:`lpm.distributed`) died or failed; the message names its rank."""


class CacheError(LpmError):
    """The response cache cannot be read or written (a damaged database, a folder that is a file)."""


class CacheMissError(LpmError):
    """A response was not in the cache while the cache mode was ``replay``."""


def validation_message(
    exc: Exception, *, noun: str = "field", unknown: str = "unknown key", top: str = "(top level)"
) -> str:
    """A pydantic ``ValidationError`` as one line per error: ``field 'a.b': message (got value)``.

    noun: what a location is called (``field``, ``run option``, ``parameter``); unknown: the message for a
    key the model forbids; top: what a model-level check (several fields at once) is about. Mappings are
    not echoed back.
    """
    parts = []
    for err in exc.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(p) for p in err["loc"])
        msg = unknown if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{noun} {loc!r}: {msg}{shown}" if loc else f"{top}: {msg}{shown}")
    return "; ".join(parts)
