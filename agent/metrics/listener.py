"""The UDP socket the application's StatsD client sends to, and the thread that reads it.

A socket that cannot be bound (the port taken, say by a real StatsD daemon) is logged and the
agent goes on without model metrics: they inform the trial and the gates, and an update must not
depend on them being there."""

from __future__ import annotations

import logging
import socket
import threading

from agent.config import parse_listen
from agent.metrics.book import MetricsBook

log = logging.getLogger("fleet_agent")
MAX_DATAGRAM = 65535


def bind(listen: str) -> socket.socket | None:
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.warning("model metrics off: cannot listen for StatsD on %s (%s); set [metrics] statsd_listen "
                    "to a free port, or \"\" to silence this", listen, exc.strerror or exc)
        return None
    sock.settimeout(0.5)
    log.info("listening for the application's StatsD metrics on udp %s", listen)
    return sock


def serve(sock: socket.socket, book: MetricsBook, stop: threading.Event) -> None:
    """Thread body: feed every datagram to the book until `stop`; never raises."""
    try:
        while not stop.is_set():
            try:
                data = sock.recv(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                continue
            try:
                book.feed(data)
            except Exception:  # one odd datagram must not stop the metrics
                log.exception("model metrics: datagram dropped")
    finally:
        sock.close()
