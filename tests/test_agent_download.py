"""agent.download.fetch against a real HTTP server: Range resume, servers that ignore Range or
fail transiently, the byte budget, giving up on an unreachable host, and stopping at once when
told to (the agent stopping, or a newer directive superseding the update)."""

from __future__ import annotations

import os
import threading
import time
from hashlib import sha256

import pytest

from agent.download import AnyEvent, DownloadError, Interrupted, fetch
from tests.support.agent_harness import ArtifactServer
from tests.support.net import free_port

DATA = os.urandom(3 * 2**20 + 12345)
SHA = sha256(DATA).hexdigest()
FAST = {"backoff": 0.01, "backoff_max": 0.05, "timeout": 5}


@pytest.fixture
def server():
    server = ArtifactServer().start()
    server.add("/a", DATA)
    yield server
    server.stop()


def test_it_resumes_a_part_file_left_by_an_earlier_run(server, tmp_path):
    part = tmp_path / "a.part"
    part.write_bytes(DATA[: 2 * 2**20])
    result = fetch(server.url("/a"), part, length=len(DATA), **FAST)
    assert result.sha256 == SHA and part.read_bytes() == DATA
    assert result.resumed_from == 2 * 2**20 and result.bytes_received == len(DATA) - 2 * 2**20
    assert server.requests[-1]["range"] == f"bytes={2 * 2**20}-"


def test_it_starts_over_when_the_server_ignores_range(server, tmp_path):
    server.ignore_range = True
    part = tmp_path / "a.part"
    part.write_bytes(DATA[:100_000])
    result = fetch(server.url("/a"), part, length=len(DATA), **FAST)
    assert result.sha256 == SHA and part.read_bytes() == DATA


def test_it_retries_transient_server_errors(server, tmp_path):
    server.fail_next = [503, 502, 500]
    result = fetch(server.url("/a"), tmp_path / "a.part", length=len(DATA), retries=3, **FAST)
    assert result.sha256 == SHA and len(server.requests) == 4


def test_it_gives_up_after_the_retries(server, tmp_path):
    server.fail_next = [503] * 5
    with pytest.raises(DownloadError) as err:
        fetch(server.url("/a"), tmp_path / "a.part", length=len(DATA), retries=2, **FAST)
    assert err.value.code == "DOWNLOAD_FAILED" and "HTTP 503" in str(err.value)


def test_it_stays_within_the_byte_budget(server, tmp_path):
    # The server ignores Range and cuts every transfer: each retry re-sends from byte 0.
    server.ignore_range = True
    server.cuts = [2 * 2**20] * 10
    with pytest.raises(DownloadError) as err:
        fetch(server.url("/a"), tmp_path / "a.part", length=len(DATA), retries=20, byte_budget_factor=1.5, **FAST)
    assert err.value.code == "DOWNLOAD_FAILED" and "budget" in str(err.value)
    assert server.bytes_served <= 1.5 * len(DATA) + 2 * 2**20 + 2**20


def test_it_fails_cleanly_when_nothing_listens(tmp_path):
    with pytest.raises(DownloadError) as err:
        fetch(f"http://127.0.0.1:{free_port()}/a", tmp_path / "a.part", length=10, retries=2, **FAST)
    assert err.value.code == "DOWNLOAD_FAILED" and "request failed" in str(err.value)


def test_it_reports_not_found_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        fetch(server.url("/missing"), tmp_path / "a.part", length=10, retries=5, **FAST)
    assert err.value.code == "NOT_FOUND" and len(server.requests) == 1


@pytest.mark.parametrize("retries", [0, 8])
def test_it_stops_at_once_while_a_read_waits_on_a_slow_server(server, tmp_path, retries):
    # 64 KiB, then a minute's pause: the read blocks well past the socket timeout. A newer
    # directive (or a stopping agent) must not wait for it, nor be taken for a server failure.
    server.rates["/a"] = 1024
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        fetch(server.url("/a"), tmp_path / "a.part", length=len(DATA), stop=stop, retries=retries,
              **{**FAST, "timeout": 30})
    assert time.monotonic() - started < 2
    assert (tmp_path / "a.part").stat().st_size <= 64 * 1024  # kept for a resume


def test_it_stops_on_either_event(server, tmp_path):
    stopping, superseded = threading.Event(), threading.Event()
    halt = AnyEvent(stopping, superseded)
    assert not halt.is_set() and halt.wait(0.1) is False
    server.rates["/a"] = 256 * 1024
    threading.Timer(0.3, superseded.set).start()
    with pytest.raises(Interrupted):
        fetch(server.url("/a"), tmp_path / "a.part", length=len(DATA), stop=halt, **FAST)
    assert halt.is_set() and halt.wait(5) is True
