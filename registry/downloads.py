"""Artifact downloads: their URL (built here and nowhere else) and the responses: HTTP Range from
the filesystem store, streamed in chunks, or a redirect to a presigned URL for object stores (the
server never proxies bytes from S3). Also the reference a lean directive carries to its release
envelope (release_ref) and the response that serves that envelope's canonical bytes."""

from __future__ import annotations

import hashlib
import re

from django.conf import settings
from django.http import FileResponse, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.urls import reverse

from agent.protocol import release_bytes
from registry.models import Artifact, ModelVersion

CHUNK = 256 * 1024
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def artifact_download_path(*, artifact: Artifact) -> str:
    """This server's download endpoint for an artifact (path only, no host). The one place its
    URL is built: the API shows it, directives hand it to devices (absolute, below)."""
    return reverse(
        "registry:artifact-download",
        kwargs={
            "name": artifact.version.model.name,
            "version": artifact.version.version,
            "hardware": artifact.hardware_id,
        },
    )


def artifact_download_url(*, artifact: Artifact) -> str:
    """Where a device fetches an artifact: this server's endpoint under PUBLIC_URL (device-token
    auth). With an object store the endpoint answers with a redirect to a short-lived presigned
    URL, which a directive valid for weeks could not carry itself."""
    return f"{settings.PUBLIC_URL}{artifact_download_path(artifact=artifact)}"


def release_ref(*, version: ModelVersion) -> dict:
    """A lean directive's reference to the released `version`'s envelope (agent.protocol.ReleaseRef):
    the sha256 and length of its canonical bytes and where a device fetches them."""
    data = release_bytes(version.envelope)
    path = reverse("registry:version-release-envelope", kwargs={"name": version.model.name, "version": version.version})
    return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data), "url": f"{settings.PUBLIC_URL}{path}"}


def release_envelope_response(request, *, version: ModelVersion) -> HttpResponse:
    """The envelope's canonical bytes, the ones release_ref digests. Always whole (a Range is
    ignored: at most 64 KiB, and a piece of JSON is no JSON); agent.download.fetch takes a 200 to a
    Range request as the whole file."""
    data = release_bytes(version.envelope)
    response = HttpResponse(data, content_type="application/json")
    response["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
    response["Cache-Control"] = "private, max-age=31536000, immutable"  # signed bytes; a new release is a new URL's content
    return response


def parse_range(header: str | None, length: int) -> tuple[int, int] | None | str:
    """(first, last) inclusive for one satisfiable range; None to send everything; "unsatisfiable"."""
    if not header:
        return None
    match = RANGE_RE.match(header.strip())
    if not match:
        return None  # multi-range or malformed: RFC 9110 lets us ignore Range and send it all
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the final N bytes
        suffix = int(last)
        if suffix == 0 or length == 0:
            return "unsatisfiable"
        return max(0, length - suffix), length - 1
    start = int(first)
    end = min(int(last), length - 1) if last else length - 1
    if start >= length or (last and int(last) < start):
        return "unsatisfiable"
    return start, end


def _iter_file(handle, start: int, count: int):
    try:
        handle.seek(start)
        while count > 0:
            chunk = handle.read(min(CHUNK, count))
            if not chunk:
                break
            count -= len(chunk)
            yield chunk
    finally:
        handle.close()


def artifact_response(request, *, artifact: Artifact, storage) -> HttpResponse:
    try:
        storage.path(artifact.storage_key)
        local = True
    except NotImplementedError:
        local = False
    if not local:
        return HttpResponseRedirect(storage.url(artifact.storage_key))

    etag = f'"{artifact.sha256}"'
    length = artifact.length
    wanted = parse_range(request.headers.get("Range"), length)
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's partial copy is of other bytes: send the whole file
    if wanted == "unsatisfiable":
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{length}"
        response["Accept-Ranges"] = "bytes"
        return response
    handle = storage.open(artifact.storage_key, "rb")
    if wanted is None:
        response = FileResponse(
            handle, as_attachment=True, filename=artifact.file_name, content_type="application/octet-stream"
        )
        response["Content-Length"] = str(length)
    else:
        first, last = wanted
        count = last - first + 1
        response = StreamingHttpResponse(
            _iter_file(handle, first, count), status=206, content_type="application/octet-stream"
        )
        response["Content-Range"] = f"bytes {first}-{last}/{length}"
        response["Content-Length"] = str(count)
        response["Content-Disposition"] = f'attachment; filename="{artifact.file_name}"'
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = etag
    response["X-Artifact-Sha256"] = artifact.sha256
    return response
