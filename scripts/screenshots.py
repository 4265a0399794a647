"""Screenshots of the real studio for the README, and the click-to-final-image time.

Serves app.py's page in this process, drives it in headless Debian Chromium (Playwright) and
writes small PNGs to docs/screenshots/: studio.png (whole page mid-generation), live.png,
quality.png, timeline.png, before_after.png, metrics.png; with a TensorAR part also
tensor_live.png (the sliding window mid-draft) and tensor_timeline.png (revisions per slide).

    python -m scripts.screenshots [--bundle FOLDER] [--example colorization] [--out docs/screenshots]

The model is RETOUCH_BUNDLE / --bundle, else the embedded default.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]      # run with the package installed (pip install -e .) or scripts/run.sh's PYTHONPATH

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DONE = '#status .rt-status[data-state="done"]'


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def shrink(path: Path) -> None:
    """Palette PNG (256 colours): a third of the size, indistinguishable for a UI screenshot."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def timed_run(page, timeout_ms: int) -> float:
    """Click Generate; seconds until the final image is on screen."""
    start = time.perf_counter()
    page.click("#generate")
    page.wait_for_selector('#status .rt-status[data-state="running"]', state="attached", timeout=timeout_ms)
    page.wait_for_selector(DONE, state="attached", timeout=timeout_ms)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=os.environ.get("RETOUCH_BUNDLE"), help="bundle folder (default: embedded)")
    parser.add_argument("--example", default=None, help="task of the example to run (default: the first)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for a generation")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing; apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 1
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="retouch-shots-"))

    import app
    from demo_core.bundle import BundleError
    from demo_core.engine import load_engine
    from playwright.sync_api import sync_playwright

    try:
        engine = load_engine(args.bundle)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    label = "embedded default" if not args.bundle else Path(args.bundle).name
    app.warm_up(engine)
    demo = app.build_demo(engine, label)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options())
    args.out.mkdir(parents=True, exist_ok=True)
    timeout_ms = int(args.timeout * 1000)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 940})
            page.set_default_timeout(timeout_ms)
            page.goto(url)
            page.wait_for_selector("#generate")
            thumbnails = page.locator("#examples img")
            index = 0
            if args.example:
                from studio.handlers import list_examples

                index = list(list_examples()).index(args.example)
            thumbnails.nth(index).click()
            page.wait_for_selector("#query img")
            page.wait_for_selector("#truth img")

            # 1. click-to-final with the default settings (live view paced), then as fast as it runs
            paced = timed_run(page, timeout_ms)
            page.locator("#advanced").get_by_text("Advanced").first.click()
            set_number(page, "pace", 0)
            unpaced = timed_run(page, timeout_ms)

            # 2. a slowed-down run for the mid-generation shots
            set_number(page, "pace", 250)
            page.locator("#advanced").get_by_text("Advanced").first.click()      # fold it again
            page.click("#generate")
            page.wait_for_function(
                "() => { const s = document.querySelector('#status .rt-status');"
                " return s && s.dataset.state === 'running' && /Drafting: [1-9]/.test(s.textContent)"
                " && document.querySelector('#canvas img'); }", timeout=timeout_ms)
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(300)
            page.screenshot(path=args.out / "studio.png", full_page=True)
            page.locator("#outputs").screenshot(path=args.out / "live.png")
            page.wait_for_selector(DONE, state="attached", timeout=timeout_ms)

            # 3. the result views, after a run at the default pace (their status line shows its time)
            page.locator("#advanced").get_by_text("Advanced").first.click()
            set_number(page, "pace", 60)
            page.locator("#advanced").get_by_text("Advanced").first.click()
            timed_run(page, timeout_ms)

            for tab, name in (("Quality", "quality"), ("Timeline", "timeline"), ("Before / after", "before_after"),
                              ("Metrics", "metrics")):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(700)
                if name == "timeline" and page.locator("#timeline-slider").is_visible():
                    set_number(page, "timeline-slider", 2)
                    page.wait_for_timeout(700)
                page.locator("#outputs").screenshot(path=args.out / f"{name}.png")

            # 4. TensorAR, when the model has it: the sliding window mid-draft, then its revisions per slide
            page.get_by_role("tab", name="Live").click()
            page.locator("#advanced").get_by_text("Advanced").first.click()
            if page.locator("#draft-mode").is_visible():
                page.locator("#draft-mode").get_by_text("TensorAR").click()
                set_number(page, "pace", 250)
                page.locator("#advanced").get_by_text("Advanced").first.click()
                page.click("#generate")
                page.wait_for_function(
                    "() => { const s = document.querySelector('#status .rt-status');"
                    " return s && s.dataset.state === 'running' && /TensorAR step [2-9][0-9]/.test(s.textContent); }",
                    timeout=timeout_ms)
                page.locator("#outputs").screenshot(path=args.out / "tensor_live.png")
                page.wait_for_selector(DONE, state="attached", timeout=timeout_ms)
                page.get_by_role("tab", name="Timeline").click()
                page.wait_for_timeout(900)
                page.locator("#outputs").screenshot(path=args.out / "tensor_timeline.png")
            browser.close()
    finally:
        demo.close()
    for path in sorted(args.out.glob("*.png")):
        shrink(path)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  {path.stat().st_size / 1024:.0f} KB")
    print(f"click to final image ({label}, {engine.grid}x{engine.grid} tokens, example #{index + 1}): "
          f"{paced:.1f} s with the default live-view pace, {unpaced:.1f} s unpaced")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
