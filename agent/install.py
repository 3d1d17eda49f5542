"""Content-addressed store and atomic symlink activation.

  store/<sha>/<file_name>               read-only, verified bytes
  models/<name>/current  -> ../../store/<sha>
  models/<name>/previous -> ../../store/<sha>

Activation writes a new symlink next to the old one and renames it over `current`: rename is
atomic, so the app-facing path always resolves to a complete, verified file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from agent.journal import crash_point, fsync_dir


class StoreError(Exception):
    pass


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return hasher.hexdigest()


class Store:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.store = self.state_dir / "store"
        self.staging = self.state_dir / "staging"
        self.models = self.state_dir / "models"
        for d in (self.store, self.staging, self.models):
            d.mkdir(parents=True, exist_ok=True)

    def part_path(self, sha: str) -> Path:
        return self.staging / f"{sha}.part"

    def stored_file(self, sha: str, file_name: str) -> Path:
        return self.store / sha / file_name

    def has(self, sha: str, file_name: str) -> bool:
        return self.stored_file(sha, file_name).is_file()

    def stage(self, sha: str, file_name: str) -> Path:
        """Move a verified .part into store/<sha>/ (read-only). Safe to run twice."""
        final = self.store / sha
        if (final / file_name).is_file():
            return final / file_name
        tmp = self.store / f".{sha}.tmp"
        tmp.mkdir(exist_ok=True)
        part = self.part_path(sha)
        if part.exists():
            os.replace(part, tmp / file_name)
        elif not (tmp / file_name).exists():
            raise StoreError(f"neither {part} nor a staged copy exists")
        os.chmod(tmp / file_name, 0o444)
        fd = os.open(tmp / file_name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(tmp)
        os.chmod(tmp, 0o555)
        if final.exists():  # a leftover of an earlier, different file name: replace it
            self.remove(sha)
        os.replace(tmp, final)
        fsync_dir(self.store)
        fsync_dir(self.staging)
        return final / file_name

    def remove(self, sha: str) -> None:
        path = self.store / sha
        if not path.exists():
            return
        os.chmod(path, 0o755)
        shutil.rmtree(path)

    def link_target(self, model: str, which: str) -> str | None:
        """The sha a model's `current`/`previous` link points at, from the filesystem itself."""
        link = self.models / model / which
        try:
            return Path(os.readlink(link)).name
        except OSError:
            return None

    def point(self, model: str, which: str, sha: str | None) -> None:
        """Atomically (re)point models/<model>/<which> at store/<sha> (or remove it)."""
        directory = self.models / model
        directory.mkdir(parents=True, exist_ok=True)
        link = directory / which
        if sha is None:
            if link.is_symlink():
                link.unlink()
                fsync_dir(directory)
            return
        target = f"../../store/{sha}"
        if link.is_symlink() and os.readlink(link) == target:
            return
        tmp = directory / f".{which}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync_dir(directory)

    def app_path(self, model: str, file_name: str) -> Path:
        return self.models / model / "current" / file_name

    def gc(self, keep: set[str]) -> None:
        """Drop store entries and partial downloads nothing refers to any more."""
        for entry in self.store.iterdir():
            name = entry.name
            if name.startswith("."):
                if entry.is_dir():
                    os.chmod(entry, 0o755)
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            if name not in keep:
                self.remove(name)
        for part in self.staging.iterdir():
            if part.name.removesuffix(".part") not in keep:
                part.unlink(missing_ok=True)


def is_read_only(path: Path) -> bool:
    return not (path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


__all__ = ["Store", "StoreError", "sha256_file", "crash_point", "is_read_only"]
