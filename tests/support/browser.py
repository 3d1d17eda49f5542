"""Real headless Chromium (Debian's `chromium` package) driven by Playwright, for the web admin
acceptance tests. Playwright's own browser downloads are never used: `executable_path` points at
the system binary, which scripts/bootstrap.sh --test installs when absent.

    with Browser(base_url=live_server.url) as browser:
        page = browser.new_page()
        login(page, "olivia-operator", "olivia-operator-password-123")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Self

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP = {"width": 1366, "height": 900}
TABLET = {"width": 820, "height": 1180}
# Every run saves its screenshots under tests/artifacts/ (ignored by git, kept by CI as evidence);
# UPDATE_SCREENSHOTS=1 writes them over the committed ones in docs/ that the README shows.
_REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = (
    _REPO / "docs" / "screenshots"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1"
    else _REPO / "tests" / "artifacts" / "screenshots"
)


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


class Browser:
    """One Chromium process with its own fresh user-data-dir (so one signed-in user per Browser)."""

    def __init__(self, *, base_url: str, viewport: dict | None = None):
        self.base_url = base_url
        self.viewport = viewport or LAPTOP
        self.user_data_dir = None
        self.context = None
        self.dialogs: list[str] = []

    def __enter__(self) -> Self:
        from playwright.sync_api import sync_playwright

        # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are
        # still plain synchronous code, so Django's async-safety guard would only get in the way.
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
        self.user_data_dir = tempfile.mkdtemp(prefix="mf-chromium-")
        self._manager = sync_playwright()
        playwright = self._manager.__enter__()
        self.context = playwright.chromium.launch_persistent_context(
            self.user_data_dir,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            base_url=self.base_url,
            viewport=self.viewport,
        )
        self.context.set_default_timeout(15_000)
        return self

    def new_page(self):
        page = self.context.new_page()

        def accept(dialog):
            # The confirmations say what an action will do; keep their text for the test to check.
            self.dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", accept)
        return page

    def __exit__(self, *exc) -> None:
        try:
            self.context.close()
        finally:
            self._manager.__exit__(*exc)
            shutil.rmtree(self.user_data_dir, ignore_errors=True)
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def login(page, username: str, password: str) -> None:
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: not url.endswith("/login/"))


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
