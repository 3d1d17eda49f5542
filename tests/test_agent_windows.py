"""Maintenance windows on the device (agent.windows, agent.machine's waiting_for_window).

The window texts are judged first (formats, errors, days across midnight and weekends, daylight
saving); then real agent processes get signed directives with windows a few seconds away: they
download, verify and precheck at once, report waiting_for_window with the next opening, leave the
running model alone, let another model's update through meanwhile, and activate only once the
window is open by their own clock. An agent that is down while its window opens waits for the
next one; a kill -9 right after the window woke the update resumes it; a newer directive
supersedes a waiting update; a stored copy changed while it waited is never activated.
(The rollout service's side, with a window two minutes away, is tests/test_rollout_windows_e2e.py.)
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from agent.protocol import ErrorCode, ProtocolError, build_directive_payload, format_time, parse_time, utcnow
from agent.windows import WindowError, is_open, next_opening, open_until, parse_window, parse_windows
from tests.support.agent_fixtures import MODEL, add_v2, close_rig, device_from, install_template, make_rig
from tests.support.agent_harness import (
    Artifact,
    active_fingerprint,
    journal,
    linear_contract,
    release_envelope,
    wait_for,
)
from tests.support.onnx_models import linear_model

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- the window texts -------------------------------------------------------------------------


def test_it_reads_days_times_and_zones():
    w = parse_window("Mon-Fri 02:00-04:00 Europe/Berlin")
    assert w.days == frozenset(range(5)) and (w.start, w.end, w.zone) == (7200, 14400, "Europe/Berlin")
    assert parse_window("Sat,Sun 22:00-06:00 UTC").days == {5, 6}
    assert parse_window("Fri-Mon 01:00-02:00 UTC").days == {4, 5, 6, 0}  # a range wraps over the weekend
    assert parse_window("daily 00:00-24:00 UTC").days == frozenset(range(7))
    assert parse_window("03:30:15-03:31 UTC").start == 3 * 3600 + 30 * 60 + 15
    assert parse_window("03:30-04:00").zone is None  # the box's own time zone


@pytest.mark.parametrize(("text", "says"), [
    ("Mon-Fry 02:00-04:00 UTC", "'Mon-Fry' is not a day"),
    ("25:00-26:00 UTC", "'25:00' is not a time of day"),
    ("02:00-02:00 UTC", "opens and closes at the same time"),
    ("02:00-03:00 Mars/Olympus_Mons", "'Mars/Olympus_Mons' is not a known time zone"),
    ("02:00-03:00 ../../etc/passwd", "is not a known time zone"),
    ("02:00-03:00 America", "'America' is not a known time zone"),
    ("at night", "is not a window; write [DAYS] HH:MM-HH:MM [ZONE]"),
    ("x" * 101, "longer than 100 characters"),
    (7, "must be a string"),
])
def test_it_names_what_is_wrong_with_a_window(text, says):
    with pytest.raises(WindowError) as caught:
        parse_window(text, "windows[0]")
    assert says in str(caught.value) and str(caught.value).startswith("windows[0]")


def test_it_caps_the_list_and_wants_a_list():
    with pytest.raises(WindowError, match="lists 17 windows, at most 16"):
        parse_windows(["02:00-03:00 UTC"] * 17)
    with pytest.raises(WindowError, match="must be a list"):
        parse_windows("02:00-03:00 UTC")
    with pytest.raises(WindowError, match=r"windows\[1\]: '9:99' is not a time of day"):
        parse_windows(["02:00-03:00 UTC", "9:99-10:00"])


def test_it_finds_the_next_opening_across_midnight_and_weekends():
    ws = parse_windows(["Mon-Fri 02:00-04:00 Europe/Berlin", "Sat 22:00-06:00 UTC"])
    tuesday_evening = at("2026-12-01T19:00:00")  # CET: UTC+1
    assert next_opening(ws, tuesday_evening) == at("2026-12-02T01:00:00")
    assert open_until(ws, at("2026-12-02T01:30:00")) == at("2026-12-02T03:00:00")
    friday_late = at("2026-12-04T23:00:00")
    assert next_opening(ws, friday_late) == at("2026-12-05T22:00:00")
    sunday_early = at("2026-12-06T05:00:00")  # inside Saturday's window, which ends on Sunday
    assert is_open(ws, sunday_early) and open_until(ws, sunday_early) == at("2026-12-06T06:00:00")
    assert next_opening(ws, sunday_early) == sunday_early
    assert next_opening(ws, at("2026-12-06T06:00:00")) == at("2026-12-07T01:00:00")  # the end is exclusive
    assert next_opening((), tuesday_evening) is None and is_open((), tuesday_evening)


def test_it_keeps_local_hours_across_daylight_saving():
    ws = parse_windows(["02:00-04:00 Europe/Berlin"])
    assert next_opening(ws, at("2026-03-27T12:00:00")) == at("2026-03-28T01:00:00")  # CET, UTC+1
    # 29 March: the clocks jump from 02:00 to 03:00 CEST; the window opens at the jump (01:00 UTC)
    # and keeps its local end, 04:00 CEST.
    assert next_opening(ws, at("2026-03-28T12:00:00")) == at("2026-03-29T01:00:00")
    assert open_until(ws, at("2026-03-29T01:30:00")) == at("2026-03-29T02:00:00")
    assert next_opening(ws, at("2026-03-29T12:00:00")) == at("2026-03-30T00:00:00")  # CEST, UTC+2
    # 25 October: 02:00-03:00 happens twice; the window opens at the first 02:00 (UTC+2).
    assert next_opening(ws, at("2026-10-24T12:00:00")) == at("2026-10-25T00:00:00")


def test_it_refuses_a_directive_with_a_bad_window():
    body = dict(device_id="d", seq=1, issued=utcnow(), expires=utcnow() + timedelta(hours=1), rollout_id=None,
                model=MODEL, release_envelope={}, artifact={"hardware": "h", "sha256": "a" * 64, "length": 1,
                                                          "url": "http://x/a"})
    with pytest.raises(ProtocolError, match=r"directive.windows\[0\]: '25:00' is not a time of day") as caught:
        build_directive_payload(**body, windows=["25:00-26:00 UTC"])
    assert caught.value.code == ErrorCode.MALFORMED
    assert b'"windows"' not in build_directive_payload(**body)  # none: left out, as earlier servers built it


# --- real agents --------------------------------------------------------------------------------


def window(opens_in: float, lasts: float) -> str:
    """A daily window in UTC opening `opens_in` seconds from now (whole seconds)."""
    start = (utcnow() + timedelta(seconds=opens_in)).replace(microsecond=0)
    end = start + timedelta(seconds=lasts)
    return f"{start:%H:%M:%S}-{end:%H:%M:%S} UTC"


def opening_of(text: str) -> datetime:
    """When a window made by window() opens (today or, past midnight, tomorrow)."""
    now = utcnow()
    found = next_opening(parse_windows([text]), now)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    rig, _ = make_rig(tmp_path_factory.mktemp("windows"))
    try:
        inst = install_template(rig, update={"reload_command": "true", "trial_seconds": 1})
        add_v2(inst, padding_bytes=300_000)
        inst.other = Artifact(linear_model(scale=5.0, bias=0.0, padding_bytes=1_000), file_name="other.onnx")
        inst.other_rel = release_envelope(rig.keys, model="counter", version="1.0", counter=1,
                                          artifacts=[inst.other.entry()], health=linear_contract(scale=5.0, bias=0.0))
        yield inst
    finally:
        close_rig(rig)


def _device(inst, device: str):
    return inst.rig, device_from(inst, device, reload_command="true", trial_seconds=1)


def _states(rig, device: str, seq: int) -> list[str]:
    return [e["state"] for e in rig.subscriber.events_for(device, seq)]


def _waiting_events(rig, device: str, seq: int) -> list[dict]:
    return [e for e in rig.subscriber.events_for(device, seq) if e["state"] == "waiting_for_window"]


def test_it_prepares_at_once_and_activates_only_when_the_window_opens(installed):
    inst = installed
    rig, state = _device(inst, "w-basic")
    agent = rig.agent("w-basic").start()
    text = window(opens_in=12, lasts=60)
    opens = opening_of(text)
    rig.publish_directive("w-basic", rig.directive("w-basic", 2, MODEL, inst.rel2, inst.v2, windows=[text]))
    wait_for(lambda: _waiting_events(rig, "w-basic", 2), 30, "waiting_for_window", agent=agent)
    assert utcnow() < opens, "the test machine was too slow to see the wait"
    waiting = _waiting_events(rig, "w-basic", 2)[0]
    assert _states(rig, "w-basic", 2) == ["received", "downloading", "verifying", "prechecking", "waiting_for_window"]
    assert waiting["next_opening"] == format_time(opens) and text in waiting["detail"]
    assert active_fingerprint(state, MODEL)[1] == inst.v1.sha256  # prepared, not switched
    j = journal(state)
    assert j["update"] is None and j["waiting"][MODEL]["seq"] == 2
    assert (state / "store" / inst.v2.sha256 / inst.v2.file_name).exists()
    wait_for(lambda: (rig.subscriber.presence.get("w-basic") or {}).get("models", {}).get(MODEL, {}).get("waiting"),
             10, "presence shows the waiting update", agent=agent)
    assert rig.subscriber.presence["w-basic"]["models"][MODEL]["waiting"] == {
        "seq": 2, "sha256": inst.v2.sha256, "next_opening": format_time(opens)}

    # Another model's update is not held up by the one waiting for its window.
    rig.publish_directive("w-basic", rig.directive("w-basic", 3, "counter", inst.other_rel, inst.other))
    other = rig.subscriber.wait_outcome("w-basic", 3, timeout=30, agent=agent)
    assert other["state"] == "committed" and utcnow() < opens, other
    assert active_fingerprint(state, MODEL)[1] == inst.v1.sha256

    outcome = rig.subscriber.wait_outcome("w-basic", 2, timeout=60, agent=agent)
    assert outcome["state"] == "committed", outcome
    activating = next(e for e in rig.subscriber.events_for("w-basic", 2) if e["state"] == "activating")
    assert parse_time(activating["ts"], "ts") >= opens
    activated = parse_time(journal(state)["models"][MODEL]["activated"], "activated")
    assert opens <= activated < opens + timedelta(seconds=10), (activated, opens)
    assert _states(rig, "w-basic", 2)[-3:] == ["activating", "trial", "committed"]
    assert active_fingerprint(state, MODEL)[1] == inst.v2.sha256
    assert journal(state)["waiting"] == {}
    assert agent.stop() == 0


def test_it_waits_for_the_next_window_when_it_was_down_for_one(installed):
    inst = installed
    rig, state = _device(inst, "w-down")
    agent = rig.agent("w-down").start()
    first, second = window(opens_in=6, lasts=4), window(opens_in=16, lasts=60)
    first_opens, second_opens = opening_of(first), opening_of(second)
    rig.publish_directive("w-down", rig.directive("w-down", 2, MODEL, inst.rel2, inst.v2, windows=[first, second]))
    wait_for(lambda: _waiting_events(rig, "w-down", 2), 30, "waiting_for_window", agent=agent)
    assert _waiting_events(rig, "w-down", 2)[0]["next_opening"] == format_time(first_opens)
    agent.proc.kill()  # power loss before the window opens
    agent.wait(10)
    time.sleep(max(0.0, (first_opens - utcnow()).total_seconds() + 5))  # back after the first window closed
    assert utcnow() < second_opens
    # Killed again right after the second window wakes the update: it resumes it.
    agent.start(env={"FLEET_AGENT_CRASH_AT": "unparked"})
    wait_for(lambda: len(_waiting_events(rig, "w-down", 2)) == 2, 30, "a second waiting_for_window", agent=agent)
    assert _waiting_events(rig, "w-down", 2)[1]["next_opening"] == format_time(second_opens)
    assert active_fingerprint(state, MODEL)[1] == inst.v1.sha256
    assert agent.wait(60) == -9  # the crash point after the unpark
    assert journal(state)["update"]["phase"] == "waiting_for_window" and journal(state)["waiting"] == {}
    agent.start()
    outcome = rig.subscriber.wait_outcome("w-down", 2, timeout=60, agent=agent)
    assert outcome["state"] == "committed", outcome
    activated = parse_time(journal(state)["models"][MODEL]["activated"], "activated")
    assert activated >= second_opens
    assert active_fingerprint(state, MODEL)[1] == inst.v2.sha256
    assert agent.stop() == 0


def test_it_lets_a_newer_directive_supersede_a_waiting_update(installed):
    inst = installed
    rig, state = _device(inst, "w-revert")
    agent = rig.agent("w-revert").start()
    rig.publish_directive("w-revert", rig.directive("w-revert", 2, MODEL, inst.rel2, inst.v2,
                                                    windows=[window(opens_in=3 * 3600, lasts=600)]))
    wait_for(lambda: _waiting_events(rig, "w-revert", 2), 30, "waiting_for_window", agent=agent)
    # The rollout is reverted: the model still running is confirmed, the waiting update ends.
    rig.publish_directive("w-revert", rig.directive("w-revert", 3, MODEL, inst.rel1, inst.v1))
    outcome = rig.subscriber.wait_outcome("w-revert", 3, timeout=30, agent=agent)
    assert outcome["state"] == "committed", outcome
    superseded = rig.subscriber.outcomes("w-revert", 2)
    assert [(e["state"], e["error_code"]) for e in superseded] == [("failed", "SUPERSEDED")]
    assert "while waiting for its maintenance window" in superseded[0]["detail"]
    j = journal(state)
    assert j["waiting"] == {} and j["update"] is None and j["seqs"][MODEL] == 3
    assert active_fingerprint(state, MODEL)[1] == inst.v1.sha256
    assert not (state / "store" / inst.v2.sha256).exists()  # the prepared copy is cleaned up
    assert agent.stop() == 0


def test_it_never_activates_a_copy_changed_while_it_waited(installed):
    inst = installed
    rig, state = _device(inst, "w-tamper")
    agent = rig.agent("w-tamper").start()
    text = window(opens_in=5, lasts=60)
    rig.publish_directive("w-tamper", rig.directive("w-tamper", 2, MODEL, inst.rel2, inst.v2, windows=[text]))
    wait_for(lambda: _waiting_events(rig, "w-tamper", 2), 30, "waiting_for_window", agent=agent)
    stored = state / "store" / inst.v2.sha256 / inst.v2.file_name
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.chmod(0o600)
    stored.write_bytes(bytes(data))
    outcome = rig.subscriber.wait_outcome("w-tamper", 2, timeout=30, agent=agent)
    assert (outcome["state"], outcome["error_code"]) == ("failed", "HASH_MISMATCH"), outcome
    assert "changed while it waited for its maintenance window" in outcome["detail"]
    assert active_fingerprint(state, MODEL)[1] == inst.v1.sha256
    assert "activating" not in _states(rig, "w-tamper", 2)
    assert agent.stop() == 0


def test_it_never_activates_a_release_that_expired_while_it_waited(installed):
    inst = installed
    rig, state = _device(inst, "w-expired")
    agent = rig.agent("w-expired").start()
    short = release_envelope(rig.keys, model=MODEL, version="2.0", counter=2, artifacts=[inst.v2.entry()],
                             health=linear_contract(scale=3.0, bias=0.5), expires_in=timedelta(seconds=6))
    rig.publish_directive("w-expired", rig.directive("w-expired", 2, MODEL, short, inst.v2,
                                                     windows=[window(opens_in=9, lasts=60)]))
    wait_for(lambda: _waiting_events(rig, "w-expired", 2), 30, "waiting_for_window", agent=agent)
    outcome = rig.subscriber.wait_outcome("w-expired", 2, timeout=30, agent=agent)
    assert (outcome["state"], outcome["error_code"]) == ("failed", "RELEASE_EXPIRED"), outcome
    assert "expired" in outcome["detail"] and "while it waited" in outcome["detail"]
    assert active_fingerprint(state, MODEL)[1] == inst.v1.sha256
    assert agent.stop() == 0
