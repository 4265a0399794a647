"""The AR backbone: a plain `transformers.LlamaForCausalLM`, its sampler and its token quality score.

The model only computes `forward` (through `fast_llama.fast_runner`); sampling is a plain function
here and the decode loops live in `drafts/`, one per sequence format (LlamaGen's split). The default
backbone speaks the SCAN vocabulary of `sequence.py`; a Hub backbone (LVM) is the same class with a
plain raster vocabulary (`drafts/raster.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .sequence import Vocab


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


def init_code_embeddings(model, codebook: torch.Tensor, seed: int = 0) -> None:
    """Start the C code rows of the input embedding and of the output head from the tokenizer's own code geometry.

    Each code's row is its VQ code vector, whitened per dimension and projected to the hidden size by a fixed random
    map, at the rows' usual norm. Similar codes then start with similar rows, so copying a code (inpainting's
    untouched cells, a sequence's static background) is within reach of one attention head from the first step,
    and a near miss lands on a similar code. Measured on a copy probe (a 2-layer Llama, 256 codes, 16x16 grids,
    one demonstration pair): with random rows the loss had not left ln(256) after 600 steps; with these rows
    the copy was exact by step 150 (docs/training.md, "Code-geometry initialisation").
    """
    with torch.no_grad():
        book = codebook.detach().float().cpu()
        book = (book - book.mean(0)) / book.std(0).clamp_min(1e-6)
        generator = torch.Generator().manual_seed(seed)
        hidden = model.get_input_embeddings().weight.shape[1]
        rows = book @ (torch.randn(book.shape[1], hidden, generator=generator) / book.shape[1] ** 0.5)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6)
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            count = book.shape[0]
            scale = weight[:count].norm(dim=1).mean()
            weight[:count] = (rows * scale).to(weight.dtype).to(weight.device)


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
        # the nucleus usually lies in the top 64 (a cheap partial sort), else in the top 512 (a flat distribution
        # over 4,096 codes: still ~3x cheaper than sorting them all); the full sort only when neither holds it
        for head in (64, 512, None):
            if head is None or head >= probs_BV.shape[-1]:
                top, top_index = probs_BV.sort(dim=-1, descending=True)
                break
            top, top_index = probs_BV.topk(head, dim=-1)
            if bool((top.sum(-1) > sampling.top_p).all()):
                break
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
