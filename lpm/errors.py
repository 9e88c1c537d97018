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


class CacheMissError(LpmError):
    """A response was not in the cache while the cache mode was ``replay``."""
