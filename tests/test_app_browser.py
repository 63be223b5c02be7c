"""End to end in a real headless browser: ``python app.py`` on the demo model, driven by Playwright + chromium.

Loads the page, diagnoses a capital prompt (sees the chart and the verdict), performs surgery on the demo model
and sees the original and corrected continuations side by side; saves screenshots to ``tests/artifacts/``.
Uses Debian's chromium (``scripts/install_chromium.sh``, run by ``make test``), never Playwright's download.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (make test installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``python app.py`` in a subprocess, as the README's ``make app`` runs it, on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "SURGERY_MODEL": "assets/demo-model", "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer on {url} within 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(app_url)
        yield page
        browser.close()


def test_diagnose_operate_and_compare_in_the_browser(page):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expect(page.get_by_role("tab", name="Diagnose")).to_be_visible()
    for name in ("Heads", "Surgery", "Verify"):
        expect(page.get_by_role("tab", name=name)).to_be_visible()

    # Diagnose: the prompt is prefilled with the first capital (France); clicking an example diagnoses it at once.
    verdict = page.locator("#verdict")
    page.get_by_role("button", name="Diagnose", exact=True).click()
    expect(verdict).to_contain_text("Paris", timeout=60_000)
    page.get_by_text("Japan → Tokyo").first.click()
    expect(page.get_by_label("Prompt").first).to_have_value("The capital of Japan is")
    expect(verdict).to_contain_text("Tokyo", timeout=60_000)
    expect(page.get_by_text("processing |")).to_have_count(0, timeout=60_000)  # every output has arrived
    expect(verdict).to_contain_text("Routing failure")
    expect(verdict).to_contain_text("overridden by L")
    expect(verdict).to_contain_text("prescribed surgery layer L")
    expect(page.locator("#lens-plot img")).to_be_visible()
    expect(page.locator("#head-heatmap img")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "diagnose.png"), full_page=True)

    # Surgery on the demo model with the default facts, site and layer.
    page.get_by_role("tab", name="Surgery").click()
    page.locator("#operate").click()
    expect(page.locator("#surgery-summary")).to_contain_text("Surgery done", timeout=240_000)
    expect(page.locator("#surgery-summary")).to_contain_text("8/8")

    # Side by side: original vs corrected.
    page.get_by_role("button", name="Generate", exact=True).click()
    corrected = page.locator("#gen-corrected textarea")
    expect(corrected).not_to_have_value("", timeout=60_000)
    expect(page.get_by_text("processing |")).to_have_count(0, timeout=60_000)
    assert page.locator("#gen-corrected textarea").input_value().strip().startswith("Paris")
    assert not page.locator("#gen-original textarea").input_value().strip().startswith("Paris")
    page.screenshot(path=str(ARTIFACTS / "surgery.png"), full_page=True)
