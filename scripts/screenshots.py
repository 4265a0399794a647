"""Screenshots of the real studio for the README, and the click-to-final-image time.

Serves app.py's page in this process, drives it in headless Debian Chromium (Playwright) and
writes small PNGs to docs/screenshots/: studio.png (whole page mid-generation), live.png,
quality.png, timeline.png, before_after.png, metrics.png; with a TensorAR part also
tensor_live.png (the sliding window mid-draft) and tensor_timeline.png (revisions per slide); in
sequence mode sequence.png (a sequence example loaded, before generating), sequence_done.png (the
written next frame) and sequence_compare.png (every stage beside the true next frame).

    python -m scripts.screenshots [--bundle FOLDER] [--example colorization] [--out docs/screenshots]
    python -m scripts.screenshots --shots sequence [--sequence-example sequence-cutout]
    python -m scripts.screenshots --shots teach        # the Teach tab after 12 steps on 8 solarize pairs

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


def pair_shots(page, url: str, out: Path, timeout_ms: int, index: int) -> tuple[list[Path], float, float]:
    """The analogy prompt's shots with pair example `index`; returns the files written and the click-to-final times."""
    page.goto(url)
    page.wait_for_selector("#generate")
    thumbnails = page.locator("#examples img")
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
    page.screenshot(path=out / "studio.png", full_page=True)
    page.locator("#outputs").screenshot(path=out / "live.png")
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
        page.locator("#outputs").screenshot(path=out / f"{name}.png")

    # 4. TensorAR, when the model has it: the sliding window mid-draft, then its revisions per slide
    page.get_by_role("tab", name="Live").click()
    page.locator("#advanced").get_by_text("Advanced").first.click()
    tensor = page.locator("#draft-mode").is_visible()
    if tensor:
        page.locator("#draft-mode").get_by_text("TensorAR").click()
        set_number(page, "pace", 250)
        page.locator("#advanced").get_by_text("Advanced").first.click()
        page.click("#generate")
        page.wait_for_function(
            "() => { const s = document.querySelector('#status .rt-status');"
            " return s && s.dataset.state === 'running' && /TensorAR step [2-9][0-9]/.test(s.textContent); }",
            timeout=timeout_ms)
        page.locator("#outputs").screenshot(path=out / "tensor_live.png")
        page.wait_for_selector(DONE, state="attached", timeout=timeout_ms)
        page.get_by_role("tab", name="Timeline").click()
        page.wait_for_timeout(900)
        page.locator("#outputs").screenshot(path=out / "tensor_timeline.png")
    shots = ["studio", "live", "quality", "timeline", "before_after", "metrics"]
    if tensor:
        shots += ["tensor_live", "tensor_timeline"]
    return [out / f"{name}.png" for name in shots], paced, unpaced


def sequence_shots(page, url: str, out: Path, timeout_ms: int, example: str) -> list[Path]:
    """Sequence mode on a fresh page: the example loaded, then the finished run (Live and Before / after)."""
    from studio.handlers import list_sequence_examples

    page.goto(url)
    page.wait_for_selector("#generate")
    page.locator("#prompt-kind label").filter(has_text="Sequence").click()
    page.wait_for_selector("#sequence-examples img")
    page.locator("#sequence-examples img").nth(list(list_sequence_examples()).index(example)).click()
    page.wait_for_selector("#next-truth img")
    page.wait_for_function("() => document.querySelectorAll('#frames img').length >= 2 && "
                           "[...document.querySelectorAll('#frames img, #sequence-examples img')].every(img => img.complete)")
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(500)
    shots = [out / "sequence.png", out / "sequence_done.png", out / "sequence_compare.png"]
    page.screenshot(path=shots[0], full_page=True)
    timed_run(page, timeout_ms)
    page.wait_for_timeout(700)
    page.screenshot(path=shots[1], full_page=True)
    page.get_by_role("tab", name="Before / after").click()
    page.wait_for_timeout(900)
    page.locator("#outputs").screenshot(path=shots[2])
    return shots


def teach_shots(page, url: str, out: Path, timeout_ms: int, steps: int = 12) -> list[Path]:
    """The Teach tab: 8 solarize pairs (training photos) uploaded, taught for `steps` steps, the loss plot."""
    import numpy as np

    from demo_core.data import ImageSampler
    from demo_core.images import float_to_pil
    from demo_core.task_family import make_pair

    folder = Path(tempfile.mkdtemp(prefix="retouch-teach-shots-"))
    sampler, rng = ImageSampler("train", 64, 0, pool="builtin"), np.random.default_rng(0)
    files = []
    for number in range(8):
        for side, image in zip(("input", "answer"), make_pair(sampler.sample(), "solarize", {"threshold": 0.5}, rng)):
            files.append(str(folder / f"photo{number}_{side}.png"))
            float_to_pil(image).save(files[-1])
    page.goto(url)
    page.wait_for_selector("#generate")
    page.get_by_role("tab", name="Teach").click()
    page.locator("#teach-files input[type=file]").set_input_files(files)
    page.wait_for_function("() => document.querySelectorAll('#teach-pairs img').length == 16")
    set_number(page, "teach-steps", steps)
    page.click("#teach")
    page.wait_for_selector('#teach-status .rt-status[data-state="done"]', state="attached", timeout=timeout_ms)
    page.wait_for_timeout(900)
    shot = out / "teach.png"
    page.locator("#outputs").screenshot(path=shot)
    return [shot]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=os.environ.get("RETOUCH_BUNDLE"), help="bundle folder (default: embedded)")
    parser.add_argument("--example", default=None, help="task of the example to run (default: the first)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for a generation")
    parser.add_argument("--shots", choices=("all", "pairs", "sequence", "teach"), default="all",
                        help="which shots to take (pairs: the analogy prompt's; sequence: sequence mode's)")
    parser.add_argument("--sequence-example", default="sequence-cutout", help="the sequence example to run")
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
    index = 0
    if args.example:
        from studio.handlers import list_examples

        index = list(list_examples()).index(args.example)
    written: list[Path] = []
    paced = unpaced = None
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 940})
            page.set_default_timeout(timeout_ms)
            if args.shots in ("all", "pairs"):
                shots, paced, unpaced = pair_shots(page, url, args.out, timeout_ms, index)
                written += shots
            if args.shots in ("all", "sequence"):
                written += sequence_shots(page, url, args.out, timeout_ms, args.sequence_example)
            if args.shots in ("all", "teach"):
                written += teach_shots(page, url, args.out, timeout_ms)
            browser.close()
    finally:
        demo.close()
    for path in written:
        shrink(path)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  {path.stat().st_size / 1024:.0f} KB")
    if paced is not None:
        print(f"click to final image ({label}, {engine.grid}x{engine.grid} tokens, example #{index + 1}): "
              f"{paced:.1f} s with the default live-view pace, {unpaced:.1f} s unpaced")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
