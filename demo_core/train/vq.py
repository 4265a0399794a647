"""Codebook training shared by the tokenizer trainers: k-means initialisation, EMA updates, restarts."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kmeans(vectors: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Plain Lloyd k-means in float32; empty clusters are re-seeded from random points."""
    vectors = vectors.float()
    centres = vectors[torch.randperm(len(vectors), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(vectors, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centres = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            centres[empty] = vectors[torch.randint(0, len(vectors), (int(empty.sum()),), generator=generator)]
    return centres


class EMAQuantizer:
    """EMA codebook state living beside the VQModel's own embedding (which it overwrites)."""

    def __init__(self, embedding: torch.nn.Embedding, decay: float = 0.99, eps: float = 1e-5):
        self.embedding = embedding
        self.decay, self.eps = decay, eps
        codes, dim = embedding.weight.shape
        self.cluster_size = torch.ones(codes)
        self.embed_sum = embedding.weight.detach().clone()
        self.reduce = None          # several processes: sums a tensor over them, so every codebook sees the global batch

    def state_dict(self) -> dict:
        return {"cluster_size": self.cluster_size, "embed_sum": self.embed_sum}

    def load_state_dict(self, state: dict) -> None:
        self.cluster_size, self.embed_sum = state["cluster_size"], state["embed_sum"]

    def reset(self, centres: torch.Tensor) -> None:
        self.embedding.weight.data.copy_(centres)
        self.embed_sum = centres.clone()
        self.cluster_size = torch.ones(len(centres))

    def quantize(self, flat: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """flat (N, D) -> (quantized (N, D) from the codebook, indices (N,))."""
        codebook = self.embedding.weight.detach()
        with torch.no_grad():
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)[None]
            indices = distances.argmin(1)
        if train:
            with torch.no_grad():
                onehot = F.one_hot(indices, len(codebook)).float()
                counts, sums = onehot.sum(0), onehot.T @ flat.detach()
                if self.reduce is not None:
                    counts, sums = self.reduce(counts), self.reduce(sums)
                self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
                total = self.cluster_size.sum()
                smoothed = (self.cluster_size + self.eps) / (total + len(codebook) * self.eps) * total
                self.embedding.weight.data.copy_(self.embed_sum / smoothed[:, None])
        return codebook[indices], indices

    def restart_dead(self, flat: torch.Tensor, threshold: float, generator: torch.Generator) -> int:
        """Move codes used less than `threshold` (EMA count) onto random current encoder outputs."""
        dead = self.cluster_size < threshold
        count = int(dead.sum())
        if count:
            picks = flat.detach()[torch.randint(0, len(flat), (count,), generator=generator)]
            picks = picks + 0.01 * picks.std() * torch.randn(picks.shape, generator=generator)
            self.embedding.weight.data[dead] = picks
            self.embed_sum[dead] = picks
            self.cluster_size[dead] = 1.0
        return count


class VQForward(torch.nn.Module):
    """`forward` below as one module: what accelerate prepares, so DDP sees the encoder and decoder used together."""

    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, pixels: torch.Tensor, ema: "EMAQuantizer | None", train: bool):
        return forward(self.vq, pixels, ema, train)


def forward(vq, pixels: torch.Tensor, ema: EMAQuantizer | None, train: bool):
    """Encode -> (quantize, straight-through) -> decode, for a diffusers.VQModel or a LocalVQModel.
    Returns the reconstruction, the commitment loss, the code indices and the flat latents (B*g*g, D)."""
    latents = vq.encode(pixels).latents                      # (B, D, g, g)
    batch, dim, height, width = latents.shape
    flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)      # (B*g*g, D)
    if ema is None:                                          # warm-up: plain autoencoder
        quantized_flat, indices, commit = flat, None, torch.zeros(())
    else:
        codes, indices = ema.quantize(flat, train)
        commit = F.mse_loss(flat, codes)
        quantized_flat = flat + (codes - flat).detach()      # straight-through estimator
    quantized = quantized_flat.view(batch, height, width, dim).permute(0, 3, 1, 2)
    return vq.decode(quantized, force_not_quantize=True).sample, commit, indices, flat


def pixel_losses(reconstruction: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """L1, MSE and the batch PSNR in dB (pixels spanning [-1, 1], so the peak-to-peak range is 2)."""
    mse = F.mse_loss(reconstruction, pixels)
    psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
    return (reconstruction - pixels).abs().mean(), mse, psnr


def optimise(loss: torch.Tensor, params, optimizer: torch.optim.Optimizer, clip: float = 1.0, accelerator=None) -> None:
    """One step: zero the gradients, backpropagate (through accelerate's when given), clip the global norm, update."""
    optimizer.zero_grad(set_to_none=True)
    if accelerator is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, clip)
    optimizer.step()
