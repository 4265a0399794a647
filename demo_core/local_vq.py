"""A VQ autoencoder whose codes are local: 64x64 RGB -> 16x16 codes (f4), LVM's 256 tokens per image.

The encoder only sees a cell's 4x4 patch and a 4-pixel margin around it (one cell on every side):
a 3x3 conv, two 4x4 stride-2 convs and per-cell MLP blocks with a per-position LayerNorm, so there
is no attention, no GroupNorm (it mixes statistics over the whole image) and no wider conv. Pixels
farther away cannot change a cell's code, so an edit (an inpainting box) leaves every code outside
its reach unchanged, and the backbone can copy what it sees. `encoder_window` states the window;
a test perturbs pixels outside it and checks the latents are bit-identical.

The decoder may be as wide as it likes (3x3 convs with GroupNorm; it is where reconstruction
quality comes from). It is fully convolutional, so it trains on crops smaller than the images it
decodes. Codebook: nearest code by L2 over low-dimensional code vectors, kept in float32.

Saved in diffusers' own format (`ModelMixin` / `ConfigMixin`: config.json with `_class_name`
LocalVQModel, diffusion_pytorch_model.safetensors); it answers the same calls as
`diffusers.VQModel` (`encode(x).latents`, `decode(z, force_not_quantize=True).sample`,
`quantize.embedding`), so `VQTokenizer` holds either.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each position (local, unlike GroupNorm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # (B, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CellMLP(nn.Module):
    """Residual per-position MLP: x + W2 gelu(W1 norm(x))."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResBlock(nn.Module):
    """Decoder residual block: (GroupNorm, SiLU, 3x3 conv) x 2."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class LocalEncoder(nn.Module):
    """(B, 3, H, W) -> (B, D, H/4, W/4); a cell's output depends on its patch + a 4-px margin."""

    def __init__(self, channels: tuple[int, int, int], mlp_blocks: int, latent_channels: int):
        super().__init__()
        c0, c1, c2 = channels
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)                 # pixel p sees [p-1, p+1]
        self.down1 = nn.Conv2d(c0, c1, 4, stride=2, padding=1)        # q sees pixels [2q-2, 2q+3]
        self.mix1 = nn.Conv2d(c1, c1, 1)
        self.down2 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)        # cell c sees pixels [4c-4, 4c+7]
        self.blocks = nn.Sequential(*[CellMLP(c2, 2 * c2) for _ in range(mlp_blocks)])
        self.norm_out = ChannelNorm(c2)
        self.conv_out = nn.Conv2d(c2, latent_channels, 1)

    def forward(self, x):
        h = F.gelu(self.conv_in(x))
        h = F.gelu(self.mix1(F.gelu(self.down1(h))))
        h = self.blocks(self.down2(h))
        return self.conv_out(F.gelu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, D, g, g) -> (B, 3, 4g, 4g): 3x3 convs at every scale, nearest upsampling."""

    def __init__(self, channels: tuple[int, int, int], latent_channels: int, blocks_low: int, groups: int):
        super().__init__()
        c0, c1, c2 = channels
        self.conv_in = nn.Conv2d(latent_channels, c2, 3, padding=1)
        self.low = nn.Sequential(*[ResBlock(c2, groups) for _ in range(blocks_low)])
        self.up1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.mid = ResBlock(c1, groups)
        self.up2 = nn.Conv2d(c1, c0, 3, padding=1)
        self.high = ResBlock(c0, groups)
        self.norm_out = nn.GroupNorm(groups, c0)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)

    def forward(self, z):
        h = self.low(self.conv_in(z))
        h = self.mid(self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        h = self.high(self.up2(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        return self.conv_out(F.silu(self.norm_out(h)))


class LocalVQModel(ModelMixin, ConfigMixin):
    """Local-encoder VQ autoencoder, f4 (see the module docstring)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 64, encoder_channels: tuple = (48, 96, 256), encoder_mlp_blocks: int = 3,
                 decoder_channels: tuple = (48, 96, 192), decoder_low_blocks: int = 2, norm_num_groups: int = 16,
                 latent_channels: int = 8, num_vq_embeddings: int = 4096):
        super().__init__()
        self.encoder = LocalEncoder(tuple(encoder_channels), encoder_mlp_blocks, latent_channels)
        self.decoder = Decoder(tuple(decoder_channels), latent_channels, decoder_low_blocks, norm_num_groups)
        self.quantize = SimpleNamespace()                              # VQModel's attribute path to the codebook
        self.codebook = nn.Embedding(num_vq_embeddings, latent_channels)
        self.quantize.embedding = self.codebook

    downsample_factor = 4
    encoder_window = (4, 4)        # pixels of margin left/top and right/bottom of a cell's 4x4 patch
    local_codes = True             # an equal code means an unchanged neighbourhood (render.py pastes such cells)

    def encode(self, pixels: torch.Tensor):
        """(B, 3, H, W) in the tokenizer's pixel range -> .latents (B, D, H/4, W/4), before quantization."""
        return SimpleNamespace(latents=self.encoder(pixels))

    def quantize_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, g, g) -> (nearest code vectors (B, D, g, g), indices (B, g, g)); L2, float32."""
        flat = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        codebook = self.codebook.weight.float()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)[None]
        indices = distances.argmin(1)
        batch, dim, height, width = latents.shape
        quantized = codebook[indices].view(batch, height, width, dim).permute(0, 3, 1, 2)
        return quantized, indices.view(batch, height, width)

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False):
        """(B, D, g, g) -> .sample (B, 3, 4g, 4g); quantizes first unless told the input is already codes."""
        if not force_not_quantize:
            latents, _ = self.quantize_latents(latents)
        return SimpleNamespace(sample=self.decoder(latents))

    def forward(self, pixels: torch.Tensor):
        return self.decode(self.encode(pixels).latents).sample
