"""TensorAR (next-tensor prediction) on the default backbone: the adapter, the wrapper and the sliding draft.

Paper: "TensorAR" (summary in ../shared/papers/tensorar-summary.txt). Instead of one token per
step the model predicts an overlapping window ("tensor") of k tokens; adjacent windows share
k-1 tokens, so every position is predicted up to k times and refined as the window slides,
while attention stays causal and the KV cache stays usable. k = 1 is plain AR.

Sequence (LVM raster format, not the backbone's SCAN answer form):
    context [x1, y1, ..., xK, yK, xq]    L codes at positions 0..L-1, plain token embeddings
    answer  y_0 .. y_{N-1}              raster order, positions L..L+N-1
The input at answer index a (position L+a) is the window [y_a, ..., y_{a+k-1}] compressed into
one hidden state; its output is the window [y_{a+1}, ..., y_{a+k}] (k logits). The last context
token (position L-1) outputs the first window [y_0 .. y_{k-1}]. Window slots past the answer's
end are padding: masked in the encoder, ignored by the loss, never sampled.

Sliding draft, step s = 0..N-1 (one forward per step, the prefill being step 0):
    the model outputs the window over cells s .. s+k-1 (clipped at N);
    cell s is at the window's front: the code predicted for it now is FINAL (next step's
    window starts at s+1, so this is the prediction made as the cell leaves the front);
    cells s+1 .. are drafts, re-predicted at the next steps (cell p is predicted min(p+1, k) times);
    step s+1 feeds back the window [final y_s, latest drafts of y_{s+1} .. y_{s+k-1}].

The modules (paper Sec. "Residual Lightweight Encoding/Decoding"), all zero-initialised on their
residual branch so an untrained wrapper is exactly the backbone:
    input encoder   a 1-layer query transformer: one learned query attends over the k token
                    embeddings of the window (+ slot embeddings); h = embed(y_a) + out(...)
    output decoder  hidden state h -> k slot states h_j = h + down(gelu(up(norm(h)) + slot_j));
                    logits_j = lm_head(h_j), the backbone's own head
    LoRA            low-rank adapters on the attention projections (q, k, v, o), added by
                    forward hooks that act only inside the wrapper's forward (and only in the
                    calling thread): the shared backbone keeps serving SCAN and VSR unchanged.
The backbone is frozen and not saved with the adapter: `tensor/` in a bundle holds only
TensorAdapter (PyTorchModelHubMixin: config.json + model.safetensors). The paper's equal-steps
control is the same class with k = 1 (LoRA only, no encoder/decoder) trained on the raster answer.

Training noise. The paper's discrete tensor noise: input slot j is replaced by a uniform random
code with probability beta(j) (`noise_schedule`), beta(0) = 0 (the front of an input window is
always a final token), rising to beta(k-1) = 1 (the back was only predicted once). Measured on
the default backbone this teaches copying: slot 1 of input window a is output slot 0's target, and
it is the ground truth 91 % of the time in training but a 4-10 %-accurate draft at inference.
`self_draft_windows` is the alternative the trainer uses by default: the model's own drafts in
slots >= 1 (one extra no-grad pass), so training inputs are wrong as often as inference inputs.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..backbone import SamplingConfig, sample_from_logits

SCHEDULES = ("exponential", "linear", "sine", "sqrt")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


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


def add_tensor_noise(windows: torch.Tensor, valid: torch.Tensor, beta: torch.Tensor, codebook_size: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Discrete tensor noise: q(x*_j | x_j) = Cat((1 - beta(j)) x_j + beta(j) / C) on every valid slot.

    windows (..., k) codes, valid (..., k) bool, beta (k,) -> noisy windows (..., k). Each slot is
    replaced with probability beta(j) by a code drawn uniformly from 0..C-1 (possibly itself).
    """
    noise = torch.rand(windows.shape, generator=generator, device=windows.device) < beta.to(windows.device, torch.float32)
    random_codes = torch.randint(0, codebook_size, windows.shape, generator=generator, device=windows.device)
    return torch.where(noise & valid, random_codes, windows)


@torch.no_grad()
def self_draft_windows(model: "TensorAR", context: torch.Tensor, windows: torch.Tensor, valid: torch.Tensor,
                       sampling: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Self-generated tensor noise: slots j >= 1 of every input window replaced by the model's own drafts.

    At inference, input window a is [final y_a, drafts of y_{a+1} .. y_{a+k-1}], each draft sampled
    at the previous step from output row a, slot j. This reproduces that: one no-grad pass whose
    windows keep only their front token (slots >= 1 masked out of the encoder), then slot j of
    window a := a sample from row a, slot j (the prediction of cell a+j). Unlike uniform noise,
    the drafts are plausible and wrong exactly as often as the model is, so the adapter learns how
    far to trust them instead of learning to copy slot 1 (which is the ground truth 1 - beta(1)
    of the time under the paper's noise). windows (B, W, k), valid (B, W, k) -> (B, W, k).
    """
    k = windows.shape[-1]
    if k == 1 or windows.shape[1] == 0:
        return windows
    front_only = valid & (torch.arange(k, device=windows.device) == 0)
    logits = teacher_forced_logits(model, context, windows, front_only)[:, : windows.shape[1], 1:, : model.codebook_size]
    batch, rows, slots, codes = logits.shape
    drafts = sample_from_logits(logits.reshape(-1, codes), sampling, generator).view(batch, rows, slots)
    noisy = windows.clone()
    noisy[..., 1:] = torch.where(valid[..., 1:], drafts, windows[..., 1:])
    return noisy


def answer_windows(answer: torch.Tensor, k: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """answer (B, N) -> windows (B, N, k) with windows[:, a] = [y_a .. y_{a+k-1}] and valid (B, N, k) (False past the end)."""
    batch, cells = answer.shape
    padded = torch.cat([answer, answer.new_full((batch, k - 1), pad_id)], 1)
    windows = padded.unfold(1, k, 1)                                                     # (B, N, k)
    valid = (torch.arange(cells, device=answer.device)[:, None] + torch.arange(k, device=answer.device)) < cells
    return windows.contiguous(), valid[None].expand(batch, -1, -1)


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


def load_tensor_part(folder, backbone: nn.Module, part: str = "tensor") -> TensorAR:
    """A bundle's `tensor/` (or `tensor-control/`) folder -> TensorAR over `backbone`; strict, safetensors only."""
    from pathlib import Path

    from ..bundle import BundleError, _read_json, load_strict, read_safetensors

    folder = Path(folder)
    config = _read_json(folder / "config.json", part)
    try:
        adapter = TensorAdapter(**config)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{part}: config.json does not match the TensorAdapter arguments ({error})") from error
    load_strict(adapter, read_safetensors(folder, part), part)
    try:
        return attach(backbone, adapter)
    except ValueError as error:
        raise BundleError(f"{part}: {error}") from error


# -- decoding ----------------------------------------------------------------------------------------

@dataclass
class WindowStep:
    """One slide of the draft: the window's cells and what was predicted for them at this step."""

    step: int                       # s: 0 .. N-1
    cells: list[int]                # window cells s .. s+k-1 (clipped at N), front first
    codes: torch.Tensor             # (B, len(cells)) codes predicted now; codes[:, 0] is FINAL for cell s
    probs: torch.Tensor             # (B, len(cells)) the model's probability of each predicted code
    previous: torch.Tensor          # (B, len(cells)) each cell's prediction before this step (-1: first time)
    current: torch.Tensor           # (B, N) latest prediction of every cell (-1: not yet predicted)
    revisions: torch.Tensor         # (N,) how many times each cell has been predicted so far

    @property
    def final_cell(self) -> int:
        return self.cells[0]

    def changed(self, row: int = 0) -> list[int]:
        """Cells whose code this step changed (re-predicted differently), for candidate `row`."""
        differs = (self.previous[row] >= 0) & (self.previous[row] != self.codes[row])
        return [cell for cell, hit in zip(self.cells, differs.tolist()) if hit]


@dataclass
class TensorDraft:
    """What a draft leaves behind: final codes, first (coarse) predictions, refinement counts, the cache."""

    codes: torch.Tensor             # (B, N) final codes
    probs: torch.Tensor             # (B, N) probability of each final code
    first: torch.Tensor             # (B, N) each cell's first prediction (the coarse draft)
    revisions: torch.Tensor         # (N,) times each cell was predicted: min(n+1, k)
    changes: torch.Tensor           # (B, N) times each cell's code changed while in the window
    windows: torch.Tensor           # (B, N-1, k) the input windows fed at steps 1..N-1 (for replay/tests)
    cache: object                   # KV cache over the context and the fed windows
    context_length: int
    step_logits: list = field(default_factory=list)   # per step (B, span, V) logits when keep_logits


def _batched_context(context: torch.Tensor, sampling: SamplingConfig, device) -> torch.Tensor:
    """(L,) -> (candidates, L); (B, L) rows are B different examples (candidates ignored)."""
    context = context.to(device).long()
    if context.dim() == 1:
        return context[None].repeat(max(1, sampling.candidates), 1)
    if context.dim() != 2:
        raise ValueError(f"context must be (L,) or (B, L), got {tuple(context.shape)}")
    return context


def _pick(logits: torch.Tensor, codebook_size: int, sampling: SamplingConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, V) slot logits -> (B, S) sampled codes and their probabilities (codes only, never special ids)."""
    batch, span, _ = logits.shape
    flat = logits[..., :codebook_size].reshape(batch * span, codebook_size)
    codes = sample_from_logits(flat, sampling, generator)
    probs = torch.softmax(flat.float(), -1).gather(1, codes[:, None])[:, 0]
    return codes.view(batch, span), probs.view(batch, span)


@torch.no_grad()
def draft_tensor(model: TensorAR, context: torch.Tensor, cells: int, sampling: SamplingConfig,
                 generator: torch.Generator | None = None, state_out: list | None = None,
                 keep_logits: bool = False) -> Iterator[WindowStep]:
    """TensorAR sliding decoding with a KV cache: N steps, one forward each; yields every window.

    Step 0 is the prefill of the context (its last position outputs the first window); step s >= 1
    feeds the window [final y_{s-1}, drafts of y_s .. y_{s+k-2}] at position L+s-1 and gets the
    window over cells s .. s+k-1. Cell s's code at step s is final. With k = 1 this is exactly
    `draft_raster` (same forwards, same sampler calls, same tokens for the same generator).
    """
    device = model.device
    k, codebook = model.k, model.codebook_size
    context = _batched_context(context, sampling, device)
    batch, length = context.shape
    current = torch.full((batch, cells), -1, dtype=torch.long, device=device)
    final_probs = torch.zeros(batch, cells, device=device)
    first = torch.full_like(current, -1)
    revisions = torch.zeros(cells, dtype=torch.long)
    changes = torch.zeros(batch, cells, dtype=torch.long, device=device)
    fed = torch.zeros(batch, max(0, cells - 1), k, dtype=torch.long, device=device)
    slot = torch.arange(k, device=device)
    step_logits = []

    out = model(input_ids=context, position_ids=torch.arange(length, device=device)[None].repeat(batch, 1),
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    for step in range(cells):
        if step > 0:
            window = current[:, step - 1: step - 1 + k]                                    # (B, <=k)
            window = torch.cat([window, window.new_zeros(batch, k - window.shape[1])], 1)  # pad past the end
            valid = (step - 1 + slot < cells)[None, None].expand(batch, 1, k)
            fed[:, step - 1] = window
            out = model(windows=window[:, None], window_valid=valid,
                        position_ids=torch.full((batch, 1), length + step - 1, device=device),
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        span = min(k, cells - step)
        logits = out.logits[:, -1, :span]                                                   # (B, span, V)
        if keep_logits:
            step_logits.append(logits.float().cpu())
        codes, probs = _pick(logits, codebook, sampling, generator)
        window_cells = list(range(step, step + span))
        previous = current[:, step: step + span].clone()
        changes[:, step: step + span] += ((previous >= 0) & (previous != codes)).long()
        current[:, step: step + span] = codes
        first_time = first[:, step: step + span] < 0
        first[:, step: step + span] = torch.where(first_time, codes, first[:, step: step + span])
        revisions[step: step + span] += 1
        final_probs[:, step] = probs[:, 0]
        yield WindowStep(step, window_cells, codes.clone(), probs.clone(), previous, current.clone(), revisions.clone())
    if state_out is not None:
        state_out.append(TensorDraft(current, final_probs, first, revisions, changes, fed, cache, length, step_logits))


@torch.no_grad()
def draft_raster(model: nn.Module, context: torch.Tensor, cells: int, codebook_size: int, sampling: SamplingConfig,
                 generator: torch.Generator | None = None, state_out: list | None = None,
                 keep_logits: bool = False) -> Iterator[WindowStep]:
    """Plain AR raster decoding with a KV cache (LVM's loop): the reference for k = 1 and the control's draft.

    `model` is a LlamaForCausalLM (logits (B, T, V)) or a TensorAR (logits (B, T, k, V); slot 0 is
    read, tokens go in plainly, which is meaningful for k = 1 only). Yields one-cell WindowSteps.
    """
    device = next(model.parameters()).device
    context = _batched_context(context, sampling, device)
    batch, length = context.shape

    def next_logits(out) -> torch.Tensor:        # (B, 1, V): the last position's next-token logits
        logits = out.logits[:, -1]
        return logits[:, :1] if logits.dim() == 3 else logits[:, None]

    current = torch.full((batch, cells), -1, dtype=torch.long, device=device)
    final_probs = torch.zeros(batch, cells, device=device)
    revisions = torch.zeros(cells, dtype=torch.long)
    step_logits = []
    out = model(input_ids=context, position_ids=torch.arange(length, device=device)[None].repeat(batch, 1),
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    for step in range(cells):
        if step > 0:
            out = model(input_ids=current[:, step - 1: step], position_ids=torch.full((batch, 1), length + step - 1, device=device),
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        logits = next_logits(out)
        if keep_logits:
            step_logits.append(logits.float().cpu())
        codes, probs = _pick(logits, codebook_size, sampling, generator)
        current[:, step] = codes[:, 0]
        final_probs[:, step] = probs[:, 0]
        revisions[step] = 1
        yield WindowStep(step, [step], codes.clone(), probs.clone(), torch.full_like(codes, -1), current.clone(),
                         revisions.clone())
    if state_out is not None:
        fed = current[:, :-1, None].clone()
        state_out.append(TensorDraft(current, final_probs, current.clone(), revisions, torch.zeros_like(current), fed, cache,
                                     length, step_logits))


def teacher_forced_logits(model: TensorAR, context: torch.Tensor, windows: torch.Tensor, valid: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Uncached pass: context (B, L) + windows (B, W, k) fed at positions L..L+W-1 -> (B, W+1, k, V) logits.

    Row 0 is the last context position (the first window's prediction), row w the output of window w-1.
    Training uses it with ground-truth (noised) windows; tests compare it with the cached draft.
    """
    batch, length = context.shape
    total = length + windows.shape[1]
    positions = torch.arange(total, device=context.device)[None].repeat(batch, 1)
    return model(input_ids=context, windows=windows, window_valid=valid, position_ids=positions,
                 logits_to_keep=windows.shape[1] + 1).logits


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
