"""A real browser on the dashboard: Playwright driving Debian's chromium, every page watched for problems."""

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Page,
    Request,
    Response,
    async_playwright,
    expect,
)

from tests.helpers import PASSWORD, Account

# Screenshots of every page the tests look at, for a reviewer (the directory is printed at the end of the run).
SCREENSHOTS = Path(os.environ.get("FLTRAINING_TEST_OUTPUT", "test-output")) / "dashboard"
# The contract: the page follows a change within 2 seconds.
LIVE_MS = 2000


def chromium_executable() -> str:
    """Debian's chromium (Playwright cannot download its own browser here); skipped only where there is none."""
    path = os.environ.get("FLTRAINING_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "no Chromium on this machine (Debian's `chromium` package; .ci/run installs it)"
        if os.environ.get("FLTRAINING_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@dataclass
class Watched:
    """A page with everything that went wrong on it recorded: console errors, failed assets, other hosts."""

    page: Page
    origin: str
    console_errors: list[str] = field(default_factory=list)
    failed_assets: list[str] = field(default_factory=list)
    api_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    confirms: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        # A refused API call (401, 409) is logged by Chromium as a failed resource: those are checked
        # through `api_errors` instead, so only script errors count here.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.console_errors.append(message.text)

    def on_response(self, response: Response) -> None:
        path = urlsplit(response.url).path
        if response.status >= 400:
            (self.api_errors if path.startswith("/api/") else self.failed_assets).append(f"{response.status} {path}")

    def on_request(self, request: Request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.foreign_requests.append(request.url)

    async def on_dialog(self, dialog: Dialog) -> None:
        # Confirmations are accepted (the tests click actions on purpose); an alert would be injected code.
        (self.confirms if dialog.type == "confirm" else self.alerts).append(dialog.message)
        await (dialog.accept() if dialog.type == "confirm" else dialog.dismiss())

    async def screenshot(self, name: str) -> None:
        """Save the whole page for a reviewer."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def assert_clean(self, allowed_api_errors: tuple[str, ...] = ()) -> None:
        """No script error, no failed page asset, no request elsewhere, no alert, only the API errors expected."""
        assert self.console_errors == []
        assert self.failed_assets == []
        assert self.foreign_requests == []
        assert self.alerts == []
        assert [error for error in self.api_errors if not error.startswith(allowed_api_errors)] == []


class Browsing:
    """Opens watched pages in fresh browser contexts (each its own sessionStorage) on one service."""

    def __init__(self, browser: Browser, origin: str) -> None:
        self.browser = browser
        self.origin = origin
        self.pages: list[Watched] = []

    async def open(self, path: str = "/") -> Watched:
        """A new context and page, watched, at `path`."""
        context = await self.browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        watched = Watched(page, self.origin)
        page.on("console", watched.on_console)
        page.on("pageerror", lambda error: watched.console_errors.append(f"uncaught: {error}"))
        page.on("response", watched.on_response)
        page.on("request", watched.on_request)
        page.on("dialog", watched.on_dialog)
        self.pages.append(watched)
        await page.goto(self.origin + path)
        return watched

    async def signed_in(self, account: Account, path: str = "/") -> Watched:
        """A page at `path` after signing in through the form."""
        watched = await self.open("/")
        await sign_in(watched.page, account.username, PASSWORD)
        await expect(watched.page.get_by_role("heading", name="Trainings")).to_be_visible()
        if path != "/":
            await watched.page.goto(self.origin + path)
        return watched


async def sign_in(page: Page, username: str, password: str) -> None:
    """Fill the sign-in form and send it."""
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()


async def browsing(origin: str) -> AsyncIterator[Browsing]:
    """A headless chromium for one test."""
    executable = chromium_executable()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield Browsing(browser, origin)
        finally:
            await asyncio.wait_for(browser.close(), 30)
