"""Production static files: collectstatic with the manifest storage production uses, served by
whitenoise with hashed names; vendored front-end libraries are pinned and keep their licences."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client

REPO = Path(__file__).resolve().parents[1]


def test_it_vendors_pinned_libraries_with_their_licences():
    vendor = REPO / "static" / "vendor"
    assert (vendor / "htmx-2.0.11" / "htmx.min.js").stat().st_size > 10_000
    assert "Zero-Clause BSD" in (vendor / "htmx-2.0.11" / "LICENSE").read_text()
    assert (vendor / "chart.js-4.6.1" / "chart.umd.min.js").stat().st_size > 100_000
    assert "MIT License" in (vendor / "chart.js-4.6.1" / "LICENSE.md").read_text()
    base = (REPO / "web" / "templates" / "web" / "base.html").read_text()
    assert "vendor/htmx-2.0.11/htmx.min.js" in base and "vendor/chart.js-4.6.1/chart.umd.min.js" in base
    assert not re.search(r'src="(https?:)?//', base), "no CDN at run time"


@pytest.mark.django_db
def test_it_serves_hashed_static_files_through_whitenoise(settings, tmp_path, viewer):
    settings.STATIC_ROOT = tmp_path / "static"
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
    }
    call_command("collectstatic", "--noinput", verbosity=0)
    browser = Client()  # a new handler, so whitenoise indexes the freshly collected files
    browser.force_login(viewer)

    html = browser.get("/").content.decode()

    urls = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert len(urls) == 4, urls
    for url in urls:
        assert re.search(r"\.[0-9a-f]{12}\.(js|css)$", url), url
        response = browser.get(url)
        assert response.status_code == 200, url
        assert "max-age=315360000" in response["Cache-Control"]
        b"".join(response.streaming_content)
        response.close()
    assert (tmp_path / "static" / "vendor" / "chart.js-4.6.1" / "LICENSE.md").exists()
