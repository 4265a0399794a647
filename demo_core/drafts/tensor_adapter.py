"""TensorAR's modules: the adapter (input encoder, output decoder, LoRA) and the wrapper over the frozen backbone.

Paper: "From Prediction to Perfection: Introducing Refinement to Autoregressive Image Generation" (TensorAR,
ICLR 2026, arXiv:2505.16324; summary in ../shared/papers/tensorar-summary.txt). Sec. "Residual
Lightweight Encoding/Decoding". The decode loop and the training noise are in `tensor.py`, whose docstring
describes the sequence and the windows.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SCHEDULES = ("exponential", "linear", "sine", "sqrt")


def noise_schedule(k: int, kind: str = "exponential", rate: float = 3.0) -> torch.Tensor:
    """beta(j) for window slots j = 0..k-1, float64: 0 at j = 0, strictly rising, 1 at j = k-1.

    With u = j / (k-1): linear u, sine sin(pi u / 2), sqrt u^0.5, exponential
    (e^(rate u) - 1) / (e^rate - 1) (convex: the first overlapped slots stay nearly clean).
    k = 1 has no overlapped slot: beta = [0].
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    if k < 1:
        raise ValueError(f"window size k must be at least 1, got {k}")
    if k == 1:
        return torch.zeros(1, dtype=torch.float64)
    u = torch.arange(k, dtype=torch.float64) / (k - 1)
    if kind == "linear":
        beta = u
    elif kind == "sine":
        beta = torch.sin(u * math.pi / 2)
    elif kind == "sqrt":
        beta = u.sqrt()
    else:
        if rate <= 0:
            raise ValueError(f"the exponential schedule needs rate > 0, got {rate}")
        beta = torch.expm1(rate * u) / math.expm1(rate)
    beta = beta.clamp(0.0, 1.0)
    beta[0], beta[-1] = 0.0, 1.0
    return beta


# -- the adapter -------------------------------------------------------------------------------------

class LoRA(nn.Module):
    """delta(x) = up(down(x)) * alpha / rank; `up` starts at zero, so delta starts at exactly 0."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scale


class InputEncoder(nn.Module):
    """Window embeddings (B, T, k, D) -> residual (B, T, D): one learned query attends over the k slots (1 layer)."""

    def __init__(self, dim: int, k: int, heads: int, ffn_multiple: int):
        super().__init__()
        self.heads = heads
        self.slot = nn.Parameter(torch.randn(k, dim) * 0.02)            # which place in the window
        self.query = nn.Parameter(torch.randn(dim) * 0.02)              # the learned query, in attention space
        self.norm_kv = nn.LayerNorm(dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_multiple * dim), nn.GELU(), nn.Linear(ffn_multiple * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)                                  # zero: the encoder starts as "no change"
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embeddings: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, k, dim = embeddings.shape
        hd = dim // self.heads
        x = self.norm_kv(embeddings) + self.slot                                            # (B, T, k, D)
        key, value = self.key_value(x).view(batch * tokens, k, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # (BT, H, k, hd)
        query = self.query.view(1, self.heads, 1, hd).expand(batch * tokens, -1, -1, -1)  # (BT, H, 1, hd)
        mask = None if valid is None else valid.reshape(batch * tokens, 1, 1, k)          # slot 0 is always valid
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)        # (BT, H, 1, hd)
        h = self.attn_out(attended.reshape(batch, tokens, dim))                             # (B, T, D)
        h = h + self.ffn(self.norm_ffn(h))
        return self.out(self.norm_out(h))


class OutputDecoder(nn.Module):
    """Hidden states (B, T, D) -> k slot states (B, T, k, D): h_j = h + down(gelu(up(norm(h)) + slot_j))."""

    def __init__(self, dim: int, k: int, multiple: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, multiple * dim)
        self.slot = nn.Parameter(torch.randn(k, multiple * dim) * 0.02)
        self.down = nn.Linear(multiple * dim, dim)                      # zero: every slot starts as the plain state
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = F.gelu(self.up(self.norm(hidden))[..., None, :] + self.slot)                # (B, T, k, M)
        return hidden[..., None, :] + self.down(inner)


class TensorAdapter(nn.Module, PyTorchModelHubMixin, library_name="retouch",
                    tags=["retouch", "tensorar", "next-tensor-prediction", "image-to-image"]):
    """What TensorAR adds to a frozen LlamaForCausalLM: input encoder, output decoder, LoRA (saved alone).

    Every constructor argument is JSON and is what `save_pretrained` writes to config.json, so
    `TensorAdapter(**config)` rebuilds it. k = 1 has no encoder/decoder (LoRA only: the control).
    """

    def __init__(self, dim: int, layers: int, kv_dim: int, codebook_size: int, k: int = 4, heads: int = 8,
                 ffn_multiple: int = 2, decoder_multiple: int = 2, lora_rank: int = 16, lora_alpha: float = 32.0,
                 lora_targets: tuple[str, ...] | list[str] = LORA_TARGETS, schedule: str = "exponential",
                 schedule_rate: float = 3.0):
        super().__init__()
        if k < 1:
            raise ValueError(f"window size k must be at least 1, got {k}")
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} encoder heads")
        unknown = [t for t in lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")
        noise_schedule(k, schedule, schedule_rate)                  # validates the schedule name and rate
        self.dim, self.layers, self.kv_dim, self.codebook_size, self.k = dim, layers, kv_dim, codebook_size, k
        self.schedule, self.schedule_rate = schedule, schedule_rate
        self.lora_targets = tuple(lora_targets)
        self.encoder = InputEncoder(dim, k, heads, ffn_multiple) if k > 1 else None
        self.decoder = OutputDecoder(dim, k, decoder_multiple) if k > 1 else None
        shapes = {"q_proj": (dim, dim), "k_proj": (dim, kv_dim), "v_proj": (dim, kv_dim), "o_proj": (dim, dim)}
        self.lora = nn.ModuleList(
            nn.ModuleDict({t: LoRA(*shapes[t], lora_rank, lora_alpha) for t in self.lora_targets}) if lora_rank > 0
            else nn.ModuleDict() for _ in range(layers))

    @classmethod
    def for_backbone(cls, backbone: nn.Module, codebook_size: int, **kwargs) -> "TensorAdapter":
        """An adapter shaped for `backbone` (any LlamaForCausalLM)."""
        config = backbone.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(dim=int(config.hidden_size), layers=int(config.num_hidden_layers),
                   kv_dim=int(config.num_key_value_heads * head_dim), codebook_size=int(codebook_size), **kwargs)

    def beta(self) -> torch.Tensor:
        return noise_schedule(self.k, self.schedule, self.schedule_rate)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        # the mixin's default is strict=False; an adapter whose weights do not match its config must not load
        return super()._from_pretrained(strict=strict, **kwargs)


# -- the wrapper -------------------------------------------------------------------------------------

@dataclass
class TensorOutput:
    logits: torch.Tensor            # (B, T, k, V): slot j of position t predicts the token j+1 places ahead
    past_key_values: object = None
    hidden_states: torch.Tensor | None = None


class TensorAR(nn.Module):
    """A frozen LlamaForCausalLM + TensorAdapter: inputs are plain tokens (the context) and/or windows of k codes.

    forward(input_ids=(B, P), windows=(B, W, k), ...) embeds the P tokens as the backbone does and
    each window through the input encoder, runs the backbone (with LoRA) over the P + W states and
    decodes k logits per kept position. The backbone is shared, not copied.
    """

    def __init__(self, backbone: nn.Module, adapter: TensorAdapter):
        super().__init__()
        if adapter.layers != backbone.config.num_hidden_layers or adapter.dim != backbone.config.hidden_size:
            raise ValueError(f"the adapter was built for {adapter.layers} layers of width {adapter.dim}, the backbone has "
                             f"{backbone.config.num_hidden_layers} of width {backbone.config.hidden_size}")
        self.backbone = backbone
        self.adapter = adapter
        self._local = threading.local()           # LoRA acts only inside this wrapper's forward, in its thread
        self._hooks = []
        for layer, adapters in zip(backbone.model.layers, adapter.lora):
            for target, lora in adapters.items():
                self._hooks.append(getattr(layer.self_attn, target).register_forward_hook(partial(self._lora_hook, lora)))

    @property
    def k(self) -> int:
        return self.adapter.k

    @property
    def codebook_size(self) -> int:
        return self.adapter.codebook_size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _lora_hook(self, lora: LoRA, module, args, output):
        if not getattr(self._local, "active", False):
            return None
        x = args[0]
        return output + lora(x.to(lora.up.dtype)).to(output.dtype)

    def remove_hooks(self) -> None:
        """Detach LoRA from the backbone for good (the wrapper is unusable afterwards)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def embed_windows(self, windows: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, W, k) codes -> (B, W, D): embed(front token) + encoder(all k embeddings) (residual)."""
        if windows.shape[-1] != self.k:
            raise ValueError(f"windows must hold k = {self.k} codes, got {windows.shape[-1]}")
        embeddings = self.backbone.get_input_embeddings()(windows)                       # (B, W, k, D)
        base = embeddings[..., 0, :]
        if self.adapter.encoder is None:
            return base
        encoder = self.adapter.encoder
        dtype = encoder.out.weight.dtype
        return base + encoder(embeddings.to(dtype), valid).to(base.dtype)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) final hidden states -> (B, T, k, V) logits through the backbone's own head."""
        if self.adapter.decoder is None:
            return self.backbone.lm_head(hidden)[..., None, :]
        decoder = self.adapter.decoder
        slots = decoder(hidden.to(decoder.down.weight.dtype)).to(hidden.dtype)             # (B, T, k, D)
        return self.backbone.lm_head(slots)

    def forward(self, input_ids: torch.Tensor | None = None, windows: torch.Tensor | None = None,
                window_valid: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, logits_to_keep: int = 0) -> TensorOutput:
        parts = []
        if input_ids is not None:
            parts.append(self.backbone.get_input_embeddings()(input_ids))                  # (B, P, D)
        if windows is not None:
            parts.append(self.embed_windows(windows, window_valid))                         # (B, W, D)
        if not parts:
            raise ValueError("give input_ids, windows or both")
        inputs_embeds = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        self._local.active = True
        try:
            out = self.backbone.model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                      past_key_values=past_key_values, use_cache=use_cache)
        finally:
            self._local.active = False
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return TensorOutput(self.decode(hidden), out.past_key_values, hidden)


def attach(backbone: nn.Module, adapter: TensorAdapter) -> TensorAR:
    """The wrapper for `backbone`, with the adapter moved to the backbone's device (kept in float32)."""
    adapter.to(next(backbone.parameters()).device)
    return TensorAR(backbone, adapter.eval())
