"""Property-based fuzzing (hypothesis) of the engine API and the HTTP API with the tiny random bundle.

Every generated case must end in a clear error (ImageInputError / EngineInputError / gr.Error: one line, no
traceback) or a valid result; the served studio must stay up; a refused request yields nothing first, so the
visitor's other widgets keep their values. Bounded and seeded: derandomize=True, fixed example counts,
>= 500 examples across the generators.
"""
from __future__ import annotations

import io
import os

import gradio as gr
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from demo_core.engine import EngineInputError, load_engine
from demo_core.images import ImageInputError, load_square
from demo_core.testing import build_tiny_bundle
from studio.handlers import MAX_ROWS, OUTPUTS, Studio

FUZZ = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
FAST = dict(scan_iterations=1, scan_cells=1, canvas_every=16, frame_ms=0, refiners="none (draft only)")
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B", "La", "RGBa"]
BUDGET = dict(images=250, arrays=60, engine=40, settings=120, pairs=60, http=30)     # max_examples per generator
RAN: dict[str, int] = {}
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(str(build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")))


@pytest.fixture(scope="module")
def studio(engine):
    return Studio(engine, "tiny")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def good(folder):
    paths = []
    for index in range(3):
        path = folder / f"good{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def clear(message: str) -> bool:
    return bool(message) and "Traceback" not in message and len(message) < 400


@st.composite
def image_files(draw):
    """Bytes of an image file: every PIL mode, extreme sizes and aspect ratios, EXIF orientations, some truncated,
    some pure noise."""
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "noise"]))
    if kind == "noise":
        return draw(st.binary(min_size=0, max_size=256)), ".png"
    mode = draw(st.sampled_from(MODES))
    width = draw(st.one_of(st.integers(1, 4), st.integers(5, 80), st.sampled_from([1, 2, 3000])))
    height = draw(st.one_of(st.integers(1, 4), st.integers(5, 80), st.sampled_from([1, 2])))
    if draw(st.booleans()):
        width, height = height, width
    fmt = draw(st.sampled_from(list(FORMATS)))
    seed = draw(st.integers(0, 2**16))
    base = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    try:
        image = base.convert(mode)
    except (ValueError, OSError):
        image = base
    buffer = io.BytesIO()
    options = {}
    orientation = draw(st.integers(0, 9))
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    try:
        image.save(buffer, fmt, **options)
    except (OSError, ValueError, TypeError, KeyError):
        buffer = io.BytesIO()
        try:
            image.save(buffer, "PNG")
            fmt = "PNG"
        except (OSError, ValueError, TypeError, KeyError):
            base.save(buffer, "PNG")
            fmt = "PNG"
    data = buffer.getvalue()
    if kind == "truncated":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    return data, FORMATS[fmt]


def write(folder, data: bytes, suffix: str, name: str) -> str:
    path = folder / f"{name}{suffix}"
    path.write_bytes(data)
    return str(path)


# --------------------------------------------------------------------------------------------- engine API


@settings(max_examples=BUDGET["images"], **FUZZ)
@given(case=image_files(), size=st.sampled_from([16, 64]))
def test_any_image_file_loads_square_or_is_explained(folder, case, size):
    RAN["images"] = RAN.get("images", 0) + 1
    data, suffix = case
    path = write(folder, data, suffix, "case")
    try:
        image = load_square(path, size, "query")
    except ImageInputError as error:
        assert clear(str(error)) and str(error).startswith("query")
    else:
        assert image.mode == "RGB" and image.size == (size, size)


@settings(max_examples=BUDGET["arrays"], **FUZZ)
@given(array=st.one_of(
    st.tuples(st.integers(0, 70), st.integers(0, 70), st.sampled_from([None, 1, 2, 3, 4, 5])),
    st.tuples(st.just(1), st.integers(1, 5000), st.just(3))),
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int64, bool]))
def test_any_array_loads_or_is_explained(array, dtype):
    RAN["arrays"] = RAN.get("arrays", 0) + 1
    height, width, channels = array
    shape = (height, width) if channels is None else (height, width, channels)
    values = np.random.default_rng(height * 131 + width).random(shape) * (255 if dtype is not bool else 1)
    try:
        image = load_square(values.astype(dtype), 16, "pair 1 input")
    except ImageInputError as error:
        assert clear(str(error))
    else:
        assert image.size == (16, 16)


@settings(max_examples=BUDGET["engine"], **FUZZ)
@given(case=image_files(), where=st.sampled_from(["query", "pair input", "pair answer"]))
def test_engine_run_with_fuzzed_images(engine, folder, good, case, where):
    RAN["engine"] = RAN.get("engine", 0) + 1
    data, suffix = case
    path = write(folder, data, suffix, "engine-case")
    pairs = [(good[0], good[1])]
    query = good[2]
    if where == "query":
        query = path
    elif where == "pair input":
        pairs = [(path, good[1])]
    else:
        pairs = [(good[0], path)]
    try:
        result = engine.run(pairs=pairs, query=query, refine=(), seed=0, canvas_every=16)
    except (EngineInputError, ImageInputError) as error:
        assert clear(str(error))
    else:
        assert result.final.size == (engine.image_size, engine.image_size)


WEIRD = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=BUDGET["settings"], **FUZZ)
@given(overrides=st.fixed_dictionaries({}, optional=dict(
    refiners=st.one_of(st.sampled_from(["SCAN", "VSR", "none (draft only)", "SCAN → VSR"]), WEIRD),
    scan_iterations=WEIRD, scan_cells=WEIRD, temperature=WEIRD, top_p=WEIRD, top_k=WEIRD, seed=WEIRD,
    randomize_seed=WEIRD, candidates=WEIRD, canvas_every=WEIRD, frame_ms=WEIRD,
    draft_mode=st.one_of(st.sampled_from(["ar", "tensor"]), WEIRD),
    quality_score=st.one_of(st.sampled_from(["combined", "head"]), WEIRD), model=WEIRD)))
def test_wrongly_typed_and_out_of_range_settings(studio, good, overrides):
    """A refused setting raises gr.Error before the first frame (no widget changes); an accepted one streams."""
    RAN["settings"] = RAN.get("settings", 0) + 1
    options = dict(pairs=[(good[0], good[1])], query=good[2], truth=None, **{**FAST, **overrides})
    frames = studio.generate(**options)
    try:
        first = next(frames)
    except gr.Error as error:
        assert clear(str(error.message))
    else:
        assert len(first) == len(OUTPUTS)
        for _ in zip(range(3), frames):       # a few more frames, then stop as the Stop button would
            pass
    finally:
        frames.close()


@settings(max_examples=BUDGET["pairs"], **FUZZ)
@given(pairs=st.lists(st.tuples(st.sampled_from([None, "good", "bad", "empty"]), st.sampled_from([None, "good", "bad", "empty"])),
                      max_size=MAX_ROWS + 3),
       query=st.sampled_from([None, "good", "bad", "empty"]), truth=st.sampled_from([None, "good", "bad"]))
def test_missing_and_extra_pairs(studio, folder, good, pairs, query, truth):
    RAN["pairs"] = RAN.get("pairs", 0) + 1
    bad = write(folder, b"GIF89a not really", ".gif", "bad")
    empty = write(folder, b"", ".png", "empty")
    files = {None: None, "good": good[0], "bad": bad, "empty": empty}
    frames = studio.generate(pairs=[(files[x], files[y]) for x, y in pairs], query=files[query], truth=files[truth], **FAST)
    try:
        outputs = list(frames)
    except gr.Error as error:
        assert clear(str(error.message))
    else:
        assert 'data-state="done"' in outputs[-1][OUTPUTS.index("status")]


# --------------------------------------------------------------------------------------------- HTTP API


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    from gradio_client import Client

    import app

    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    demo = app.build_demo(engine, "tiny")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options())
    try:
        yield Client(url, verbose=False, download_files=False), url
    finally:
        demo.close()
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


@settings(max_examples=BUDGET["http"], **FUZZ)
@given(case=image_files(), where=st.sampled_from(["query", "pair1_input", "truth"]),
       extra=st.fixed_dictionaries({}, optional=dict(scan_iterations=st.sampled_from([-1, 0, 1, 10**9, 2.5]),
                                                     temperature=st.sampled_from([-1.0, 0.0, 1e9]),
                                                     top_k=st.sampled_from([-5, 0, 3]))))
def test_http_api_survives_fuzzed_uploads(served, folder, good, case, where, extra):
    RAN["http"] = RAN.get("http", 0) + 1
    import httpx
    from gradio_client import handle_file

    client, url = served
    data, suffix = case
    path = write(folder, data, suffix, "http-case")
    request = dict(pair1_input=handle_file(good[0]), pair1_answer=handle_file(good[1]), query=handle_file(good[2]),
                   scan_iterations=1, scan_cells=1, canvas_every=16, frame_ms=0, refiners="none (draft only)")
    request[where] = handle_file(path)
    request.update(extra)
    try:
        outputs = client.predict(**request, api_name="/generate")
    except Exception as error:                            # gr.Error reaches the client as AppError with its message
        assert type(error).__name__ == "AppError" and clear(str(error)), repr(error)
    else:
        assert 'data-state="done"' in outputs[1]
    assert httpx.get(url, timeout=10).status_code == 200  # the server is still up


def test_the_fuzz_ran_at_least_500_examples():
    """Counted as they ran (hypothesis stops early when a strategy's space is used up)."""
    if set(RAN) != set(BUDGET):
        pytest.skip("only part of the fuzz module ran")
    assert sum(RAN.values()) >= 500, RAN
