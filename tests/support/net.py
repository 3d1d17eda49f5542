"""Ports for the servers tests start (Mosquitto, Redis, HTTP servers, make run) and for ports
meant to stay closed, safe when tests run side by side: pytest-xdist workers of one run, and other
engineers' runs on the same machine.

"Bind port 0, close, hand the number out" raced twice over. A port from bind(0) is in the
kernel's ephemeral range, which every outgoing connection draws from, so between a test choosing
it and its server binding it a connection of another worker (to PostgreSQL, Redis, a broker)
could take it; and the kernel could hand the same number to another worker before the first
server had bound it. So ports come from below the ephemeral range, and each one handed out is
reserved for the life of the process: an abstract Unix socket named after it is held (the
kernel frees it when the process exits, however it exits), and every process choosing ports here
skips the reserved ones. A stopped broker's port stays this test's until it restarts there.
"""

from __future__ import annotations

import collections
import random
import socket
import sys
from pathlib import Path

# Reservations kept per process, oldest released first: far more than any test holds at once,
# while a whole serial run (thousands of ports) stays well inside the open-files limit.
_MAX_RESERVED = 1000
_reserved: collections.OrderedDict[int, socket.socket | None] = collections.OrderedDict()


def _port_range() -> range:
    """The ports handed out: the 12,000 below the kernel's ephemeral range (32768 by default)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), max(1025, low))


def _reserve(port: int) -> bool:
    """Hold this process's claim on `port`; False when another process (or this one) holds it."""
    if port in _reserved:
        return False
    if not sys.platform.startswith("linux"):  # abstract sockets are Linux's; elsewhere: no claim
        _reserved[port] = None
    else:
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0modelfleet-test-port-{port}")
        except OSError:
            claim.close()
            return False
        _reserved[port] = claim
    while len(_reserved) > _MAX_RESERVED:
        _port, old = _reserved.popitem(last=False)
        if old is not None:
            old.close()
    return True


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserve(port: int) -> None:
    """Keep free_port() from handing `port` to any other test process on this machine for the rest
    of this one: for a port chosen elsewhere that a test needs again, like the MQTT port `make run`
    picked and keeps across restarts. Already held: nothing changes."""
    _reserve(port)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, reserved for this process (see the module's
    docstring): bind a server to it, or use it as a port where nothing answers."""
    ports = _port_range()
    for _ in range(500):
        port = random.choice(ports)
        # Claimed first, then checked: a port bound by anything else stays claimed and unused.
        if _reserve(port) and _bindable(port):
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1} after 500 tries")


class TcpProxy:
    """A TCP forwarder on a fixed local port that can go away and come back: what a client sees
    of a server restarting (connections refused meanwhile), without touching the server."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1"):
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._threading = threading
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        self._stop.clear()
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Refuse new connections until start() again (connections already open finish)."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
