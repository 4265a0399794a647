"""The second-generation tokenizer: local codes, the diffusers format, and the task family it must carry."""
import numpy as np
import pytest
import torch

from demo_core.local_vq import LocalVQModel
from demo_core.task_family import HELDOUT_KINDS, KINDS, TRAIN_KINDS, canny_map, make_pair
from demo_core.tokenizer import VQTokenizer

TINY = dict(sample_size=32, encoder_channels=(8, 16, 32), encoder_mlp_blocks=1, decoder_channels=(8, 16, 16),
            decoder_low_blocks=1, norm_num_groups=4, latent_channels=4, num_vq_embeddings=64)


@pytest.fixture(scope="module")
def tiny_vq():
    torch.manual_seed(0)
    return LocalVQModel(**TINY).eval()


def test_a_cells_latent_depends_only_on_its_patch_and_a_4px_margin(tiny_vq):
    torch.manual_seed(1)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    base = tiny_vq.encode(pixels).latents                         # (1, D, 8, 8)
    for cell_y, cell_x in ((0, 0), (3, 4), (7, 7)):
        changed = pixels.clone()
        window = torch.zeros(32, 32, dtype=torch.bool)
        window[max(0, 4 * cell_y - 4):4 * cell_y + 8, max(0, 4 * cell_x - 4):4 * cell_x + 8] = True
        changed[:, :, ~window] = torch.rand(int((~window).sum())) * 2 - 1   # everything outside the window
        after = tiny_vq.encode(changed).latents
        assert torch.equal(after[..., cell_y, cell_x], base[..., cell_y, cell_x])
        inside = pixels.clone()
        inside[:, :, 4 * cell_y, 4 * cell_x] += 0.5                  # a pixel inside the patch does change it
        assert not torch.equal(tiny_vq.encode(inside).latents[..., cell_y, cell_x], base[..., cell_y, cell_x])


def test_tokenizer_reads_a_16x16_grid_and_round_trips_through_the_diffusers_format(tiny_vq, tmp_path):
    from demo_core.bundle import load_tokenizer_part

    tokenizer = VQTokenizer(tiny_vq)
    assert tokenizer.grid == 8 and tokenizer.codebook_size == 64
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    codes = tokenizer.encode(images)
    assert codes.shape == (2, 8, 8)
    tiny_vq.save_pretrained(tmp_path / "tokenizer", safe_serialization=True)
    loaded = load_tokenizer_part(tmp_path / "tokenizer")
    assert isinstance(loaded.model, LocalVQModel) and loaded.grid == 8
    assert torch.equal(loaded.encode(images), codes)
    np.testing.assert_array_equal(loaded.decode(codes), tokenizer.decode(codes))


def test_task_family_has_twelve_kinds_and_one_held_out():
    assert len(KINDS) >= 12 and HELDOUT_KINDS and not set(HELDOUT_KINDS) & set(TRAIN_KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_makes_pairs_in_range_and_params_are_shared(kind):
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    params = KINDS[kind].draw(rng, "train")
    x, y = make_pair(image, kind, params, rng)
    assert x.shape == y.shape == (64, 64, 3) and x.dtype == y.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and 0.0 <= y.min() and y.max() <= 1.0
    if KINDS[kind].photo_input:
        np.testing.assert_array_equal(x, image)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "solarize"])
def test_held_out_parameter_values_never_come_up_in_training(kind):
    train = {repr(sorted(KINDS[kind].draw(np.random.default_rng(s), "train").items())) for s in range(300)}
    heldout = {repr(sorted(KINDS[kind].draw(np.random.default_rng(s), "heldout").items())) for s in range(50)}
    assert not train & heldout


def test_canny_maps_are_binary_thin_lines():
    image = np.zeros((64, 64, 3), np.float32)
    image[:, 32:] = 1.0
    lines = canny_map(image, sigma=1.5)
    assert set(np.unique(lines)) <= {0.0, 1.0}
    assert lines[:, 30:34].sum(axis=1).max() <= 2 and lines[8:56, 30:34].sum() >= 40   # one line along the step


def test_family_examples_share_parameters_and_hold_out_kinds():
    from demo_core.task_family import FamilySampler

    sampler = FamilySampler("train", seed=0, pool="builtin")
    example = sampler.sample(kind="posterize", k=3)
    assert len(example.pairs) == 3 and example.params["levels"] in (2, 4, 5, 6)
    steps = example.params["levels"] - 1
    for x, y in example.pairs + [(example.query, example.answer)]:                # one level count for all four
        np.testing.assert_allclose(y, np.round(x * steps) / steps, atol=1e-6)
    assert {sampler.sample().kind for _ in range(60)} <= set(TRAIN_KINDS)
    assert FamilySampler("heldout", seed=0, pool="builtin").sample(kind="posterize").params["levels"] == 3
    with pytest.raises(ValueError, match="held out"):
        FamilySampler("train", kinds=("solarize",), pool="builtin")


def test_sequences_move_as_their_parameters_say():
    from demo_core.sequences import SEQUENCE_KINDS, SequenceSampler

    sampler = SequenceSampler("val", seed=0)
    for kind in SEQUENCE_KINDS:
        sequence = sampler.sample(kind, frames=3)
        assert len(sequence.frames) == 3 and sequence.next_frame.shape == (64, 64, 3)
        assert all(0 <= f.min() and f.max() <= 1 for f in sequence.frames)
    ramp = sampler.sample("brightness", frames=3)
    means = [f.mean() for f in ramp.frames + [ramp.next_frame]]
    assert np.all(np.sign(np.diff(means)) == np.sign(ramp.params["step"]))
    pan = sampler.sample("pan", frames=2)
    vy, vx = pan.params["velocity"]
    a, b = pan.frames
    shift_y, shift_x = int(round(vy)), int(round(vx))
    if max(abs(shift_y), abs(shift_x)) >= 1:                      # frame b is frame a moved by the velocity
        crop = lambda f, dy, dx: f[8 + dy:56 + dy, 8 + dx:56 + dx]
        moved = np.abs(crop(a, shift_y, shift_x) - crop(b, 0, 0)).mean()
        still = np.abs(crop(a, 0, 0) - crop(b, 0, 0)).mean()
        assert moved < still


def test_episode_pool_cuts_pairs_and_sequences_and_resumes_its_cache(tiny_vq, tmp_path, monkeypatch):
    from demo_core.train.episodes import FRAMES_PER_EPISODE, PAIRS_PER_EPISODE, EpisodePool

    tokenizer = VQTokenizer(LocalVQModel(**{**TINY, "sample_size": 64}).eval())
    cache = tmp_path / "pool.pt"
    pool = EpisodePool(tokenizer, episodes=6, sequences=4, seed=0, cache=cache, pool="builtin", chunk=3)
    cells = tokenizer.grid ** 2
    assert pool.pairs.shape == (6, PAIRS_PER_EPISODE, 2, cells) and pool.frames.shape == (4, FRAMES_PER_EPISODE, cells)
    rng = np.random.default_rng(0)
    context, answer, kinds = pool.pair_batch(3, 2, rng)
    assert context.shape == (3, 5 * cells) and answer.shape == (3, cells) and set(kinds) <= set(TRAIN_KINDS)
    for row, kind in zip(range(3), kinds):        # the answer is the y of one of its episode's pairs, never shown in the context
        episode = [e for e in range(6) if pool.kind_names[int(pool.kinds[e])] == kind]
        assert any(any(torch.equal(answer[row], pool.pairs[e, i, 1].long()) for i in range(PAIRS_PER_EPISODE)) for e in episode)
    context, answer, _ = pool.sequence_batch(2, 3, rng)
    assert context.shape == (2, 3 * cells) and answer.shape == (2, cells)
    again = EpisodePool(tokenizer, episodes=6, sequences=4, seed=0, cache=cache, pool="builtin")
    assert torch.equal(again.pairs, pool.pairs) and torch.equal(again.frames, pool.frames)
    # a complete cache is read without the photos it was built from (a machine that was only given the pool)
    monkeypatch.setenv("RETOUCH_PHOTOS", str(tmp_path / "no-photos"))
    carried = EpisodePool(tokenizer, episodes=6, sequences=4, seed=0, cache=cache, pool="debian")
    assert torch.equal(carried.pairs, pool.pairs)
    with pytest.raises(Exception, match="data fetch"):     # one more episode would need them
        EpisodePool(tokenizer, episodes=7, sequences=4, seed=0, cache=cache, pool="debian")
