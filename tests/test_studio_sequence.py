"""The studio's sequence mode (#23): a sequence example through the embedded default bundle, refused runs as one
status line (nothing else touched), the frames gallery's edits, the sequence examples and the prompt-kind switch."""
import os

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from demo_core.engine import load_engine
from studio import handlers
from studio.handlers import MAX_ROWS, OUTPUTS, RunView, Studio

FAST = dict(scan_iterations=3, scan_cells=2, canvas_every=4, frame_ms=0)


@pytest.fixture(scope="module")
def engine():
    return load_engine(None)                 # the embedded default bundle (64 px images, 8x8 tokens)


@pytest.fixture()
def studio(engine):
    return Studio(engine, "embedded default")


@pytest.fixture(scope="module")
def pan():
    return handlers.list_sequence_examples()["sequence-pan"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("a", (40, 40)), ("b", (40, 40)), ("wide", (60, 40))):
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[name])
    paths["corrupt"] = str(folder / "corrupt.png")
    with open(paths["corrupt"], "w") as handle:
        handle.write("not a picture")
    return paths


def by_name(output: tuple) -> dict:
    return dict(zip(OUTPUTS, output))


def is_set(value) -> bool:
    return not (isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1)


def widgets(frames, next_frame=None, prompt_kind="sequence", query=None, truth=None, pairs=()):
    """The Generate button's values in app.py's order: pair images, query, truth, settings, prompt kind, frames,
    true next frame, use taught adapter, taught adapter, model."""
    images = [None] * (2 * MAX_ROWS)
    for index, (x, y) in enumerate(pairs):
        images[2 * index:2 * index + 2] = [x, y]
    settings = ["SCAN", FAST["scan_iterations"], FAST["scan_cells"], None, None, None, 0, False, 1,
                FAST["canvas_every"], FAST["frame_ms"], "ar", "combined"]
    return [*images, query, truth, *settings, prompt_kind, frames, next_frame, False, None, None]


def gallery_value(paths):
    """What the frames gallery hands a handler: (path, caption) items."""
    return handlers.frames_gallery(paths)


# ---------------------------------------------------------------------------------------------
# a run


def test_sequence_example_runs_through_the_default_bundle(studio, pan):
    gallery, selected, next_frame = studio.load_sequence_example("sequence-pan")
    assert [path for path, _ in gallery["value"]] == pan.frames and selected is None and next_frame == pan.next_frame
    frames = [by_name(f) for f in studio.generate_from_widgets(*widgets(gallery["value"], next_frame))]
    canvases = [f["canvas"] for f in frames if isinstance(f["canvas"], Image.Image)]
    assert len(canvases) >= 64 // FAST["canvas_every"] and len({c.tobytes() for c in canvases}) >= 3
    last = frames[-1]
    assert 'data-state="done"' in last["status"]
    run = last["run_state"]
    assert isinstance(run, RunView) and run.result.frames == len(pan.frames) and list(run.result.stages) == ["draft", "scan"]
    assert run.result.final.size == (64, 64)
    # the last frame is the query's stand-in and the true next frame the ground truth's, under their own names
    assert {"last frame", "true next frame"} <= set(run.images)
    assert np.array_equal(np.asarray(run.images["last frame"]), np.asarray(Image.open(pan.frames[-1]).convert("RGB")))
    assert ("true next frame", "true next frame") in last["compare_b"]["choices"]
    left, right = handlers.compare_view("last frame", "true next frame", run)
    assert left.size == right.size
    assert [row[0] for row in last["metrics_table"]] == ["last frame (doing nothing)", "draft", "SCAN"]
    assert all(isinstance(row[1], float) for row in last["metrics_table"])           # PSNR against the true next frame
    assert "true next frame" in last["metrics_note"]
    assert last["timeline_slider"]["visible"] and last["quality_draft"] is not None and last["before_after"] is not None


def test_without_a_true_next_frame_there_are_no_metrics_and_same_seed_same_frame(studio, pan):
    value = gallery_value(pan.frames[:2])
    first = by_name(list(studio.generate_from_widgets(*widgets(value)))[-1])
    assert all(row[1] is None for row in first["metrics_table"]) and "true next frame" in first["metrics_note"]
    again = by_name(list(studio.generate_from_widgets(*widgets(value)))[-1])
    assert np.array_equal(first["run_state"].result.codes["draft"], again["run_state"].result.codes["draft"])


def test_each_mode_ignores_the_other_modes_inputs(studio, pan, files):
    # sequence mode with pairs and a query still filled in: the frames are the prompt
    sequence = by_name(list(studio.generate_from_widgets(*widgets(gallery_value(pan.frames), pairs=[(files["a"], files["b"])],
                                                                  query=files["a"], truth=files["b"])))[-1])
    assert sequence["run_state"].result.frames == len(pan.frames)
    # pairs mode with frames in the gallery: exactly the pairs run
    pairs = by_name(list(studio.generate_from_widgets(*widgets(gallery_value(pan.frames), prompt_kind="pairs",
                                                               pairs=[(files["a"], files["b"])], query=files["a"])))[-1])
    assert pairs["run_state"].result.frames == 0 and "query" in pairs["run_state"].images


# ---------------------------------------------------------------------------------------------
# refused runs: one status line, every other output left as it is


@pytest.mark.parametrize("case, frame_names, next_name, message", [
    ("one frame", ["a"], None, "at least 2 frames"),
    ("no frames", [], None, "at least 2 frames"),
    ("different sizes", ["a", "wide"], None, "same size"),
    ("corrupt frame", ["a", "corrupt"], None, "frame 2"),
    ("corrupt true next frame", ["a", "b"], "corrupt", "true next frame"),
])
def test_bad_sequences_end_with_one_status_line(studio, files, case, frame_names, next_name, message):
    value = gallery_value([files[name] for name in frame_names])
    outputs = [by_name(f) for f in studio.generate_from_widgets(*widgets(value, files.get(next_name)))]
    assert len(outputs) == 1
    status = outputs[0]["status"]
    assert 'data-state="error"' in status and message in status and "Traceback" not in status
    assert not any(is_set(value) for name, value in outputs[0].items() if name != "status")     # nothing else changes
    with pytest.raises(gr.Error, match=message):                                                # the API's way
        next(studio.generate(None, None, prompt_kind="sequence", frames=value, next_frame=files.get(next_name), **FAST))


def test_too_many_frames_for_the_model(studio, engine, files):
    value = gallery_value([files["a"]] * (engine.max_frames + 1))
    outputs = [by_name(f) for f in studio.generate_from_widgets(*widgets(value))]
    assert len(outputs) == 1 and f"at most {engine.max_frames}" in outputs[0]["status"] and "remove 1" in outputs[0]["status"]


def test_unknown_prompt_kind(studio, pan):
    with pytest.raises(gr.Error, match="prompt kind"):
        next(studio.generate(None, None, prompt_kind="video", frames=gallery_value(pan.frames)))


# ---------------------------------------------------------------------------------------------
# the frames gallery's edits


def test_frame_paths_reads_every_gallery_value_shape():
    assert handlers.frame_paths(None) == [] and handlers.frame_paths([]) == []
    mixed = [("a.png", "1"), ["b.png", None], "c.png", {"path": "d.png"}, (None, None)]
    assert handlers.frame_paths(mixed) == ["a.png", "b.png", "c.png", "d.png"]
    assert handlers.frame_paths("a.png") == ["a.png"]                     # one path on its own, not its letters
    assert [caption for _, caption in handlers.frames_gallery(["a", "b", "c"])] == ["1 · oldest", "2", "3 · latest"]


def test_add_frames_appends_and_warns_above_the_models_limit(studio, engine):
    gallery, selected = studio.add_frames(gallery_value(["a", "b"]), ["c", "d"])
    assert handlers.frame_paths(gallery["value"]) == ["a", "b", "c", "d"] and selected == 3 == gallery["selected_index"]
    with pytest.warns(UserWarning, match=f"at most {engine.max_frames}"):
        gallery, _ = studio.add_frames(gallery_value(["a"] * engine.max_frames), ["z"])
    assert len(gallery["value"]) == engine.max_frames + 1              # kept: the user decides which to remove


def test_move_and_remove_the_selected_frame():
    value = gallery_value(["a", "b", "c"])
    gallery, selected = handlers.move_earlier(value, 2)
    assert handlers.frame_paths(gallery["value"]) == ["a", "c", "b"] and selected == 1 == gallery["selected_index"]
    gallery, selected = handlers.move_later(gallery["value"], 0)
    assert handlers.frame_paths(gallery["value"]) == ["c", "a", "b"] and selected == 1
    gallery, selected = handlers.move_earlier(value, 0)                 # the oldest stays first
    assert handlers.frame_paths(gallery["value"]) == ["a", "b", "c"] and selected == 0
    gallery, selected = handlers.move_later(value, 2)                   # the latest stays last
    assert handlers.frame_paths(gallery["value"]) == ["a", "b", "c"] and selected == 2
    gallery, selected = handlers.remove_frame(value, 1)
    assert handlers.frame_paths(gallery["value"]) == ["a", "c"] and selected == 1       # the next one is selected
    gallery, selected = handlers.remove_frame(gallery_value(["a", "b"]), 1)
    assert handlers.frame_paths(gallery["value"]) == ["a"] and selected == 0
    gallery, selected = handlers.remove_frame(gallery_value(["a"]), 0)
    assert gallery["value"] == [] and selected is None
    for edit in (handlers.remove_frame, handlers.move_earlier, handlers.move_later):     # nothing selected: a warning, no change
        with pytest.warns(UserWarning, match="Click a frame first"):
            gallery, selected = edit(value, None)
        assert not is_set(gallery) and selected is None
    with pytest.warns(UserWarning, match="Click a frame first"):
        assert not is_set(handlers.move_later(value, 7)[0])             # a stale selection (the frame is gone)
    gallery, selected = handlers.clear_frames()
    assert gallery["value"] == [] and selected is None


def test_an_edit_clears_only_a_refusal():
    from studio.layout import SEQUENCE_IDLE_STATUS, status_html

    assert handlers.clear_refusal(handlers.error_status("A sequence needs at least 2 frames")) == SEQUENCE_IDLE_STATUS
    assert not is_set(handlers.clear_refusal(status_html(["draft"], None, 1.0, "Done in 1.0 s", "done")))
    assert not is_set(handlers.clear_refusal(None))


# ---------------------------------------------------------------------------------------------
# examples and the switch


def test_sequence_examples_are_small_and_loadable(studio, engine):
    examples = handlers.list_sequence_examples()
    assert list(examples) == ["sequence-pan", "sequence-cutout", "sequence-brightness"]
    assert "sequence-pan" not in handlers.list_examples()               # not a task's pair example
    for name, example in examples.items():
        assert 2 <= len(example.frames) <= engine.max_frames and example.next_frame
        sizes = {Image.open(path).size for path in [*example.frames, example.next_frame]}
        assert sizes == {(64, 64)}
        assert handlers.sequence_preview(example).width > 64 * len(example.frames)
    total = sum(os.path.getsize(p) for p in handlers.EXAMPLES_DIR.glob("sequence-*/*.png"))
    assert total < 200_000
    with pytest.raises(gr.Error, match="No sequence example"):
        studio.load_sequence_example("sequence-juggling")


def test_prompt_kind_switch_shows_one_set_of_inputs():
    from studio.layout import IDLE_STATUS, SEQUENCE_IDLE_STATUS, status_html

    pair_examples, sequence_examples, pair_inputs, sequence_inputs, status = handlers.prompt_kind_updates("sequence", IDLE_STATUS)
    assert not pair_examples["visible"] and sequence_examples["visible"]
    assert not pair_inputs["visible"] and sequence_inputs["visible"]
    assert status == SEQUENCE_IDLE_STATUS and "next frame" in status
    *visibility, status = handlers.prompt_kind_updates("pairs", SEQUENCE_IDLE_STATUS)
    assert [u["visible"] for u in visibility] == [True, False, True, False] and status == IDLE_STATUS
    done = status_html(["draft"], None, 1.0, "Done in 1.0 s", "done")
    assert not is_set(handlers.prompt_kind_updates("pairs", done)[-1])      # a finished run's status stays


# ---------------------------------------------------------------------------------------------
# the served app: /generate takes a sequence too


def test_client_generates_the_next_frame(engine, pan, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    demo = app.build_demo(engine, "embedded default")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options())
    try:
        client = Client(url, verbose=False)
        api = str(client.view_api(print_info=False, return_format="str"))
        assert "prompt_kind" in api and "frames" in api and "next_frame" in api
        sequence = dict(pair1_input=None, pair1_answer=None, prompt_kind="sequence", scan_iterations=2, frame_ms=0,
                        api_name="/generate")
        frames = [{"image": handle_file(path), "caption": None} for path in pan.frames]
        canvas, status, _ = client.predict(frames=frames, next_frame=handle_file(pan.next_frame), **sequence)
        assert 'data-state="done"' in status and canvas
        _, status, _ = client.predict(frames=frames[:1], **sequence)
        assert 'data-state="error"' in status and "at least 2 frames" in status
    finally:
        demo.close()
