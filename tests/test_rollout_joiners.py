"""Late joiners: a device that starts matching a running rollout's target (enrolled, relabelled)
is taken into the wave in progress or a catch-up wave; a rollout that follows its target keeps
doing so after it completed. Each join is audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from ota.models import Device, Rollout, RolloutDevice, Wave
from ota.rollouts.actions import rollout_start
from ota.rollouts.create import rollout_create
from ota.rollouts.engine import rollout_evaluate
from ota.rollouts.joiners import JOIN_CHECK_SECONDS, rollout_take_in_joiners, rollouts_taking_joiners
from registry.models import AuditEntry
from tests.support.rollout_data import make_devices, release

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(client, admin_token, django_capture_on_commit_callbacks, mosquitto, settings):
    settings.MQTT_PORT, settings.MQTT_USERNAME = mosquitto.port, ""
    release(client, admin_token, "detector", "1.0")
    make_devices(4, labels={"site": "berlin"})
    return django_capture_on_commit_callbacks


def later(seconds=JOIN_CHECK_SECONDS + 1):
    return timezone.now() + timedelta(seconds=seconds)


def commit_all(rollout):
    RolloutDevice.objects.filter(rollout=rollout, state="directed").update(state="committed")


def test_it_takes_a_device_enrolled_mid_rollout_into_the_wave_in_progress(fleet):
    with fleet(execute=True):
        rollout = rollout_create(model="detector", version="1.0", target={"labels": {"site": "berlin"}},
                                 waves=[{"percent": 100}], actor="user:x")
        rollout_start(rollout_id=rollout.pk, actor="user:x")
        rollout_evaluate(rollout_id=rollout.pk)
        make_devices(2, labels={"site": "berlin"}, prefix="new")
        make_devices(1, labels={"site": "paris"}, prefix="elsewhere")

        assert rollout_take_in_joiners(rollout_id=rollout.pk, now=later()) == 2
        assert rollout_take_in_joiners(rollout_id=rollout.pk, now=later()) == 0  # checked just now
        rollout_evaluate(rollout_id=rollout.pk)

    joined = RolloutDevice.objects.filter(rollout=rollout, device__id__startswith="new")
    assert {a.state for a in joined} == {"directed"} and {a.wave.index for a in joined} == {0}
    assert Wave.objects.get(rollout=rollout, index=0).size == 6
    entry = AuditEntry.objects.get(object_id=str(rollout.pk), action="rollout.join")
    assert entry.reason == "2 devices started matching the target and joined wave 1."


def test_it_adds_a_catch_up_wave_for_a_relabelled_device_after_the_last_wave_and_follows_the_target(fleet):
    with fleet(execute=True):
        rollout = rollout_create(model="detector", version="1.0", target={"labels": {"site": "berlin"}},
                                 waves=[{"percent": 100}], follow_target=True, actor="user:x")
        rollout_start(rollout_id=rollout.pk, actor="user:x")
        rollout_evaluate(rollout_id=rollout.pk)
        commit_all(rollout)
        rollout_evaluate(rollout_id=rollout.pk)
        rollout.refresh_from_db()
        assert rollout.state == "completed" and rollout.pk in rollouts_taking_joiners()

        make_devices(1, labels={"site": "paris"}, prefix="moved")
        Device.objects.filter(pk="moved-0000").update(labels={"site": "berlin"})  # relabelled
        assert rollout_take_in_joiners(rollout_id=rollout.pk, now=later()) == 1
        rollout.refresh_from_db()
        assert rollout.state == "running"
        rollout_evaluate(rollout_id=rollout.pk)
        catch_up = Wave.objects.get(rollout=rollout, index=1)
        assert catch_up.spec["name"] == "catch-up" and catch_up.size == 1
        assert RolloutDevice.objects.get(rollout=rollout, device_id="moved-0000").state == "directed"
        commit_all(rollout)
        rollout_evaluate(rollout_id=rollout.pk)

    rollout.refresh_from_db()
    assert rollout.state == "completed"
    actions = list(AuditEntry.objects.filter(object_id=str(rollout.pk)).order_by("id").values_list("action", flat=True))
    joined_at = actions.index("rollout.join")
    assert actions[joined_at - 1] == "wave.add" and actions.count("rollout.complete") == 2
    assert actions[-1] == "rollout.complete"


def test_it_leaves_a_completed_rollout_alone_unless_it_follows_its_target(fleet):
    with fleet(execute=True):
        rollout = rollout_create(model="detector", version="1.0", target={"labels": {"site": "berlin"}},
                                 waves=[{"percent": 100}], actor="user:x")
        rollout_start(rollout_id=rollout.pk, actor="user:x")
        rollout_evaluate(rollout_id=rollout.pk)
        commit_all(rollout)
        rollout_evaluate(rollout_id=rollout.pk)
        make_devices(1, labels={"site": "berlin"}, prefix="late")
        assert rollout.pk not in rollouts_taking_joiners()
        assert rollout_take_in_joiners(rollout_id=rollout.pk, now=later()) == 0
    assert Rollout.objects.get(pk=rollout.pk).state == "completed"


def test_it_takes_in_a_device_enrolled_just_before_the_last_wave_passes(fleet):
    with fleet(execute=True):
        rollout = rollout_create(model="detector", version="1.0", target={"labels": {"site": "berlin"}},
                                 waves=[{"percent": 100}], actor="user:x")
        rollout_start(rollout_id=rollout.pk, actor="user:x")
        rollout_evaluate(rollout_id=rollout.pk)
        assert rollout_take_in_joiners(rollout_id=rollout.pk) == 0  # the periodic check just ran
        make_devices(1, labels={"site": "berlin"}, prefix="new")
        commit_all(rollout)
        # The last wave passes before the next periodic check: the device joins a catch-up
        # wave instead of being left out by completion.
        rollout_evaluate(rollout_id=rollout.pk)
        assert Rollout.objects.get(pk=rollout.pk).state == "running"
        commit_all(rollout)
        rollout_evaluate(rollout_id=rollout.pk)

    joined = RolloutDevice.objects.get(rollout=rollout, device_id="new-0000")
    assert (joined.state, joined.wave.index, joined.wave.spec["name"]) == ("committed", 1, "catch-up")
    assert Rollout.objects.get(pk=rollout.pk).state == "completed"
