"""The rollout-action catalogue (ota.rollouts.catalogue) is the one place that says which actions
exist, who may run them and in which states: the API routes, the web buttons, the Django admin
actions and fleetctl's subcommands are built from it, and the actions check their states with it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.urls import NoReverseMatch, reverse

from fleetctl.cli import build_parser
from ota.models import Device, Rollout
from ota.rollouts import actions
from ota.rollouts.actions import rollout_act
from ota.rollouts.catalogue import ACTIONS, BY_NAME, actions_available
from ota.rollouts.create import rollout_create
from registry.errors import Conflict
from tests.support import web_data
from tests.support.registry_api import API

pytestmark = pytest.mark.django_db


@pytest.fixture
def created(db):
    web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",))
    Device.objects.bulk_create(
        [Device(id=f"cam-{i}", hardware_id="jetson-orin", labels={"site": "berlin"}, mqtt_username=f"cam-{i}")
         for i in range(3)]
    )
    return rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
        actor="user:x",
    )


def test_it_names_real_states_and_real_functions():
    for entry in ACTIONS:
        assert set(entry.states) <= set(Rollout.State.values), entry.name
        assert callable(getattr(actions, entry.function)), entry.name
        assert set(entry.scopes) <= {"read", "ci", "operator", "admin"}, entry.name
        entry.confirm.format(rollout=1, release="m@1", devices=2, waves=3, wave="w", Wave="W", failed=4)


def test_it_routes_the_api_to_exactly_the_catalogue_actions():
    for entry in ACTIONS:
        assert reverse(f"rollout-{entry.name}", kwargs={"pk": 1}) == f"{API}/rollouts/1/{entry.name}"
    with pytest.raises(NoReverseMatch):
        reverse("rollout-delete", kwargs={"pk": 1})


def test_it_offers_every_catalogue_action_in_the_django_admin():
    from django.contrib import admin

    names = {a.__name__ for a in admin.site._registry[Rollout].actions}
    assert names == {f"{entry.name}_rollouts" for entry in ACTIONS}


def test_it_offers_exactly_the_catalogue_actions_in_fleetctl():
    # fleetctl cannot import the catalogue (the bare install has no server code); its list is
    # held equal to it here, names and help text alike.
    from fleetctl.rollout import ACTIONS as CLI_ACTIONS

    assert CLI_ACTIONS == {entry.name: entry.summary for entry in ACTIONS}
    parser = build_parser()
    rollout = next(a for a in parser._subparsers._group_actions[0].choices["rollout"]._actions
                   if a.dest == "rollout_command")
    assert set(BY_NAME) <= set(rollout.choices)
    for entry in ACTIONS:  # every action takes a reason for the audit log
        assert any(a.dest == "reason" for a in rollout.choices[entry.name]._actions), entry.name


@pytest.mark.parametrize("state", Rollout.State.values)
def test_it_refuses_every_action_outside_its_states_with_a_conflict(created, state):
    Rollout.objects.filter(pk=created.pk).update(state=state)
    for entry in ACTIONS:
        if state in entry.states:
            continue
        with pytest.raises(Conflict) as refused:
            rollout_act(action=entry.name, rollout_id=created.pk, actor="user:x", reason="test")
        assert refused.value.get_codes() == "invalid_state"
        assert f"cannot {entry.verb} rollout {created.pk}: it is {state}" in str(refused.value.detail)


def test_it_shows_the_available_actions_as_buttons(client, created):
    operator = User.objects.create_user("op", password="pw-123456789")
    operator.groups.add(Group.objects.get_or_create(name="operator")[0])
    client.force_login(operator)
    Rollout.objects.filter(pk=created.pk).update(state="paused")

    html = client.get(reverse("web:rollout_live", args=[created.pk])).content.decode()

    shown = [entry.name for entry in ACTIONS if f'value="{entry.name}"' in html or f"/{entry.name}/" in html]
    expected = [a.name for a in actions_available(state="paused", requires_approval=False, approved=False)]
    assert shown == expected == ["resume", "advance", "retry", "abort", "rollback"]


def test_it_refuses_an_admin_action_to_a_staff_user_without_the_role(client, created):
    staff = User.objects.create_user("staff-viewer", password="pw-123456789", is_staff=True)
    staff.groups.add(Group.objects.get_or_create(name="viewer")[0])
    # Django's own model permissions let this user into the changelist; the role is what is missing.
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_rollout", "change_rollout"]))
    client.force_login(staff)

    page = client.post(
        "/admin/ota/rollout/", {"action": "abort_rollouts", "_selected_action": [created.pk]}, follow=True
    ).content.decode()

    entry = BY_NAME["abort"]
    assert f"{entry.label} needs the {' or '.join(entry.scopes)} role." in page
    created.refresh_from_db()
    assert created.state == "created"
