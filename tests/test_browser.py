"""The studio in headless Debian Chromium (Playwright): what a person sees and clicks.

Loads the page, clicks an example and Generate, watches the live canvas change, reaches the
final image, opens the Quality and Timeline tabs, and stops a second run with Stop. In sequence
mode: clicks a sequence example, reorders a frame, generates the next frame, and removes frames
until a run is refused with one status line.
"""
import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# records every distinct image the live canvas shows (frames can come faster than a screenshot loop)
WATCH_CANVAS = """() => {
  window.__frames = [];
  const root = document.querySelector('#canvas');
  const record = () => {
    const img = root.querySelector('img');
    if (img && img.src && window.__frames[window.__frames.length - 1] !== img.src) window.__frames.push(img.src);
  };
  new MutationObserver(record).observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
}"""


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    import app
    from demo_core.engine import load_engine
    from demo_core.testing import build_tiny_bundle

    engine = load_engine(str(build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")))
    demo = app.build_demo(engine, "tiny test bundle")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options())
    yield url
    demo.close()
    if previous is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = previous


@pytest.fixture(scope="module")
def page(studio_url, tmp_path_factory):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(studio_url)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def status_state(page) -> str:
    return page.locator("#status .rt-status").get_attribute("data-state")


def test_example_generate_live_canvas_tabs_and_stop(page):
    expect = playwright_api.expect
    # one click on an example fills the pairs, the query and the ground truth
    page.locator("#examples img").first.click()
    expect(page.locator("#query img")).to_be_visible()
    expect(page.locator("#truth img")).to_be_visible()

    page.evaluate(WATCH_CANVAS)
    page.click("#generate")
    expect(page.locator('#status .rt-status[data-state="done"]')).to_be_attached(timeout=60_000)
    frames = page.evaluate("window.__frames")
    assert len(frames) >= 4, f"the live canvas changed only {len(frames)} times"   # >= 3 changes, then the final image
    final = page.locator("#canvas img")
    expect(final).to_be_visible()
    assert page.evaluate("document.querySelector('#canvas img').naturalWidth") >= 192     # sent at 3x or more
    assert page.evaluate("document.querySelector('#canvas img').getBoundingClientRect().width") >= 320   # shown large
    expect(page.locator("#status")).to_contain_text("Done in")

    page.get_by_role("tab", name="Quality").click()
    expect(page.locator("#quality-draft img").first).to_be_visible()
    expect(page.locator("#quality-final img").first).to_be_visible()

    page.get_by_role("tab", name="Timeline").click()
    expect(page.locator("#timeline-slider")).to_be_visible()
    expect(page.locator("#timeline-image img")).to_be_visible()
    number = page.locator("#timeline-slider input[type=number]")
    number.fill("1")
    number.press("Enter")
    expect(page.get_by_text("Iteration 1 ", exact=False)).to_be_visible()

    # a second, slowed-down run, stopped halfway
    page.get_by_role("tab", name="Live").click()
    page.locator("#advanced").get_by_text("Advanced").first.click()
    pace = page.locator("#pace input[type=number]")
    pace.fill("400")
    pace.press("Enter")
    page.evaluate(WATCH_CANVAS)
    page.click("#generate")
    expect(page.locator('#status .rt-status[data-state="running"]')).to_be_attached()
    expect(page.locator("#status")).to_contain_text("Drafting")
    page.click("#stop")
    expect(page.locator('#status .rt-status[data-state="stopped"]')).to_be_attached()
    frames_at_stop = len(page.evaluate("window.__frames"))
    page.wait_for_timeout(1500)
    assert status_state(page) == "stopped"                                  # the run did not finish after Stop
    assert len(page.evaluate("window.__frames")) <= frames_at_stop + 1      # and the canvas stopped changing


def frame_names(page) -> list[str]:
    """The frames gallery's images, by file name, in the order shown."""
    return page.evaluate("[...document.querySelectorAll('#frames img')].map(img => decodeURIComponent(img.src).split('/').pop())")


def test_sequence_mode_example_reorder_generate_and_refused_run(page, studio_url):
    expect = playwright_api.expect
    page.goto(studio_url)                                                   # a fresh page: pairs mode, nothing run
    page.wait_for_selector("#generate")
    page.locator("#prompt-kind label").filter(has_text="Sequence").click()
    expect(page.locator("#sequence-inputs")).to_be_visible()
    expect(page.locator("#pair-inputs")).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("next frame")

    # one click on a sequence example fills the frames (oldest first) and the true next frame
    page.locator("#sequence-examples img").first.click()
    expect(page.locator("#frames img")).to_have_count(4)
    expect(page.locator("#next-truth img")).to_be_visible()
    assert frame_names(page) == ["frame1.png", "frame2.png", "frame3.png", "frame4.png"]

    # frame 3 one place earlier, then back
    page.locator("#frames img").nth(2).click()
    page.click("#frame-earlier")
    page.wait_for_function("() => decodeURIComponent(document.querySelectorAll('#frames img')[1].src).endsWith('frame3.png')")
    assert frame_names(page) == ["frame1.png", "frame3.png", "frame2.png", "frame4.png"]
    page.click("#frame-later")
    page.wait_for_function("() => decodeURIComponent(document.querySelectorAll('#frames img')[2].src).endsWith('frame3.png')")

    # generate the next frame: the live canvas changes, then the finished run's status
    page.evaluate(WATCH_CANVAS)
    page.click("#generate")
    expect(page.locator('#status .rt-status[data-state="done"]')).to_be_attached(timeout=60_000)
    expect(page.locator("#status")).to_contain_text("Done in")
    assert len(page.evaluate("window.__frames")) >= 4, "the live canvas hardly changed"
    assert page.evaluate("document.querySelector('#canvas img').naturalWidth") >= 192     # sent at 3x or more
    assert page.evaluate("document.querySelector('#canvas img').getBoundingClientRect().width") >= 320   # shown large
    page.get_by_role("tab", name="Metrics").click()
    expect(page.get_by_text("true next frame you gave")).to_be_visible()
    page.get_by_role("tab", name="Live").click()

    # down to one frame: the run is refused with one line in the status; the other inputs stay
    page.locator("#frames img").first.click()
    for remaining in (3, 2, 1):
        page.click("#frame-remove")
        expect(page.locator("#frames img")).to_have_count(remaining)
    page.click("#generate")
    expect(page.locator('#status .rt-status[data-state="error"]')).to_be_attached()
    expect(page.locator("#status")).to_contain_text("at least 2 frames")
    expect(page.locator("#next-truth img")).to_be_visible()
    expect(page.locator("#canvas img")).to_be_visible()                     # the last run's frame is still shown
    page.click("#frames-clear")                                             # an edit: the red line gives way to the hint
    expect(page.locator("#frames img")).to_have_count(0)
    expect(page.locator('#status .rt-status[data-state="idle"]')).to_be_attached()

    # pairs mode again: its inputs are back as they were
    page.locator("#prompt-kind label").filter(has_text="Pairs").click()
    expect(page.locator("#pair-inputs")).to_be_visible()
    expect(page.locator("#sequence-inputs")).to_be_hidden()


# records every data-state the status line takes (a fast run can pass "running" between two polls)
WATCH_STATUS = """(selector) => {
  window.__states = [];
  const root = document.querySelector(selector);
  new MutationObserver(() => {
    const line = root.querySelector('.rt-status');
    if (line) window.__states.push(line.getAttribute('data-state'));
  }).observe(root, {subtree: true, childList: true, attributes: true});
}"""


def test_teach_tab_upload_train_generate_with_and_without_and_export(page, studio_url, tmp_path):
    import numpy as np
    from PIL import Image

    expect = playwright_api.expect
    rng = np.random.default_rng(0)
    files = []
    for name in ("one", "two", "three"):
        x = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        for side, image in (("input", x), ("answer", 255 - x)):
            files.append(str(tmp_path / f"{name}_{side}.png"))
            Image.fromarray(image).save(files[-1])
    page.goto(studio_url)
    page.wait_for_selector("#generate")
    page.locator("#examples img").first.click()                             # the generation inputs, kept throughout
    expect(page.locator("#query img")).to_be_visible()

    page.get_by_role("tab", name="Teach").click()
    page.locator("#teach-files input[type=file]").set_input_files(files)
    expect(page.locator("#teach-pairs img")).to_have_count(6)                 # the pairs as a grid
    expect(page.locator("#teach-status")).to_contain_text("3 pairs ready")
    steps = page.locator("#teach-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.evaluate(WATCH_STATUS, "#teach-status")
    page.click("#teach")
    expect(page.locator('#teach-status .rt-status[data-state="done"]')).to_be_attached(timeout=90_000)
    expect(page.locator("#teach-status")).to_contain_text("taught 2 of 2 steps on 3 pairs")
    assert "running" in page.evaluate("window.__states")                     # the progress bar moved on the way
    expect(page.locator("#teach-loss")).to_be_visible()

    page.get_by_role("tab", name="Live").click()
    for use in (False, True):                                                # without, then with the adapter
        if use:
            page.locator("#use-adapter input[type=checkbox]").check()
        page.evaluate(WATCH_STATUS, "#status")
        page.click("#generate")
        page.wait_for_function("window.__states.includes('done')", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("Done in")
        expect(page.locator("#canvas img")).to_be_visible()
    expect(page.locator("#query img")).to_be_visible()                       # the other inputs stayed

    page.get_by_role("tab", name="Teach").click()
    page.click("#teach-export")
    expect(page.locator('#teach-file a[href$="retouch-adapter.zip"]')).to_be_attached(timeout=30_000)
    href = page.locator('#teach-file a[href$="retouch-adapter.zip"]').first.get_attribute("href")
    archive = page.context.request.get(href if href.startswith("http") else studio_url.rstrip("/") + href)
    zip_path = tmp_path / "retouch-adapter.zip"
    zip_path.write_bytes(archive.body())
    with page.expect_file_chooser() as chooser:                                  # the download, loaded back
        page.click("#teach-load")
    chooser.value.set_files(str(zip_path))
    expect(page.locator("#teach-status")).to_contain_text("Loaded retouch-adapter.zip", timeout=30_000)
