import json
import shutil

import pytest
import torch

from demo_core.bundle import BundleError, load_bundle
from demo_core.testing import build_tiny_bundle


@pytest.fixture()
def bundle_dir(tmp_path):
    return build_tiny_bundle(tmp_path / "b")


def test_round_trip_is_exact(bundle_dir):
    from demo_core.testing import tiny_parts

    tokenizer, backbone, _ = tiny_parts(0)
    loaded = load_bundle(bundle_dir)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, loaded.backbone.state_dict()[name]), name
    for name, tensor in tokenizer.model.state_dict().items():
        assert torch.equal(tensor, loaded.tokenizer.model.state_dict()[name]), name
    assert loaded.vocab.size == loaded.backbone.config.vocab_size and loaded.max_pairs == 3
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["format"] == "retouch-bundle" and info["tokens_per_image"] == 16 and info["special_tokens"]["good"] == 32 + 16


def test_missing_part(bundle_dir):
    shutil.rmtree(bundle_dir / "backbone")
    with pytest.raises(BundleError, match="backbone part is missing"):
        load_bundle(bundle_dir)


def test_missing_manifest(bundle_dir):
    (bundle_dir / "bundle.json").unlink()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(bundle_dir)


def test_corrupt_weights_are_reported(bundle_dir):
    weights = bundle_dir / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BundleError, match="backbone: cannot read model.safetensors"):
        load_bundle(bundle_dir)


def test_mismatched_weights_are_named(bundle_dir):
    from safetensors.torch import load_file, save_file

    path = bundle_dir / "tokenizer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state.pop("quant_conv.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(BundleError, match=r"tokenizer: weights do not match.*missing quant_conv.bias.*unexpected extra.weight"):
        load_bundle(bundle_dir)


def test_bad_json(bundle_dir):
    (bundle_dir / "backbone" / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="backbone: .*config.json is not valid JSON"):
        load_bundle(bundle_dir)


def test_unknown_source():
    with pytest.raises(BundleError, match="no such folder"):
        load_bundle("/definitely/not/here")


def _populate_hub_cache(cache, repo_id, folder, commit="a" * 40):
    """The Hub cache layout (models--org--name/{refs,snapshots,blobs}) as huggingface_hub writes it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_id_through_the_real_snapshot_download_offline(tmp_path, monkeypatch, bundle_dir):
    cache = tmp_path / "hub"
    commit = _populate_hub_cache(cache, "retouch/tiny", bundle_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    loaded = load_bundle("retouch/tiny")
    assert loaded.vocab.cells == 16
    assert load_bundle("retouch/tiny", revision=commit).vocab.cells == 16
    with pytest.raises(BundleError, match="not in the local Hub cache"):
        load_bundle("retouch/absent")


# --------------------------------------------------------------------------------------------
# the tokenizer's pixel range, stored in bundle.json
# --------------------------------------------------------------------------------------------

def test_pixel_range_is_written_and_a_bundle_without_it_reads_as_minus_one_to_one(bundle_dir):
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["pixel_range"] == [-1.0, 1.0]
    assert load_bundle(bundle_dir).tokenizer.pixel_range == (-1.0, 1.0)
    del info["pixel_range"]                                  # a bundle written before the field existed
    (bundle_dir / "bundle.json").write_text(json.dumps(info))
    assert load_bundle(bundle_dir).tokenizer.pixel_range == (-1.0, 1.0)
    info["pixel_range"] = [0, 1]
    (bundle_dir / "bundle.json").write_text(json.dumps(info))
    assert load_bundle(bundle_dir).tokenizer.pixel_range == (0.0, 1.0)
    for bad in ([1, 0], [0], "0..1", [0, float("inf")]):
        info["pixel_range"] = bad
        (bundle_dir / "bundle.json").write_text(json.dumps(info))
        with pytest.raises(BundleError, match="tokenizer: .*bundle.json: pixel range") as error:
            load_bundle(bundle_dir)
        assert "\n" not in str(error.value)


def test_embedded_default_reads_and_writes_minus_one_to_one():
    import numpy as np

    from demo_core.bundle import DEFAULT_BUNDLE

    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        pytest.skip("no embedded default in this checkout")
    tokenizer = load_bundle(DEFAULT_BUNDLE).tokenizer
    assert tokenizer.pixel_range == (-1.0, 1.0)                # it was trained so
    image = np.random.default_rng(0).random((tokenizer.image_size, tokenizer.image_size, 3)).astype(np.float32)
    pixels = tokenizer.to_tensor(image)
    assert torch.equal(pixels, torch.from_numpy(image).permute(2, 0, 1)[None] * 2.0 - 1.0)   # as before the field
    np.testing.assert_array_equal(tokenizer.to_arrays(pixels), ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())


def test_zero_to_one_tokenizer_feeds_pixels_as_is_and_clamps_decodes():
    import numpy as np

    from demo_core.testing import TINY_TOKENIZER
    from demo_core.tokenizer import VQTokenizer, build_vqmodel

    tokenizer = VQTokenizer(build_vqmodel(TINY_TOKENIZER), pixel_range=(0.0, 1.0))
    image = np.random.default_rng(1).random((TINY_TOKENIZER.image_size,) * 2 + (3,)).astype(np.float32)
    assert torch.equal(tokenizer.to_tensor(image), torch.from_numpy(image).permute(2, 0, 1)[None])
    raw = torch.linspace(-0.5, 1.5, 3 * 16 * 16).view(1, 3, 16, 16)
    np.testing.assert_array_equal(tokenizer.to_arrays(raw), raw.clamp(0, 1).permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="low < high"):
        VQTokenizer(build_vqmodel(TINY_TOKENIZER), pixel_range=(1.0, 1.0))
