"""The demo in a real browser: ``proxyclip demo`` on localhost, driven in headless Chromium.

Needs Debian's Chromium (``bash .ci/install_browser.sh``) and the pip packages gradio (web
extra) and playwright; Playwright's own browser builds are never used or downloaded. Outside
CI the test is skipped when Chromium is missing; in CI (CI set) it fails instead.
"""

import os
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

from proxyclip.apps.demo import EXAMPLES_DIR, vocabulary

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY_CONFIG = Path(__file__).parent / "configs" / f"{TINY_CLIP}.json"
# The real CLI entry point, with the tiny test CLIP registered first (as conftest does in-process).
BOOT = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
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
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
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
    page.wait_for_load_state("networkidle")
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
