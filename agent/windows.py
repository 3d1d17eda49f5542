"""Maintenance windows: when a device may switch to a new model.

A window is one line of text, in the device's local time or in a named time zone:

    Mon-Fri 02:00-04:00 Europe/Berlin      weekdays, two hours, Berlin wall-clock time
    Sat,Sun 22:00-06:00 UTC                starts Saturday and Sunday at 22:00, ends the next day
    03:30-04:00                            every day, in the box's own time zone
    Mon,Wed-Fri 01:00:30-01:05 America/New_York   seconds may be given

Days name the day a window *starts* on (Mon Tue Wed Thu Fri Sat Sun, ranges with `-`, lists
with `,`; `daily` or no days at all: every day). An end at or before the start crosses midnight;
`24:00` is the end of the day. The zone is an IANA name (zoneinfo; the `tzdata` package stands in
on boxes without a system time-zone database), or nothing for the box's own local time. Wall-clock
times are turned into instants with the zone's rules on that date, so a window keeps its local
hours across daylight-saving changes; a start that falls in the hour skipped in spring opens when
the clock jumps past it.

A directive carries its windows signed (agent.protocol.Directive.windows); the agent downloads,
verifies and prechecks at once, then waits with its own clock, offline or not, until one is open
(agent.waiting). The server parses the same text with the same functions (a rollout definition's
`windows`), so a window it accepts is a window every agent understands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MAX_WINDOWS = 16
MAX_WINDOW_CHARS = 100

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = r"(\d{1,2}):(\d{2})(?::(\d{2}))?"
_WINDOW_RE = re.compile(rf"^(?:(?P<days>[A-Za-z,\-]+)\s+)?(?P<start>{_TIME})-(?P<end>{_TIME})(?:\s+(?P<zone>\S+))?$")
_TIME_RE = re.compile(rf"^{_TIME}$")


class WindowError(ValueError):
    """A window that cannot be understood; the message names what is wrong with it."""


@dataclass(frozen=True)
class Window:
    text: str
    days: frozenset[int]  # 0 = Monday, the days a window starts on
    start: int  # seconds after local midnight
    end: int  # seconds after local midnight of the start day; > start (crossing midnight: > 86400)
    zone: str | None  # IANA name; None: the box's own local time

    def spans_on(self, day: date) -> tuple[datetime, datetime] | None:
        """The window starting on `day` as UTC instants, or None if it does not start that day."""
        if day.weekday() not in self.days:
            return None
        return self._instant(day, self.start), self._instant(day, self.end)

    def _instant(self, day: date, seconds: int) -> datetime:
        wall = datetime.combine(day, time()) + timedelta(seconds=seconds)
        if self.zone is None:
            return datetime.fromtimestamp(wall.timestamp(), timezone.utc)  # naive: the box's local rules
        return wall.replace(tzinfo=ZoneInfo(self.zone)).astimezone(timezone.utc)

    def local_day(self, instant: datetime) -> date:
        if self.zone is None:
            return datetime.fromtimestamp(instant.timestamp()).date()
        return instant.astimezone(ZoneInfo(self.zone)).date()


def _days(text: str | None, where: str) -> frozenset[int]:
    if text is None or text.lower() in ("daily", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.lower().partition("-")
        try:
            a = DAY_NAMES.index(first)
            b = DAY_NAMES.index(last) if last else a
        except ValueError:
            raise WindowError(f"{where}: {part!r} is not a day or a range of days (Mon Tue Wed Thu Fri Sat Sun, "
                              "as in Mon-Fri or Sat,Sun)") from None
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps over the weekend
    return frozenset(days)


def _seconds(text: str, where: str, *, end: bool) -> int:
    m = _TIME_RE.match(text)
    assert m is not None  # the window pattern matched it already
    hours, minutes, seconds = int(m[1]), int(m[2]), int(m[3] or 0)
    if end and (hours, minutes, seconds) == (24, 0, 0):
        return 86400
    if hours > 23 or minutes > 59 or seconds > 59:
        raise WindowError(f"{where}: {text!r} is not a time of day (00:00 to 23:59{', or 24:00' if end else ''})")
    return hours * 3600 + minutes * 60 + seconds


def parse_window(text: object, where: str = "window") -> Window:
    """One window from its text (WindowError if it is not one)."""
    if not isinstance(text, str):
        raise WindowError(f"{where} must be a string such as 'Mon-Fri 02:00-04:00 Europe/Berlin'")
    if len(text) > MAX_WINDOW_CHARS:
        raise WindowError(f"{where} is longer than {MAX_WINDOW_CHARS} characters")
    m = _WINDOW_RE.match(text.strip())
    if m is None:
        raise WindowError(f"{where}: {text!r} is not a window; write [DAYS] HH:MM-HH:MM [ZONE], "
                          "as in 'Mon-Fri 02:00-04:00 Europe/Berlin'")
    days = _days(m["days"], where)
    start = _seconds(m["start"], where, end=False)
    end = _seconds(m["end"], where, end=True)
    if end == start:
        raise WindowError(f"{where}: {text!r} opens and closes at the same time")
    if end < start:
        end += 86400  # crosses midnight: ends the next day
    zone = m["zone"]
    if zone is not None:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder of the database ("America")
            raise WindowError(f"{where}: {zone!r} is not a known time zone (an IANA name such as Europe/Berlin "
                              "or UTC)") from None
    return Window(text=text.strip(), days=days, start=start, end=end, zone=zone)


def parse_windows(texts: object, where: str = "windows") -> tuple[Window, ...]:
    """A list of windows (WindowError naming the first bad one); an empty list means no windows."""
    if not isinstance(texts, Sequence) or isinstance(texts, (str, bytes)):
        raise WindowError(f"{where} must be a list of windows such as ['Mon-Fri 02:00-04:00 Europe/Berlin']")
    if len(texts) > MAX_WINDOWS:
        raise WindowError(f"{where} lists {len(texts)} windows, at most {MAX_WINDOWS} are allowed")
    return tuple(parse_window(text, f"{where}[{i}]") for i, text in enumerate(texts))


def _spans(windows: Iterable[Window], now: datetime, days_ahead: int):
    for w in windows:
        today = w.local_day(now)
        for offset in range(-2, days_ahead + 1):  # a window from the day before may still be open
            span = w.spans_on(today + timedelta(days=offset))
            if span is not None:
                yield span


def open_until(windows: Sequence[Window], now: datetime) -> datetime | None:
    """When the window open at `now` closes (the latest of several open ones), or None if none is open."""
    ends = [end for start, end in _spans(windows, now, 0) if start <= now < end]
    return max(ends) if ends else None


def next_opening(windows: Sequence[Window], now: datetime) -> datetime | None:
    """`now` if a window is open, else when the next one opens (UTC); None without windows."""
    if not windows:
        return None
    if open_until(windows, now) is not None:
        return now
    starts = [start for start, _end in _spans(windows, now, 8) if start > now]
    return min(starts) if starts else None


def is_open(windows: Sequence[Window], now: datetime) -> bool:
    """Whether the device may activate now: no windows at all, or one of them open."""
    return not windows or open_until(windows, now) is not None
