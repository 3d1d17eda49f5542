"""Release envelopes that lean directives reference (agent.protocol.ReleaseRef), fetched and cached.

A lean directive names its release by the sha256 and length of the envelope's canonical bytes
(agent.protocol.release_bytes) and a URL on the server the device enrolled with. The agent
fetches those bytes once (agent.download.fetch: the device token goes to that server only, the
length is enforced), keeps them as `releases/<sha256>.json` in the state directory, and reads
them back for every later directive of the release. Nothing is trusted for being here: a file is
used only if its bytes still hash to its name, and the envelope inside is verified with the
release keys by admission, exactly as an envelope carried in the directive is.

Admission itself does no I/O: it sees the cache as a read-only mapping (`ReleaseCache`), and
answers NeedRelease when the envelope is not there; agent.directives then calls `fetch_release`
and judges the directive again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from agent.config import Config
from agent.download import DownloadError, fetch_from_server
from agent.journal import atomic_write_bytes
from agent.protocol import ErrorCode, ReleaseRef

log = logging.getLogger("fleet_agent")

KEEP = 32  # envelopes kept; the oldest go first (a fleet rarely runs more than a few releases at once)


class ReleaseUnavailable(Exception):
    """The referenced envelope could not be fetched or does not match its reference; `code` is
    the error code the directive is refused with."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class ReleaseCache(Mapping[str, dict]):
    """sha256 -> the release envelope cached under it (verified against the name on every read)."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "releases"

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}.json"

    def __getitem__(self, digest: str) -> dict:
        try:
            data = self.path(digest).read_bytes()
        except (OSError, ValueError):  # ValueError: a digest that is no file name (never from a parsed ref)
            raise KeyError(digest) from None
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("cached release %s no longer matches its sha256; fetching it again", digest[:12])
            self.path(digest).unlink(missing_ok=True)
            raise KeyError(digest)
        return json.loads(data)

    def __iter__(self) -> Iterator[str]:
        return (p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else iter(())

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def store(self, digest: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path(digest), data, mode=0o644)
        self.prune()

    def discard(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def prune(self, keep: int = KEEP) -> None:
        files = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[keep:]:
            old.unlink(missing_ok=True)


def fetch_release(ref: ReleaseRef, *, cfg: Config, cache: ReleaseCache,
                  stop: threading.Event | None = None) -> dict:
    """Fetch the envelope `ref` names into `cache` and return it. Raises ReleaseUnavailable
    (NOT_FOUND, TOO_LARGE, DOWNLOAD_FAILED, HASH_MISMATCH, MALFORMED) or agent.download.Interrupted."""
    cache.dir.mkdir(parents=True, exist_ok=True)
    part = cache.dir / f"{ref.sha256}.part"
    try:
        result = fetch_from_server(cfg, ref.url, part, length=ref.length, stop=stop,
                                   retries=min(cfg.update.download_retries, 3))
    except DownloadError as exc:
        part.unlink(missing_ok=True)
        raise ReleaseUnavailable(f"the release manifest could not be fetched from {ref.url}: {exc}", exc.code) from None
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ReleaseUnavailable(f"the release manifest could not be stored: {exc}", ErrorCode.DOWNLOAD_FAILED) from None
    try:
        data = part.read_bytes()
    finally:
        part.unlink(missing_ok=True)
    if result.sha256 != ref.sha256 or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ReleaseUnavailable(f"the release manifest from {ref.url} has sha256 {result.sha256}, the directive "
                                 f"names {ref.sha256}", ErrorCode.HASH_MISMATCH)
    try:
        envelope = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ReleaseUnavailable("the release manifest is not JSON", ErrorCode.MALFORMED) from None
    if not isinstance(envelope, dict):
        raise ReleaseUnavailable("the release manifest is not a JSON object", ErrorCode.MALFORMED)
    cache.store(ref.sha256, data)
    log.info("fetched release manifest %s (%d bytes)", ref.sha256[:12], len(data))
    return envelope

