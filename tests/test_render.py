"""render.py: the query's own pixels where an answer keeps its codes (paste), on by default for local codes."""
import numpy as np
import pytest
import torch
from PIL import Image

from demo_core.backbone import BackboneConfig, build_backbone
from demo_core.bundle import Bundle, manifest
from demo_core.engine import Engine
from demo_core.events import TokensWritten
from demo_core.local_vq import LocalVQModel
from demo_core.render import kept_cells, paste_query, render
from demo_core.sequence import Vocab
from demo_core.tokenizer import VQTokenizer

LOCAL = dict(sample_size=32, encoder_channels=(8, 16, 32), encoder_mlp_blocks=1, decoder_channels=(8, 16, 16),
             decoder_low_blocks=1, norm_num_groups=4, latent_channels=4, num_vq_embeddings=64)


def _image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def test_paste_puts_the_query_pixels_exactly_in_the_kept_cells_only():
    decoded, query = _image(0), _image(1)
    kept = np.zeros(64, dtype=bool)
    kept[[0, 9, 63]] = True                                         # cells (0,0), (1,1), (7,7) of an 8x8 grid
    out = np.asarray(paste_query(decoded, query, kept, grid=8))
    mask = kept.reshape(8, 8).repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(out[mask], np.asarray(query)[mask])
    np.testing.assert_array_equal(out[~mask], np.asarray(decoded)[~mask])


def test_kept_cells_compares_codes_and_render_is_the_decode_when_paste_is_off():
    codes, query_codes = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])
    assert kept_cells(codes, query_codes).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="cannot be compared"):
        kept_cells(codes, torch.tensor([1, 2]))
    decoded = _image(0)
    assert render(decoded, codes, _image(1), query_codes, 2, paste=False) is decoded
    assert render(decoded, codes, None, query_codes, 2, paste=True) is decoded
    with pytest.raises(ValueError, match="cannot paste"):
        paste_query(decoded, _image(1, 16), np.ones(4, bool), 2)


def _local_engine(info_extra: dict | None = None) -> Engine:
    torch.manual_seed(0)
    tokenizer = VQTokenizer(LocalVQModel(**LOCAL).eval())
    vocab = Vocab(tokenizer.codebook_size, tokenizer.grid ** 2)
    backbone = build_backbone(BackboneConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                             max_positions=512), vocab).eval()
    info = manifest(tokenizer, backbone, name="tiny-local", tasks=["inpaint"], extra=info_extra)
    return Engine(Bundle(info=info, tokenizer=tokenizer, backbone=backbone))


@pytest.fixture(scope="module")
def local_engine():
    return _local_engine()


def test_local_codes_paste_by_default_and_the_answer_equals_the_query_where_it_keeps_its_codes(local_engine):
    assert local_engine.tokenizer.local_codes and local_engine.bundle.paste_query
    query = _image(3)
    # the query as its own demonstration answer, greedy: a random model still keeps some of the query's codes
    result = local_engine.run([(_image(2), _image(2))], query, refine=("scan",), seed=0, temperature=0.0)
    assert result.pasted and result.kept.shape == (8, 8) and result.kept.dtype == bool
    query_codes = local_engine.encode([query])[0]
    np.testing.assert_array_equal(result.kept.reshape(-1), result.codes["scan"].reshape(-1) == query_codes.numpy())
    mask = result.kept.repeat(4, 0).repeat(4, 1)
    final = np.asarray(result.final)
    np.testing.assert_array_equal(final[mask], np.asarray(query)[mask])
    np.testing.assert_array_equal(final[~mask], np.asarray(local_engine.decode(result.codes["scan"]))[~mask])
    # the answer that keeps every code is the query itself, pixel for pixel; half kept, half the decode
    assert np.array_equal(np.asarray(local_engine.render(query_codes, query, query_codes)), np.asarray(query))
    half = query_codes.clone()
    half[32:] = (half[32:] + 1) % 64
    image = np.asarray(local_engine.render(half, query, query_codes))
    np.testing.assert_array_equal(image[:16], np.asarray(query)[:16])
    np.testing.assert_array_equal(image[16:], np.asarray(local_engine.decode(half))[16:])
    plain = local_engine.run([(_image(2), _image(2))], query, refine=("scan",), seed=0, temperature=0.0, paste_query=False)
    assert not plain.pasted
    np.testing.assert_array_equal(np.asarray(plain.final), np.asarray(local_engine.decode(plain.codes["scan"])))


def test_the_live_canvas_shows_the_query_itself_where_nothing_is_written_yet(local_engine):
    query = _image(4)
    first = next(e for e in local_engine.stream([(_image(2), _image(5))], query, refine=(), seed=0, canvas_every=1)
                 if isinstance(e, TokensWritten))
    mask = ~first.written.repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(np.asarray(first.canvas)[mask], np.asarray(query)[mask])


def test_a_bundle_can_turn_paste_off_and_whole_image_tokenizers_do_not_paste(tmp_path):
    assert not _local_engine({"paste_query": False}).bundle.paste_query
    from demo_core.engine import load_engine
    from demo_core.testing import build_tiny_bundle

    engine = load_engine(str(build_tiny_bundle(tmp_path / "b")))        # diffusers VQModel: codes mix the whole image
    assert not engine.tokenizer.local_codes and not engine.bundle.paste_query
    pairs = [(_image(2, engine.image_size), _image(5, engine.image_size))]
    assert not engine.run(pairs, _image(6, engine.image_size), refine=(), seed=0).pasted


def _ramp_pairs(transform, count: int = 2, size: int = 32):
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(count):
        x = rng.random((size, size, 3)).astype(np.float32)
        pairs.append((x, np.clip(transform(x), 0, 1)))
    return pairs


def test_luminance_map_fits_a_per_pixel_brightness_relation_and_refuses_others():
    from demo_core.render import luminance_map
    from demo_core.task_family import luminance

    grey = luminance_map(_ramp_pairs(lambda x: np.repeat(luminance(x)[..., None], 3, -1)))   # colour -> grey: y = x
    assert grey is not None and grey.residual < 0.01
    np.testing.assert_allclose(grey(np.array([0.2, 0.5, 0.8])), [0.2, 0.5, 0.8], atol=0.03)
    negative = luminance_map(_ramp_pairs(lambda x: 1.0 - x))
    np.testing.assert_allclose(negative(np.array([0.2, 0.8])), [0.8, 0.2], atol=0.03)
    rng = np.random.default_rng(0)                                  # no relation: y's brightness is not x's
    assert luminance_map(_ramp_pairs(lambda x: rng.random(x.shape).astype(np.float32))) is None
    assert luminance_map([]) is None


def test_carry_takes_the_query_luminance_and_keeps_the_answer_colour():
    from demo_core.render import carry_luminance, luminance_map
    from demo_core.task_family import luminance

    identity = luminance_map(_ramp_pairs(lambda x: x))
    query = _image(5)
    answer = Image.new("RGB", query.size, (150, 115, 105))            # a flat warm tint: the model's colour, no detail
    out = np.asarray(carry_luminance(answer, query, identity), np.float32) / 255
    error = np.abs(luminance(out) - luminance(np.asarray(query, np.float32) / 255))
    assert np.median(error) < 0.01 and error.mean() < 0.03            # (a few extreme pixels clip)
    assert (out[..., 0] - out[..., 2]).mean() > 0.1                   # still warm
    codes = torch.tensor([1, 2, 3, 4])
    assert render(answer, codes, query, codes, 2, paste=False, luminance=None) is answer
    with pytest.raises(ValueError, match="cannot carry"):
        carry_luminance(answer, _image(5, size=16), identity)


def test_luma_carry_is_the_bundles_choice_and_renders_every_stage_with_the_query_luminance():
    from demo_core.task_family import luminance

    assert not _local_engine().bundle.luma_carry                     # off unless a bundle says so
    engine = _local_engine({"luma_carry": True})
    query = _image(3)
    grey = lambda image: Image.fromarray(np.repeat(np.asarray(image.convert("L"))[..., None], 3, -1))   # noqa: E731
    pairs = [(grey(_image(2)), _image(2)), (grey(_image(7)), _image(7))]   # grey -> colour: the brightness is kept
    result = engine.run(pairs, grey(query), refine=("scan",), seed=0, temperature=0.0)
    assert result.luma_carried
    wanted = luminance(np.asarray(grey(query), np.float32) / 255)
    for image in (result.draft, result.final):
        error = np.abs(luminance(np.asarray(image, np.float32) / 255) - wanted)
        assert np.median(error) < 0.02
    off = engine.run(pairs, grey(query), refine=(), seed=0, temperature=0.0, luma_carry=False)
    assert not off.luma_carried
    unrelated = [(_image(2), _image(8)), (_image(7), _image(9))]     # no brightness relation: nothing carried
    assert not engine.run(unrelated, query, refine=(), seed=0, temperature=0.0).luma_carried
