"""The demo in a real browser: ``proxyclip demo`` on localhost, driven in headless Chromium.

Needs Debian's Chromium (``bash .ci/install_browser.sh``) and the pip packages gradio (web
extra) and playwright; Playwright's own browser builds are never used or downloaded. Outside
CI the test is skipped when Chromium is missing; in CI (CI set) it fails instead.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLIP
from PIL import Image

from proxyclip.apps.demo import EXAMPLES_DIR, comparison_font_size, vocabulary

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY_CONFIG = Path(__file__).parent / "configs" / f"{TINY_CLIP}.json"
REPO = Path(__file__).resolve().parent.parent  # the server imports this checkout's proxyclip, not an installed one
# The real CLI entry point, with the tiny test CLIP registered first (as conftest does in-process), and
# text encoding slowed to 0.15 s a batch of 8 names, as a real CLIP on a CPU is slow: a vocabulary of
# 171 classes then takes seconds, long enough to see its progress in the page.
BOOT = ("import sys, time, open_clip; open_clip.add_model_config(sys.argv[1]); "
        "import proxyclip.model.clip as c; fast = c.encode_text; "
        "c.encode_text = lambda *a, **k: (time.sleep(0.15), fast(*a, **k))[1]; "
        "from proxyclip.apps.cli import main; sys.exit(main(sys.argv[2:]))")

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        pytest.fail("the browser test needs Debian's chromium in CI: run bash .ci/install_browser.sh",
                    pytrace=False)
    pytest.skip("Debian's chromium is not installed (bash .ci/install_browser.sh installs it)",
                allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright").sync_playwright
pytest.importorskip("gradio", reason="the web extra is not installed: pip install -e '.[web]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``proxyclip demo --random-weights`` on a free localhost port; yields its URL."""
    tmp = tmp_path_factory.mktemp("demo-server")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-c", BOOT, str(TINY_CONFIG), "demo", "--random-weights", "--clip", TINY_CLIP,
           "--vfm", "dino_vits16", "--window", "112", "--stride", "56", "--short-side", "112",
           "--host", "127.0.0.1", "--port", str(port), "--max-upload-mb", "1"]
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the demo server exited with {proc.returncode}:\n{log.read()}", pytrace=False)
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the demo server did not answer within 60 s:\n{log.read()}", pytrace=False)
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        server_log = log.read()
        log.close()
        assert "Traceback" not in server_log, server_log


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(60_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def _wait_for_images(page, selector: str) -> None:
    """Until every image under ``selector`` has loaded (the page keeps a heartbeat open: no "networkidle")."""
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel + ' img')].every(i => i.complete && i.naturalWidth > 0)", arg=selector)


def _legend(page) -> list[str]:
    return [t.strip() for t in page.locator("#pc-result .legend-item").all_inner_texts()]


def test_upload_name_classes_and_see_the_segmentation(server, browser_page, tmp_path):
    page = browser_page
    page.goto(server)
    page.wait_for_selector("#pc-run")
    limits = page.locator("#pc-limits").inner_text()
    assert "files up to 1 MB" in limits and "4096 px a side" in limits and "up to 200 classes" in limits

    page.locator("#pc-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "beach.jpg"))
    page.locator("#pc-classes textarea").fill("sky, sea; ocean, sand; beach, boat")
    page.locator("#pc-run").click()
    status = page.locator("#pc-status", has_text="Segmented in")
    status.wait_for()
    page.locator("#pc-result .legend-item").first.wait_for()
    _wait_for_images(page, "#pc-result")
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    # The overlay: the image at its own size, a legend naming exactly the classes the status lists as present.
    size = page.locator("#pc-result img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [640, 480]
    legend = _legend(page)
    assert legend and set(legend) <= {"sky", "sea", "sand", "boat"} and len(set(legend)) == len(legend)
    text = status.inner_text()
    present = text.split("Present: ")[1].split(".")[0]
    assert {part.rsplit(" ", 1)[0] for part in present.split(", ")} == set(legend)
    assert "640 x 480 px" in text and "4 classes" in text

    # The label PNG to download: 640 x 480, one palette index per class.
    href = page.locator('#pc-files a[download="beach_labels.png"]').get_attribute("href")
    with urllib.request.urlopen(urllib.parse.urljoin(server, href), timeout=10) as response:
        labels_png = response.read()
    (tmp_path / "labels.png").write_bytes(labels_png)
    labels = Image.open(tmp_path / "labels.png")
    assert labels.mode == "P" and labels.size == (640, 480) and np.asarray(labels).max() < 4


def test_bad_input_gets_a_message_in_the_page(server, browser_page, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(tmp_path / "big.png")  # ~1.9 MB
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (5000, 10)).save(tmp_path / "wide.png")
    cases = [
        (EXAMPLES_DIR / "house.jpg", " , ", "name at least one class"),
        (tmp_path / "big.png", "sky", "exceed the maximum allowed size of 1.0 Mb"),
        (tmp_path / "notes.png", "sky", "the file is not an image"),
        (tmp_path / "wide.png", "sky", "the image is 5000 x 10 px; the limit is 4096 px a side"),
    ]
    page = browser_page
    for image, classes, message in cases:
        page.goto(server)
        page.wait_for_selector("#pc-run")
        page.locator("#pc-image input[type=file]").set_input_files(str(image))
        page.locator("#pc-classes textarea").fill(classes)
        page.locator("#pc-run").click()
        page.get_by_text(message).first.wait_for(timeout=20_000)
        assert "Traceback" not in page.locator("body").inner_text()


def test_vocabulary_and_method_comparison(server, browser_page, tmp_path):
    page = browser_page
    page.goto(server)
    page.wait_for_selector("#pc-run")
    page.locator("#pc-vocab input").click()
    page.get_by_role("option", name="PASCAL VOC (21 classes)").click()
    classes = page.locator("#pc-classes textarea")
    page.wait_for_function("() => document.querySelector('#pc-classes textarea').value.includes('aeroplane')")
    assert classes.is_disabled() and classes.input_value().splitlines()[1] == "aeroplane"

    page.locator("#pc-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "house.jpg"))
    page.get_by_text("Advanced settings").click()
    page.locator("#pc-compare input[type=checkbox]").check()
    page.locator("#pc-run").click()
    page.locator("#pc-status", has_text="Segmented in").wait_for()
    gallery = page.locator("#pc-compare-gallery")
    gallery.locator("img").nth(2).wait_for()
    captions = gallery.inner_text()
    assert "CLIP" in captions and "MaskCLIP" in captions and "ProxyCLIP" in captions
    assert _legend(page) and set(_legend(page)) <= set(vocabulary("PASCAL VOC (21 classes)")[1])
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)


# ---- layout, errors and progress at a laptop's window size ---------------------------------------

LAPTOP = {"width": 1280, "height": 800}


def _box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def _result_src(page) -> str:
    return page.locator("#pc-result img").first.get_attribute("src")


def test_the_segment_button_is_in_sight_on_a_laptop_window(server, browser_page, tmp_path):
    page = browser_page
    page.set_viewport_size(LAPTOP)
    page.goto(server)
    page.wait_for_selector("#pc-run")
    _wait_for_images(page, "body")
    page.screenshot(path=str(tmp_path / "laptop.png"))
    print(f"screenshot: {tmp_path / 'laptop.png'}")
    button = _box(page, "#pc-run")
    assert page.evaluate("window.scrollY") == 0
    assert 0 <= button["y"] and button["y"] + button["height"] <= LAPTOP["height"]
    assert 0 <= button["x"] and button["x"] + button["width"] <= LAPTOP["width"]
    status, result = _box(page, "#pc-status"), _box(page, "#pc-result")
    assert status["y"] + status["height"] <= LAPTOP["height"] and result["y"] < LAPTOP["height"] / 2
    assert result["x"] > button["x"] + button["width"]  # the outputs beside the inputs


def test_an_error_stays_beside_the_previous_result_until_the_next_run(server, browser_page, tmp_path):
    page = browser_page
    page.set_viewport_size(LAPTOP)
    page.goto(server)
    page.wait_for_selector("#pc-run")
    page.locator("#pc-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "beach.jpg"))
    page.locator("#pc-classes textarea").fill("sky, sea; ocean, sand; beach, boat")
    page.locator("#pc-run").click()
    page.locator("#pc-status", has_text="Segmented in").wait_for()
    page.locator("#pc-result .legend-item").first.wait_for()
    before, legend = _result_src(page), _legend(page)

    page.locator("#pc-classes textarea").fill(" , ")  # a validation error
    page.locator("#pc-run").click()
    error = page.locator("#pc-status", has_text="Not segmented: name at least one class")
    error.wait_for(timeout=20_000)
    time.sleep(3)  # it stays (a toast would have been the only trace, and gone after a while)
    page.screenshot(path=str(tmp_path / "error.png"))
    print(f"screenshot: {tmp_path / 'error.png'}")
    assert error.is_visible() and "Segmented in" not in page.locator("#pc-status").inner_text()
    assert "earlier request" in error.inner_text()
    assert _result_src(page) == before and _legend(page) == legend  # the previous result is still shown
    assert page.locator("#pc-result img").first.is_visible()
    box, status = _box(page, "#pc-result"), _box(page, "#pc-status")
    assert status["y"] + status["height"] <= box["y"] + 5 and abs(status["x"] - box["x"]) < 30  # right above it

    page.locator("#pc-classes textarea").fill("sky, sea")
    page.locator("#pc-run").click()
    page.locator("#pc-status", has_text="Segmented in").wait_for()
    assert "Not segmented" not in page.locator("#pc-status").inner_text()
    page.wait_for_function("() => [...document.querySelectorAll('#pc-result .legend-item')].length <= 2")
    assert set(_legend(page)) <= {"sky", "sea"}  # the new result


def test_a_large_vocabulary_shows_progress_and_the_status_never_claims_the_last_success(server, browser_page, tmp_path):
    page = browser_page
    page.set_viewport_size(LAPTOP)
    page.goto(server)
    page.wait_for_selector("#pc-run")
    page.locator("#pc-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "house.jpg"))
    page.locator("#pc-classes textarea").fill("sky, grass")
    page.locator("#pc-run").click()
    page.locator("#pc-status", has_text="Segmented in").wait_for()

    page.locator("#pc-vocab input").click()
    page.get_by_role("option", name="COCO-Stuff (171 classes)").click()
    page.wait_for_function("() => document.querySelector('#pc-classes textarea').value.includes('pizza')")
    page.locator("#pc-run").click()
    page.locator("#pc-status", has_text="Segmenting").wait_for(timeout=5_000)  # at once, not the last result
    assert "Segmented in" not in page.locator("#pc-status").inner_text()
    progress = page.get_by_text(re.compile(r"encoding the class names: \d+ of \d+"))
    progress.first.wait_for(timeout=20_000)
    page.screenshot(path=str(tmp_path / "progress.png"))
    print(f"screenshot: {tmp_path / 'progress.png'}")
    page.locator("#pc-status", has_text="Segmented in").wait_for(timeout=60_000)
    assert "Encoding the class names took" in page.locator("#pc-status").inner_text()


def test_the_comparison_sits_under_the_result_with_legible_legends(server, browser_page, tmp_path):
    page = browser_page
    page.set_viewport_size(LAPTOP)
    page.goto(server)
    page.wait_for_selector("#pc-run")
    page.locator("#pc-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "house.jpg"))
    page.locator("#pc-classes textarea").fill("sky, grass, house, tree, path")
    page.locator("#pc-compare input[type=checkbox]").check()
    page.locator("#pc-run").click()
    page.locator("#pc-status", has_text="Segmented in").wait_for()
    images = page.locator("#pc-compare-gallery img")
    images.nth(2).wait_for()
    _wait_for_images(page, "#pc-compare-gallery")
    page.screenshot(path=str(tmp_path / "compare-laptop.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'compare-laptop.png'}")
    result, gallery = _box(page, "#pc-result"), _box(page, "#pc-compare-gallery")
    assert 0 <= gallery["y"] - (result["y"] + result["height"]) < 60  # right under the result
    assert abs(gallery["x"] - result["x"]) < 30 and gallery["width"] > 0.8 * result["width"]  # same column
    for i in range(3):
        shown = images.nth(i).evaluate("img => [img.getBoundingClientRect().width, img.naturalWidth]")
        font = comparison_font_size(640) * shown[0] / shown[1]  # the legend's text height as displayed
        assert font >= 10, f"legend text {font:.1f} px high on screen"
