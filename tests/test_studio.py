"""The studio's handlers on a tiny random bundle: generators exhausted, every bad input a gr.Error,
the model selector, examples, and one generation streamed through gradio_client."""
import json
import os
import time

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from demo_core.engine import load_engine
from demo_core.images import load_square, pil_to_float
from demo_core.metrics import psnr
from demo_core.testing import build_tiny_bundle
from demo_core import viz
from studio import handlers
from studio.handlers import LIVE_OUTPUTS, MAX_ROWS, OUTPUTS, REPORT_OUTPUTS, RunView, Studio

FAST = dict(scan_iterations=4, scan_cells=2, canvas_every=1, frame_ms=0)


@pytest.fixture(scope="module")
def temp_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gradio")
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = previous


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def engine(bundle):
    return load_engine(str(bundle))


@pytest.fixture()
def studio(engine):
    return Studio(engine, "tiny test bundle")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("x1", "y1", "x2", "y2", "query", "truth"):
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(paths[name])
    return paths


def by_name(output: tuple) -> dict:
    return dict(zip(OUTPUTS, output))


def is_set(value) -> bool:
    """A real output value (not gr.skip())."""
    return not (isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1)


def run(studio, images, **overrides):
    options = dict(pairs=[(images["x1"], images["y1"]), (images["x2"], images["y2"])], query=images["query"],
                   truth=images["truth"], refiners="SCAN", **FAST)
    options.update(overrides)
    return [by_name(frame) for frame in studio.generate(**options)]


# ---------------------------------------------------------------------------------------------
# generation


def test_generate_streams_the_canvas_then_every_view(studio, images):
    frames = run(studio, images)
    canvases = [f["canvas"] for f in frames if isinstance(f["canvas"], Image.Image)]
    assert len(canvases) >= 16 // FAST["canvas_every"]                  # a frame per token, then SCAN frames
    assert len({c.tobytes() for c in canvases}) >= 3                     # the canvas really changes
    assert canvases[0].width >= 192                                      # sent upscaled (the browser enlarges it further)
    last = frames[-1]
    assert 'data-state="done"' in last["status"]
    assert isinstance(last["run_state"], RunView)
    result = last["run_state"].result
    assert list(result.stages) == ["draft", "scan"]
    base, bands = last["quality_draft"]
    assert base.size == (base.width, base.width) and bands and all(mask.shape == (base.width, base.width) for mask, _ in bands)
    assert last["quality_final"] is not None
    assert last["timeline_slider"]["visible"] and last["timeline_slider"]["maximum"] == len(result.history) >= 1
    assert isinstance(last["timeline_image"], Image.Image)
    before, after = last["before_after"]
    assert before.size == after.size
    assert last["compare_b"]["value"] == "scan" and ("ground truth", "ground truth") in last["compare_b"]["choices"]
    table = last["metrics_table"]
    assert [row[0] for row in table] == ["query (doing nothing)", "draft", "SCAN"]
    assert all(isinstance(row[1], float) for row in table)                # PSNR with a ground truth
    size = result.query.size[0]
    assert table[0][1] == pytest.approx(psnr(pil_to_float(result.query), pil_to_float(load_square(images["truth"], size))),
                                        abs=0.01)
    assert last["cosine_plot"] is not None and last["quality_plot"] is not None
    assert any(row[0] == "total" for row in last["timings_table"])
    status_stages = [f["status"] for f in frames if is_set(f["status"])]
    assert any("Drafting" in s for s in status_stages) and any("SCAN iteration" in s for s in status_stages)


def test_generate_from_widgets_and_draft_only(studio, images):
    widgets = [None] * (2 * MAX_ROWS)
    widgets[0:2] = [images["x1"], images["y1"]]
    frames = [by_name(f) for f in studio.generate_from_widgets(
        *widgets, images["query"], None, "none (draft only)", 0, 1, 0.0, 0.9, 0, 7, False, 1, 4, 0)]
    last = frames[-1]
    assert last["seed"] == 7 or any(f["seed"] == 7 for f in frames)
    assert list(last["run_state"].result.stages) == ["draft"]
    assert last["timeline_slider"]["visible"] is False
    assert last["cosine_plot"] is None and "ground-truth" in last["metrics_note"]
    assert all(row[1] is None for row in last["metrics_table"])         # no ground truth, no PSNR


def test_same_seed_same_image(studio, images):
    first = run(studio, images, seed=3)[-1]["run_state"].result.final
    again = run(studio, images, seed=3)[-1]["run_state"].result.final
    assert first.tobytes() == again.tobytes()


def test_randomized_seed_is_reported(studio, images):
    frames = run(studio, images, randomize_seed=True, refiners="none (draft only)")
    seeds = [f["seed"] for f in frames if is_set(f["seed"])]
    assert len(seeds) == 1 and 0 <= seeds[0] < 2**31


def test_both_refiners_in_either_order(images, tmp_path):
    engine = load_engine(str(build_tiny_bundle(tmp_path / "with-vsr", refiner=True)))
    studio = Studio(engine)
    assert "SCAN → VSR" in handlers.refiner_choices(engine.available_refiners)
    for choice, stages in (("SCAN → VSR", ["draft", "scan", "vsr"]), ("VSR → SCAN", ["draft", "vsr", "scan"])):
        frames = run(studio, images, refiners=choice)
        last = frames[-1]
        assert list(last["run_state"].result.stages) == stages
        assert [row[0] for row in last["metrics_table"]] == ["query (doing nothing)", "draft",
                                                             *(viz_title(s) for s in stages[1:])]
        vsr_updates = [f["vsr_image"] for f in frames if is_set(f["vsr_image"]) and f["vsr_image"].get("visible")]
        assert vsr_updates and isinstance(vsr_updates[-1]["value"], Image.Image)
        assert "VSR" in last["status"] and last["stage_grid"].width > 3 * 100


def test_quality_score_choice_reaches_the_heatmap(studio, images):
    """The paper's head-only score and the default combined one: same draft tokens, the combined score is lower."""
    head = run(studio, images, quality_score="head")[-1]["run_state"].result
    combined = run(studio, images)[-1]["run_state"].result
    assert (head.codes["draft"] == combined.codes["draft"]).all()
    assert (combined.quality["draft"] <= head.quality["draft"] + 1e-6).all()
    assert not np.allclose(combined.quality["draft"], head.quality["draft"])


def test_paste_choice_reaches_the_run_and_the_status_says_what_the_copied_cells_show(studio, images):
    default = run(studio, images)[-1]
    assert not default["run_state"].result.pasted                   # the tiny test model's codes are not local
    assert "keep the query's code" in default["status"] or "Every cell was redrawn" in default["status"]
    pasted = run(studio, images, paste="on")[-1]
    assert pasted["run_state"].result.pasted and pasted["run_state"].result.kept.shape == (4, 4)


def test_tensor_draft_shows_the_sliding_window(images, tmp_path):
    engine = load_engine(str(build_tiny_bundle(tmp_path / "with-tensor", tensor=True)))
    studio = Studio(engine)
    assert handlers.draft_mode_update(engine)["visible"] is True
    frames = run(studio, images, draft_mode="tensor", refiners="SCAN")
    statuses = [f["status"] for f in frames if is_set(f["status"])]
    assert sum("TensorAR step" in s for s in statuses) >= 3
    assert 'data-state="done"' in frames[-1]["status"]
    plot = frames[-1]["tensor_plot"]                              # the timeline's revisions-per-slide plot
    assert plot["visible"] is True and plot["value"] is not None
    with pytest.raises(gr.Error, match="cannot draft"):
        next(studio.generate(pairs=[(images["x1"], images["y1"])], query=images["query"], draft_mode="diffusion"))


def viz_title(stage):
    from demo_core.viz import stage_title

    return stage_title(stage)


def test_odd_image_modes_are_accepted(studio, images, tmp_path):
    rng = np.random.default_rng(1)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(grey16)
    with_alpha = tmp_path / "alpha.png"
    Image.fromarray(rng.integers(0, 256, (20, 40, 4), dtype=np.uint8), "RGBA").save(with_alpha)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(cmyk)
    palette = tmp_path / "palette.gif"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(palette)
    frames = run(studio, images, pairs=[(str(grey16), str(with_alpha)), (str(cmyk), str(palette))],
                 refiners="none (draft only)")
    assert 'data-state="done"' in frames[-1]["status"]


# ---------------------------------------------------------------------------------------------
# bad input: a gr.Error before anything is yielded (so no widget changes)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    unreadable = folder / "notes.png"
    unreadable.write_text("this is not an image")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    huge = folder / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)      # 48 megapixels in a small file: refused before decoding
    return dict(unreadable=str(unreadable), empty=str(empty), huge=str(huge))


@pytest.mark.parametrize("case, overrides, message", [
    ("missing query", dict(query=None), "query image"),
    ("no pairs", dict(pairs=[]), "at least one demonstration pair"),
    ("pair without answer", dict(pairs=[("x1", None)]), "Pair 1 has no answer"),
    ("pair without input", dict(pairs=[("x1", "y1"), (None, "y2")]), "Pair 2 has no input"),
    ("too many pairs", dict(pairs=[("x1", "y1")] * (MAX_ROWS + 1)), "do not fit"),
    ("unreadable pair", dict(pairs=[("unreadable", "y1")]), "not an image"),
    ("empty query", dict(query="empty"), "empty"),
    ("huge query", dict(query="huge"), "megapixels"),
    ("unreadable ground truth", dict(truth="unreadable"), "ground truth"),
    ("VSR without g_phi", dict(refiners="SCAN → VSR"), "no VSR refiner"),
    ("unknown refiner", dict(refiners="magic"), "Unknown refiner"),
    ("c too large", dict(scan_cells=99), "SCAN c"),
    ("temperature not a number", dict(temperature="hot"), "temperature"),
    ("negative seed", dict(seed=-1), "seed"),
    ("TensorAR without its part", dict(draft_mode="tensor"), "cannot draft"),
    ("unknown quality score", dict(quality_score="entropy"), "quality score"),
    ("unknown paste setting", dict(paste="sometimes"), "paste setting"),
    ("unknown brightness setting", dict(luma="sometimes"), "brightness setting"),
])
def test_bad_input_raises_gr_error(studio, images, bad_files, case, overrides, message):
    files = {**images, **bad_files}

    def resolve(value):
        return files.get(value, value) if isinstance(value, str) else value

    if "pairs" in overrides:
        overrides["pairs"] = [tuple(resolve(v) for v in pair) for pair in overrides["pairs"]]
    for key in ("query", "truth"):
        if key in overrides:
            overrides[key] = resolve(overrides[key])
    generator = studio.generate(**{**dict(pairs=[(images["x1"], images["y1"])], query=images["query"], truth=None,
                                          refiners="SCAN", **FAST), **overrides})
    with pytest.raises(gr.Error, match=message) as error:
        next(generator)
    assert "Traceback" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# model selector, examples, pair rows, timeline


def test_hub_id_fails_fast_offline_and_keeps_the_model(engine):
    studio = Studio(engine, "tiny", models=handlers.allowed_models("default,retouch-test/no-such-model"))
    start = time.perf_counter()
    with pytest.raises(gr.Error, match="current model stays"):
        studio.load_model("retouch-test/no-such-model", current="default")
    assert time.perf_counter() - start < 10
    assert studio.engine_for("default") is engine and studio.cache.loaded() == ["default"]


def test_allow_list_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RETOUCH_MODELS", raising=False)
    assert [o.id for o in handlers.allowed_models(gpu=False)] == ["default"]
    assert [o.id for o in handlers.allowed_models(gpu=True)] == ["default", "lvm-7b"]
    spec = f"default, org/name@v1, {tmp_path}, not a model, lvm"
    assert [o.id for o in handlers.allowed_models(spec, allow_local=False)] == ["default", "org/name@v1", "lvm-7b"]
    options = handlers.allowed_models(spec, allow_local=True)
    assert [o.id for o in options] == ["default", "org/name@v1", f"local:{tmp_path}", "lvm-7b"]
    hub = options[1]
    assert (hub.source, hub.revision) == ("org/name", "v1")
    monkeypatch.setenv("RETOUCH_MODELS", "default,org/other")
    assert [o.id for o in handlers.allowed_models()] == ["default", "org/other"]


@pytest.mark.parametrize("request_id", ["/etc", str(os.getcwd()), "../assets/retouch-tiny", "~/models", "local:/tmp",
                                        "org/not-allowed", "lvm-7b", "Emma02/LVM_ckpts", "a" * 500, 42, ["x"]])
def test_a_refused_model_touches_neither_files_nor_the_hub(engine, monkeypatch, request_id):
    """Not on the allow-list (local folders not allowed): one line, and no file looked at, no Hub call made."""
    import builtins
    import pathlib

    import huggingface_hub

    import demo_core.bundle
    import demo_core.hub
    import studio.models as models

    studio = Studio(engine, "tiny", models=handlers.allowed_models("default", allow_local=False))
    calls = []

    def forbidden(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called for a refused model")
        return record

    with monkeypatch.context() as patch:
        for module, name in [(models, "load_engine"), (os.path, "isdir"), (os.path, "exists"), (os, "stat"),
                             (os, "listdir"), (os, "scandir"), (builtins, "open"), (pathlib.Path, "is_dir"),
                             (pathlib.Path, "exists"), (pathlib.Path, "stat"), (huggingface_hub, "snapshot_download"),
                             (huggingface_hub, "hf_hub_download"), (demo_core.bundle, "load_bundle")]:
            patch.setattr(module, name, forbidden(f"{getattr(module, '__name__', module)}.{name}"))
        for name in dir(demo_core.hub):
            if callable(getattr(demo_core.hub, name)) and not name.startswith("_") and name[0].islower():
                patch.setattr(demo_core.hub, name, forbidden(f"hub.{name}"))
        with pytest.raises(gr.Error) as error:
            studio.load_model(request_id, current="default")
        with pytest.raises(gr.Error):
            next(studio.generate(pairs=[], query=None, model=request_id))
    assert calls == []
    message = str(error.value)
    assert ("not offered on this server" in message or "Choose a model" in message) and "\n" not in message
    assert len(message) < 200


def test_visitor_b_keeps_their_model_when_visitor_a_loads_another(engine, images, tmp_path):
    other = build_tiny_bundle(tmp_path / "with-vsr", refiner=True)
    studio = Studio(engine, "tiny", models=handlers.allowed_models(f"default,local:{other}", allow_local=True))
    visitor_a = visitor_b = studio.default_model                 # both sessions start on the server's model
    visitor_a, info, refiners, *_ = studio.load_model(f"local:{other}", "SCAN", "ar", visitor_a)
    assert visitor_a == f"local:{other}" and "SCAN → VSR" in refiners["choices"] and "with-vsr" in info
    assert visitor_b == "default" and studio.engine_for(visitor_b) is engine
    assert studio.engine_for(visitor_a) is not engine
    assert sorted(studio.cache.loaded()) == sorted(["default", visitor_a])
    # B's run uses B's model (no VSR part), A's run uses A's (with VSR)
    with pytest.raises(gr.Error, match="no VSR refiner"):
        next(studio.generate(pairs=[(images["x1"], images["y1"])], query=images["query"], refiners="SCAN → VSR",
                             model=visitor_b, **FAST))
    frames = run(studio, images, refiners="SCAN → VSR", model=visitor_a)
    assert list(frames[-1]["run_state"].result.stages) == ["draft", "scan", "vsr"]
    assert "none (draft only)" in studio.model_outputs(visitor_b)[1]["choices"]
    assert "SCAN → VSR" not in studio.model_outputs(visitor_b)[1]["choices"]


def test_engine_cache_is_least_recently_used_within_its_budget_and_loads_without_blocking():
    import threading

    release = threading.Event()

    def loader(option):
        if option.id == "slow":
            release.wait(10)
        return f"engine {option.id}"

    cache = handlers.EngineCache(budget_bytes=2, loader=loader, measure=lambda engine: 1)
    cache.put("start", "engine start", pinned=True)
    option = lambda name: handlers.ModelOption(name, name)               # noqa: E731
    assert cache.get(option("a")) == "engine a" and cache.get(option("b")) == "engine b"
    assert cache.loaded() == ["start", "b"]                              # a out (least recent), the pinned one stays
    assert cache.get(option("a")) == "engine a" and cache.loaded() == ["start", "a"]
    slow = threading.Thread(target=cache.get, args=(option("slow"),))
    slow.start()
    time.sleep(0.1)
    started = time.perf_counter()
    assert cache.get(option("a")) == "engine a"                          # not held up by the load in progress
    assert time.perf_counter() - started < 0.5
    release.set()
    slow.join(5)
    assert cache.peek("slow") == "engine slow" and "start" in cache.loaded() and cache.used_bytes() <= 2


def test_not_a_bundle_folder_is_explained(engine, tmp_path):
    studio = Studio(engine, "tiny", models=handlers.allowed_models(f"default,local:{tmp_path}", allow_local=True))
    with pytest.raises(gr.Error, match="bundle.json"):
        studio.load_model(f"local:{tmp_path}", current="default")
    assert studio.engine_for("default") is engine


def test_local_bundle_loads(engine, bundle):
    studio = Studio(engine, "tiny", models=handlers.allowed_models(f"default,local:{bundle}", allow_local=True))
    state, info, refiners, scan_cells, max_pairs, draft, temperature, top_p, top_k, note, canvas = studio.load_model(
        f"local:{bundle}", "SCAN", "ar")
    assert state == f"local:{bundle}" and studio.engine_for(state) is not engine and max_pairs == engine.max_pairs
    assert draft["visible"] is False and draft["value"] == "ar"           # no TensorAR part: no choice shown
    assert "4×4 tokens" in info and refiners["choices"] == ["none (draft only)", "SCAN"]
    assert scan_cells["maximum"] == 16
    assert (temperature["value"], top_p["value"], top_k["value"]) == (1.0, 0.9, 0)     # the embedded default's
    assert "top-p 0.9" in note and "Retouch's own defaults" in note
    assert (canvas["value"], canvas["maximum"]) == (1, 16)        # 16 cells: a canvas every token, 16 a draft


def test_a_model_with_its_own_sampling_is_labelled(tmp_path, monkeypatch):
    from test_lvm import serve_lvm, use_cache, write_tiny_lvm, write_tiny_vqgan

    sources = {"backbone": write_tiny_lvm(tmp_path / "lvm"), "tokenizer": write_tiny_vqgan(tmp_path / "vq")}
    use_cache(monkeypatch, tmp_path / "hub")
    serve_lvm(tmp_path / "hub", sources)
    studio = Studio(load_engine(str(build_tiny_bundle(tmp_path / "tiny"))), "tiny",
                    models=handlers.allowed_models("default,lvm-7b"))
    state, *_, temperature, top_p, top_k, note, canvas = studio.load_model("lvm-7b")
    assert (temperature["value"], top_p["value"], top_k["value"]) == (1.0, 1.0, 0)
    assert note.startswith("Defaults for this model: temperature 1.0, top-p 1.0 — the LVM reference scripts'")
    assert "batch_generation.py" in note and note == studio.sampling_note(state)
    pictures = [str(tmp_path / f"{name}.png") for name in ("x", "y", "q")]
    for seed, path in enumerate(pictures):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    widgets = dict(pairs=[(pictures[0], pictures[1])], query=pictures[2], refiners="none (draft only)", model=state, **FAST)
    left_out = by_name(list(studio.generate(**widgets))[-1])["run_state"]          # sampling not given: the model's
    given = by_name(list(studio.generate(**widgets, temperature=1.0, top_p=1.0, top_k=0))[-1])["run_state"]
    assert np.array_equal(left_out.result.codes["draft"], given.result.codes["draft"])


def test_every_task_has_a_loadable_example(studio):
    examples = handlers.list_examples()
    assert set(examples) == {"colorization", "inpainting", "edges", "posterize", "invert"}
    total = sum(os.path.getsize(p) for p in (handlers.EXAMPLES_DIR).rglob("*.png"))
    assert total < 1_000_000
    for name, example in examples.items():
        outputs = studio.load_example(name)
        count, rows = outputs[0], outputs[1:1 + MAX_ROWS]
        pair_values = outputs[1 + MAX_ROWS:1 + 3 * MAX_ROWS]
        query, truth, task = outputs[-3:]
        assert count == len(example.pairs) and [r["visible"] for r in rows].count(True) == count
        assert all(os.path.exists(p) for p in pair_values[:2 * count]) and pair_values[2 * count:] == [None] * (2 * (MAX_ROWS - count))
        assert os.path.exists(query) and os.path.exists(truth) and task == name
        assert handlers.example_preview(example).width > 64
    with pytest.raises(gr.Error, match="No example"):
        studio.load_example("juggling")


def test_pair_rows_grow_and_shrink_within_limits():
    count, *rows = handlers.add_pair(2, 4)
    assert count == 3 and [r["visible"] for r in rows] == [True] * 3 + [False] * (MAX_ROWS - 3)
    with pytest.warns(UserWarning, match="at most 3"):
        assert handlers.add_pair(3, 3)[0] == 3                           # the model's limit
    outputs = handlers.remove_pair(3)
    assert outputs[0] == 2
    images = outputs[1 + MAX_ROWS:]
    assert images[4:6] == [None, None] and not is_set(images[0])        # row 3 cleared, row 1 left as is
    with pytest.warns(UserWarning, match="At least one"):
        assert handlers.remove_pair(1)[0] == 1


def test_served_frames_send_plain_values_and_the_report_once(studio, images):
    """The served event's frames: canvas, status and seed as values (no gr.skip()/gr.update(): each costs Gradio a
    component rebuilt), every other view once from the report event, as the in-process generator left it."""
    options = dict(pairs=[(images["x1"], images["y1"]), (images["x2"], images["y2"])], query=images["query"],
                   truth=images["truth"], refiners="SCAN", **FAST)
    frames = list(handlers.live(studio.generate(**options)))
    assert len(frames) > 10 and all(len(f) == len(LIVE_OUTPUTS) for f in frames)
    throttled = list(handlers.live(studio.generate(**options), min_interval=60.0))       # progress frames dropped
    assert len(throttled) < len(frames) and throttled[0][1] == frames[0][1] and 'data-state="done"' in throttled[-1][1]
    assert handlers.report(throttled[-1][-1])[REPORT_OUTPUTS.index("metrics_table")] is not None
    for canvas, status, seed, _ in frames:
        assert isinstance(canvas, Image.Image) and isinstance(status, str) and seed == 0
    run_view = frames[-1][LIVE_OUTPUTS.index("run_state")]
    assert isinstance(run_view, RunView) and 'data-state="done"' in frames[-1][1]
    views = dict(zip(REPORT_OUTPUTS, handlers.report(run_view)))
    expected = run(studio, images)[-1]                                 # same seed, same run: same scores
    assert [row[:7] for row in views["metrics_table"]] == [row[:7] for row in expected["metrics_table"]]
    assert views["quality_final"] is not None
    assert views["timeline_slider"]["visible"] is True and views["stage_grid"].size == expected["stage_grid"].size
    assert all(not is_set(v) for v in handlers.report(run_view))        # sent once; the session keeps the run itself
    assert all(not is_set(v) for v in handlers.report(None))


def test_timeline_and_compare_views(studio, images):
    run_view = run(studio, images)[-1]["run_state"]
    image, text = handlers.timeline_view(1, run_view)
    assert isinstance(image, Image.Image) and "Iteration 1" in text
    draft, text = handlers.timeline_view(0, run_view)
    assert "draft" in text
    assert handlers.timeline_view(3, None)[0] is None
    left, right = handlers.compare_view("query", "ground truth", run_view)
    assert left.size == right.size
    with pytest.raises(gr.Error):
        handlers.compare_view("draft", "nonsense", run_view)


def test_stop_marks_only_a_running_status():
    from studio.layout import status_html

    assert 'data-state="stopped"' in handlers.stopped_status(status_html(["draft"], "draft", 0.3, "…", "running"))
    assert not is_set(handlers.stopped_status(status_html(["draft"], None, 1.0, "Done", "done")))


# ---------------------------------------------------------------------------------------------
# the served app through gradio_client


def test_client_receives_intermediate_outputs(engine, images, temp_dir):
    from gradio_client import Client, handle_file

    import app

    demo = app.build_demo(engine, "tiny test bundle")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options())
    try:
        client = Client(url, verbose=False)
        pair = dict(pair1_input=handle_file(images["x1"]), pair1_answer=handle_file(images["y1"]))
        # paced (50 ms a frame): an unpaced run of the tiny bundle is over in ~0.1 s, one 10 Hz frame slot
        settings = dict(scan_iterations=3, scan_cells=2, canvas_every=2, frame_ms=50, api_name="/generate")
        job = client.submit(**pair, query=handle_file(images["query"]), **settings)
        job.result(timeout=60)
        outputs = job.outputs()
        assert all(len(out) == len(LIVE_OUTPUTS) - 1 for out in outputs)  # canvas, status, seed (run_state stays on the server)
        canvases = [out[LIVE_OUTPUTS.index("canvas")] for out in outputs]
        assert len(outputs) >= 5
        assert len({c for c in canvases if c}) >= 3                       # several different live frames arrived
        assert 'data-state="done"' in outputs[-1][LIVE_OUTPUTS.index("status")]
        views = client.predict(api_name="/report")                        # the same session's finished run, once
        assert len(views) >= 10 and any(v for v in views)
        with pytest.raises(Exception, match="query"):                     # a gr.Error reaches the client as a message
            client.predict(**pair, **settings)
        api = str(client.view_api(print_info=False, return_format="str"))
        assert "/load_example" in api and "pair1_input" in api and "scan_iterations" in api
        big = images["query"] + ".big.png"
        with open(big, "wb") as handle:
            handle.write(b"\0" * (11 * 2**20))
        with pytest.raises(Exception, match="maximum file size"):           # the upload limit set in launch()
            client.predict(**pair, query=handle_file(big), **settings)
    finally:
        demo.close()


def test_server_address_follows_gradio_then_retouch_names():
    import app

    assert app.server_address({}) == ("127.0.0.1", 7860)
    assert app.server_address({"RETOUCH_HOST": "0.0.0.0", "RETOUCH_PORT": "8000"}) == ("0.0.0.0", 8000)
    both = {"GRADIO_SERVER_NAME": "::", "GRADIO_SERVER_PORT": "7861", "RETOUCH_HOST": "x", "RETOUCH_PORT": "1"}
    assert app.server_address(both) == ("::", 7861)
    for bad in ("http", "0", "70000"):
        with pytest.raises(ValueError, match="GRADIO_SERVER_PORT"):
            app.server_address({"GRADIO_SERVER_PORT": bad})


# ---------------------------------------------------------------------------------------------
# the Teach tab (issue 21)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teach-pairs")
    rng = np.random.default_rng(5)
    paths = []
    for name in ("a", "b", "c"):
        x = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        for side, image in (("input", x), ("answer", 255 - x)):
            paths.append(str(folder / f"{name}_{side}.png"))
            Image.fromarray(image).save(paths[-1])
    return paths


def test_teach_streams_the_loss_then_generation_uses_the_adapter_or_not(studio, images, pair_files):
    from studio.teach import Taught, export, preview, stopped

    grid, status = preview(pair_files)
    assert len(grid) == 6 and grid[0][1] == "a · input" and "3 pairs ready" in status
    frames = list(studio.teach(pair_files, 3))
    assert len(frames) == 5                                            # encoding, one per step, done
    status, plot, taught = frames[-1]
    assert 'data-state="done"' in status and list(plot["step"]) == [1, 2, 3]
    assert isinstance(taught, Taught) and taught.steps == 3 and taught.adapter.num_bytes() < 2 * 2**20
    assert isinstance(frames[1][2], Taught)                           # the state holds the adapter from the first step
    assert 'data-state="stopped"' in stopped(frames[2][0], taught) and "kept" in stopped(frames[2][0], taught)
    assert not is_set(stopped(status, taught))                         # nothing to stop once done
    options = dict(temperature=0.0)
    plain = run(studio, images, **options)[-1]
    taught_run = run(studio, images, use_adapter=True, taught=taught, **options)[-1]
    plain_again = run(studio, images, use_adapter=False, taught=taught, **options)[-1]
    assert 'data-state="done"' in taught_run["status"] and "without it" in taught_run["status"]
    assert plain["run_state"].result.codes["scan"].tolist() == plain_again["run_state"].result.codes["scan"].tolist()
    # the taught run's before/after starts from the same run without the adapter, which is also a comparable image
    untaught = taught_run["run_state"].images["without adapter"]
    assert np.array_equal(np.asarray(untaught), np.asarray(plain["run_state"].result.final))
    assert np.array_equal(np.asarray(taught_run["before_after"][0]), np.asarray(viz.upscale(untaught)))
    assert taught_run["compare_a"]["value"] == "without adapter"
    assert [row[0] for row in taught_run["metrics_table"]][-1] == "without adapter"
    assert "without adapter" not in plain_again["run_state"].images
    archive = export(taught)
    import zipfile

    assert sorted(zipfile.ZipFile(archive).namelist()) == ["adapter/adapter.safetensors", "adapter/config.json"]


def test_a_downloaded_adapter_loads_back_and_bad_ones_get_one_line(studio, engine, pair_files, tmp_path, monkeypatch):
    import zipfile

    import torch

    from studio.teach import Taught, download_allowed, export

    taught = [frame for frame in studio.teach(pair_files, 2)][-1][2]
    archive = export(taught)
    status, loaded = studio.load_adapter(archive)
    assert 'data-state="done"' in status and "taught 2 of 2 steps on 3 pairs" in status and isinstance(loaded, Taught)
    own, back = taught.adapter.state_dict(), loaded.adapter.state_dict()
    assert set(own) == set(back) and all(torch.equal(own[k], back[k]) for k in own)

    def refused(path, phrase):
        status, state = studio.load_adapter(str(path))
        assert 'data-state="error"' in status and phrase in status and handlers._is_skip(state), status

    (tmp_path / "not.zip").write_text("no zip")
    refused(tmp_path / "not.zip", "is not a zip file")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    refused(tmp_path / "empty.zip", "holds no config.json or adapter.safetensors")
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        config = json.loads(src.read("adapter/config.json"))
        config["base_fingerprint"] = "0" * 16                           # taught on other backbone weights
        zf.writestr("adapter/config.json", json.dumps(config))
        zf.writestr("adapter/adapter.safetensors", src.read("adapter/adapter.safetensors"))
    refused(tmp_path / "other.zip", "teach it again on this model")
    # the operator decides whether Download may write to the server's disk
    assert download_allowed({}) and not download_allowed({"SPACE_ID": "me/retouch"})
    assert download_allowed({"SPACE_ID": "me/retouch", "RETOUCH_ADAPTER_DOWNLOAD": "1"})
    assert not download_allowed({"RETOUCH_ADAPTER_DOWNLOAD": "0"})
    monkeypatch.setenv("RETOUCH_ADAPTER_DOWNLOAD", "0")
    with pytest.raises(gr.Error, match="RETOUCH_ADAPTER_DOWNLOAD=1"):
        export(taught)


def test_teach_refuses_bad_uploads_with_one_line(studio, images, pair_files, tmp_path):
    from studio.teach import export, preview

    with pytest.raises(gr.Error, match="has no answer"):
        list(studio.teach(pair_files[:3], 2))
    with pytest.raises(gr.Error, match="at least 2"):
        list(studio.teach(pair_files[:2], 2))
    text = tmp_path / "d_input.png"
    text.write_text("no image")
    Image.new("RGB", (8, 8)).save(tmp_path / "d_answer.png")
    with pytest.raises(gr.Error, match="not an image"):
        list(studio.teach([*pair_files, str(text), str(tmp_path / "d_answer.png")], 2))
    _, status = preview(pair_files[:3])
    assert 'data-state="error"' in status and "has no answer" in status
    with pytest.raises(gr.Error, match="steps must be between"):
        list(studio.teach(pair_files, 0))
    with pytest.raises(gr.Error, match="Nothing taught yet"):
        run(studio, images, use_adapter=True, taught=None)
    with pytest.raises(gr.Error, match="Teach a task first"):
        export(None)
