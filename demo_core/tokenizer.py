"""VQ image tokenizer: image <-> grid of code indices, with a `diffusers.VQModel` inside.

The same class holds the embedded default (trained here) and LVM's converted MUSE VQGAN.
Quantizer maths stays float32 (LVM's VQGAN produces NaNs in fp16).

Pixel range: each tokenizer has its own, the interval its VQ model was trained to read and write
(bundle.json "pixel_range"). The embedded default was trained on [-1, 1] (its trainer feeds
x * 2 - 1), so that is the default, and a bundle without the field reads as [-1, 1]. LVM's MUSE VQGAN reads RGB
in [0, 1] as is and its output is clamped to [0, 1] (`muse_vqgan.MUSE_PIXEL_RANGE`); fed [-1, 1]
instead, its codes are mostly not LVM's (issue 15 measured ~17 % agreement on the real VQGAN).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class TokenizerConfig:
    """Shape of the default tokenizer: 64x64 RGB -> 8x8 codes (f8)."""

    image_size: int = 64                                   # input side in pixels
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)  # one down block each; 4 blocks -> f8
    layers_per_block: int = 1
    latent_channels: int = 8                               # code vector dimension
    num_vq_embeddings: int = 1024                          # codebook size
    norm_num_groups: int = 16

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (len(self.block_out_channels) - 1)


def build_vqmodel(config: TokenizerConfig):
    """A fresh `diffusers.VQModel` of this config (no attention: fast on a CPU, like MUSE's VQGAN)."""
    from diffusers import VQModel

    blocks = len(config.block_out_channels)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        act_fn="silu",
        latent_channels=config.latent_channels,
        sample_size=config.image_size,
        num_vq_embeddings=config.num_vq_embeddings,
        norm_num_groups=config.norm_num_groups,
        vq_embed_dim=config.latent_channels,
        mid_block_add_attention=False,
    )


DEFAULT_PIXEL_RANGE = (-1.0, 1.0)      # the embedded default's training range, and that of bundles without the field


def check_pixel_range(value) -> tuple[float, float]:
    """(low, high) floats from a pixel range given as a pair; None -> DEFAULT_PIXEL_RANGE. ValueError if malformed."""
    if value is None:
        return DEFAULT_PIXEL_RANGE
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"pixel range must be a pair [low, high] of numbers, got {value!r}") from None
    if not low < high or not np.isfinite([low, high]).all():
        raise ValueError(f"pixel range must have low < high (finite), got [{low}, {high}]")
    return low, high


class VQTokenizer:
    """Encodes RGB images in [0, 1] to (B, g, g) code grids and decodes them back.

    `pixel_range` is the interval the VQ model reads and writes: images in [0, 1] are mapped onto
    it before encoding, and decoded output is clamped to it and mapped back to [0, 1].
    """

    def __init__(self, vqmodel, image_size: int | None = None, *, pixel_range=DEFAULT_PIXEL_RANGE):
        self.model = vqmodel.eval().float()
        self.pixel_range = check_pixel_range(pixel_range)
        self.image_size = int(image_size or vqmodel.config.sample_size)
        factor = getattr(vqmodel, "downsample_factor", None)       # LocalVQModel states it (f4)
        if factor is None:                                          # diffusers.VQModel: one halving per extra block
            factor = 2 ** (len(vqmodel.config.block_out_channels) - 1)
        self.grid = self.image_size // factor
        self.codebook_size = int(vqmodel.config.num_vq_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def local_codes(self) -> bool:
        """Whether a cell's code depends on its own neighbourhood only (LocalVQModel), not on the whole image."""
        return bool(getattr(self.model, "local_codes", False))

    @property
    def codebook(self) -> torch.Tensor:
        """(C, D) code vectors, float32."""
        return self.model.quantize.embedding.weight

    # -- images <-> tensors ------------------------------------------------------------
    def to_tensor(self, images) -> torch.Tensor:
        """PIL images / HxWx3 float arrays in [0, 1] / a BxHxWx3 array -> (B, 3, H, W) in `pixel_range` on the device."""
        if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 if isinstance(im, Image.Image) else np.asarray(im, dtype=np.float32)
                  for im in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if batch.shape[-1] != self.image_size or batch.shape[-2] != self.image_size:
            raise ValueError(f"tokenizer expects {self.image_size}x{self.image_size} images, got {tuple(batch.shape[-2:])}")
        low, high = self.pixel_range
        return (batch * (high - low) + low).to(self.device)       # [-1, 1]: x * 2 - 1; [0, 1]: x as is

    def to_arrays(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) in `pixel_range` (clamped to it) -> BxHxWx3 float32 in [0, 1]."""
        low, high = self.pixel_range
        return ((batch.detach().float().clamp(low, high) - low) / (high - low)).permute(0, 2, 3, 1).cpu().numpy()

    # -- codes -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in `pixel_range` -> pre-quantization latents (B, D, g, g)."""
        return self.model.encode(pixels.float()).latents

    @torch.no_grad()
    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, g, g) -> (B, g, g) indices of the nearest code (L2, float32)."""
        flat = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        codebook = self.codebook.float()
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)[None])
        return distances.argmin(1).view(latents.shape[0], latents.shape[2], latents.shape[3])

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images -> (B, g, g) long code indices."""
        return self.nearest_codes(self.encode_latents(self.to_tensor(images)))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g, g) indices -> (B, 3, H, W), nominally in `pixel_range` (not clamped here)."""
        codes = codes.long().to(self.device)
        quantized = self.codebook[codes].permute(0, 3, 1, 2).contiguous()  # (B, D, g, g)
        return self.model.decode(quantized, force_not_quantize=True).sample

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """(B, g, g) or (g, g) or (B, g*g) indices -> BxHxWx3 float arrays in [0, 1]."""
        codes = torch.as_tensor(codes)
        if codes.dim() == 1:
            codes = codes.view(1, self.grid, self.grid)
        elif codes.dim() == 2 and codes.shape[-1] == self.grid * self.grid:
            codes = codes.view(-1, self.grid, self.grid)
        elif codes.dim() == 2:
            codes = codes[None]
        return self.to_arrays(self.decode_codes(codes))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """(B, N, D) or (B, g, g, D) code-space vectors, not snapped to codes -> BxHxWx3 float arrays in [0, 1]
        (VSR's continuous decode: the decoder reads any latent, not only codebook rows)."""
        latents = torch.as_tensor(latents).to(self.device, self.codebook.dtype)
        latents = latents.reshape(latents.shape[0], self.grid, self.grid, latents.shape[-1]).permute(0, 3, 1, 2)
        return self.to_arrays(self.model.decode(latents.contiguous(), force_not_quantize=True).sample)

    def decode_pil(self, codes) -> Image.Image:
        from .images import float_to_pil

        return float_to_pil(self.decode(codes)[0])

    def config_dict(self) -> dict:
        return dict(self.model.config)


def tokenizer_config_dict(config: TokenizerConfig) -> dict:
    data = asdict(config)
    data["block_out_channels"] = list(config.block_out_channels)
    return data


DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def codes_fingerprint(vqmodel) -> str:
    """16 hex digits of SHA-256 over every weight that decides an image's codes (encoder, quant conv, codebook),
    leaving out the decoder: two tokenizers with one fingerprint give every image the same codes."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vqmodel.state_dict().items()):
        if name.startswith(DECODER_PREFIXES):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
