"""The one polling helper of the test suite: wait until something is true, or fail saying what
was awaited, for how long, and whatever the caller knows that might explain why (server logs,
an agent's log, what a recorder has seen).

Tests wait on things that happen in other processes and threads (an agent committing, ingest
storing events, Celery finishing a wave), so they poll. Every such wait goes through
`wait_for`, so that a timeout always reads the same way:

    timed out after 30s waiting for presence
    <diagnostics, if any>

Helpers that wait for one kind of thing keep their own short names as thin wrappers that fix
the diagnostics: `tests.support.agent_harness.wait_for` appends the agent's log,
`DirectiveRecorder.wait_for` the number of directives seen, `Platform.wait_for_log` the
process's log (tests.support.platform).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return that.

    `predicate` is called at least once, and once more after the deadline has passed (so a
    condition that became true during the last sleep still counts). An exception from it is not
    caught: it fails the wait at once, as it would have failed the test.

    After `timeout` seconds without a truthy value, raises AssertionError with the message
    "timed out after {timeout}s waiting for {what}", followed by a newline and the text
    `diagnostics()` returns, when it is given. `diagnostics` is called only then; should it raise,
    the timeout is still reported, with the diagnostics' own error in place of their text.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    message = f"timed out after {timeout}s waiting for {what}"
    if diagnostics is not None:
        try:
            extra = diagnostics()
        except Exception as exc:  # noqa: BLE001 - the timeout is the failure to report, not this
            extra = f"(diagnostics failed: {exc!r})"
        message += f"\n{extra}"
    raise AssertionError(message)
