"""Registry API v1 routes, mounted under /api/v1/ (the contract CI scripts depend on)."""

from django.urls import path

from registry import views

app_name = "registry"

V = "models/<slug:name>/versions/<str:version>"

urlpatterns = [
    path("hardware/", views.HardwareListCreate.as_view(), name="hardware-list"),
    path("models/", views.ModelListCreate.as_view(), name="model-list"),
    path("models/<slug:name>/", views.ModelDetail.as_view(), name="model-detail"),
    path("models/<slug:name>/versions/", views.VersionListCreate.as_view(), name="version-list"),
    path(f"{V}/", views.VersionDetail.as_view(), name="version-detail"),
    path(f"{V}/artifacts/", views.ArtifactListUpload.as_view(), name="artifact-list"),
    path(
        f"{V}/artifacts/<str:hardware>/download", views.ArtifactDownload.as_view(), name="artifact-download"
    ),
    path(f"{V}/release", views.VersionRelease.as_view(), name="version-release"),
    path(f"{V}/manifest", views.VersionManifest.as_view(), name="version-manifest"),
    path(f"{V}/release-envelope", views.VersionReleaseEnvelope.as_view(), name="version-release-envelope"),
    path(f"{V}/manifest-payload", views.VersionManifestPayload.as_view(), name="version-manifest-payload"),
    path(f"{V}/deprecate", views.VersionDeprecate.as_view(), name="version-deprecate"),
    path(f"{V}/revoke", views.VersionRevoke.as_view(), name="version-revoke"),
    path("models/<slug:name>/aliases/", views.AliasList.as_view(), name="alias-list"),
    path("models/<slug:name>/aliases/<slug:alias>", views.AliasDetail.as_view(), name="alias-detail"),
    path("keys/", views.KeyList.as_view(), name="key-list"),
    path("keys/registered/", views.RegisteredKeyList.as_view(), name="key-registered"),
    path("keys/registered/<str:keyid>/revoke", views.RegisteredKeyRevoke.as_view(), name="key-revoke"),
    path("tokens/", views.ApiTokenList.as_view(), name="token-list"),
]
