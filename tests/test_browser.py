"""The demo in a real browser: headless Chromium driven through selenium, as a person would use it.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them and sets
``STEPDISTILL_REQUIRE_BROWSER=1``, so in CI this test runs instead of skipping)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest

REPO = Path(__file__).resolve().parent.parent
BATCH = 4


def _browser_paths():
    chrome = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chrome = None
    if chrome is None or driver is None:
        if os.environ.get("STEPDISTILL_REQUIRE_BROWSER"):
            pytest.fail("headless Chromium, chromedriver and selenium are required here (apt-get install chromium "
                        "chromium-driver; pip install selenium)")
        pytest.skip("headless Chromium / chromedriver / selenium not installed")
    return chrome, driver


@pytest.fixture(scope="module")
def browser():
    chrome, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    drv.set_page_load_timeout(120)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def app_url():
    """The demo as `stepdistill demo` serves it: the shipped teacher and one-step student."""
    from stepdistill.frontends import demo_ui as D

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = D.build_demo()
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False,
               theme=D.offline_theme(), head=D.CLEAR_TOASTS_JS)  # as demo_ui.launch serves it
    yield f"http://127.0.0.1:{port}/"
    app.close()


def _wait(cond, timeout=120.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _images(drv, elem_id):
    return drv.find_elements("css selector", f"#{elem_id} img")


def _text(drv, elem_id):
    return drv.find_element("css selector", f"#{elem_id} textarea").get_attribute("value") or ""


def _set_number(drv, elem_id, value):
    from selenium.webdriver.common.keys import Keys

    box = drv.find_element("css selector", f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_demo_in_a_real_browser(browser, app_url, tmp_path):
    drv = browser
    drv.get(app_url)
    _wait(lambda: drv.find_elements("css selector", "#generate"), what="the Generate button")
    # pick a class from the dropdown
    drv.find_element("css selector", "#class input").click()
    _wait(lambda: drv.find_elements("css selector", 'li[role="option"][aria-label="cat"]'), 30,
          "the 'cat' option")[0].click()
    _wait(lambda: drv.find_element("css selector", "#class input").get_attribute("value") == "cat", 10, "cat chosen")
    _set_number(drv, "teacher-steps", 100)
    drv.find_element("css selector", "#generate").click()

    # the student's images come first, while the teacher is still sampling
    _wait(lambda: len(_images(drv, "student-gallery")) >= BATCH, 60, "the student's images")
    teacher_then = _text(drv, "teacher-text")
    assert not _images(drv, "teacher-gallery") and teacher_then.startswith("teacher:"), teacher_then
    _wait(lambda: "wall-clock" in _text(drv, "teacher-text"), 300, "the teacher's images")
    _wait(lambda: len(_images(drv, "teacher-gallery")) >= BATCH, 30, "the teacher's gallery")
    s_txt, t_txt = _text(drv, "student-text"), _text(drv, "teacher-text")
    s_nfe, s_sec = re.search(r"NFE (\d+) · ([0-9.]+) s wall-clock", s_txt).groups()
    t_nfe, t_sec = re.search(r"NFE (\d+) · ([0-9.]+) s wall-clock", t_txt).groups()
    assert (int(s_nfe), int(t_nfe)) == (1, 200)  # one step vs 100 steps x 2 (CFG)
    assert 0 < float(s_sec) < float(t_sec), (s_txt, t_txt)
    status = drv.find_element("css selector", "#status").text
    assert "student uses 1 NFE vs teacher 200" in status and "faster wall-clock" in status
    assert drv.find_element("css selector", "#student-gallery").text.count("cat") >= 1  # captions name the class
    shot = tmp_path / "demo_browser.png"
    drv.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("STEPDISTILL_UPDATE_DOCS"):
        shutil.copy(shot, REPO / "docs" / "demo_browser.png")

    # a bad seed: the error box, the old images and status cleared; then the page still works
    _set_number(drv, "seed", -1)
    drv.find_element("css selector", "#generate").click()
    _wait(lambda: "seed must be in 0..2147483647" in drv.find_element("tag name", "body").text, 60, "the error box")
    assert not _images(drv, "student-gallery") and not _images(drv, "teacher-gallery")
    assert drv.find_element("css selector", "#status").text.strip() == ""
    _set_number(drv, "seed", 3)
    _set_number(drv, "teacher-steps", 2)
    drv.find_element("css selector", "#generate").click()
    _wait(lambda: len(_images(drv, "teacher-gallery")) >= BATCH and "NFE 4 ·" in _text(drv, "teacher-text"), 120,
          "images after the error")
    # the Generate click closed the old error toast (gradio would keep it up for 10 s); its fade-out may outlast a
    # fast run, so allow it a moment, well inside the 10 s it would otherwise stay
    _wait(lambda: "seed must be in" not in drv.find_element("tag name", "body").text, 3, "the old error toast to close")
    assert len(_images(drv, "student-gallery")) >= BATCH


def test_video_section_streams_frames_in_a_real_browser(browser, app_url, tmp_path_factory):
    """A person opens the video section, names a causal video student, presses Stream and sees the frames arrive:
    the current frame, the strip of frames so far and the frame count, then the whole stream."""
    from test_video import TINY, _argv

    from stepdistill.frontends.cli import main

    root = tmp_path_factory.mktemp("browser_video")
    assert main(_argv("teacher", "configs/teacher_video_animal_mnist.yaml", root / "t", **TINY)) == 0
    extra = {"dmd.teacher": root / "t" / "model", "data.resolution": 8, "data.frames": 4, "train.max_steps": 1,
             "train.batch_size": 2, "train.sample_every": 1, "train.checkpoint_every": 1, "train.cpu": "true",
             "dmd.critic_updates": 1, "dmd.regression_warmup_steps": 0}
    assert main([str(a) for a in _argv("distill", "configs/self_forcing_video_animal_mnist.yaml", root / "s",
                                       **extra)]) == 0
    drv = browser
    drv.get(app_url)
    toggle = _wait(lambda: [e for e in drv.find_elements("css selector", "#video-section button, #video-section "
                                                                             ".label-wrap") if e.is_displayed()],
                   what="the video section")[0]
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", toggle)
    toggle.click()
    box = _wait(lambda: [e for e in drv.find_elements("css selector", "#video-student textarea, #video-student input")
                         if e.is_displayed()], 30, "the video student box")[0]
    folder = str(root / "s" / "student")
    for _ in range(5):  # the box can miss the first keys while the section opens: type until it holds the path
        box.click()
        box.clear()
        box.send_keys(folder)
        if box.get_attribute("value") == folder:
            break
        time.sleep(0.5)
    assert box.get_attribute("value") == folder
    seen = set()
    drv.find_element("css selector", "#video-stream").click()

    def done():
        t = _text(drv, "video-text")
        seen.add(t)
        return "frame 4/4" in t
    try:
        _wait(done, 120, "the last frame")
    except AssertionError:
        raise AssertionError(f"page: {drv.find_element('tag name', 'body').text[-800:]!r}; seen {seen}") from None
    assert any(t.startswith("frame") for t in seen)
    assert _images(drv, "video-frame") and _images(drv, "video-strip")
    assert "chunked chunks of 2" in _text(drv, "video-text")
