"""MUSE VQGAN (LVM's tokenizer format) -> diffusers.VQModel conversion, on tiny checkpoints."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from demo_core.muse_vqgan import (
    LVM_MUSE_CONFIG,
    diffusers_to_muse,
    load_muse_vqgan,
    muse_config_to_vqmodel_kwargs,
    muse_to_diffusers,
)
from demo_core.testing import make_tiny_muse_vqgan

TINY_VARIANTS = {
    # a valid open-muse model (32 GroupNorm groups, as MUSE hard-codes)
    "muse32": dict(),
    # narrower, three levels, two resnets per encoder level: needs the norm_num_groups extension
    "narrow3": dict(hidden_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2, norm_num_groups=4,
                    z_channels=6, quantized_embed_dim=5, resolution=16),
}


def _load_raw(folder):
    config = json.loads((folder / "config.json").read_text())
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return config, state


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"muse_{request.param}")
    make_tiny_muse_vqgan(folder, seed=0, **TINY_VARIANTS[request.param])
    config, state = _load_raw(folder)
    return folder, config, state


def _fresh_vqmodel(config):
    from diffusers import VQModel

    with torch.device("meta"):
        return VQModel(**muse_config_to_vqmodel_kwargs(config))


def test_tiny_checkpoint_is_in_muse_format(tiny):
    folder, config, state = tiny
    assert config["_class_name"] == "VQGANModel"
    for field in ("resolution", "num_channels", "hidden_channels", "channel_mult", "num_res_blocks",
                  "attn_resolutions", "z_channels", "num_embeddings", "quantized_embed_dim"):
        assert field in config
    # literal open-muse key names (modeling_taming_vqgan.py module tree)
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_1.conv1.weight",
                "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight", "encoder.conv_out.bias",
                "decoder.conv_in.weight", "decoder.mid.block_1.conv2.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                f"decoder.up.0.block.{config['num_res_blocks']}.conv2.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.norm_out.bias", "decoder.conv_out.weight", "quantize.embedding.weight",
                "quant_conv.weight", "post_quant_conv.bias"):
        assert key in state, key
    assert "decoder.up.0.upsample.conv.weight" not in state                      # full resolution: no upsample
    last = len(config["channel_mult"]) - 1
    assert f"encoder.down.{last}.downsample.conv.weight" not in state            # lowest resolution: no downsample
    assert f"encoder.down.0.block.{config['num_res_blocks']}.conv1.weight" not in state  # encoder has R resnets
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_conversion_maps_every_key_once_onto_vqmodel(tiny):
    _, config, state = tiny
    converted = muse_to_diffusers(state, config)
    assert len(converted) == len(state)
    reference = _fresh_vqmodel(config).state_dict()
    assert set(converted) == set(reference)                                       # no missing, no unexpected
    for key, value in reference.items():
        assert tuple(converted[key].shape) == tuple(value.shape), key
    # each source tensor used exactly once (same objects, no copies)
    assert sorted(id(v) for v in converted.values()) == sorted(id(v) for v in state.values())


def test_inverse_round_trips_exactly(tiny):
    _, config, state = tiny
    back = diffusers_to_muse(muse_to_diffusers(state, config), config)
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), key
    # separately: a real VQModel's own key set inverts onto exactly the MUSE key set
    vq_keys = _fresh_vqmodel(config).state_dict()
    assert set(diffusers_to_muse(vq_keys, config)) == set(state)


def _gn(x, w, b, groups):
    return F.group_norm(x, groups, w, b, eps=1e-6)


def _muse_reference_forward(state, config, pixels):
    """MUSE's VQGAN computation written from its description, on MUSE-named weights."""
    groups = config.get("norm_num_groups", 32)
    n, r = len(config["channel_mult"]), config["num_res_blocks"]

    def conv(x, p, stride=1, padding=1):
        return F.conv2d(x, state[f"{p}.weight"], state[f"{p}.bias"], stride=stride, padding=padding)

    def resnet(x, p):
        h = conv(F.silu(_gn(x, state[f"{p}.norm1.weight"], state[f"{p}.norm1.bias"], groups)), f"{p}.conv1")
        h = conv(F.silu(_gn(h, state[f"{p}.norm2.weight"], state[f"{p}.norm2.bias"], groups)), f"{p}.conv2")
        if f"{p}.nin_shortcut.weight" in state:
            x = conv(x, f"{p}.nin_shortcut", padding=0)
        return x + h

    def tail(x, part):
        x = F.silu(_gn(x, state[f"{part}.norm_out.weight"], state[f"{part}.norm_out.bias"], groups))
        return conv(x, f"{part}.conv_out")

    h = conv(pixels, "encoder.conv_in")
    for i in range(n):
        for j in range(r):
            h = resnet(h, f"encoder.down.{i}.block.{j}")
        if i != n - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2, padding=0)
    h = resnet(resnet(h, "encoder.mid.block_1"), "encoder.mid.block_2")
    z = conv(tail(h, "encoder"), "quant_conv", padding=0)
    codebook = state["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codes = torch.cdist(flat, codebook).argmin(dim=1).reshape(z.shape[0], z.shape[2], z.shape[3])
    zq = codebook[codes].permute(0, 3, 1, 2)
    h = conv(conv(zq, "post_quant_conv", padding=0), "decoder.conv_in")
    h = resnet(resnet(h, "decoder.mid.block_1"), "decoder.mid.block_2")
    for i in reversed(range(n)):
        for j in range(r + 1):
            h = resnet(h, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv")
    return z, codes, tail(h, "decoder")


@torch.no_grad()
def test_loaded_vqmodel_encodes_quantizes_decodes_like_muse(tiny):
    folder, config, state = tiny
    model = load_muse_vqgan(folder)
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    assert model.config.force_upcast and model.config.lookup_from_codebook

    res = config["resolution"]
    grid = res // 2 ** (len(config["channel_mult"]) - 1)
    pixels = torch.rand(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    latents = model.encode(pixels).latents
    _, _, (_, _, indices) = model.quantize(latents)
    codes = indices.reshape(2, grid, grid)
    assert codes.shape == (2, grid, grid)
    assert int(codes.min()) >= 0 and int(codes.max()) < config["num_embeddings"]
    decoded = model.decode(codes, force_not_quantize=True, shape=(2, grid, grid, config["quantized_embed_dim"])).sample
    assert decoded.shape == (2, 3, res, res) and torch.isfinite(decoded).all()

    ref_z, ref_codes, ref_decoded = _muse_reference_forward(state, config, pixels)
    torch.testing.assert_close(latents, ref_z, rtol=1e-4, atol=1e-5)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(decoded, ref_decoded, rtol=1e-4, atol=1e-4)


def test_unknown_key_is_named(tiny):
    _, config, state = tiny
    n, r = len(config["channel_mult"]), config["num_res_blocks"]
    not_muse = [
        "encoder.down.0.block.0.extra_gate.weight",      # unknown parameter
        f"encoder.down.{n}.block.0.conv1.weight",         # no such level
        f"encoder.down.0.block.{r}.conv1.weight",         # encoder has R resnets per level
        f"decoder.up.0.block.{r + 1}.conv1.weight",       # decoder has R + 1
        f"encoder.down.{n - 1}.downsample.conv.weight",   # lowest level has no downsampler
        "decoder.up.0.upsample.conv.weight",              # full-resolution level has no upsampler
        "encoder.down.00.block.0.conv1.weight",           # not a canonical index
        "model.encoder.conv_in.weight",                   # a wrapped/prefixed checkpoint
    ]
    for key in not_muse:
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            muse_to_diffusers({**state, key: torch.zeros(1)}, config)
    attn = dict(state)
    attn["encoder.mid.attn_1.q.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"attention.*encoder\.mid\.attn_1\.q\.weight"):
        muse_to_diffusers(attn, config)
    with pytest.raises(ValueError, match=r"decoder\.up_blocks\.0\.upsamplers\.1\.conv\.weight"):
        diffusers_to_muse({"decoder.up_blocks.0.upsamplers.1.conv.weight": torch.zeros(1)}, config)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    make_tiny_muse_vqgan(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match=r"missing pytorch_model\.bin") as info:
        load_muse_vqgan(tmp_path)
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"missing config\.json"):
        load_muse_vqgan(empty)
    with pytest.raises(ValueError, match=r"not a folder"):
        load_muse_vqgan(tmp_path / "nowhere")


def test_mismatching_state_dict_is_a_clear_error(tmp_path):
    make_tiny_muse_vqgan(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del state["decoder.up.1.upsample.conv.bias"]
    state["quant_conv.weight"] = torch.zeros(7, 4, 1, 1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"1 missing: decoder\.up_blocks\.0\.upsamplers\.0\.conv\.bias.*wrong shape: quant_conv\.weight") as info:
        load_muse_vqgan(tmp_path)
    assert "\n" not in str(info.value)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return "pwned"


class _NotATensor:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_loader_refuses_pickled_objects(tmp_path):
    make_tiny_muse_vqgan(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["encoder.conv_in.bias"] = _NotATensor()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"weights_only=True") as info:
        load_muse_vqgan(tmp_path)
    assert "\n" not in str(info.value)
    assert _UNPICKLED == []  # the object's reduce function never ran


def test_lvm_config_converts_to_the_amused_vq_shape():
    kwargs = muse_config_to_vqmodel_kwargs({"_class_name": "VQGANModel", "_version": "0.0.1", **LVM_MUSE_CONFIG})
    assert kwargs["block_out_channels"] == (128, 256, 256, 512, 768)
    assert kwargs["down_block_types"] == ("DownEncoderBlock2D",) * 5
    assert kwargs["up_block_types"] == ("UpDecoderBlock2D",) * 5
    assert (kwargs["layers_per_block"], kwargs["latent_channels"], kwargs["vq_embed_dim"]) == (2, 64, 64)
    assert (kwargs["num_vq_embeddings"], kwargs["norm_num_groups"], kwargs["sample_size"]) == (8192, 32, 256)
    assert kwargs["mid_block_add_attention"] is False and kwargs["norm_type"] == "group"
    assert kwargs["lookup_from_codebook"] is True and kwargs["force_upcast"] is True
    model = _fresh_vqmodel(LVM_MUSE_CONFIG)  # meta device: no memory
    assert sum(p.numel() for p in model.parameters()) * 4 == pytest.approx(585e6, rel=0.01)  # the Hub file's size
    keys = model.state_dict()
    muse_keys = diffusers_to_muse(keys, LVM_MUSE_CONFIG)
    assert set(muse_to_diffusers(muse_keys, LVM_MUSE_CONFIG)) == set(keys)
    assert "decoder.up.4.block.0.conv1.weight" in muse_keys and "decoder.up.0.block.2.conv2.weight" in muse_keys


@pytest.mark.parametrize("change, message", [
    ({"no_attn_mid_block": False}, "mid-block attention"),
    ({"attn_resolutions": [16]}, "attention at resolution"),
    ({"channel_mult": [2, 2, 4]}, "start with 1"),
    ({"decoder_res_blocks": 3}, "decoder_res_blocks"),
    ({"hidden_channels": 8}, "divisible"),
    ({"frobnicate": 1}, "unknown field"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        muse_config_to_vqmodel_kwargs({**LVM_MUSE_CONFIG, **change})


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    make_tiny_muse_vqgan(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    model = load_muse_vqgan(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.quantize.embedding.weight, state["quantize.embedding.weight"].half().float())
