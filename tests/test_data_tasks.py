import numpy as np
import pytest

from demo_core.data import ImageSampler, source_names, VALIDATION_SOURCES, load_source
from demo_core.tasks import CORE_TASKS, PHOTO_INPUT_TASKS, TASKS, ExampleSampler, get_task


def test_split_is_by_source_image():
    train, val = set(source_names("train")), set(source_names("val"))
    assert val == set(VALIDATION_SOURCES) and not train & val and len(train) >= 15
    with pytest.raises(ValueError):
        source_names("test")


def test_every_source_loads_offline_as_rgb_float():
    for name in source_names("train") + source_names("val"):
        image = load_source(name)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0


@pytest.mark.parametrize("split", ["train", "val"])
def test_sampler_shapes_ranges_and_determinism(split):
    a = ImageSampler(split, 64, seed=3).batch(6)
    b = ImageSampler(split, 64, seed=3).batch(6)
    c = ImageSampler(split, 64, seed=4).batch(6)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_train_and_val_streams_differ_for_the_same_seed():
    assert not np.array_equal(ImageSampler("train", 32, 0).batch(4), ImageSampler("val", 32, 0).batch(4))


@pytest.mark.parametrize("name", list(TASKS))
def test_task_shapes_ranges_determinism(name):
    image = ImageSampler("val", 64, seed=1).sample()
    x1, y1 = get_task(name).transform(image, np.random.default_rng(0))
    x2, y2 = get_task(name).transform(image, np.random.default_rng(0))
    for array in (x1, y1):
        assert array.shape == (64, 64, 3) and array.min() >= 0 and array.max() <= 1
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, y1)


def test_task_semantics():
    image = ImageSampler("val", 64, seed=2, procedural_share=0.0).sample()
    rng = np.random.default_rng(0)
    x, y = TASKS["colorization"].transform(image, rng)
    assert np.allclose(x[..., 0], x[..., 1]) and np.array_equal(y, image)
    x, y = TASKS["inpainting"].transform(image, rng)
    assert np.array_equal(y, image) and (x == 0.5).all(-1).sum() >= 16 * 16
    x, y = TASKS["invert"].transform(image, rng)
    assert np.allclose(x + y, 1.0)
    _, y = TASKS["posterize"].transform(image, rng)
    assert set(np.unique(np.round(y * 3, 4))) <= {0.0, 1.0, 2.0, 3.0}
    _, y = TASKS["edges"].transform(image, rng)
    flat = np.full((64, 64, 3), 0.4, np.float32)
    assert TASKS["edges"].transform(flat, rng)[1].max() == 0.0 and y.max() > 0.3


def test_photo_input_tasks_let_only_the_demonstrations_decide():
    assert set(PHOTO_INPUT_TASKS) >= {"edges", "posterize", "invert"}
    assert set(CORE_TASKS) == {"colorization", "inpainting", "edges"}


def test_example_sampler():
    sampler = ExampleSampler("train", 32, seed=0)
    ks = set()
    for _ in range(20):
        example = sampler.sample()
        ks.add(len(example.pairs))
        assert example.task in TASKS and example.query.shape == (32, 32, 3) and example.answer.shape == (32, 32, 3)
    assert ks == {1, 2, 3}
    fixed = ExampleSampler("val", 32, seed=0).sample(task="edges", k=2)
    again = ExampleSampler("val", 32, seed=0).sample(task="edges", k=2)
    assert fixed.task == "edges" and len(fixed.pairs) == 2 and np.array_equal(fixed.answer, again.answer)
    with pytest.raises(ValueError):
        ExampleSampler(tasks=("nope",))


def test_a_photo_the_kind_leaves_unchanged_is_drawn_again(monkeypatch):
    """Colorizing a grey photo is no example: neither a demonstration nor a query may have x == y."""
    from demo_core.task_family import FamilySampler

    sampler = FamilySampler("train", 16, 0, kinds=["colorize"], pool="builtin")
    grey = np.full((16, 16, 3), 0.4, np.float32)
    photos = iter([grey, grey, np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)] * 8)
    monkeypatch.setattr(sampler.images, "sample", lambda: next(photos))
    example = sampler.sample(k=1, params={"tint": "grey"})
    for x, y in [*example.pairs, (example.query, example.answer)]:
        assert np.abs(x - y).max() >= 1 / 255
    given = sampler.sample(k=1, source=grey)                     # a source the caller chose is kept as it is
    assert given.query_source is grey
