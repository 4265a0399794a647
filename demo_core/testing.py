"""Tiny random components for tests, examples of the formats and CI: builds a complete bundle in
seconds (random weights; shapes and formats exactly as the default's)."""
from __future__ import annotations

from pathlib import Path

import torch

from .backbone import BackboneConfig, build_backbone
from .bundle import save_bundle
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
        from .refiners.tensor import TensorAdapter

        adapter = TensorAdapter.for_backbone(backbone, vocab.codebook_size, k=4, heads=4)   # untrained: the backbone exactly
    return save_bundle(folder, tokenizer, backbone, g_phi, name="tiny-random", tasks=["colorization", "inpainting", "edges"],
                       tensor=adapter)
