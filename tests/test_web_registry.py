"""Web admin registry pages: models, versions with artifacts, hashes, signatures and provenance;
releasing a draft and moving an alias go through registry.releases and registry.aliases with role checks."""

from __future__ import annotations

import pytest
from django.urls import reverse

from registry.models import AliasMove, AuditEntry, ModelVersion
from tests.support import web_data

pytestmark = pytest.mark.django_db


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
