import numpy as np
import pytest

from demo_core.engine import EngineInputError, load_engine
from demo_core.events import DraftDone, Finished, GenerationStarted, ScanStep, StageDone, TokensWritten
from demo_core.testing import build_tiny_bundle


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(str(build_tiny_bundle(tmp_path_factory.mktemp("bundle"))))


def images(seed, count):
    rng = np.random.default_rng(seed)
    return [rng.random((24, 30, 3)).astype(np.float32) for _ in range(count)]


def test_stream_event_order_and_result(engine):
    x, y, q = images(0, 3)
    events = list(engine.stream([(x, y)], q, refine=("scan",), seed=0, scan_iterations=4, canvas_every=4))
    assert isinstance(events[0], GenerationStarted) and events[0].total_tokens == 16
    written = [e for e in events if isinstance(e, TokensWritten)]
    assert [e.index for e in written] == list(range(16))
    assert sum(e.canvas is not None for e in written) == 4 and written[-1].written.all()
    kinds = [type(e) for e in events]
    assert kinds.index(DraftDone) == 17 and kinds[-1] is Finished and StageDone in kinds
    steps = [e for e in events if isinstance(e, ScanStep)]
    result = events[-1].result
    assert result.history == steps and list(result.stages) == ["draft", "scan"]
    assert result.final.size == (16, 16) and set(result.timings) >= {"draft", "scan", "total"}
    assert result.quality["draft"].shape == (4, 4) and ((0 <= result.quality["draft"]) & (result.quality["draft"] <= 1)).all()


def test_same_seed_same_image_and_candidates(engine):
    x, y, q = images(1, 3)
    a = engine.run([(x, y)], q, refine=(), seed=3)
    b = engine.run([(x, y)], q, refine=(), seed=3)
    assert np.array_equal(a.codes["draft"], b.codes["draft"])
    c = engine.run([(x, y)], q, refine=("scan",), seed=3, candidates=3, scan_iterations=2)
    assert len(c.candidates) == 3


@pytest.mark.parametrize("pairs, query, message", [
    ([], "q", "at least one demonstration pair"),
    ([("x", None)], "q", "Pair 1 has no answer"),
    ([(None, "y")], "q", "Pair 1 has no input"),
    ([("x", "y")] * 4, "q", "do not fit in the context"),
    ([("x", "y")], None, "Give a query image"),
])
def test_bad_inputs(engine, pairs, query, message):
    x, y, q = images(2, 3)
    lookup = {"x": x, "y": y, "q": q, None: None}
    pairs = [tuple(lookup[v] for v in pair) for pair in pairs]
    with pytest.raises(EngineInputError, match=message):
        engine.run(pairs, lookup[query])


def test_bad_files_and_refiners(engine, tmp_path):
    x, y, q = images(3, 3)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(EngineInputError, match="query: bad.png is not an image"):
        engine.run([(x, y)], tmp_path / "bad.png")
    with pytest.raises(EngineInputError, match="no VSR refiner"):
        engine.run([(x, y)], q, refine=("self",))
    with pytest.raises(EngineInputError, match="Unknown refiner"):
        engine.run([(x, y)], q, refine=("magic",))


@pytest.mark.parametrize("settings, message", [
    ({"top_k": -1}, "top-k >= 0"), ({"top_p": 0.0}, "top-p"), ({"temperature": -1.0}, "temperature"),
    ({"colour": 1}, "Unknown setting"),
])
def test_bad_settings(engine, settings, message):
    x, y, q = images(4, 3)
    with pytest.raises(EngineInputError, match=message):
        engine.run([(x, y)], q, **settings)


def test_pairs_must_be_pairs(engine):
    x, y, q = images(5, 3)
    with pytest.raises(EngineInputError, match="Pair 1 must be an"):
        engine.run([x], q)


def test_run_raises_when_the_stream_ends_without_a_result(engine, monkeypatch):
    x, y, q = images(5, 3)
    monkeypatch.setattr(engine, "_stream", lambda *args: iter(()))
    with pytest.raises(RuntimeError, match="without a result"):
        engine.run([(x, y)], q)


def test_public_api_is_exported():
    import demo_core

    assert set(demo_core.__all__) >= {"load_engine", "Engine", "Result", "RunSettings", "EngineInputError", "BundleError"}
    assert all(getattr(demo_core, name) is not None for name in demo_core.__all__)
    assert demo_core.Result.tokens.__doc__.startswith("Deprecated")          # the old name of Result.codes stays



# --------------------------------------------------------------------------------------------
# sequential prompting: frames in, the next frame out
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_engine(tmp_path_factory):
    """The tiny bundle with every part: VSR g_phi and the TensorAR adapter."""
    return load_engine(str(build_tiny_bundle(tmp_path_factory.mktemp("full"), refiner=True, tensor=True)))


def test_a_sequence_streams_the_next_frame(engine):
    import torch

    frames = images(10, 3)
    assert engine.max_frames == 7                     # 128 positions / 16 tokens = 8 images: 7 frames + the answer
    events = list(engine.stream(frames=frames, refine=("scan",), seed=0, scan_iterations=3, canvas_every=4))
    started = events[0]
    assert isinstance(started, GenerationStarted)
    assert (started.frames, started.pairs, started.context_tokens, started.total_tokens) == (3, 0, 3 * 16, 16)
    written = [e for e in events if isinstance(e, TokensWritten)]
    assert [e.index for e in written] == list(range(16)) and sum(e.canvas is not None for e in written) == 4
    result = events[-1].result
    assert isinstance(events[-1], Finished) and list(result.stages) == ["draft", "scan"] and result.frames == 3
    assert result.history == [e for e in events if isinstance(e, ScanStep)] and result.final.size == (16, 16)
    prepared = engine.prepare_frames(frames)
    assert np.array_equal(np.asarray(result.query), np.asarray(prepared[-1]))   # the last frame is the sequence's query
    # the layout: every frame's codes, raster order, oldest first, nothing between them
    context, last = engine.build_frames_context(prepared)
    codes = engine.encode(prepared)
    assert torch.equal(context, codes.reshape(-1)) and torch.equal(last, codes[-1]) and context.dtype == torch.long
    again = engine.run(frames=frames, refine=("scan",), seed=0, scan_iterations=3)
    assert all(np.array_equal(again.codes[name], result.codes[name]) for name in result.codes)


def test_a_sequence_is_the_pair_layout_with_cell_aligned_answers(full_engine):
    """[f1, f2, f3] is the same token sequence as the pair (f1, f2) and the query f3, so with the same seed every
    stage writes the same codes: the positions, the answer form and every refiner are the pairs' own."""
    a, b, c = images(11, 3)
    for settings in ({"refine": ("scan", "vsr")}, {"refine": ("scan",), "draft_mode": "tensor"}):
        sequence = full_engine.run(frames=[a, b, c], seed=2, scan_iterations=3, **settings)
        pairs = full_engine.run([(a, b)], c, seed=2, scan_iterations=3, **settings)
        assert list(sequence.stages) == list(pairs.stages) == ["draft", *settings["refine"]]
        for name in pairs.codes:
            assert np.array_equal(sequence.codes[name], pairs.codes[name]), name
            np.testing.assert_allclose(sequence.quality[name], pairs.quality[name], rtol=1e-5, atol=1e-6)


def test_every_refiner_and_draft_mode_runs_on_a_sequence(full_engine):
    frames = images(12, 5)
    result = full_engine.run(frames=frames, refine=("scan", "vsr"), seed=1, scan_iterations=2, draft_mode="tensor",
                             candidates=2)
    assert list(result.stages) == ["draft", "scan", "vsr"] and len(result.candidates) == 2 and result.slides
    longest = full_engine.run(frames=images(13, full_engine.max_frames), refine=("scan",), seed=0, scan_iterations=1)
    assert longest.frames == full_engine.max_frames == 7


@pytest.mark.parametrize("case, message", [
    ("one", "at least 2 frames.*add 1 more"),
    ("none", "at least 2 frames.*give 2"),
    ("eight", "8 frames do not fit in the context: this model holds at most 7; remove 1"),
    ("with pairs", "either demonstration pairs and a query or a frame sequence, not both"),
    ("with query", "either demonstration pairs and a query or a frame sequence, not both"),
    ("mixed sizes", "Frame 3 is 20x20 but frame 1 is 30x24: a sequence's frames must all be the same size"),
    ("a gap", "Frame 2 has no image"),
    ("not a list", "frames must be a list of images"),
])
def test_bad_sequences_are_one_line(engine, case, message):
    x, y, q = images(14, 3)
    frames = images(15, 8)
    calls = {
        "one": dict(frames=frames[:1]), "none": dict(frames=[]), "eight": dict(frames=frames),
        "with pairs": dict(pairs=[(x, y)], frames=frames[:3]), "with query": dict(query=q, frames=frames[:3]),
        "mixed sizes": dict(frames=[frames[0], frames[1], np.zeros((20, 20, 3), np.float32)]),
        "a gap": dict(frames=[frames[0], None, frames[2]]), "not a list": dict(frames="frame.png"),
    }
    with pytest.raises(EngineInputError, match=message) as error:
        engine.run(**calls[case])
    assert "\n" not in str(error.value)


def test_a_bad_frame_file_names_the_frame(engine, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(EngineInputError, match="frame 2: bad.png is not an image"):
        engine.run(frames=[images(16, 1)[0], tmp_path / "bad.png"])
    stacked = np.stack(images(17, 3))                                  # one (F, H, W, C) array is a sequence too
    assert engine.run(frames=stacked, refine=()).frames == 3


def test_scan_regeneration_temperature_comes_from_the_bundle_unless_given(tmp_path, monkeypatch):
    import json

    from demo_core import formats
    from demo_core.engine import load_engine
    from demo_core.testing import build_tiny_bundle

    folder = build_tiny_bundle(tmp_path / "b")
    info = json.loads((folder / "bundle.json").read_text())
    info["sampling"] = {"temperature": 0.7, "scan_temperature": 0.0}
    (folder / "bundle.json").write_text(json.dumps(info))
    engine = load_engine(folder)
    seen = []
    original = formats.scan_refine

    def spy(model, vocab, state, config, sampling, generator):
        seen.append(sampling.temperature)
        yield from original(model, vocab, state, config, sampling, generator)

    monkeypatch.setattr(formats, "scan_refine", spy)
    rng = np.random.default_rng(0)
    pair = (rng.uniform(0, 1, (16, 16, 3)), rng.uniform(0, 1, (16, 16, 3)))
    query = rng.uniform(0, 1, (16, 16, 3))
    engine.run([pair], query, refine=("scan",), seed=0, scan_iterations=2)
    engine.run([pair], query, refine=("scan",), seed=0, scan_iterations=2, scan_temperature=1.5)
    info["sampling"] = {"temperature": 0.7}
    (folder / "bundle.json").write_text(json.dumps(info))
    load_engine(folder).run([pair], query, refine=("scan",), seed=0, scan_iterations=2)
    assert seen == [0.0, 1.5, 0.7]            # the bundle's, the caller's, else the draft's


def test_the_live_canvas_defaults_to_sixteen_frames_a_draft(engine):
    from demo_core.engine import CANVAS_FRAMES
    from demo_core.events import TokensWritten

    rng = np.random.default_rng(0)
    x, y, q = (rng.random((16, 16, 3)).astype(np.float32) for _ in range(3))
    cells = engine.grid ** 2
    assert engine.canvas_every_default == max(1, cells // CANVAS_FRAMES)
    canvases = [e for e in engine.stream([(x, y)], q, refine=(), seed=0) if isinstance(e, TokensWritten) and e.canvas is not None]
    assert len(canvases) == cells // engine.canvas_every_default
    given = [e for e in engine.stream([(x, y)], q, refine=(), seed=0, canvas_every=cells)
             if isinstance(e, TokensWritten) and e.canvas is not None]
    assert len(given) == 1                                         # an explicit setting wins
