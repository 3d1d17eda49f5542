"""Django admin for the registry: every model browsable, signed data read-only, drafts deletable
with their stored files, released versions not."""

from __future__ import annotations

import pytest

from registry.models import Artifact, AuditEntry, ModelVersion
from tests.support.onnx_models import linear_model
from tests.support.registry_api import (
    create_hardware,
    create_model,
    create_version,
    files_under,
    upload,
    version_url,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(client, django_user_model, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed only
    # force_login: client.login() calls authenticate() without a request, which django-axes refuses.
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "root-password-123"))
    return client


@pytest.fixture
def versions(client, ci_token):
    create_hardware(client, ci_token, "rpi5")
    create_model(client, ci_token, "detector")
    for version in ("1.0", "2.0"):
        create_version(client, ci_token, "detector", version)
        assert (
            upload(client, ci_token, "detector", version, hardware="rpi5", data=linear_model()).status_code
            == 201
        )
    client.post(f"{version_url('detector', '1.0')}/release", **ci_token.headers)
    client.put(
        "/api/v1/models/detector/aliases/production",
        {"version": "1.0"},
        content_type="application/json",
        **ci_token.headers,
    )


def test_it_lists_every_registry_model(root, versions):
    for name in (
        "hardwaretarget",
        "model",
        "modelversion",
        "artifact",
        "alias",
        "aliasmove",
        "apitoken",
        "auditentry",
    ):
        response = root.get(f"/admin/registry/{name}/")
        assert response.status_code == 200, name
    released = ModelVersion.objects.get(version="1.0")
    page = root.get(f"/admin/registry/modelversion/{released.pk}/change/").content.decode()
    assert released.manifest_sha256 in page  # shown, but as text
    assert 'name="manifest_sha256"' not in page and 'name="state"' not in page


def test_it_deletes_a_draft_with_its_stored_file(
    root, versions, isolated_storage, django_capture_on_commit_callbacks
):
    draft = ModelVersion.objects.get(version="2.0")
    key = draft.artifacts.get().storage_key
    assert (isolated_storage / key).exists()

    with django_capture_on_commit_callbacks(execute=True):
        response = root.post(f"/admin/registry/modelversion/{draft.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302
    assert not ModelVersion.objects.filter(version="2.0").exists()
    assert Artifact.objects.count() == 1
    assert not (isolated_storage / key).exists()
    assert len(files_under(isolated_storage)) == 1  # the released version's file stays
    assert AuditEntry.objects.filter(action="version.delete", actor="user:root").exists()


def test_it_keeps_alias_history_and_audit_read_only(root, versions):
    assert root.get("/admin/registry/alias/add/").status_code == 403
    assert root.get("/admin/registry/auditentry/add/").status_code == 403
    entry = AuditEntry.objects.first()
    assert root.post(f"/admin/registry/auditentry/{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    assert root.get("/admin/registry/artifact/add/").status_code == 403
