"""Tiny random components for tests, examples of the formats and CI: builds a complete bundle in
seconds (random weights; shapes and formats exactly as the default's), and a tiny MUSE VQGAN in MUSE's
own on-disk format (for the LVM recipe's tests)."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from .backbone import BackboneConfig, build_backbone
from .bundle import save_bundle
from .muse_vqgan import CONFIG_NAME, WEIGHTS_NAME
from .sequence import Vocab
from .tokenizer import TokenizerConfig, VQTokenizer, build_vqmodel

TINY_TOKENIZER = TokenizerConfig(image_size=16, block_out_channels=(8, 8, 8), latent_channels=4, num_vq_embeddings=32,
                                 norm_num_groups=4)   # 16x16 -> 4x4 = 16 tokens
TINY_BACKBONE = BackboneConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=128)


def tiny_parts(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = VQTokenizer(build_vqmodel(TINY_TOKENIZER))
    vocab = Vocab(tokenizer.codebook_size, tokenizer.grid ** 2)
    backbone = build_backbone(TINY_BACKBONE, vocab).eval()
    return tokenizer, backbone, vocab


def build_tiny_bundle(folder, seed: int = 0, refiner: bool = False, tensor: bool = False) -> Path:
    """A complete random bundle (max 3 pairs: (2*3+2)*16 = 128 positions)."""
    tokenizer, backbone, vocab = tiny_parts(seed)
    g_phi = None
    if refiner:
        from .refiners.self_refine import SelfRefiner

        g_phi = SelfRefiner.for_backbone(backbone, grid=tokenizer.grid)
    adapter = None
    if tensor:
        from .drafts.tensor import TensorAdapter

        adapter = TensorAdapter.for_backbone(backbone, vocab.codebook_size, k=4, heads=4)   # untrained: the backbone exactly
    return save_bundle(folder, tokenizer, backbone, g_phi, name="tiny-random", tasks=["colorization", "inpainting", "edges"],
                       tensor=adapter)



def _muse_param_shapes(cfg: dict) -> "OrderedDict[str, tuple[int, ...]]":
    """Key -> shape of open-muse `VQGANModel.state_dict()` for a config, in module order.

    Written from the open-muse module tree (Encoder: conv_in, down[i].block[j] / downsample,
    mid.block_1/2, norm_out, conv_out; Decoder: conv_in, mid, up[i].block[j] / upsample,
    norm_out, conv_out; then quantize.embedding, quant_conv, post_quant_conv), independently
    of the key map above.
    """
    shapes: OrderedDict = OrderedDict()
    hidden, mult = int(cfg["hidden_channels"]), [int(m) for m in cfg["channel_mult"]]
    n, res_blocks = len(mult), int(cfg["num_res_blocks"])
    ch_img, z, q = int(cfg["num_channels"]), int(cfg["z_channels"]), int(cfg["quantized_embed_dim"])

    def conv(prefix, c_out, c_in, k):
        shapes[f"{prefix}.weight"] = (c_out, c_in, k, k)
        shapes[f"{prefix}.bias"] = (c_out,)

    def norm(prefix, c):
        shapes[f"{prefix}.weight"] = (c,)
        shapes[f"{prefix}.bias"] = (c,)

    def resnet(prefix, c_in, c_out):
        norm(f"{prefix}.norm1", c_in)
        conv(f"{prefix}.conv1", c_out, c_in, 3)
        norm(f"{prefix}.norm2", c_out)
        conv(f"{prefix}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{prefix}.nin_shortcut", c_out, c_in, 1)

    # encoder
    conv("encoder.conv_in", hidden, ch_img, 3)
    in_mult = [1] + mult
    for i in range(n):
        c_in, c_out = hidden * in_mult[i], hidden * mult[i]
        for j in range(res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
    mid = hidden * mult[-1]
    resnet("encoder.mid.block_1", mid, mid)
    resnet("encoder.mid.block_2", mid, mid)
    norm("encoder.norm_out", mid)
    conv("encoder.conv_out", z, mid, 3)
    # decoder
    conv("decoder.conv_in", mid, z, 3)
    resnet("decoder.mid.block_1", mid, mid)
    resnet("decoder.mid.block_2", mid, mid)
    for i in range(n):  # ModuleList order: up.0 (full resolution) ... up.{n-1} (lowest)
        c_in = hidden * (mult[i + 1] if i < n - 1 else mult[-1])
        c_out = hidden * mult[i]
        for j in range(res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_out, c_out, 3)
    norm("decoder.norm_out", hidden * mult[0])
    conv("decoder.conv_out", ch_img, hidden * mult[0], 3)
    # quantizer and 1x1 convs
    shapes["quantize.embedding.weight"] = (int(cfg["num_embeddings"]), q)
    conv("quant_conv", q, z, 1)
    conv("post_quant_conv", z, q, 1)
    return shapes


def make_tiny_muse_vqgan(folder, seed: int = 0, *, hidden_channels: int = 32, channel_mult=(1, 2),
                         num_res_blocks: int = 1, z_channels: int = 4, quantized_embed_dim: int = 4,
                         num_embeddings: int = 16, resolution: int = 16, num_channels: int = 3,
                         norm_num_groups: int | None = None) -> dict:
    """TEST HELPER: write a tiny random MUSE VQGAN checkpoint in MUSE's own on-disk format.

    `folder/config.json` uses open-muse's field names, `folder/pytorch_model.bin` is a
    `torch.save`d state dict whose keys are the ones open-muse's `VQGANModel.state_dict()`
    produces (built from the config, not by inverting a diffusers model). Random weights, for
    tests only. The default hidden_channels=32 keeps it a valid MUSE model (MUSE hard-codes
    32 GroupNorm groups); smaller widths need `norm_num_groups`, written as an extension field.
    Returns the config dict.
    """
    config = {
        "_class_name": "VQGANModel",
        "_version": "0.0.1",
        "resolution": resolution,
        "num_channels": num_channels,
        "hidden_channels": hidden_channels,
        "channel_mult": list(channel_mult),
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [],
        "no_attn_mid_block": True,
        "z_channels": z_channels,
        "num_embeddings": num_embeddings,
        "quantized_embed_dim": quantized_embed_dim,
        "dropout": 0.0,
        "resample_with_conv": True,
        "commitment_cost": 0.25,
    }
    if norm_num_groups is not None:
        config["norm_num_groups"] = int(norm_num_groups)
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict = OrderedDict()
    for key, shape in _muse_param_shapes(config).items():
        if key == "quantize.embedding.weight":
            tensor = torch.randn(shape, generator=gen)
        elif len(shape) == 4:  # conv weight, fan-in scaled
            fan_in = shape[1] * shape[2] * shape[3]
            tensor = torch.randn(shape, generator=gen) / fan_in ** 0.5
        elif ".norm" in key and key.endswith(".weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:  # biases
            tensor = 0.05 * torch.randn(shape, generator=gen)
        state[key] = tensor.contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    torch.save(state, folder / WEIGHTS_NAME)
    return config
