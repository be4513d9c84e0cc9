"""`ddim serve` in a real browser: headless Chromium (Debian's package) driven over the DevTools protocol.

Starts ``python -m ddim serve`` on 127.0.0.1 at a free port, loads the page, drags the steps slider
(the draft changes), uploads a held-out MNIST digit (the reconstruction and the edits appear), paints a
mask (the inpainted image appears), and saves a screenshot: ``serve_page.png`` in the test's tmp folder,
and also in ``$DDIM_TEST_ARTIFACTS`` when that is set. Skipped where no Chromium is installed.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flask", reason="ddim serve needs the 'serve' extra (flask, waitress)")
websocket = pytest.importorskip("websocket", reason="the browser test drives Chromium with websocket-client")

from PIL import Image  # noqa: E402
from serve_harness import Browser, find_chromium, start_server, stop_server  # noqa: E402

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary found (looked for chromium, chromium-browser, google-chrome; $DDIM_CHROMIUM): "
    "install Debian's 'chromium' package (.ci/run does)",
)


def held_out_digit(path: Path) -> int:
    """Write a held-out MNIST digit (never trained on), upscaled to 112x112, as a PNG; returns its label."""
    from ddim.data import mnist5k_split

    data = mnist5k_split("holdout")
    i = int((data.labels == 7).nonzero()[0, 0])
    u8 = np.round((data.images[i, 0].numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(u8).resize((112, 112), Image.Resampling.NEAREST).save(path)
    return 7


def test_page_in_headless_chromium(tmp_path):
    digit = tmp_path / "digit7.png"
    held_out_digit(digit)
    proc, url = start_server("--threads", "1")
    browser = None
    try:
        browser = Browser(CHROMIUM, tempfile.mkdtemp(prefix="ddim-chromium-", dir=tmp_path))
        browser.send("Page.enable")
        browser.send("Page.navigate", url=url)
        browser.wait("document.getElementById('main-img')?.dataset.loads >= 1", what="the first draft")
        browser.wait("document.getElementById('cmp-b').dataset.loads >= 1", 120, "the 50-step side of the pair")
        browser.wait("document.getElementById('interp-img').dataset.loads >= 1", 120, "the interpolation frame")
        before = browser.image_bytes("main-img")
        first_url = browser.js("document.getElementById('main-img').dataset.url")
        assert "steps=10" in first_url
        page_ms = float(browser.js("document.getElementById('main-img').dataset.pageMs"))

        # move the steps slider with the mouse: from 10 % to 40 % of its width, through several values
        y = browser.center("#steps")[1]
        x0, _ = browser.center("#steps", 0.10)
        x1, _ = browser.center("#steps", 0.40)
        n = browser.loads("main-img")
        browser.drag([(x0 + (x1 - x0) * k / 8, y) for k in range(9)])
        steps = browser.js("document.getElementById('steps').value")
        assert int(steps) > 20
        browser.wait(
            f"document.getElementById('main-img').dataset.url.includes('steps={steps}&')",
            what=f"the {steps}-step draft",
        )
        assert browser.loads("main-img") > n
        after = browser.image_bytes("main-img")
        assert after != before, "moving the steps control did not change the image"
        # the page shows exactly what the API returns for those settings
        moved_url = browser.js("document.getElementById('main-img').dataset.url")
        with urllib.request.urlopen(url.rstrip("/") + moved_url, timeout=60) as r:
            assert r.read() == after

        # scrub the interpolation
        n = browser.loads("interp-img")
        browser.drag([browser.center("#scrub", 0.02), browser.center("#scrub", 0.6)])
        browser.wait(f"document.getElementById('interp-img').dataset.loads > {n}", what="a scrubbed frame")

        # upload a digit: the reconstruction and the edits appear
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#upload")["nodeId"]
        browser.send("DOM.setFileInputFiles", files=[str(digit)], nodeId=node)
        for img in ("recon-img", "swap-img", "sdedit-img"):
            browser.wait(f"document.getElementById('{img}').dataset.loads >= 1", 120, img)
        mse = float(browser.js("document.getElementById('recon-img').dataset.mse"))
        assert mse < 0.02, f"reconstruction MSE {mse}"
        rec = np.asarray(Image.open(io.BytesIO(browser.image_bytes("recon-img"))))
        assert rec.shape == (28, 28) and rec.max() > 128  # a bright digit on black, as uploaded

        # paint a mask over the right half of the digit: the inpainted image appears
        pts = [browser.center("#mask", 0.55 + 0.3 * (k % 2), 0.1 + 0.1 * k) for k in range(9)]
        browser.drag(pts)
        browser.wait("document.getElementById('inpaint-img').dataset.loads >= 1", 120, "the inpainted image")
        assert browser.js("document.querySelectorAll('.status.error').length") == 0, browser.status()

        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        out = tmp_path / "serve_page.png"
        out.write_bytes(shot)
        artefacts = os.environ.get("DDIM_TEST_ARTIFACTS")
        if artefacts:
            Path(artefacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(out, Path(artefacts) / "serve_page.png")
        im = np.asarray(Image.open(out).convert("L"))
        assert im.shape[0] > 500 and im.std() > 10
        print(f"\nscreenshot: {out}; first draft at the page: {page_ms:.0f} ms (10 steps, cold page); MSE {mse:.5f}")
    finally:
        if browser is not None:
            browser.close()
        err = stop_server(proc)
    assert "ddim serve: stopped" in err
