"""The run report in a real headless browser: Chromium from the system's packages, driven by Playwright.

Opened from a file with every network request refused: the page loads without console errors or
requests, every image is decoded, and a screenshot of the page is not blank. Skipped (with the
reason) when no Chromium or no Playwright is installed; ``.ci/run`` installs Chromium with
apt-get where it can, Playwright comes with the ``test`` extra. Playwright's own browser
download is not used: ``CRYOSAM_CHROMIUM`` or the first of chromium, chromium-browser,
google-chrome on the PATH is launched.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from report_run import NAMES, make_run

from cryosam_ray.report import write_report


def _chromium() -> str | None:
    candidates = [os.environ.get("CRYOSAM_CHROMIUM")] + [shutil.which(n) for n in
                                                         ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and os.path.exists(c)), None)


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install chromium, or set "
                                "CRYOSAM_CHROMIUM to a Chromium or Chrome executable)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(pip install '.[test]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def test_report_loads_offline_with_every_image_and_is_not_blank(browser, tmp_path):
    out, evaluation = make_run(tmp_path)
    report = write_report(str(out), evaluation=evaluation)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def refuse_network(route):
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            requests.append(url)
            route.abort()

    page.route("**/*", refuse_network)
    page.goto(f"file://{os.path.abspath(report)}", wait_until="load")
    images = page.evaluate("Array.from(document.images).map(i => ({complete: i.complete, "
                           "width: i.naturalWidth, height: i.naturalHeight, alt: i.alt}))")
    shot = page.screenshot(full_page=True)
    svg_boxes = page.evaluate("Array.from(document.querySelectorAll('svg')).map(s => s.getBoundingClientRect().width)")
    page.close()

    assert problems == [] and requests == []
    assert len(images) == len(NAMES)
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images), images
    assert {i["alt"] for i in images} == {f"preview of {n}" for n in NAMES}
    assert len(svg_boxes) == len(NAMES) + 1 and all(w > 100 for w in svg_boxes)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 900  # the whole page, longer than one screen
    assert pixels.std() > 20  # not blank: text, tables, charts and dark previews on white
    dark = (pixels < 64).mean()
    assert 0.02 < dark < 0.9  # the previews are drawn (dark panels), the page is not all dark
