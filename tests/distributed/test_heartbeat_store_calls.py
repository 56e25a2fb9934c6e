"""Heartbeat load on rank 0's store: a real TCPStore, 8 ranks' heartbeats, every store call counted.

Each rank's ``Heartbeat`` has its own real TCPStore client (as in a job), wrapped so that the test counts the
calls that reach the server. Publishing (``set`` of a rank's own key, about once an interval) is the steady cost
and is counted apart; the reads are what a stall or a failure adds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as tdist

from r2d2_hpc.train.dist import HEARTBEAT_KEY, DistEnv, Heartbeat, describe_failure

pytestmark = pytest.mark.distributed
WORLD, DEAD = 8, 5
INTERVAL_S, STALL_WARN_S, STALE_AFTER_S = 0.05, 0.3, 1.0


class CountingStore:
    """A real TCPStore client whose calls are counted (shared counter, several threads)."""

    def __init__(self, store: Any, calls: Counter, lock: threading.Lock) -> None:
        self._store, self._calls, self._lock = store, calls, lock

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any) -> Any:
            key = "publish" if name == "set" and str(args[0]).startswith("r2d2/heartbeat/") else name
            if key == "publish" and args[0].endswith("verdict"):
                key = "set_verdict"
            with self._lock:
                self._calls[key] += 1
            result = method(*args)
            return CountingStore(result, self._calls, self._lock) if name == "clone" else result

        return counted


def _env(rank: int) -> DistEnv:
    return DistEnv(rank, WORLD, rank, WORLD, "127.0.0.1", 0, 1, "gloo", "cpu", "torchrun", None)


@pytest.fixture
def server() -> Any:
    return tdist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)


def _heartbeats(server: Any, calls: Counter, ranks: list[int]) -> dict[int, Heartbeat]:
    lock = threading.Lock()
    beats = {}
    for rank in ranks:
        client = tdist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=10))
        store = CountingStore(client, calls, lock)
        beats[rank] = Heartbeat(
            _env(rank),
            store=store,
            interval_s=INTERVAL_S,
            stale_after_s=STALE_AFTER_S,
            stall_warn_s=STALL_WARN_S,
        )
    return beats


def _dead_rank(server: Any, age_s: float) -> None:
    """Rank DEAD's last record, written ``age_s`` ago; it never beats again."""
    record = {"step": 3, "time": time.time() - age_s, "done": False, "host": "n2", "pid": 4242}
    server.set(HEARTBEAT_KEY.format(rank=DEAD), json.dumps(record))


def _reads(calls: Counter) -> int:
    return sum(n for name, n in calls.items() if name != "publish")


@pytest.mark.parametrize("dead", [True, False], ids=["a-rank-died", "every-rank-alive"])
def test_a_stall_of_8_ranks_is_inspected_once_in_one_batched_read(
    server: Any, caplog: pytest.LogCaptureFixture, dead: bool
) -> None:
    calls: Counter = Counter()
    ranks = [r for r in range(WORLD) if not (dead and r == DEAD)]
    if dead:
        _dead_rank(server, age_s=60.0)
    beats = _heartbeats(server, calls, ranks)
    try:
        for hb in beats.values():
            hb.beat(3)
        with caplog.at_level(logging.WARNING, logger="r2d2_hpc.train.dist"):
            time.sleep(STALL_WARN_S + 30 * INTERVAL_S)  # a stall of ~30 heartbeat intervals past the warning
    finally:
        for hb in beats.values():
            hb.close()
    lines = [r.getMessage() for r in caplog.records if "has made no progress" in r.getMessage()]
    # one line for the job (the inspector, rank 0), not one per rank, and not one per second
    assert len(lines) == 1 and lines[0].startswith("rank 0 has made no progress"), lines
    if dead:
        assert f"rank {DEAD} stopped beating" in lines[0] and "pid 4242" in lines[0], lines
        assert all(f"rank {r} " not in lines[0] for r in ranks if r != 0), lines  # no healthy rank blamed
    else:
        assert "every other rank still beats" in lines[0], lines
    # one existence check and one multi_get, instead of 2 (N-1) reads per rank per interval
    assert calls["multi_get"] == 1 and _reads(calls) <= 2, calls
    assert calls["get"] == 0


def test_a_failed_collective_on_8_ranks_reads_the_store_a_bounded_number_of_times(
    server: Any,
) -> None:
    """Rank 5 died just now (its heartbeat is still fresh): 7 survivors describe the failure at once."""
    calls: Counter = Counter()
    survivors = [r for r in range(WORLD) if r != DEAD]
    _dead_rank(server, age_s=0.0)
    beats = _heartbeats(server, calls, survivors)
    messages: dict[int, str] = {}
    exc = RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:4321")

    def fail(rank: int) -> None:
        messages[rank] = describe_failure(exc, beats[rank], _env(rank), timeout_s=20)

    try:
        for hb in beats.values():
            hb.beat(3)
        started = time.monotonic()
        threads = [threading.Thread(target=fail, args=(rank,)) for rank in survivors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        took_s = time.monotonic() - started
    finally:
        for hb in beats.values():
            hb.close()
    assert sorted(messages) == survivors
    for rank, message in messages.items():
        assert f"Suspect rank(s): {DEAD} " in message, (rank, message)
        assert f"rank {DEAD} stopped beating" in message, (rank, message)
    # the inspector: one check and two multi_gets (now, and once more when rank 5 has gone stale; a third when
    # its stall report falls in the wait) and the verdict; each other survivor: one wait and one get of the
    # verdict. No polling.
    assert calls["multi_get"] <= 3 and calls["check"] <= 1 and calls["set_verdict"] == 1, calls
    assert calls["wait"] == len(survivors) - 1 and calls["get"] == len(survivors) - 1, calls
    assert _reads(calls) <= 5 + 4 * (len(survivors) - 1), calls  # + clone and set_timeout, no I/O
    assert took_s < STALE_AFTER_S + 10 * INTERVAL_S + 5.0
