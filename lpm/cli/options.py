"""Parsing of options shared by the commands: repeated ``NAME=VALUE`` (``--set``, ``--context``), comma-separated
lists (``--seeds``, ``--parameters``) and dates (``--start``)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from lpm.errors import InputError


def parse_pairs(pairs: list[str], option: str, example: str) -> dict[str, Any]:
    """``["week=10", "cases=2300", "trend=rising"]`` -> ``{"week": 10, "cases": 2300, "trend": "rising"}``.

    Values that read as an int or a float become numbers (finite only); anything else stays text. option
    and example name the option in errors (``--set``, ``beta=0.05``).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"{option} {pair!r}: expected NAME=VALUE, e.g. {option} {example}")
        value: Any = text.strip()
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{option} {pair!r}: the value must be finite")
        out[name] = value
    return out


def parse_list(text: str | None, option: str, kind: type = str) -> list:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (empty entries dropped; None -> []); a bad entry names the option."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise InputError(f"{option} {text!r}: expected a comma-separated list, e.g. {option} 0,1,2") from None


def parse_date(text: str | None, option: str) -> dt.date | None:
    """``"2020-03-16"`` -> the date (None stays None); anything else is an error naming the option."""
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InputError(f"{option} must be a date YYYY-MM-DD, got {text!r}") from None


def weights_option() -> Any:
    """``--model PATH``: the weights a local server serves (commands that ask a model)."""
    import typer

    return typer.Option(
        None,
        "--model",
        help="model folder or .gguf file for the local server (default SmolLM2-135M-Instruct); the cache "
        "names answers by the weights' content",
    )


def revision_option() -> Any:
    """``--model-revision REV``: the version of the model at ``--llm-url`` (commands that ask a model)."""
    import typer

    return typer.Option(
        None,
        "--model-revision",
        help="version of the model served at --llm-url (part of the cache key; without it the name alone is)",
    )


# -- the options of commands that ask a model directly (decide, probe) ------------------------------------


def llm_url_option() -> Any:
    import typer

    return typer.Option(
        None,
        "--llm-url",
        help="OpenAI-compatible base URL, or the URLs of several servers of the same model (replicas) "
        "separated by commas, which share the requests; default: start a local server",
    )


def llm_model_option() -> Any:
    import typer

    return typer.Option(None, "--llm-model", help="served model name (default: the server's only model)")


def api_key_env_option() -> Any:
    import typer

    return typer.Option("OPENAI_API_KEY", "--api-key-env", help="environment variable with the API key")


def server_option() -> Any:
    import typer

    from lpm.server_kind import SERVER_KINDS

    return typer.Option(
        "vllm",
        "--server",
        help="kind of the local server lpm starts, or of the server at --llm-url (which answer constraint "
        f"it takes): {'|'.join(SERVER_KINDS)}",
    )


def cache_option() -> Any:
    import typer

    from lpm.cache import CACHE_MODES

    return typer.Option("use", "--cache", help=f"response cache mode: {'|'.join(CACHE_MODES)}")


def cache_dir_option() -> Any:
    import typer

    return typer.Option(None, "--cache-dir", help="response cache folder (default: $LPM_CACHE_DIR/responses)")


def llm_timeout_option() -> Any:
    """``--llm-timeout SECONDS``: how long to wait for the answer to one model request (every command that
    asks a model)."""
    import typer

    return typer.Option(
        60.0,
        "--llm-timeout",
        metavar="SECONDS",
        help="seconds to wait for the model's answer to one request; a server that gives none in time stops "
        "the step with an error",
    )


def mode_option() -> Any:
    import typer

    from lpm.decoding import MODES

    return typer.Option("auto", "--mode", "--llm-mode", help=f"how a distribution is read: {'|'.join(MODES)}")


def samples_option() -> Any:
    import typer

    return typer.Option(20, "--samples", help="answers per request in sample mode")


def concurrency_option() -> Any:
    import typer

    return typer.Option(16, "--concurrency", help="requests in flight at once")


def elicitation_option() -> Any:
    import typer

    from lpm.elicitation import ELICITATIONS

    return typer.Option(
        "choice",
        "--elicitation",
        help=f"how the question is put: {'|'.join(ELICITATIONS)} (yes-no and scale: two actions only)",
    )


def scoring_option() -> Any:
    import typer

    from lpm.decoding import DEFAULT_SCORING, SCORING_CHOICES

    return typer.Option(
        DEFAULT_SCORING,
        "--scoring",
        help=f"how a logprobs answer is read: {'|'.join(SCORING_CHOICES)} (sequence: each whole action, one "
        "request each; first-token: one request, under the answer constraint)",
    )
