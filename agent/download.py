"""Resumable artifact download: Range requests, hashing while streaming, hard length cap.

The partial file `staging/<sha>.part` is the resume state: after a dropped connection or an
agent restart the download continues from its size (re-hashing the bytes already on disk).
A byte past the signed length aborts at once; total bytes received across retries stay within
a budget so a flapping link cannot burn a metered connection.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from agent.protocol import ErrorCode

log = logging.getLogger("fleet_agent.download")

CHUNK = 1 << 20
MAX_REDIRECTS = 5
USER_AGENT = "fleet-agent"


class DownloadError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Interrupted(Exception):
    """The agent is stopping (or the update may be superseded); the .part file stays for the next run."""


class AnyEvent:
    """Set while any of `events` is (threading.Event has no "or"): what fetch() and the precheck
    stop on is the agent stopping or a newer directive superseding the update. wait() polls."""

    POLL = 0.05

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            remaining = self.POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.events[0].wait(min(self.POLL, remaining))
        return True


class _Retryable(Exception):
    pass


@dataclass
class DownloadResult:
    sha256: str
    length: int
    bytes_received: int
    resumed_from: int


class _Watcher:
    """Shuts down the socket of the request in progress once `stop` is set: a read blocked on a slow
    or silent server returns at once, instead of after its chunk or the socket timeout."""

    def __init__(self, stop):
        self.stop = stop
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.conn = None
        self.thread = threading.Thread(target=self._run, name="download-watcher", daemon=True)
        self.thread.start()

    def attach(self, conn) -> None:
        with self.lock:
            self.conn = conn
        if self.stop.is_set():
            self._cut()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.stop.wait(0.1):
                self._cut()
                return

    def _cut(self) -> None:
        with self.lock:
            sock = getattr(self.conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.done.set()


@dataclass
class _Progress:
    fd: int
    length: int
    offset: int = 0
    received: int = 0
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    watcher: _Watcher | None = None

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        self.offset = 0
        self.hasher = hashlib.sha256()


def _hash_existing(progress: _Progress) -> None:
    size = os.fstat(progress.fd).st_size
    if size > progress.length:
        # Nothing valid is longer than the signed length: start over.
        progress.restart()
        return
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    os.lseek(progress.fd, 0, os.SEEK_SET)
    pos = 0
    while pos < size:
        n = os.readv(progress.fd, [view[: min(CHUNK, size - pos)]])
        if not n:
            break
        progress.hasher.update(view[:n])
        pos += n
    progress.offset = pos


def _connect(url: str, timeout: float, ssl_context: ssl.SSLContext | None):
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl_context or ssl.create_default_context()
        )
    elif parts.scheme == "http":
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    else:
        raise DownloadError(ErrorCode.DOWNLOAD_FAILED, f"unsupported URL scheme in {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return conn, path


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a port that is not a number: an origin that matches nothing
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def fetch(
    url: str,
    part_path: Path,
    *,
    length: int,
    token: str = "",
    server_url: str = "",
    timeout: float = 30,
    retries: int = 8,
    backoff: float = 1.0,
    backoff_max: float = 60.0,
    byte_budget_factor: float = 3.0,
    stop: threading.Event | None = None,
    on_chunk: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> DownloadResult:
    """Download `url` into `part_path` until it holds exactly `length` bytes; return its sha256.

    `token` goes only to `server_url`'s origin (scheme, host, port: the server the device enrolled
    with), never to another host the directive's URL or a redirect names; without `server_url` it
    is sent nowhere. Raises DownloadError (NOT_FOUND, TOO_LARGE, DOWNLOAD_FAILED) or Interrupted. `stop` (anything
    with is_set() and wait(timeout)) is noticed within a fraction of a second even while a read
    waits on a slow or silent server: a watcher thread shuts the connection's socket down.
    """
    stop = stop or threading.Event()
    budget = int(byte_budget_factor * length) + CHUNK
    failures = 0
    view = memoryview(bytearray(CHUNK))
    fd = os.open(part_path, os.O_RDWR | os.O_CREAT, 0o600)
    watcher = _Watcher(stop)
    try:
        progress = _Progress(fd=fd, length=length, watcher=watcher)
        _hash_existing(progress)
        resumed_from = progress.offset
        while progress.offset < length:
            if stop.is_set():
                raise Interrupted()
            before = progress.offset
            try:
                _attempt(url, progress, view, token, server_url, timeout, ssl_context, stop, on_chunk, budget)
                reason = "connection closed early"
            except _Retryable as exc:
                reason = str(exc)
            if progress.offset >= length:
                break
            if stop.is_set():
                raise Interrupted()  # the watcher cut the connection: not a failure of the server
            if progress.received > budget:
                raise DownloadError(
                    ErrorCode.DOWNLOAD_FAILED,
                    f"gave up after receiving {progress.received} bytes (budget {budget}): {reason}",
                )
            if progress.offset > before:
                failures = 0  # progress resets the retry count; the byte budget bounds the total
            failures += 1
            if failures > retries:
                raise DownloadError(ErrorCode.DOWNLOAD_FAILED, f"gave up after {retries} retries: {reason}")
            delay = min(backoff_max, backoff * 2 ** (failures - 1))
            delay = random.uniform(delay / 2, delay) if delay else 0
            log.warning("download interrupted at %d/%d (%s); retry in %.2fs", progress.offset, length, reason, delay)
            if stop.wait(delay):
                raise Interrupted()
        os.fsync(fd)
    finally:
        watcher.close()
        os.close(fd)
    return DownloadResult(
        sha256=progress.hasher.hexdigest(),
        length=progress.offset,
        bytes_received=progress.received,
        resumed_from=resumed_from,
    )


def _attempt(url, progress: _Progress, view, token, server_url, timeout, ssl_context, stop, on_chunk,
             budget) -> None:
    """One request chain (following redirects), appending to the part file as bytes arrive."""
    origin = _origin(server_url) if server_url else None
    target = url
    length = progress.length
    for _hop in range(MAX_REDIRECTS + 1):
        conn, path = _connect(target, timeout, ssl_context)
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        # The device token is for the server we enrolled with only: never hand it to another host
        # a directive names or we are redirected to (a presigned URL carries its own authorisation).
        if token and _origin(target) == origin:
            headers["Authorization"] = f"Bearer {token}"
        if progress.offset:
            headers["Range"] = f"bytes={progress.offset}-"
        try:
            if stop.is_set():
                raise Interrupted()
            try:
                conn.request("GET", path, headers=headers)
                if progress.watcher:
                    progress.watcher.attach(conn)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(f"request failed: {exc}") from None
            status = resp.status
            if status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise _Retryable(f"HTTP {status} without Location")
                target = urljoin(target, location)
                continue
            if status in (404, 410):
                raise DownloadError(ErrorCode.NOT_FOUND, f"artifact not found (HTTP {status})")
            if status == 416:
                progress.restart()
                raise _Retryable("server refused the range; restarting from zero")
            if status not in (200, 206):
                raise _Retryable(f"HTTP {status} from {urlsplit(target).hostname}")
            if status == 206:
                crange = resp.getheader("Content-Range", "")
                try:
                    rest = crange.split(" ", 1)[1]
                    first = int(rest.split("-", 1)[0])
                    total = rest.rsplit("/", 1)[1]
                except (ValueError, IndexError):
                    raise _Retryable(f"bad Content-Range {crange!r}") from None
                if first != progress.offset:
                    raise _Retryable(f"server sent a range from {first}, asked for {progress.offset}")
                if total != "*" and int(total) > length:
                    raise DownloadError(ErrorCode.TOO_LARGE, f"server has {total} bytes, signed length is {length}")
            elif progress.offset:
                # 200 to a Range request: the server ignored it, so the body starts at byte 0.
                progress.restart()
            declared = resp.getheader("Content-Length")
            if declared is not None and declared.isdigit() and progress.offset + int(declared) > length:
                raise DownloadError(
                    ErrorCode.TOO_LARGE,
                    f"server announces {progress.offset + int(declared)} bytes, signed length is {length}",
                )
            os.lseek(progress.fd, progress.offset, os.SEEK_SET)
            while True:
                if stop.is_set():
                    raise Interrupted()
                # Ask for one byte more than what is left, to catch an overrun at its first byte.
                want = min(len(view), length - progress.offset + 1)
                try:
                    n = resp.readinto(view[:want])
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retryable(f"read failed: {exc}") from None
                if not n:
                    return
                if progress.offset + n > length:
                    raise DownloadError(ErrorCode.TOO_LARGE, f"received a byte past the signed length {length}")
                chunk = view[:n]
                while chunk:
                    chunk = chunk[os.write(progress.fd, chunk) :]
                progress.hasher.update(view[:n])
                progress.offset += n
                progress.received += n
                if progress.received > budget:
                    raise _Retryable("byte budget exhausted")
                if on_chunk:
                    on_chunk(progress.offset)
        finally:
            conn.close()
    raise _Retryable(f"more than {MAX_REDIRECTS} redirects")


def fetch_from_server(cfg, url: str, part_path: Path, *, length: int, stop=None, on_chunk=None,
                      retries: int | None = None) -> DownloadResult:
    """`fetch` with this agent's settings (agent.config.Config): its device token for the server it
    enrolled with, its [update] download timeouts, retries and back-off, and its server CA."""
    u = cfg.update
    ssl_context = ssl.create_default_context(cafile=cfg.server.ca_file) if cfg.server.ca_file else None
    return fetch(url, part_path, length=length, token=cfg.server.token, server_url=cfg.server.url,
                 timeout=u.download_timeout_seconds, retries=u.download_retries if retries is None else retries,
                 backoff=u.download_backoff_seconds, backoff_max=u.download_backoff_max_seconds,
                 byte_budget_factor=u.download_byte_budget_factor, stop=stop, on_chunk=on_chunk,
                 ssl_context=ssl_context)
