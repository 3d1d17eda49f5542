"""Web admin registry pages: models, versions with artifacts, hashes, signatures, provenance and
metadata, the health contract summarised (the whole contract is a download), the rollouts a version
was in and how many devices run it; releasing, deprecating and revoking a version and moving an
alias go through registry.releases and registry.aliases with the API's role checks."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth.models import Group, User
from django.urls import reverse

from registry.models import AliasMove, AuditEntry, ModelVersion
from tests.support import web_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_user(db):
    user = User.objects.create_user("ada-admin", password="x")
    user.groups.add(Group.objects.get_or_create(name="admin")[0])
    return user


def test_it_shows_versions_artifacts_hashes_signature_and_provenance(client, viewer):
    mv = web_data.released("detector", "1.0.0", hardware_ids=("jetson-orin", "rpi5"))
    client.force_login(viewer)

    models_page = client.get(reverse("web:models")).content.decode()
    assert "detector" in models_page

    model_page = client.get(reverse("web:model", args=["detector"])).content.decode()
    assert "1.0.0" in model_page and "released" in model_page

    page = client.get(reverse("web:version", args=["detector", "1.0.0"])).content.decode()
    for artifact in mv.artifacts.all():
        assert artifact.sha256 in page
        assert artifact.hardware_id in page
    assert mv.manifest_sha256 in page
    assert mv.envelope["signatures"][0]["keyid"] in page
    assert "0123456789abcdef0123456789abcdef01234567" in page  # git sha
    assert "https://ci.example/run/7" in page


def test_it_releases_a_draft_for_an_operator(client, operator):
    web_data.draft("detector", "2.0.0")
    client.force_login(operator)
    page = client.get(reverse("web:version", args=["detector", "2.0.0"])).content.decode()
    assert 'id="release-form"' in page

    response = client.post(reverse("web:version_release", args=["detector", "2.0.0"]), follow=True)

    mv = ModelVersion.objects.get(version="2.0.0")
    assert mv.state == "released" and mv.envelope
    assert mv.released_by == "user:olivia-operator"
    assert "Released detector@2.0.0" in response.content.decode()
    assert AuditEntry.objects.filter(action="version.release", actor="user:olivia-operator").exists()
    # The version page lists what the release action wrote (one audit writer and reader).
    history = response.content.decode().split('class="timeline"')[1]
    assert "<span>version.release</span><span>user:olivia-operator" in history


def test_it_reports_why_a_draft_could_not_be_released(client, operator):
    web_data.hardware("jetson-orin")
    from registry.versions import model_create, version_create

    model = model_create(name="empty", actor="user:t")
    version_create(model=model, version="0.1.0", actor="user:t")
    client.force_login(operator)

    response = client.post(reverse("web:version_release", args=["empty", "0.1.0"]), follow=True)

    assert "Not released:" in response.content.decode()
    assert "has no artifacts" in response.content.decode()
    assert ModelVersion.objects.get(version="0.1.0").state == "draft"


def test_it_moves_an_alias_and_keeps_its_history(client, operator):
    web_data.released("detector", "1.0.0")
    web_data.released("detector", "1.1.0", scale=3.0)
    client.force_login(operator)
    url = reverse("web:alias_move", args=["detector"])

    client.post(url, {"alias": "production", "version": "1.0.0"})
    response = client.post(url, {"alias": "production", "version": "1.1.0"}, follow=True)

    moves = list(AliasMove.objects.order_by("moved_at", "id").values_list("from_version__version", "to_version__version"))
    assert moves == [(None, "1.0.0"), ("1.0.0", "1.1.0")]
    html = response.content.decode()
    assert "Alias production now points at 1.1.0." in html
    assert 'id="alias-history"' in html and html.count("olivia-operator") >= 2


def test_it_shows_alias_errors_next_to_the_field(client, operator):
    web_data.released("detector", "1.0.0")
    web_data.draft("detector", "1.1.0")
    client.force_login(operator)
    url = reverse("web:alias_move", args=["detector"])

    response = client.post(url, {"alias": "not a slug!", "version": "1.1.0"})

    assert response.status_code == 400
    html = response.content.decode()
    # The draft is not offered, so choosing it is a field error, as is the bad alias name.
    assert "Select a valid choice. 1.1.0 is not one of the available choices." in html
    assert "Enter a valid “slug”" in html
    assert not AliasMove.objects.exists()


def test_it_refuses_alias_moves_and_releases_to_a_viewer(client, viewer):
    web_data.released("detector", "1.0.0")
    web_data.draft("detector", "1.1.0")
    client.force_login(viewer)

    page = client.get(reverse("web:model", args=["detector"])).content.decode()
    assert 'id="alias-move"' not in page
    assert 'id="release-form"' not in client.get(reverse("web:version", args=["detector", "1.1.0"])).content.decode()

    assert client.post(reverse("web:alias_move", args=["detector"]), {"alias": "p", "version": "1.0.0"}).status_code == 403
    assert client.post(reverse("web:version_release", args=["detector", "1.1.0"])).status_code == 403
    assert not AliasMove.objects.exists()
    assert ModelVersion.objects.get(version="1.1.0").state == "draft"


def big_contract(values: int = 2000) -> dict:
    """A real-sized health contract: thousands of golden floats (within the registry's size limit)."""
    return {
        "inputs": {"images": {"dtype": "float32", "shape": [1, values], "data": [0.25] * values}},
        "outputs": {"logits": {"dtype": "float32", "shape": [1, values], "data": [0.75] * values}},
        "atol": 0.001,
        "rtol": 0.01,
        "latency_budget_ms": 40,
    }


def test_it_summarises_a_large_health_contract_and_offers_it_whole_as_a_download(client, viewer):
    from registry.versions import model_create, version_create

    model = model_create(name="segmenter", actor="user:t")
    mv = version_create(model=model, version="3.1.0", actor="user:t", health=big_contract())
    web_data.draft("detector", "1.0.0")  # its contract has only a latency budget
    client.force_login(viewer)

    html = client.get(reverse("web:version", args=["segmenter", "3.1.0"])).content.decode()

    # Not one golden value on the page: 4,000 floats were 4,000 lines (12,766 px) before.
    assert "0.25" not in html and "0.75" not in html
    assert len(html) < 20_000, len(html)
    contract = html.split('id="health-contract"')[1].split("</section>")[0]
    assert re.search(r'data-tensor="input"><td>input</td><td class="mono">images</td><td>float32</td><td>1 × 2000</td><td>2000</td>', contract)
    assert re.search(r'data-tensor="output"><td>output</td><td class="mono">logits</td><td>float32</td><td>1 × 2000</td><td>2000</td>', contract)
    assert "<dt>atol</dt><dd>0.001</dd>" in contract and "<dt>rtol</dt><dd>0.01</dd>" in contract
    assert "<dt>Latency budget</dt><dd>40 ms</dd>" in contract

    link = re.search(r'<a href="([^"]+)" download id="health-download">', contract).group(1)
    assert link == reverse("web:version_health", args=["segmenter", "3.1.0"])
    download = client.get(link)
    assert download.status_code == 200 and download["Content-Type"] == "application/json"
    assert download["Content-Disposition"] == 'attachment; filename="segmenter-3.1.0-health.json"'
    assert json.loads(download.content) == mv.health == big_contract()

    small = client.get(reverse("web:version", args=["detector", "1.0.0"])).content.decode()
    assert "<dt>Latency budget</dt><dd>50 ms</dd>" in small and "No golden inputs or outputs." in small
    assert "<dt>atol</dt><dd>not set (the agent's default)</dd>" in small

    model_create(name="bare", actor="user:t")
    version_create(model=model.__class__.objects.get(name="bare"), version="0.1.0", actor="user:t")
    assert "No health contract" in client.get(reverse("web:version", args=["bare", "0.1.0"])).content.decode()
    assert client.get(reverse("web:version_health", args=["bare", "0.1.0"])).status_code == 404
    client.logout()
    assert client.get(link).status_code == 302  # to the login page: the contract is for readers


def test_it_shows_a_versions_metadata_metrics_and_provenance(client, viewer):
    from registry.versions import model_create, version_create

    model = model_create(name="segmenter", actor="user:t")
    version_create(
        model=model, version="3.1.0", actor="user:t",
        metadata={"dataset": "coco-2017-val", "input_size": [640, 640], "notes": "x" * 5000},
        metrics={"mAP50": 0.713},
        provenance={"git_sha": "feedface" * 5, "ci_run_url": "https://ci.example/run/9", "training_run_id": "mlflow-run-42"},
    )
    client.force_login(viewer)

    html = client.get(reverse("web:version", args=["segmenter", "3.1.0"])).content.decode()

    metadata = html.split('id="version-metadata"')[1].split("</section>")[0]
    assert '<dt class="mono">dataset</dt><dd>coco-2017-val</dd>' in metadata
    assert '<dt class="mono">input_size</dt><dd>[640, 640]</dd>' in metadata
    assert "x" * 159 + "…" in metadata and "x" * 161 not in metadata  # a long value is cut, not dumped
    assert '<dt class="mono">mAP50</dt><dd>0.713</dd>' in html.split('id="version-metrics"')[1]
    assert "feedface" * 5 in html and "https://ci.example/run/9" in html and "mlflow-run-42" in html


def test_it_lists_the_rollouts_of_a_version_marks_the_failed_ones_and_counts_devices_running_it(client, viewer):
    from ota.models import Device, DeviceModelState, RolloutDevice
    from ota.rollouts.actions import rollout_act
    from ota.rollouts.create import rollout_create
    from ota.rollouts.engine import rollout_evaluate

    mv = web_data.released("detector", "1.0.0")
    berlin = [f"ber-{i}" for i in range(10)]
    paris = [f"par-{i}" for i in range(4)]
    Device.objects.bulk_create(
        [Device(id=i, hardware_id="jetson-orin", labels={"site": "berlin"}, mqtt_username=i) for i in berlin]
        + [Device(id=i, hardware_id="jetson-orin", labels={"site": "paris"}, mqtt_username=i) for i in paris]
    )
    # Gated: paused by its failure gate once 2 of 8 reporting devices failed.
    gated = rollout_create(
        model="detector", version="1.0.0", target={"labels": {"site": "berlin"}}, waves=[{"percent": 100}],
        gates={"failure": {"min_reports": 1, "max_failed_percent": 20}}, abort_policy="pause", actor="user:x",
    )
    rollout_act(action="start", rollout_id=gated.pk, actor="user:x")
    rollout_evaluate(rollout_id=gated.pk)
    assigned = list(RolloutDevice.objects.filter(rollout=gated).order_by("rank"))
    RolloutDevice.objects.filter(pk__in=[a.pk for a in assigned[:6]]).update(state="committed")
    RolloutDevice.objects.filter(pk__in=[a.pk for a in assigned[6:8]]).update(state="failed", error_code="PRECHECK_FAILED")
    assert rollout_evaluate(rollout_id=gated.pk) == "gate-tripped"
    # Aborted by an operator, and one an operator merely paused (healthy: not a failure).
    aborted = rollout_create(
        model="detector", version="1.0.0", target={"labels": {"site": "paris"}}, waves=[{"percent": 100}], actor="user:x",
    )
    rollout_act(action="abort", rollout_id=aborted.pk, actor="user:x", reason="wrong site")
    paused = rollout_create(
        model="detector", version="1.0.0", target={"labels": {"site": "paris"}}, waves=[{"percent": 100}], actor="user:x",
    )
    rollout_act(action="start", rollout_id=paused.pk, actor="user:x")
    rollout_act(action="pause", rollout_id=paused.pk, actor="user:x", reason="lunch")
    # What ingest records: the 6 committed devices run 1.0.0 now; a revoked device does not count.
    running = [a.device_id for a in assigned[:6]]
    DeviceModelState.objects.bulk_create(
        [DeviceModelState(device_id=d, model=mv.model, active_version=mv) for d in running]
    )
    Device.objects.filter(pk=running[0]).update(state="revoked")
    client.force_login(viewer)

    html = client.get(reverse("web:version", args=["detector", "1.0.0"])).content.decode()

    def row(rollout):
        return re.search(rf'<tr data-rollout="{rollout.pk}"[^>]*>.*?</tr>', html, re.DOTALL).group(0)

    gated_row = row(gated)
    assert 'data-failure="paused by its failure gate"' in gated_row
    assert f'<a href="/rollouts/{gated.pk}/">#{gated.pk}</a>' in gated_row
    assert "<td data-committed>6</td>" in gated_row and '<td data-failed><span class="badge bad">2</span></td>' in gated_row
    assert "Wave 1 tripped its failure gate: 2 of 8 reporting devices failed" in gated_row
    assert 'data-failure="aborted"' in row(aborted) and "wrong site" in row(aborted)
    assert "data-failure" not in row(paused) and "lunch" in row(paused)
    banner = html.split('id="version-failed"')[1].split("</ul>")[0]
    assert f"rollout #{gated.pk}</a> paused by its failure gate (2 devices failed)" in banner
    assert f"rollout #{aborted.pk}</a> aborted: wrong site" in banner and f"#{paused.pk}" not in banner
    assert "<b data-running>5</b>" in html and "<b data-rollouts>3</b>" in html
    link = re.search(r'<a href="(/devices/\?[^"]+)">list</a>', html).group(1).replace("&amp;", "&")
    listing = client.get(link).content.decode()
    assert all(d in listing for d in running[1:]) and running[0] not in listing and "par-0" not in listing


def test_it_lets_an_admin_deprecate_then_revoke_a_version_with_a_reason(client, admin_user):
    web_data.released("detector", "1.0.0")
    client.force_login(admin_user)
    page_url = reverse("web:version", args=["detector", "1.0.0"])

    html = client.get(page_url).content.decode()
    assert 'id="deprecate-form"' in html and 'id="revoke-form"' in html
    assert 'data-confirm="Deprecate detector@1.0.0? No new rollout can use it.' in html
    assert 'name="reason" required' in html

    refused = client.post(reverse("web:version_deprecate", args=["detector", "1.0.0"]), {"reason": " "}, follow=True)
    assert "Deprecate needs a reason; nothing was changed." in refused.content.decode()
    assert ModelVersion.objects.get(version="1.0.0").state == "released"

    done = client.post(
        reverse("web:version_deprecate", args=["detector", "1.0.0"]), {"reason": "superseded by 1.1.0"}, follow=True
    ).content.decode()
    assert ModelVersion.objects.get(version="1.0.0").state == "deprecated"
    assert "Deprecated detector@1.0.0." in done
    assert 'id="deprecate-form"' not in done and 'id="revoke-form"' in done
    assert AuditEntry.objects.filter(action="version.deprecate", actor="user:ada-admin", reason="superseded by 1.1.0").exists()

    done = client.post(
        reverse("web:version_revoke", args=["detector", "1.0.0"]), {"reason": "leaks PII"}, follow=True
    ).content.decode()
    assert ModelVersion.objects.get(version="1.0.0").state == "revoked"
    assert "Revoked detector@1.0.0: its artifacts can no longer be downloaded." in done
    assert 'id="version-actions"' not in done
    assert "<span>version.revoke</span><span>user:ada-admin leaks PII" in done

    again = client.post(reverse("web:version_revoke", args=["detector", "1.0.0"]), {"reason": "twice"}, follow=True)
    assert "Revoke refused: detector@1.0.0 is already revoked." in again.content.decode()


@pytest.mark.parametrize("who", ["operator", "viewer"])
def test_it_shows_no_deprecate_or_revoke_to_non_admins_and_refuses_a_forged_post(client, request, who, operator_token):
    web_data.released("detector", "1.0.0")
    client.force_login(request.getfixturevalue(who))

    html = client.get(reverse("web:version", args=["detector", "1.0.0"])).content.decode()
    assert 'id="version-actions"' not in html and "deprecate-form" not in html and "revoke-form" not in html

    for name in ("version_deprecate", "version_revoke"):
        assert client.post(reverse(f"web:{name}", args=["detector", "1.0.0"]), {"reason": "forged"}).status_code == 403
    # The same rule as the API's: an operator token may not deprecate there either.
    api = client.post("/api/v1/models/detector/versions/1.0.0/deprecate", {"reason": "x"},
                      content_type="application/json", **operator_token.headers)
    assert api.status_code == 403
    assert ModelVersion.objects.get(version="1.0.0").state == "released"
    assert not AuditEntry.objects.filter(action__in=["version.deprecate", "version.revoke"]).exists()
