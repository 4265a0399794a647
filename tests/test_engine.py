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

