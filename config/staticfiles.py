"""Static files storage for DEBUG off: WhiteNoise's hashed, compressed files from collectstatic,
and the plain file from its app for anything collectstatic has not seen.

`make run` collects static files on every start, so its pages use the hashed names. `manage.py
runserver` (or a gunicorn started by hand) before any collectstatic, or after a file was added
since, would otherwise fail every page that names a static file with "Missing staticfiles
manifest entry" (a 500 on /api/docs/, the admin and the UI). WhiteNoise's own
WHITENOISE_MANIFEST_STRICT=False does not cover that case: it hashes the file from STATIC_ROOT
and still raises when the file was never collected there. Here such a file keeps its plain name
(/static/admin/css/base.css), which WhiteNoise serves from the app's directory because settings
turn on WHITENOISE_USE_FINDERS. A name that no finder knows is still an error.
"""

from __future__ import annotations

from django.contrib.staticfiles import finders
from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticFilesStorage(CompressedManifestStaticFilesStorage):
    def stored_name(self, name: str) -> str:
        try:
            return super().stored_name(name)
        except ValueError:
            if finders.find(name.split("?", 1)[0].split("#", 1)[0]) is None:
                raise
            return name
