"""Local development set-up used by `make run`: one admin login that survives restarts.

The password is kept in DATA_DIR/admin-password (mode 0600) so every `make run` prints the same
working login; if someone changed it in the admin, the next run resets it to the stored one.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction


@dataclass(frozen=True)
class DevLogin:
    username: str
    password: str
    created: bool  # the user did not exist before
    reset: bool  # the password or the superuser flags had to be (re)set


def password_file() -> Path:
    return Path(settings.DATA_DIR) / "admin-password"


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    path.chmod(0o600)


def dev_admin_ensure(*, username: str = "admin", new_password: bool = False) -> DevLogin:
    """Make sure `username` is an active superuser whose password is the stored one."""
    path = password_file()
    stored = path.read_text().strip() if path.exists() else ""
    password = stored if stored and not new_password else secrets.token_urlsafe(12)
    User = get_user_model()
    with transaction.atomic():
        user, created = User.objects.select_for_update().get_or_create(username=username)
        healthy = user.is_active and user.is_staff and user.is_superuser and user.check_password(password)
        if not healthy:
            user.is_active = user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
    if password != stored:
        _write_secret(path, password)
    return DevLogin(username=username, password=password, created=created, reset=not healthy)
