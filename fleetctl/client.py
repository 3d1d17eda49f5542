"""The HTTP client fleetctl's commands share: JSON calls and streamed multipart uploads.

Standard library only, so a CI image needs nothing beyond `pip install modelfleet`.

    client = FleetClient("https://fleet.example.com", token)
    client.get("/api/v1/models/")
    client.post("/api/v1/models/", {"name": "detector"})
    client.upload("/api/v1/models/detector/versions/1.0/artifacts/",
                  fields={"hardware": "jetson", "format": "onnx"}, file_path=path, progress=bar)

Every failure raises ApiError: `status` is the HTTP status (0 when the server could not be
reached), `code` and `message` come from the server's JSON error body when it sent one.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import secrets
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from fleetctl import __version__

CHUNK_SIZE = 1024 * 1024
DEFAULT_TIMEOUT = 300.0


class ConfigError(Exception):
    """Missing or malformed client configuration (no URL, no token, bad URL)."""


class ApiError(Exception):
    """The server refused a request, or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str, body: Any = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body

    @property
    def is_client_error(self) -> bool:
        return 400 <= self.status < 500

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status else "network"
        return f"{self.message} ({where}, {self.code})"


def path_quote(value: str) -> str:
    """Quote one path segment (model names, versions, aliases) for a URL."""
    return quote(str(value), safe="")


def from_environment(url: str | None = None, token: str | None = None, **kwargs) -> FleetClient:
    """Build a client from explicit values, falling back to FLEET_URL / FLEET_TOKEN."""
    url = url or os.environ.get("FLEET_URL", "")
    token = token or os.environ.get("FLEET_TOKEN", "")
    if not url:
        raise ConfigError("no server URL: set FLEET_URL or pass --url")
    if not token:
        raise ConfigError("no API token: set FLEET_TOKEN or pass --token")
    return FleetClient(url, token, **kwargs)


class FleetClient:
    def __init__(self, url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"server URL must look like http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        # A server mounted under a path prefix (https://host/fleet) keeps working.
        self.prefix = parts.path.rstrip("/")
        token = token.strip()  # a trailing newline from a file or `$(cat ...)` is not part of it
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            # e.g. FLEET_TOKEN=$(... 2>&1) caught a message along with the token: say so, not a traceback
            raise ConfigError("the API token contains spaces, line breaks or control characters; "
                              "set FLEET_TOKEN (or --token) to the token alone")
        self.token = token
        self.timeout = timeout

    # --- JSON calls -----------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, data: Any = None) -> Any:
        return self.request("POST", path, data={} if data is None else data)

    def put(self, path: str, data: Any = None) -> Any:
        return self.request("PUT", path, data={} if data is None else data)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def get_all(self, path: str, params: Mapping[str, Any] | None = None) -> list:
        """GET a list endpoint, following limit/offset pagination when the server paginates."""
        items: list = []
        query = dict(params or {})
        while True:
            page = self.get(path, query)
            if isinstance(page, list):
                return items + page
            if not isinstance(page, dict) or "results" not in page:
                raise ApiError(200, "unexpected_response", f"GET {path} did not return a list", page)
            items.extend(page["results"])
            if not page.get("next") or not page["results"]:
                return items
            query["offset"] = len(items)

    def request(self, method: str, path: str, *, data: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        body = None
        headers = {"Accept": "application/json"}
        if data is not None:
            body = json.dumps(data).encode("utf-8")
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(len(body))
        target = self._target(path, params)
        conn = self._connection()
        try:
            self._send_headers(conn, method, target, headers)
            if body:
                conn.send(body)
            return self._read_response(conn, method, target)
        except (OSError, http.client.HTTPException) as exc:
            raise self._network_error(exc) from None
        finally:
            conn.close()

    # --- streamed multipart upload ---------------------------------------------------------

    def upload(
        self,
        path: str,
        *,
        fields: Mapping[str, str],
        file_path: str | os.PathLike,
        file_field: str = "file",
        file_name: str | None = None,
        content_type: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        method: str = "POST",
    ) -> Any:
        """POST `fields` plus one file as multipart/form-data, reading the file in chunks.

        Content-Length is computed up front from the file size, so the request is not chunked
        (some proxies and Django's upload handlers need the length) and memory stays flat
        whatever the file size. `progress(sent, total)` is called after every chunk.
        """
        file_path = Path(file_path)
        total = file_path.stat().st_size
        boundary = "modelfleet-" + secrets.token_hex(16)
        name = file_name or file_path.name
        ctype = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        head = b"".join(
            _form_field(boundary, key, str(value)) for key, value in fields.items() if value is not None
        )
        head += (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{_escape(file_field)}"; filename="{_escape(name)}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode("utf-8")
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        headers = {
            "Accept": "application/json",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + total + len(tail)),
        }
        target = self._target(path, None)
        conn = self._connection()
        try:
            self._send_headers(conn, method, target, headers)
            conn.send(head)
            sent = 0
            if progress:
                progress(0, total)
            with file_path.open("rb") as handle:
                while chunk := handle.read(CHUNK_SIZE):
                    try:
                        conn.send(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        # The server answered early (e.g. 413/401) and closed: its reply is
                        # the useful error, not the broken pipe.
                        return self._read_response(conn, method, target)
                    sent += len(chunk)
                    if progress:
                        progress(sent, total)
            if sent != total:
                raise ApiError(0, "file_changed", f"{file_path} changed size while uploading ({sent} != {total} bytes)")
            conn.send(tail)
            return self._read_response(conn, method, target)
        except (OSError, http.client.HTTPException) as exc:
            raise self._network_error(exc) from None
        finally:
            conn.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _target(self, path: str, params: Mapping[str, Any] | None) -> str:
        target = self.prefix + "/" + path.lstrip("/")
        if params:
            target += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        return target

    def _send_headers(self, conn, method: str, target: str, headers: Mapping[str, str]) -> None:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {self.token}")
        conn.putheader("User-Agent", f"fleetctl/{__version__}")
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()

    def _read_response(self, conn, method: str, target: str) -> Any:
        response = conn.getresponse()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
        parsed: Any = None
        if raw and "json" in content_type:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        if 200 <= response.status < 300:
            if raw and parsed is None and "json" in content_type:
                raise ApiError(response.status, "bad_json", f"{method} {target}: the server sent invalid JSON")
            return parsed if parsed is not None else (raw if raw else None)
        raise _error_from(response.status, response.reason, parsed, raw, method, target)

    def _network_error(self, exc: Exception) -> ApiError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ApiError(0, "network_error", f"cannot reach {self.url}: {reason}")


def _error_from(status: int, reason: str, parsed: Any, raw: bytes, method: str, target: str) -> ApiError:
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        return ApiError(status, str(error.get("code") or "error"), str(error.get("message") or reason), parsed)
    if isinstance(parsed, dict) and "detail" in parsed:
        return ApiError(status, "error", str(parsed["detail"]), parsed)
    # Not our JSON error format (a proxy's HTML page, say): show a short excerpt, not the page.
    excerpt = raw[:200].decode("utf-8", "replace").strip()
    message = f"{method} {target}: HTTP {status} {reason}"
    if excerpt and "json" not in excerpt[:20]:
        message += f" — {' '.join(excerpt.split())[:120]}"
    return ApiError(status, "http_error", message, parsed)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _form_field(boundary: str, name: str, value: str) -> bytes:
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{_escape(name)}"\r\n\r\n'
        f"{value}\r\n"
    ).encode("utf-8")
