"""Acceptance for the web admin in real headless Chromium against a live server, with the real
broker, Celery worker and beat, `mqtt_ingest`, and devices answering over MQTT."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import Group

from agent.protocol import encode_json
from ota.models import Device, DeviceModelState, Rollout, RolloutDevice
from ota.rollouts.catalogue import BY_NAME
from ota.rollouts.create import rollout_create
from ota.sim.enroll import enroll_simulated_devices
from ota.sim.fleet import FleetSimulator
from tests.support import web_data
from tests.support.browser import TABLET, Browser, chromium_available, login, screenshot
from tests.support.waiting import wait_for

OLD_HEALTH = {"error_rate": 0.04, "latency_ms_p95": 38.0}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not chromium_available(), reason="chromium is not installed (scripts/bootstrap.sh --test)"),
]


def enroll(count, *, labels, hardware="jetson-orin", running=None, prefix="sim"):
    """Devices enrolled through ota.fleet.enrollment with their own broker credentials (the simulator's
    path); `running` is the release they already run, as their last reports left it."""
    web_data.hardware(hardware)
    creds = enroll_simulated_devices(count=count, hardware=hardware, labels=labels, name_prefix=prefix)
    if running is not None:
        sha = running.artifacts.get(hardware_id=hardware).sha256
        DeviceModelState.objects.bulk_create([
            DeviceModelState(device_id=c.device_id, model=running.model, active_version=running, active_sha256=sha)
            for c in creds
        ])
    return creds


def report_health(sim, device_ids, model: str, sha: str, health: dict) -> None:
    """Telemetry as the agent sends it (active model sha and its trial health), over each
    simulated device's own connection."""
    for device in sim.devices:
        if device.id in device_ids:
            payload = encode_json({
                "_type": "telemetry", "device_id": device.id, "ts": "2026-01-01T00:00:00Z", "cpu_percent": 12.5,
                "memory_percent": 40.0, "disk_percent": 55.0, "active": {model: sha}, "health": health,
            })
            device.client.publish(device.t_telemetry, payload, qos=1)


def fits_tablet(page, url: str) -> None:
    """The page does not scroll sideways (wide tables scroll inside their card). Charts resize on
    their ResizeObserver's next turn, so the layout gets a moment to settle."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("() => document.documentElement.scrollWidth <= window.innerWidth + 1", timeout=5_000)
    except PlaywrightTimeout:
        widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
            .slice(0, 5).map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className)""")
        raise AssertionError(f"{url} is {widths[0]} px wide at {widths[1]} px; too wide: {wide}") from None


@pytest.fixture
def platform(server_platform):
    return server_platform


@pytest.fixture
def simulate(platform):
    """Runs the fleet simulator (one thread, a real MQTT connection per device) for the test."""
    started = []

    def start(creds):
        sim = FleetSimulator.from_settings(creds, step_seconds=0.15).start()
        started.append(sim)
        sim.wait_connected(timeout=30)
        ids = [c.device_id for c in creds]
        wait_for(lambda: Device.objects.filter(pk__in=ids, online=True).count() == len(ids), timeout=30,
                 what="presence", interval=0.2, diagnostics=platform.logs)
        return sim

    yield start
    for sim in started:
        sim.stop()


def live_state(page) -> tuple[str, int]:
    live = page.locator("#live")
    return live.get_attribute("data-state"), int(live.get_attribute("data-percent"))


def click_action(page, browser, action: str) -> str:
    before = len(browser.dialogs)
    page.click(f'button[data-action="{action}"]')
    page.wait_for_function("() => !document.querySelector('#live.htmx-request')")
    assert len(browser.dialogs) == before + 1, "every action asks for confirmation"
    return browser.dialogs[-1]


def test_it_lets_an_operator_create_start_and_watch_a_rollout_reach_100_percent_without_reloading(
    live_server, operator, platform, simulate
):
    old = web_data.released("detector", "1.0.0", hardware_ids=("jetson-orin",))
    new = web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",), scale=3.0)
    berlin = enroll(12, labels={"site": "berlin"}, running=old, prefix="ber")
    pis = enroll(3, hardware="rpi5", labels={"site": "berlin"}, prefix="pi")
    munich = enroll(3, labels={"site": "munich"}, running=old, prefix="muc")
    sim = simulate(berlin + pis + munich)
    old_sha = old.artifacts.get().sha256
    report_health(sim, {c.device_id for c in berlin + munich}, "detector", old_sha, OLD_HEALTH)
    wait_for(lambda: Device.objects.filter(last_telemetry__health=OLD_HEALTH).count() == 15, timeout=30,
             what="telemetry", interval=0.2, diagnostics=platform.logs)

    with Browser(base_url=live_server.url) as browser:
        page = browser.new_page()
        login(page, "olivia-operator", "olivia-operator-password-123")
        page.wait_for_selector("#fleet-totals canvas, #fleet-totals")
        assert page.locator("[data-online]").inner_text() == "18"

        page.click("text=Rollouts")
        page.click("#new-rollout")
        page.fill("#id_target_labels", "site=berlin")
        page.wait_for_function("() => document.querySelector('#preview').textContent.includes('Pick a released version')")
        page.select_option("#id_release", label="detector @ 2.0.0")  # the preview follows any field's change
        page.select_option("#id_template", "canary 2 → 25% → 100%")
        page.fill("#id_soak_seconds", "2")
        page.fill("#id_rate_per_minute", "")
        page.fill("#id_name", "berlin cameras")
        page.wait_for_selector("#preview [data-matched]")
        page.wait_for_function("() => document.querySelector('#preview [data-matched]').textContent === '15'")
        assert page.locator("#preview [data-incompatible]").inner_text() == "3"
        assert "canary: 2 devices → 2" in page.locator("#preview").inner_text()
        screenshot(page, "wizard")

        page.click("#review-button")
        page.wait_for_selector("#review")
        assert "12 compatible" in page.locator("#review").inner_text()
        page.click("#create-button")
        page.wait_for_selector("#live")
        rollout = Rollout.objects.get()
        assert page.url.endswith(f"/rollouts/{rollout.pk}/")
        assert (rollout.name, rollout.release_id) == ("berlin cameras", new.pk)

        page.evaluate("window.__noReloadMarker = 'still-here'")
        text = click_action(page, browser, "start")
        assert text.startswith(f"Start rollout #{rollout.pk}? detector@2.0.0 goes to 12 devices in 3 waves")

        # Progress arrives by htmx polling alone: catch it part-way, then at 100 %.
        page.wait_for_function(
            "() => { const l = document.querySelector('#live');"
            " return l.dataset.state === 'running' && +l.dataset.percent > 0 && +l.dataset.percent < 100; }",
            timeout=60_000,
        )
        screenshot(page, "rollout-running")
        page.wait_for_function(
            "() => { const l = document.querySelector('#live');"
            " return l.dataset.state === 'completed' && l.dataset.percent === '100'; }",
            timeout=90_000,
        )
        assert page.evaluate("window.__noReloadMarker") == "still-here", "the page was reloaded"
        assert page.locator('#waves [data-state="healthy"] [data-count]').all_inner_texts() == ["2", "1", "9"]
        # The simulator reports its trial health (p95 4.2 ms) with each commit. Every targeted device
        # is on the new release now, so devices outside the rollout stand in for the old one.
        health = page.locator("#health").inner_text()
        assert "latency p95 (ms): previous 38.0 (3 devices) · new 4.2 (12 devices)" in health, health
        assert page.locator("#health canvas").count() == 2
        assert "rollout.complete" in page.locator("#rollout-audit").inner_text()
        screenshot(page, "rollout-completed")

        # Tablet width: the same page stays usable (no horizontal scrolling of the whole page).
        page.set_viewport_size(TABLET)
        # Charts resize on their ResizeObserver's next turn, so give the layout a moment to settle.
        page.wait_for_function("() => document.documentElement.scrollWidth <= window.innerWidth + 1", timeout=5_000)
        screenshot(page, "rollout-tablet")
        # The operator's other pages at tablet width: the wizard, a device's timeline, the audit log.
        for url in ("/rollouts/new/", f"/devices/{berlin[0].device_id}/", "/audit/"):
            page.goto(url)
            fits_tablet(page, url)
    assert RolloutDevice.objects.filter(rollout=rollout, state="committed").count() == 12


def test_it_pauses_and_resumes_one_rollout_and_aborts_another_with_revert(
    live_server, operator, platform, simulate
):
    old = web_data.released("detector", "1.0.0", hardware_ids=("jetson-orin",))
    web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",), scale=3.0)
    berlin = enroll(6, labels={"site": "berlin"}, running=old, prefix="ber")
    paris = enroll(6, labels={"site": "paris"}, running=old, prefix="par")
    slow_canary = {"success": {"min_healthy_percent": 100}, "soak_seconds": 3}
    first = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "berlin"}},
        waves=[{"name": "canary", "count": 2}, {"percent": 100}], gates=slow_canary, actor="user:setup",
    )
    second = rollout_create(
        model="detector", version="2.0.0", target={"labels": {"site": "paris"}},
        waves=[{"name": "canary", "count": 2}, {"percent": 100}], gates={**slow_canary, "soak_seconds": 600},
        actor="user:setup",
    )

    simulate(berlin + paris)
    with Browser(base_url=live_server.url) as browser:
        page = browser.new_page()
        login(page, "olivia-operator", "olivia-operator-password-123")

        page.goto(f"/rollouts/{first.pk}/")
        click_action(page, browser, "start")
        page.wait_for_selector('#live[data-state="running"]')
        text = click_action(page, browser, "pause")
        assert "No new directives go out until it is resumed" in text
        page.wait_for_selector('#live[data-state="paused"]')
        time.sleep(4)  # longer than the canary soak: a paused rollout must not move on
        assert Rollout.objects.get(pk=first.pk).current_wave == 0
        assert not RolloutDevice.objects.filter(rollout=first, wave__index=1).exclude(state="planned").exists()
        click_action(page, browser, "resume")
        page.wait_for_function(
            "() => { const l = document.querySelector('#live');"
            " return l.dataset.state === 'completed' && l.dataset.percent === '100'; }",
            timeout=60_000,
        )

        page.goto(f"/rollouts/{second.pk}/")
        click_action(page, browser, "start")
        # The canary commits, then soaks for ten minutes: abort and revert it from the page.
        page.wait_for_function("() => document.querySelector('#live').dataset.percent === '33'", timeout=60_000)
        overview = browser.new_page()  # a second tab: the rollout page itself is never navigated
        overview.goto("/")
        overview.wait_for_selector(f'a[href="/rollouts/{second.pk}/"]')
        screenshot(overview, "overview")
        overview.close()
        canary = list(RolloutDevice.objects.filter(rollout=second, state="committed").values_list("device_id", flat=True))
        assert len(canary) == 2 and set(canary) <= {c.device_id for c in paris}
        text = click_action(page, browser, "rollback")
        assert "gets a new directive back to the release it ran before" in text
        page.wait_for_selector('#live[data-state="rolled_back"]')
        page.wait_for_function(
            "() => document.querySelector('#live [data-state=\"rolled_back\"] [data-count]').textContent === '2'",
            timeout=60_000,
        )
        assert "rollout.rollback" in page.locator("#rollout-audit").inner_text()
    assert set(
        RolloutDevice.objects.filter(rollout=second, device_id__in=canary).values_list("state", flat=True)
    ) == {"reverted"}
    assert set(DeviceModelState.objects.filter(device_id__in=canary).values_list("active_version_id", flat=True)) == {old.pk}
    assert RolloutDevice.objects.filter(rollout=second, state="skipped").count() == 4


def test_it_shows_a_viewer_no_action_buttons_and_refuses_a_forged_post(live_server, viewer):
    web_data.released("detector", "2.0.0")
    web_data.hardware("jetson-orin")
    Device.objects.bulk_create(
        [Device(id=f"cam-{i}", hardware_id="jetson-orin", labels={"site": "berlin"}, mqtt_username=f"cam-{i}") for i in range(4)]
    )
    rollout = rollout_create(
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
            roles = " or ".join(f"&#x27;{scope}&#x27;" for scope in BY_NAME[action].scopes)
            assert f"needs the {roles} role" in response.text(), response.text()[:300]
        # Read pages stay usable at tablet width: wide tables scroll inside their card, not the page.
        page.set_viewport_size(TABLET)
        for url in ("/", "/devices/", "/devices/cam-0/", "/registry/", "/registry/detector/",
                    "/registry/detector/versions/2.0.0/", "/rollouts/", f"/rollouts/{rollout.pk}/", "/audit/"):
            page.goto(url)
            fits_tablet(page, url)

        response = page.request.post(
            "/registry/detector/aliases/", form={"csrfmiddlewaretoken": csrf, "alias": "prod", "version": "2.0.0"},
            headers={"Referer": live_server.url + "/"},
        )
        assert response.status == 403 and "role" in response.text()
    rollout.refresh_from_db()
    assert rollout.state == "created"


def test_it_locks_out_guessed_passwords_keeps_cookies_httponly_and_runs_every_page_under_the_csp(
    live_server, settings, django_user_model
):
    settings.AXES_FAILURE_LIMIT = 3
    django_user_model.objects.create_user("mallory-target", password="the-right-password-123")
    admin = django_user_model.objects.create_superuser("ada-admin", "ada@example.com", "ada-admin-password-123")
    admin.groups.add(Group.objects.get_or_create(name="admin")[0])
    web_data.released("detector", "2.0.0")

    with Browser(base_url=live_server.url) as browser:
        page = browser.new_page()
        violations: list[str] = []
        page.on("console", lambda m: "Content Security Policy" in m.text and violations.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: violations.append(f"{page.url}: {e}"))

        # Three wrong passwords, then the right one is refused with the lockout message.
        page.goto("/login/")
        for attempt in range(3):
            page.fill("#id_username", "mallory-target")
            page.fill("#id_password", f"guess-{attempt}")
            page.click("button[type=submit]")
            page.wait_for_load_state()
        page.fill("#id_username", "mallory-target")
        page.fill("#id_password", "the-right-password-123")
        with page.expect_response(lambda r: r.url.endswith("/login/") and r.request.method == "POST") as answer:
            page.click("button[type=submit]")
        assert answer.value.status == 429
        assert "signing in is locked for 15 minutes" in page.locator("#locked-out").inner_text()
        assert not any(c["name"] == "sessionid" for c in browser.context.cookies())

        login(page, "ada-admin", "ada-admin-password-123")
        cookies = {c["name"]: c for c in browser.context.cookies()}
        for name in ("sessionid", "csrftoken"):
            assert cookies[name]["httpOnly"] and cookies[name]["sameSite"] == "Lax", cookies[name]
        assert page.evaluate("() => document.cookie") == ""  # neither is readable from script

        # The policy is enforced: a script injected inline does not run, and says so in the console.
        assert page.evaluate("""() => { const s = document.createElement('script');
            s.textContent = 'window.injected = 1'; document.head.appendChild(s); return window.injected; }""") is None
        page.wait_for_timeout(100)
        assert any("inline script" in v for v in violations), violations
        violations.clear()

        for url in ("/", "/devices/", "/rollouts/", "/registry/", "/registry/detector/", "/audit/", "/access/",
                    "/admin/", "/admin/registry/apitoken/", f"/admin/auth/user/{admin.pk}/change/"):
            response = page.goto(url)
            assert response.status == 200, url
            assert "script-src 'self'" in response.headers["content-security-policy"], url
            page.wait_for_load_state("load")
        # The wizard's template picker (a script file now, no inline handler) still fills the waves.
        page.goto("/rollouts/new/")
        page.select_option("#id_template", index=1)
        assert page.input_value("#id_waves") != ""
        # The Swagger UI renders from its split-out init script, and loads the schema.
        page.goto("/api/docs/")
        page.wait_for_selector(".swagger-ui .opblock-tag", timeout=15_000)
        page.wait_for_timeout(200)
    assert violations == []


def test_it_charts_a_devices_model_metrics_with_its_release_change_under_the_csp(live_server, viewer):
    from datetime import timedelta

    from django.utils import timezone

    from ota.models import ActiveRelease
    from tests.support.model_metrics import ingest, metrics_message

    old = web_data.released("detector", "1.0.0", hardware_ids=("jetson-orin",))
    new = web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",), scale=3.0)
    old_sha, new_sha = old.artifacts.get().sha256, new.artifacts.get().sha256
    Device.objects.create(id="cam-0", hardware_id="jetson-orin", labels={"site": "berlin"},
                          mqtt_username="cam-0")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    ingest([
        metrics_message("cam-0", sha, latency_ms=ms, requests=120, errors=e, at=hour - timedelta(hours=ago))
        for sha, ms, e, ago in ((old_sha, 20, 1, 3), (new_sha, 30, 3, 2), (new_sha, 30, 2, 1))
    ])
    ActiveRelease.objects.create(device_id="cam-0", model=new.model, version=new, sha256=new_sha,
                                 from_time=hour - timedelta(hours=2))

    with Browser(base_url=live_server.url) as browser:
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: "Content Security Policy" in m.text and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        login(page, "victor-viewer", "victor-viewer-password-123")
        page.goto("/devices/cam-0/")
        page.wait_for_function("""() => ['metrics-latency-detector', 'metrics-traffic-detector'].every(id =>
            Chart.getChart(document.querySelector(`canvas[data-chart="${id}"]`)))""", timeout=10_000)
        latency = page.evaluate("""() => { const c = Chart.getChart(document.querySelector(
            'canvas[data-chart="metrics-latency-detector"]'));
            return {labels: c.data.labels, sets: c.data.datasets.map(d => d.label),
                    drawn: c.chartArea.width > 0}; }""")
        assert latency["drawn"]
        assert latency["sets"] == ["p95 · 1.0.0", "p50 · 1.0.0", "p95 · 2.0.0", "p50 · 2.0.0"]
        assert latency["labels"][1][1] == "▶ 2.0.0"
        page.locator(".model-metrics details").evaluate("d => d.open = true")
        screenshot(page, "device-model-metrics")
        page.set_viewport_size(TABLET)
        fits_tablet(page, "/devices/cam-0/")
    assert problems == []


def test_it_charts_a_running_waves_new_vs_control_figures_under_the_csp(live_server, viewer):
    """The rollout page's control-group panel and charts in the browser. The wave's state is set
    directly (no broker here); tests/test_web_rollouts.py drives the same through the engine."""
    import random

    from django.utils import timezone

    from ota.models import Wave
    from tests.support.model_metrics import ingest, metrics_message

    old = web_data.released("detector", "1.0.0", hardware_ids=("jetson-orin",))
    new = web_data.released("detector", "2.0.0", hardware_ids=("jetson-orin",), scale=3.0)
    old_sha, new_sha = old.artifacts.get().sha256, new.artifacts.get().sha256
    ids = [f"cam-{i}" for i in range(8)]
    Device.objects.bulk_create([
        Device(id=d, hardware_id="jetson-orin", labels={"site": "berlin"}, mqtt_username=d, online=True)
        for d in ids])
    DeviceModelState.objects.bulk_create([DeviceModelState(device_id=d, model=old.model, active_version=old,
                                                           active_sha256=old_sha) for d in ids[3:]])
    rollout = rollout_create(model="detector", version="2.0.0", target={"labels": {"site": "berlin"}},
                             waves=[{"devices": ids[:3]}, {"percent": 100}], actor="user:x")
    now = timezone.now()
    Rollout.objects.filter(pk=rollout.pk).update(state="running", started_at=now)
    Wave.objects.filter(rollout=rollout, index=0).update(state="soaking", started_at=now, gate_met_at=now)
    RolloutDevice.objects.filter(rollout=rollout, wave__index=0).update(state="committed")
    rng = random.Random(3)
    ingest([metrics_message(d, old_sha, latency_ms=20, requests=150, errors=1, rng=rng) for d in ids[3:]]
           + [metrics_message(d, new_sha, latency_ms=20, requests=150, errors=1, rng=rng) for d in ids[:3]])

    with Browser(base_url=live_server.url) as browser:
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: "Content Security Policy" in m.text and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        login(page, "victor-viewer", "victor-viewer-password-123")
        page.goto(f"/rollouts/{rollout.pk}/")
        page.wait_for_function("""() => ['control-latency-0', 'control-shares-0'].every(id =>
            Chart.getChart(document.querySelector(`canvas[data-chart="${id}"]`)))""", timeout=10_000)
        panel = page.locator('[data-wave="0"] .control-gate')
        assert panel.get_attribute("data-control") == "live" and panel.get_attribute("data-verdict") == "pass"
        devices = page.locator('[data-wave="0"] tr[data-figure="devices"] td').all_inner_texts()
        assert devices[1:3] == ["3", "5"]
        page.wait_for_timeout(2_500)  # one htmx refresh: the charts are drawn again, still no violation
        assert page.evaluate("() => !!Chart.getChart(document.querySelector("
                             "'canvas[data-chart=control-latency-0]'))")
        screenshot(page, "rollout-control-group")
        page.set_viewport_size(TABLET)
        fits_tablet(page, f"/rollouts/{rollout.pk}/")
    assert problems == []
