"""The response cache: keys, modes, corrupt entries, stats, and two processes at once."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from lpm.backend import Answer
from lpm.cache import ResponseCache, cache_key, default_directory
from lpm.errors import CacheMissError, InputError

MESSAGES = [{"role": "user", "content": "isolate or go out?"}]
ACTIONS = ["isolate", "go out"]
REQUEST = {"temperature": 0.0, "max_tokens": 8, "logprobs": True, "top_logprobs": 20}


def key(*, mode: str = "logprobs", request: dict | None = None, **changes) -> str:
    """The key of a request of ``mode`` sending ``request`` (default REQUEST), with other parts changed."""
    args = {
        "model": {"backend": "openai", "model": "m", "server": "vllm"},
        "messages": MESSAGES,
        "actions": ACTIONS,
        "decoding": {"mode": mode, "logprobs": REQUEST if request is None else request},
    }
    args.update(changes)
    return cache_key(**args)


def answer(p: float = 0.25) -> Answer:
    return Answer([p, 1 - p], "logprobs", "go out", prompt_tokens=40, completion_tokens=2)


def test_key_is_stable_and_covers_what_changes_the_answer():
    assert key() == key(messages=[dict(MESSAGES[0])])  # canonical JSON, not object identity
    different = [
        key(model={"backend": "openai", "model": "other", "server": "vllm"}),
        key(model={"backend": "openai", "model": "m", "server": "llamacpp"}),
        key(messages=[{"role": "user", "content": "isolate or go out? "}]),
        key(actions=["go out", "isolate"]),
        key(mode="sample"),
        key(request={**REQUEST, "temperature": 1.0}),
        key(request={**REQUEST, "max_tokens": 9}),
        key(request={**REQUEST, "top_logprobs": 5}),
    ]
    assert len({key(), *different}) == 1 + len(different)


def test_default_directory_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LPM_CACHE_DIR", str(tmp_path / "c"))
    assert default_directory() == tmp_path / "c" / "responses"
    assert ResponseCache().directory == tmp_path / "c" / "responses"


def test_use_mode_round_trip_and_stats(tmp_path):
    cache = ResponseCache(tmp_path)
    assert cache.get(key()) is None
    cache.put(key(), answer())
    got = cache.get(key())
    assert got.probs == [0.25, 0.75] and got.raw == "go out" and got.mode == "logprobs"
    stats = cache.stats()
    assert (stats["entries"], stats["hits"], stats["misses"], stats["tokens_saved"]) == (1, 1, 1, 42)
    cache.close()
    assert ResponseCache(tmp_path).stats()["hits"] == 1  # persisted
    assert ResponseCache(tmp_path).clear() > 0
    assert ResponseCache(tmp_path).stats()["entries"] == 0


def test_modes(tmp_path):
    ResponseCache(tmp_path).put(key(), answer(0.25))
    refresh = ResponseCache(tmp_path, mode="refresh")
    assert refresh.get(key()) is None  # never reads
    refresh.put(key(), answer(0.5))  # overwrites
    assert ResponseCache(tmp_path).get(key()).probs == [0.5, 0.5]
    off = ResponseCache(tmp_path, mode="off")
    assert off.get(key()) is None
    off.put(key(mode="sample"), answer())
    replay = ResponseCache(tmp_path, mode="replay")
    assert replay.get(key()).probs == [0.5, 0.5]
    with pytest.raises(CacheMissError, match=r"covid_isolation\[age_group=20-29\]"):
        replay.get(key(mode="sample"), label="covid_isolation[age_group=20-29]")  # off wrote nothing
    with pytest.raises(InputError, match="cache mode"):
        ResponseCache(tmp_path, mode="sometimes")


def _reseal(value: bytes, edit) -> bytes:
    """A stored value with its JSON body changed by ``edit`` and the old checksum kept."""
    import json

    return value[:65] + json.dumps(edit(json.loads(value[65:]))).encode()


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: b"0" * 64 + v[64:],  # checksum
        lambda v: _reseal(v, lambda d: {**d, "probs": [0.9, 0.9]}),
        lambda v: _reseal(v, lambda d: {k: x for k, x in d.items() if k != "mode"}),
        lambda v: b"not an entry",
        lambda v: v[:-5],  # truncated
    ],
)
def test_corrupt_entry_is_detected_and_deleted(tmp_path, damage):
    cache = ResponseCache(tmp_path)
    cache.put(key(), answer())
    raw_key = "r:" + key()
    cache.store.set(raw_key, damage(cache.store.get(raw_key)))
    assert cache.get(key()) is None
    assert raw_key not in cache.store
    assert cache.stats()["corrupt"] == 1


def test_a_pickled_entry_is_never_unpickled(tmp_path):
    """Someone who can write the cache folder stores a pickle that would run code when loaded: lpm never
    loads it (the store refuses every mode but raw values), deletes it and counts it as corrupt."""
    import pickle
    import sqlite3

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cache = ResponseCache(tmp_path)
    cache.put(key(), answer())
    cache.close()
    db = sqlite3.connect(tmp_path / "cache.db")
    payload = pickle.dumps(Exploit())
    db.execute(
        "UPDATE Cache SET mode = 4, value = ? WHERE key = ?", (payload, "r:" + key())
    )  # 4: MODE_PICKLE
    db.execute(
        "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, "
        "filename, value) VALUES (?, 0, 0, NULL, 0, 0, NULL, 0, 4, NULL, ?)",
        (pickle.dumps(Exploit()), payload),
    )
    db.commit()
    db.close()
    cache = ResponseCache(tmp_path)
    assert cache.get(key()) is None
    stats = cache.stats()
    assert stats["corrupt"] == 1 and stats["entries"] == 0
    assert not marker.exists()


def test_probabilities_not_summing_to_one_are_corrupt_even_with_valid_checksum(tmp_path):
    from lpm.cache import _encode

    cache = ResponseCache(tmp_path)
    cache.store.set("r:" + key(), _encode(key(), Answer([0.2, 0.2], "logprobs", "x")))
    assert cache.get(key()) is None and cache.stats()["corrupt"] == 1


def _worker(directory: str, worker: int, n: int, queue) -> None:
    cache = ResponseCache(directory)
    seen = 0
    for i in range(n):
        cache.put(key(mode=f"m{worker}-{i}"), answer(i / n))
        for j in range(i + 1):  # read back everything this worker wrote, and the other worker's if there
            if cache.get(key(mode=f"m{worker}-{j}")) is not None:
                seen += 1
            cache.get(key(mode=f"m{1 - worker}-{j}"))
    cache.close()
    queue.put(seen)


def test_two_processes_share_the_cache(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    n = 30
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), w, n, queue)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert [queue.get(timeout=5) for _ in procs] == [n * (n + 1) // 2] * 2
    cache = ResponseCache(tmp_path)
    stats = cache.stats()
    assert stats["entries"] == 2 * n and stats["writes"] == 2 * n
    # every lookup of both processes was counted, none lost to a race
    assert stats["hits"] + stats["misses"] == 2 * 2 * (n * (n + 1) // 2)
    for w in (0, 1):
        for i in range(n):
            assert cache.get(key(mode=f"m{w}-{i}")).probs[0] == pytest.approx(i / n)
