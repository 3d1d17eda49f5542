"""Acceptance for the web admin in real headless Chromium against a live server, with the real
broker, Celery worker and beat, `mqtt_ingest`, and devices answering over MQTT."""

from __future__ import annotations

import re
import time

import pytest

from ota import actions
from ota.models import Rollout
from tests.support import web_data
from tests.support.browser import Browser, chromium_available, login, screenshot

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not chromium_available(), reason="chromium is not installed (scripts/bootstrap.sh --test)"),
]


def make_devices(count, *, hardware="jetson-orin", labels=None, prefix="cam"):
    from ota.models import Device

    web_data.hardware(hardware)
    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    Device.objects.bulk_create(
        [Device(id=i, hardware_id=hardware, labels=dict(labels or {}), mqtt_username=i, online=True) for i in ids]
    )
    return ids


def test_it_shows_a_viewer_no_action_buttons_and_refuses_a_forged_post(live_server, viewer):
    web_data.released("detector", "2.0.0")
    make_devices(4, labels={"site": "berlin"})
    rollout = actions.rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
        actor="user:x",
    )
    with Browser(base_url=live_server.url) as browser:
        page = browser.new_page()
        login(page, "victor-viewer", "victor-viewer-password-123")
        page.goto(f"/rollouts/{rollout.pk}/")
        page.wait_for_selector("#waves")
        assert page.locator("[data-action]").count() == 0
        assert page.locator("#rollout-actions").count() == 0
        page.goto("/rollouts/")
        assert page.locator("#new-rollout").count() == 0

        csrf = next(c["value"] for c in browser.context.cookies() if c["name"] == "csrftoken")
        for action in ("start", "abort", "rollback"):
            response = page.request.post(
                f"/rollouts/{rollout.pk}/{action}/",
                form={"csrfmiddlewaretoken": csrf},
                headers={"Referer": f"{live_server.url}/rollouts/{rollout.pk}/"},
            )
            # 403 from the role check, not from CSRF: the token is valid.
            assert response.status == 403, (action, response.status)
            assert "needs the &#x27;operator&#x27; role" in response.text(), response.text()[:300]
        response = page.request.post(
            f"/registry/detector/aliases/", form={"csrfmiddlewaretoken": csrf, "alias": "prod", "version": "2.0.0"},
            headers={"Referer": live_server.url + "/"},
        )
        assert response.status == 403 and "role" in response.text()
    rollout.refresh_from_db()
    assert rollout.state == "created"
