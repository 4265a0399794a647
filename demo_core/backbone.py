"""The AR backbone: a plain `transformers.LlamaForCausalLM`, its KV-cached draft loop and sampler.

The model only computes `forward`; sampling and the draft loop are plain functions here
(LlamaGen's split). The default backbone speaks the SCAN vocabulary of `sequence.py`; a Hub
backbone (LVM) is the same class with a plain raster vocabulary (see `lvm.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from .fast_llama import KVBuffer, fast_runner
from .sequence import Vocab, answer_positions


@dataclass
class BackboneConfig:
    """Size of the default in-context model (sized for two CPU cores; DESIGN.md has the timings)."""

    hidden_size: int = 256          # width
    num_layers: int = 4
    num_heads: int = 8              # head dim 32
    intermediate_size: int = 768    # SwiGLU MLP width (3x)
    max_positions: int = 512        # (2K+2)*64 positions: K <= 3 demonstration pairs
    rope_theta: float = 10000.0


def build_backbone(config: BackboneConfig, vocab: Vocab):
    """A fresh LlamaForCausalLM over the SCAN vocabulary; no BOS/EOS/pad ids (generation never stops early)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        rope_theta=config.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(llama_config)


def backbone_config_dict(config: BackboneConfig) -> dict:
    return asdict(config)


@dataclass
class SamplingConfig:
    """How draft tokens are drawn. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0          # 0: off
    top_p: float = 0.9      # the embedded default's nucleus (LVM's reference scripts use 1.0: lvm.LVM_SAMPLING)
    candidates: int = 1     # drafts drawn in one batch; the best mean quality wins


def sample_from_logits(logits_BV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None,
                       with_probability: bool = False):
    """(B, V) logits over codes only -> (B,) sampled indices. Float32 maths.

    `with_probability`: also return each drawn code's probability under the model's full distribution
    (`code_probability`), reusing the sampler's softmax when it is that distribution (temperature 1, no top-k).

    Draws by inverse CDF (one uniform per row, a binary search in the cumulative probabilities):
    `torch.multinomial` costs ~35 us a row on a CPU, most of a decoding step's sampling time.
    """
    raw_BV = logits_BV = logits_BV.float()
    if sampling.temperature <= 0:
        picked = logits_BV.argmax(-1)
        return (picked, code_probability(raw_BV, picked)) if with_probability else picked
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k and sampling.top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, sampling.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    full_BV = probs_BV = torch.softmax(logits_BV, dim=-1)
    index_BV = None
    if 0 < sampling.top_p < 1:
        # the nucleus usually lies in the top 64 (a cheap partial sort); the full sort only when it does not
        head = min(64, probs_BV.shape[-1])
        top, top_index = probs_BV.topk(head, dim=-1)
        if head < probs_BV.shape[-1] and not bool((top.sum(-1) > sampling.top_p).all()):
            top, top_index = probs_BV.sort(dim=-1, descending=True)
        probs_BV, index_BV = top, top_index
    cumulative = probs_BV.cumsum(-1)
    if index_BV is not None:
        # the nucleus: the smallest prefix (by probability) whose mass reaches top_p
        last = ((cumulative - probs_BV) <= sampling.top_p).sum(-1, keepdim=True) - 1
        mass = cumulative.gather(-1, last)
    else:
        last, mass = logits_BV.shape[-1] - 1, cumulative[:, -1:]
    u = torch.rand(mass.shape, generator=generator, device=mass.device) * mass
    picked = torch.searchsorted(cumulative, u, right=True).clamp(max=last)     # first cell whose cumulative passes u
    codes = (picked if index_BV is None else index_BV.gather(-1, picked)).squeeze(-1)
    if not with_probability:
        return codes
    if sampling.temperature == 1 and not (sampling.top_k and sampling.top_k < raw_BV.shape[-1]):
        return codes, full_BV.gather(-1, codes[:, None])[:, 0]
    return codes, code_probability(raw_BV, codes)


QUALITY_SCORES = ("combined", "head")


def code_probability(gen_logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(..., C) logits at <at_n>, (...) codes -> (...) p(code) under the model's full distribution (temperature 1,
    float32): the model's own confidence in the token it wrote, whatever sampler drew it."""
    return torch.softmax(gen_logits.float(), -1).gather(-1, codes[..., None].to(gen_logits.device))[..., 0]


def check_quality_score(mode: str) -> None:
    if mode not in QUALITY_SCORES:
        raise ValueError(f"quality score must be one of {QUALITY_SCORES}, not {mode!r}")


def token_score(quality, probability, mode: str = "combined"):
    """A token's quality score s_n, the number SCAN ranks and compares.

    "head": p(<good>), the quality token's probability (SCAN paper, Eq. 4).
    "combined": p(<good>) x p(code | what the model saw when it wrote it). The head judges a token after
    seeing it; the code probability is the model's belief before. Together they rank wrong draft tokens
    better than either alone (docs/results: AUROC per task for both), so SCAN picks and accepts by it.
    Float32 tensors or Python floats (SCAN's bookkeeping).
    """
    check_quality_score(mode)
    return quality if mode == "head" else quality * probability


def quality_from_logits(logits: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """(..., V) logits at code tokens -> (...) p(<good>) from the two quality logits (SCAN's score s_n)."""
    pair = torch.stack([logits[..., vocab.good], logits[..., vocab.bad]], dim=-1).float()
    return torch.softmax(pair, dim=-1)[..., 0]


@dataclass
class DraftStep:
    """One written token: its cell, the code per candidate, its quality score per candidate."""

    index: int                  # 0-based count of tokens written
    cell: int
    codes: torch.Tensor         # (B,)
    scores: torch.Tensor        # (B,)


@dataclass
class DraftState:
    """What the draft leaves behind for the refiners: the KV cache and the answer so far."""

    cache: object               # KV cache over [context, answer pairs]: a fast_llama.FastCache, or transformers' on other models
    context_length: int
    codes: torch.Tensor         # (B, N) long
    scores: torch.Tensor        # (B, N) float
    order: torch.Tensor         # (N,) generation order of the cells


class GrowingLayer:
    """A transformers KV-cache layer over `fast_llama.KVBuffer` (preallocated, grown by doubling), handing out views.

    transformers' DynamicLayer `torch.cat`s the whole cache on every step: O(length) copies per
    token, a quarter of the draft's time for the default model. Here a step writes only its new
    entries. SCAN's edits (`keep`, `select_batch`) compact the buffer in place.
    """

    is_sliding = False
    is_compileable = False

    _combined = None

    def __new__(cls, *args, **kwargs):
        from transformers.cache_utils import DynamicLayer

        # subclass DynamicLayer lazily (transformers is imported only when a model is used), once
        if not issubclass(cls, DynamicLayer):
            if GrowingLayer._combined is None:
                GrowingLayer._combined = type("GrowingDynamicLayer", (cls, DynamicLayer), {})
            cls = GrowingLayer._combined
        return object.__new__(cls)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("GrowingLayer supports update/keep/select_batch only (use DynamicCache for generate/beam search)")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.buffer = KVBuffer()                 # the fast path's buffer; this class only adapts it to transformers
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    def _views(self):
        length = self.buffer.length
        self.keys = self.buffer.key_buffer[..., :length, :]
        self.values = self.buffer.value_buffer[..., :length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self.buffer.update(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.buffer.length if self.is_initialized else 0

    def keep(self, index: torch.Tensor, start: int | None = None) -> None:
        """Keep only sequence positions `index` (sorted), compacted to the front (`KVBuffer.keep`)."""
        self.buffer.keep(index, start)
        self._views()

    def select_batch(self, row: int) -> None:
        self.buffer.select_batch(row)
        self._views()


def new_cache():
    """An empty KV cache of `GrowingLayer`s (a transformers `DynamicCache`, so every model accepts it)."""
    from transformers.cache_utils import Cache, DynamicCache

    class GrowingCache(DynamicCache):
        def __init__(self):
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    return GrowingCache()


def _forward(model, input_ids, position_ids, cache, attention_mask=None, logits_to_keep: int = 0):
    """One cached forward through the model's fast runner (`fast_llama.py`), or HF's forward when unsupported."""
    runner = fast_runner(model)
    if cache is None and runner is model:
        cache = new_cache()
    out = runner(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
                 attention_mask=attention_mask, logits_to_keep=logits_to_keep)
    return out.logits, out.past_key_values


@torch.no_grad()
def draft_scan(model, vocab: Vocab, context: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None, order: torch.Tensor | None = None,
               state_out: list | None = None, score: str = "combined") -> Iterator[DraftStep]:
    """Write the answer in SCAN form with a KV cache, one forward per token.

    `context` is one context (L,) drafted `sampling.candidates` times, or a batch of contexts (B, L).

    The context is prefilled once (with the first <at_n>); then each forward takes
    [y_prev, <at_next>]: the logits at y_prev score it (quality), those at <at_next> give the
    next code. Yields a DraftStep per token once its score is known (`token_score(.., score)`); the final
    state (cache, codes, scores) is appended to `state_out` when given.
    """
    device = next(model.parameters()).device
    cells = vocab.cells
    context = context.to(device)
    if context.dim() == 1:        # one context, `sampling.candidates` drafts of it
        context = context[None].repeat(max(1, sampling.candidates), 1)
    batch, context_length = context.shape     # (B, L): one draft per row (all rows the same length)
    order = torch.arange(cells) if order is None else order.cpu()
    codes = torch.zeros(batch, cells, dtype=torch.long, device=device)
    scores = torch.zeros(batch, cells, dtype=torch.float32, device=device)

    first = int(order[0])
    input_ids = torch.cat([context, torch.full((batch, 1), vocab.at(first), device=device)], 1)
    positions = torch.cat([torch.arange(context_length), torch.tensor([context_length + first])]).to(device)[None].repeat(batch, 1)
    logits, cache = _forward(model, input_ids, positions, None, logits_to_keep=1)
    gen_logits = logits[:, -1, : vocab.codebook_size]
    for index in range(cells):
        cell = int(order[index])
        new_codes, probability = sample_from_logits(gen_logits, sampling, generator, with_probability=True)
        codes[:, cell] = new_codes
        if index + 1 < cells:
            nxt = int(order[index + 1])
            step_ids = torch.stack([new_codes, torch.full_like(new_codes, vocab.at(nxt))], dim=1)
            step_pos = torch.tensor([context_length + cell, context_length + nxt], device=device)[None].repeat(batch, 1)
        else:
            step_ids = new_codes[:, None]
            step_pos = torch.tensor([[context_length + cell]], device=device).repeat(batch, 1)
        logits, cache = _forward(model, step_ids, step_pos, cache)
        scores[:, cell] = token_score(quality_from_logits(logits[:, 0], vocab), probability, score)
        gen_logits = logits[:, -1, : vocab.codebook_size]
        yield DraftStep(index, cell, new_codes.clone(), scores[:, cell].clone())
    if state_out is not None:
        state_out.append(DraftState(cache, context_length, codes, scores, order))


@torch.no_grad()
def score_answer(model, vocab: Vocab, context: torch.Tensor, codes: torch.Tensor, order: torch.Tensor | None = None,
                 score: str = "combined"):
    """Teacher-forced pass over a full answer: returns (gen_logits (B, N, C) per cell, scores (B, N), cache); the
    scores are `token_score(.., score)`, as the draft loop would have given these codes.

    Used to (re)score an answer that did not come from the draft loop (e.g. after VSR) and by tests
    as the uncached reference.
    """
    device = next(model.parameters()).device
    codes = codes.to(device)
    batch, cells = codes.shape
    order = torch.arange(cells, device=device) if order is None else order.to(device)
    context_length = int(context.numel())
    from .sequence import interleave_answer

    answer = interleave_answer(vocab, order[None].repeat(batch, 1), codes[:, order])
    input_ids = torch.cat([context.to(device)[None].repeat(batch, 1), answer], dim=1)
    positions = torch.cat([torch.arange(context_length, device=device)[None].repeat(batch, 1),
                           answer_positions(context_length, order[None].repeat(batch, 1))], dim=1)
    logits, cache = _forward(model, input_ids, positions, None)
    at_logits = logits[:, context_length::2, : vocab.codebook_size]     # (B, N, C) in `order`
    quality = token_score(quality_from_logits(logits[:, context_length + 1::2], vocab),
                          code_probability(at_logits, codes[:, order]), score)
    gen = torch.empty_like(at_logits)
    gen[:, order] = at_logits
    scores = torch.empty_like(quality)
    scores[:, order] = quality
    return gen, scores, cache
