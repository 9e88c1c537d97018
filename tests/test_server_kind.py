"""The table of server kinds: one entry per kind, read by backends, endpoint, server control and CLI."""

from __future__ import annotations

import importlib.util

import pytest

from lpm.endpoint import default_mode
from lpm.errors import InputError, ServerError
from lpm.server_kind import SERVER_KINDS, SERVERS, gbnf_grammar, server_kind

ACTIONS = ["isolate", "go out"]


def test_one_table_of_names():
    assert SERVER_KINDS == ("vllm", "llamacpp")
    assert all(SERVERS[name].name == name for name in SERVER_KINDS)
    assert server_kind("vllm") is SERVERS["vllm"] and server_kind(SERVERS["vllm"]) is SERVERS["vllm"]


def test_constraint_payload_of_each_kind():
    assert SERVERS["vllm"].constraint_payload(ACTIONS) == {"structured_outputs": {"choice": ACTIONS}}
    assert SERVERS["llamacpp"].constraint_payload(ACTIONS) == {"grammar": 'root ::= "isolate" | "go out"'}


def test_gbnf_grammar_escapes_literals():
    assert gbnf_grammar(["isolate", "go out"]) == 'root ::= "isolate" | "go out"'
    assert gbnf_grammar(['say "hi"', "a\\b"]) == 'root ::= "say \\"hi\\"" | "a\\\\b"'


@pytest.mark.parametrize(
    ("mode", "vllm", "llamacpp"),
    [("auto", "auto", "sample"), ("logprobs", "logprobs", "logprobs"), ("sample", "sample", "sample")],
)
def test_auto_means_sample_where_logprobs_come_before_the_constraint(mode, vllm, llamacpp):
    assert SERVERS["vllm"].logprobs_after_constraint and not SERVERS["llamacpp"].logprobs_after_constraint
    assert default_mode(mode, "vllm") == vllm
    assert default_mode(mode, "llamacpp") == llamacpp


def test_unknown_kind_names_the_field_the_value_and_the_choices():
    with pytest.raises(InputError, match=r"^--server must be one of vllm, llamacpp, got 'ollama'$"):
        server_kind("ollama", field="--server")
    with pytest.raises(ServerError, match="kind must be one of"):
        server_kind("ollama", field="kind", error=ServerError)
    with pytest.raises(InputError, match="server must be one of"):
        default_mode("auto", "tgi")


def test_launchers_and_install_hints():
    for kind in SERVERS.values():
        assert kind.install.startswith("pip install")
        assert kind.installed() == (importlib.util.find_spec(kind.module) is not None)
    assert importlib.util.find_spec(SERVERS["llamacpp"].launcher) is not None  # lpm's own launcher
