"""Headless Chromium against a served dashboard, for the browser tests: the system's
/usr/bin/chromium driven by Playwright (installed here if missing and possible: apt-get as root,
pip; never a downloaded browser), the dashboard as a real ``python -m dashboard`` process, and
ways to read what a page shows. Without Chromium or Playwright the tests skip, except under CI
(``CI`` set), where they fail.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fraudstream.testing import end_process, wait_for

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-quic", "--no-first-run",
                 "--disable-sync"]
TIMEOUT = 90.0


def _unavailable(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI")
    pytest.skip(f"{what} is not available and could not be installed")


def _ensure_chromium() -> bool:
    if os.access(CHROMIUM, os.X_OK):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "chromium"], env=env, check=False)
    return os.access(CHROMIUM, os.X_OK)


def _ensure_playwright() -> bool:
    try:
        importlib.import_module("playwright.sync_api")
        return True
    except ImportError:
        # The package only: the browser is the system's Chromium, never a download.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "playwright"],
                       check=False)
        importlib.invalidate_caches()
        try:
            importlib.import_module("playwright.sync_api")
            return True
        except ImportError:
            return False


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A launched headless Chromium (skips, or fails under CI, when it cannot be had)."""
    if not _ensure_chromium():
        _unavailable(CHROMIUM)
    if not _ensure_playwright():
        _unavailable("the playwright package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def new_page(browser: Any) -> Iterator[Any]:
    """A page in a fresh context, tall enough to show a whole dashboard page."""
    context = browser.new_context(viewport={"width": 1500, "height": 2200})
    context.set_default_timeout(TIMEOUT * 1000)
    try:
        yield context.new_page()
    finally:
        context.close()


@contextlib.contextmanager
def served_dashboard(env: Mapping[str, str], log_path: Path,
                     before_ready: Callable[[], Any] | None = None) -> Iterator[str]:
    """``python -m dashboard`` with ``env`` (which sets its port and address); yields its URL
    once healthy. ``before_ready`` runs while the server starts (its start-up overlaps)."""
    port = env["STREAMLIT_SERVER_PORT"]
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dashboard"], cwd=REPO, env=dict(env),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if before_ready is not None:
            before_ready()
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dashboard did not become healthy"
            time.sleep(0.2)
        yield url
    finally:
        end_process(process)


def wait_on_page(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """:func:`fraudstream.testing.wait_for` polling at a page's pace."""
    wait_for(condition, timeout, what, interval=0.05)


def choose_option(page: Any, select: Any, text: str) -> None:
    """Pick the option of a Streamlit select box whose label contains ``text``.

    The open list renders only the options near its viewport, so an option far down a long
    list is not in the page until the list scrolls to it: typing ``text`` into the box first
    narrows the list to the matching options, which are then at its top.
    """
    select.click()
    page.keyboard.type(text)
    page.get_by_role("option").filter(has_text=text).first.click()


def settled(page: Any) -> bool:
    """No element left over from the previous run (Streamlit dims those during a rerun)."""
    return page.locator('[data-testid="stElementContainer"][data-stale="true"]').count() == 0


GRID_SNAPSHOT = """grid => {
    const table = grid.querySelector('table[role="grid"]');
    if (!table) return {rowCount: null, rows: {}};
    const headers = {};
    for (const th of table.querySelectorAll('[role="columnheader"]')) {
        headers[th.getAttribute('aria-colindex')] = th.textContent;
    }
    const rows = {};
    for (const tr of table.querySelectorAll('tbody [role="row"]')) {
        const row = {};
        for (const td of tr.querySelectorAll('[role="gridcell"]')) {
            row[headers[td.getAttribute('aria-colindex')]] = td.textContent;
        }
        rows[tr.getAttribute('aria-rowindex')] = row;
    }
    return {rowCount: Number(table.getAttribute('aria-rowcount')), rows};
}"""
#: Scroll the grid by most of its height, or back to the top once at the bottom.
_SCROLL = """scroller => {
    const before = scroller.scrollTop;
    scroller.scrollTop = before + Math.max(scroller.clientHeight - 80, 40);
    if (scroller.scrollTop === before) scroller.scrollTop = 0;
}"""
_NEXT_FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


def table_rows(page: Any, index: int = 0, timeout: float = TIMEOUT) -> list[dict[str, str]]:
    """Every row of the ``index``-th dataframe as {column header: cell text}.

    The grid mirrors only the rows near its viewport into the DOM (row 1 is the header, data
    rows 2..aria-rowcount), and updates that mirror a frame or more after it scrolls: so this
    scrolls a step, waits for the mirrored rows to change, and goes on until it saw them all.
    """
    grid = page.locator('[data-testid="stDataFrame"]').nth(index)
    scroller = grid.locator(".dvn-scroller")
    seen: dict[int, dict[str, str]] = {}
    deadline = time.monotonic() + timeout
    shown: set[str] = set()
    while True:
        snapshot = grid.evaluate(GRID_SNAPSHOT)
        count = snapshot["rowCount"]
        if count is not None and (set(snapshot["rows"]) != shown or count < 2):
            # None: the grid is being re-drawn; the same rows: the mirror lags the scroll.
            seen.update({int(i): row for i, row in snapshot["rows"].items()})
            if all(i in seen for i in range(2, count + 1)):
                return [seen[i] for i in range(2, count + 1)]
            shown = set(snapshot["rows"])
            scroller.evaluate(_SCROLL)
            page.evaluate(_NEXT_FRAMES)
            continue
        assert time.monotonic() < deadline, "timed out reading the table"
        page.evaluate(_NEXT_FRAMES)


