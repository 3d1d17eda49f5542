"""Which device identity the state directory's journal and outbox belong to.

The journal records the device id it was written for (`device_id`). A directive seq and the
events in the outbox mean something only for that id: the server numbers directives per device
from 1, and an event carries the device id it was made for. When the configured device id is
another one (`fleet-agent enroll --force`, or an agent.toml replaced by hand), `rebind()` moves
the state directory over to the new identity:

- kept: what is installed and what was learnt about artifacts, which no identity changes: the
  store, models/ links, and the journal's models, floors, denylist and last_health;
- kept: event_no, which goes on counting, so the outbox's `sent` watermark stays true and event
  numbers stay unique on this box whichever id they go out under (the server de-duplicates on
  device id and event_no, and a new device starts with none);
- reset: last_seq (0: the new identity's first directive is seq 1), last_outcome and refused (they
  name the old identity's directives), and updates parked until a maintenance window opens
  (`waiting`: the old identity's rollouts; the new identity's send their own directives);
- retired, never published: every outbox event made for another device id goes to
  outbox/retired/<that id>/ (kept for an operator, never sent: the broker would carry it on the
  new device's topic), and the journal's last_events of another id are dropped (they would be
  re-queued after a crash).

An update in flight stays (it runs to its outcome under the new identity); `fleet-agent enroll`
refuses to re-enroll while one is in flight, so this only happens to a hand-edited config.
A journal without `device_id` (written by an agent before this existed) is taken to be the
device's its last_events were made for, or else the configured device's, and stamped.

The caller holds the state directory's lock (agent.daemon.lock_state_dir).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from agent.journal import Journal
from agent.outbox import Outbox

log = logging.getLogger("fleet_agent")

# The owner recorded by `fleet-agent enroll` for a journal of unknown identity (no device_id,
# and no readable agent.toml saying whose it was): no device id matches it, so it is rebound.
UNKNOWN_OWNER = ""


@dataclass(frozen=True)
class Rebound:
    previous: str  # the device id the state belonged to ("" when unknown)
    device_id: str
    retired_events: int  # outbox events moved to outbox/retired/
    last_seq: int  # the old identity's last directive seq (now 0)


def owner(journal: Journal) -> str | None:
    """The device id the journal was written for; None for a journal older than this record."""
    return journal.data.get("device_id")


def stamp(journal: Journal, device_id: str) -> None:
    """Record `device_id` as the owner of a journal that records none (no other change)."""
    if owner(journal) is None:
        data = journal.snapshot()
        data["device_id"] = device_id
        journal.commit(data, "identity")


def _event_device(payload: str | bytes) -> str | None:
    try:
        value = json.loads(payload).get("device_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def rebind(journal: Journal, outbox: Outbox, device_id: str) -> Rebound | None:
    """Make the journal and outbox `device_id`'s (see the module docstring); None if they were."""
    previous = owner(journal)
    if previous is None:
        # An older agent's journal: the device its last transition's events were made for, if any.
        made_for = [d for e in journal.data.get("last_events") or [] if (d := _event_device(e.get("payload", "")))]
        previous = made_for[-1] if made_for else device_id
        stamp(journal, previous)
    retired = outbox.retire_foreign(device_id)
    if previous == device_id:
        if retired:
            log.warning("retired %d outbox events made for another device id (this is %s)", retired, device_id)
        return None
    data = journal.snapshot()
    old_seq = data.get("last_seq", 0)
    data.update(
        device_id=device_id,
        last_seq=0,
        seqs={},
        seq_floor=0,
        last_outcome=None,
        refused=[],
        timestamp=None,  # the old identity's signed state (agent.trust); the keyring is the fleet's, kept
        waiting={},  # updates parked for a maintenance window: the old identity's directives
        last_events=[e for e in data.get("last_events") or [] if _event_device(e.get("payload", "")) == device_id],
    )
    journal.commit(data, "rebind")
    log.warning(
        "state directory moved from device %s to %s: models kept, directive seq reset (was %d), event numbers "
        "go on from %d, %d undelivered events of the old identity retired to %s",
        previous or "(unknown)", device_id, old_seq, data.get("event_no", 0), retired, outbox.retired_dir,
    )
    return Rebound(previous=previous, device_id=device_id, retired_events=retired, last_seq=old_seq)
