"""Visual self-refinement (VSR): the g_phi refiner and nearest-code decoding.

Paper: "Visual Self-Refinement for Autoregressive Models" (Wang et al.; arXiv id not in the copy at
../shared/papers/visual-self-refinement.txt), Sec. 3.3, Algorithm 1, appendix.
After the AR draft y_q, the backbone's frozen input embeddings e = f_embed(y_q) of all N answer
tokens are refined jointly by one light block, e' = e + g_phi(e) (Eq. 3), trained to minimise
the mean cosine distance to the ground-truth embeddings (Eq. 4); each refined embedding is then
decoded to the code whose embedding is most cosine-similar ("Generation", appendix "More Details
on Decoding"). The backbone is never updated; only g_phi is trained (`demo_core.train.refiner`).

g_phi (appendix, "More Technical Details"): MultiHead-Attention + Add & LayerNorm, then FFN +
Add & LayerNorm; 8 heads, 1 block; learned 2D position embeddings. Ablations (`kind`): a
token-wise MLP and a 1D convolution in place of attention (Table 7), and, beyond the paper,
`with_query`: the block also sees the query image's token embeddings.

Beyond the paper (issue 20), `space` says which vectors g_phi refines:
    "backbone"  the paper's: the backbone's frozen input embeddings, nearest code by cosine over them
    "codes"     the tokenizer's own VQ code vectors (`dim` = the code width, the block `width` wider, projected
                in and out), nearest code by L2 over the VQ codebook, the quantizer's own rule; the refined
                latents can also go straight into the VQ decoder, unsnapped (`refine_latents`)
and `gate` (a decode option, `self_refine(gate=)`) changes a cell only where the refined vector prefers its new
code over the draft's by more than the margin. A g_phi built with `learned_gate` also has a per-cell head, trained
on its own proposals (`demo_core.train.refiner`): the probability that taking the snapped code brings the cell
closer to the right answer's VQ code vector than the draft's; at decode a cell changes only where that probability
exceeds `gate_threshold` (chosen on validation drafts and stored in the config); with `gate_scope="answer"` the
head is trained on whole answers (does taking every proposal bring the decoded answer nearer the right one?) and
the decision is one per answer, on its cells' mean probability.

`score_gate` is the backbone's own say (SCAN's acceptance rule, Eq. 5, applied to VSR's proposals): with the
answer re-scored teacher-forced after g_phi, a cell keeps its new code only where the backbone's quality score
of it beats the draft's ("cells"), or the whole refined answer is kept only if its mean score beats the draft's
("answer"). The engine scores; this module only applies the rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..sequence import Vocab
from ..token_metrics import cosine_distance  # noqa: F401  (VSR's loss, Eq. 4; the trainer imports it from here)

KINDS = ("attention", "mlp", "conv")
GATE_SCOPES = ("cells", "answer")
SPACES = ("backbone", "codes")


class SelfRefiner(nn.Module, PyTorchModelHubMixin, library_name="retouch",
                  tags=["retouch", "visual-self-refinement", "image-to-image"]):
    """g_phi: (B, N, D) drafted-answer embeddings -> (B, N, D) refined embeddings (Eq. 3).

    Every constructor argument is JSON and is exactly what `save_pretrained` writes to
    config.json, so `SelfRefiner(**config)` rebuilds it (bundle.py loads it that way).
    """

    def __init__(self, dim: int, grid: int, heads: int = 8, ffn_multiple: int = 4, kind: str = "attention",
                 with_query: bool = False, space: str = "backbone", width: int | None = None,
                 learned_gate: bool = False, gate_threshold: float = 0.5, gate_scope: str = "cells"):
        super().__init__()
        if gate_scope not in GATE_SCOPES:
            raise ValueError(f"unknown gate scope {gate_scope!r}; choose from {', '.join(GATE_SCOPES)}")
        if kind not in KINDS:
            raise ValueError(f"unknown g_phi kind {kind!r}; choose from {', '.join(KINDS)}")
        if space not in SPACES:
            raise ValueError(f"unknown g_phi space {space!r}; choose from {', '.join(SPACES)}")
        width = int(width or dim)
        if kind == "attention" and width % heads:
            raise ValueError(f"block width {width} is not divisible by {heads} heads; pick heads dividing {width}")
        self.dim, self.grid, self.heads, self.kind, self.with_query = dim, grid, heads, kind, with_query
        self.space, self.width = space, width
        self.learned_gate, self.gate_threshold = bool(learned_gate), float(gate_threshold)
        self.gate_scope = gate_scope        # "cells": each cell by its own probability; "answer": all by their mean
        # refining narrow vectors (VQ codes, 8 wide) in a wider block: projected in here, out by `out` below
        self.in_proj = nn.Linear(dim, width) if width != dim else None
        dim = width
        # Backbones' embedding scales differ (a fresh Llama's 0.02 std, LVM's trained table): normalising the
        # input makes positions and attention logits scale-free. Our addition; the paper does not say.
        self.input_norm = nn.LayerNorm(self.dim)
        self.row_embedding = nn.Parameter(torch.randn(grid, dim) * 0.02)      # learned 2D positions: row + column
        self.col_embedding = nn.Parameter(torch.randn(grid, dim) * 0.02)
        if with_query and kind == "attention":
            self.type_embedding = nn.Parameter(torch.randn(2, dim) * 0.02)    # 0: query token, 1: answer token
        elif with_query:
            # token-wise / local mixers never reach a query token N positions away: feed it cell-aligned instead
            self.query_proj = nn.Linear(dim, dim)
        # The token mixer. All kinds keep the residual structure and ~4 D^2 parameters (Table 7's fairness rule).
        if kind == "attention":
            self.qkv = nn.Linear(dim, 3 * dim)
            self.mix_out = nn.Linear(dim, dim)
        elif kind == "mlp":
            self.mix_in = nn.Linear(dim, 2 * dim)
            self.mix_out = nn.Linear(2 * dim, dim)
        else:
            self.mix_in = nn.Conv1d(dim, dim, kernel_size=3, padding=1)     # 1D conv along the raster sequence
            self.mix_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_multiple * dim), nn.GELU(), nn.Linear(ffn_multiple * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        # Maps the block's unit-scale output back to the embedding scale. Zero-initialised, so an
        # untrained g_phi is the identity (e' = e): the refined image starts as the draft.
        self.out = nn.Linear(dim, self.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if self.learned_gate:
            # reads the block's output (detached in training, so the gate never bends the refinement itself)
            self.gate_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    @classmethod
    def for_backbone(cls, backbone: nn.Module, grid: int, **kwargs) -> "SelfRefiner":
        """A g_phi as wide as `backbone`'s input embeddings (any LlamaForCausalLM: the tiny default, LVM-7B)."""
        return cls(dim=int(backbone.get_input_embeddings().weight.shape[1]), grid=int(grid), **kwargs)

    def positions(self) -> torch.Tensor:
        """(N, D) learned 2D position embedding of each raster cell: row + column."""
        return (self.row_embedding[:, None, :] + self.col_embedding[None, :, :]).reshape(self.grid * self.grid, self.width)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The token mixer over (B, T, D)."""
        if self.kind == "attention":
            batch, tokens, _ = x.shape
            qkv = self.qkv(x).view(batch, tokens, 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])    # (B, H, T, hd), bidirectional
            return self.mix_out(attended.transpose(1, 2).reshape(batch, tokens, self.width))
        if self.kind == "mlp":
            return self.mix_out(F.gelu(self.mix_in(x)))
        return self.mix_out(F.gelu(self.mix_in(x.transpose(1, 2)).transpose(1, 2)))

    def forward(self, embeddings: torch.Tensor, query_embeddings: torch.Tensor | None = None, with_gate: bool = False):
        """embeddings (B, N, D) of the drafted answer [, query_embeddings (B, N, D)] -> e' (B, N, D); `with_gate`:
        (e', the learned gate's logits (B, N), or None for a g_phi without one)."""
        cells = embeddings.shape[1]
        if cells != self.grid * self.grid:
            raise ValueError(f"g_phi was built for a {self.grid}x{self.grid} grid ({self.grid ** 2} tokens), got {cells} tokens")
        if self.with_query and query_embeddings is None:
            raise ValueError("this g_phi also reads the query image: pass its token embeddings (query_embeddings)")
        positions = self.positions()
        widen = self.in_proj if self.in_proj is not None else (lambda v: v)
        x = widen(self.input_norm(embeddings)) + positions                               # (B, N, width)
        if self.with_query:
            query = widen(self.input_norm(query_embeddings)) + positions                  # (B, N, width)
            if self.kind == "attention":
                x = torch.cat([query + self.type_embedding[0], x + self.type_embedding[1]], dim=1)   # (B, 2N, D)
            else:
                x = x + self.query_proj(query)
        h = self.norm1(x + self.mix(x))          # MultiHead-Attention + Add & LayerNorm
        h = self.norm2(h + self.ffn(h))[:, -cells:]   # FFN + Add & LayerNorm
        logits = self.gate_head(h.detach()).squeeze(-1) if self.learned_gate else None
        refined = embeddings + self.out(h)                                                # Eq. 3: e' = e + g_phi(e)
        return (refined, logits) if with_gate else refined

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        # the mixin's default is strict=False; a g_phi whose weights do not match its config must not load
        return super()._from_pretrained(strict=strict, **kwargs)


def code_embeddings(backbone: nn.Module, vocab: Vocab) -> torch.Tensor:
    """(C, D) the frozen f_embed rows of the VQ codes 0..C-1 (the paper's "codebook"; special tokens excluded)."""
    return backbone.get_input_embeddings().weight[: vocab.codebook_size]


@torch.no_grad()
def nearest_codes(embeddings: torch.Tensor, code_embeddings: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(..., D) embeddings -> (...) long index of the most cosine-similar row of `code_embeddings` (C, D).

    Sec. 3.3 "Generation": the refined token is the one whose embedding is nearest by cosine
    similarity. Float32 with autocast off; rows are processed in chunks to bound the (rows, C) matrix.
    """
    device = code_embeddings.device
    with torch.autocast(device_type=device.type, enabled=False):
        codebook = F.normalize(code_embeddings.float(), dim=-1)                              # (C, D)
        flat = F.normalize(embeddings.reshape(-1, embeddings.shape[-1]).to(device).float(), dim=-1)   # (R, D)
        indices = torch.cat([(rows @ codebook.T).argmax(-1) for rows in flat.split(chunk)]) if len(flat) else \
            torch.zeros(0, dtype=torch.long, device=device)
    return indices.view(embeddings.shape[:-1])


def refine_table(refiner: SelfRefiner, backbone: nn.Module, vocab: Vocab, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """(C, dim) the vectors g_phi refines: the backbone's code embeddings ("backbone") or the VQ codebook ("codes")."""
    if refiner.space == "codes":
        if codebook is None:
            raise ValueError("this g_phi refines the tokenizer's VQ code vectors: pass codebook (tokenizer.codebook)")
        if codebook.shape[-1] != refiner.dim:
            raise ValueError(f"this g_phi refines {refiner.dim}-wide code vectors, the codebook's are {codebook.shape[-1]} wide")
        return codebook
    return code_embeddings(backbone, vocab)


@torch.no_grad()
def nearest_codes_l2(vectors: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(..., D) -> (...) index of the nearest codebook row (C, D) by L2: the VQ quantizer's own rule."""
    device = codebook.device
    with torch.autocast(device_type=device.type, enabled=False):
        book = codebook.float()
        flat = vectors.reshape(-1, vectors.shape[-1]).to(device).float()
        norms = book.pow(2).sum(1)
        indices = torch.cat([(norms[None] - 2 * rows @ book.T).argmin(-1) for rows in flat.split(chunk)]) if len(flat) \
            else torch.zeros(0, dtype=torch.long, device=device)
    return indices.view(vectors.shape[:-1])


def snap_codes(refiner: SelfRefiner, vectors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """g_phi's own nearest-code rule over `table` (its `refine_table`): L2 for space "codes", cosine otherwise."""
    return nearest_codes_l2(vectors, table) if refiner.space == "codes" else nearest_codes(vectors, table)


def _preference(refined: torch.Tensor, table: torch.Tensor, new: torch.Tensor, old: torch.Tensor, space: str) -> torch.Tensor:
    """How much the refined vectors prefer their new code over the draft's: cosine gain, or L2 gain in the
    codebook's own units (squared distance over the mean squared code norm)."""
    refined, new_rows, old_rows = refined.float(), table[new].float(), table[old].float()
    if space == "codes":
        scale = table.float().pow(2).sum(-1).mean().clamp_min(1e-12)
        return ((refined - old_rows).pow(2).sum(-1) - (refined - new_rows).pow(2).sum(-1)) / scale
    return F.cosine_similarity(refined, new_rows, dim=-1) - F.cosine_similarity(refined, old_rows, dim=-1)


def _refined_vectors(refiner: SelfRefiner, table: torch.Tensor, vocab: Vocab, codes: torch.Tensor,
                     query_codes: torch.Tensor | None) -> torch.Tensor:
    """e' = g_phi(table[codes]) (Eq. 3), (B, N, dim); `table` already on g_phi's device."""
    parameter = next(refiner.parameters())
    if codes.dim() != 2 or codes.shape[1] != vocab.cells:
        raise ValueError(f"codes must be (batch, {vocab.cells}), got {tuple(codes.shape)}")
    embeddings = table[codes.to(parameter.device)].to(parameter.dtype)                      # (B, N, dim)
    query_embeddings = None
    if refiner.with_query:
        if query_codes is None:
            raise ValueError("this g_phi also reads the query image: pass query_codes")
        query_codes = query_codes.reshape(-1, vocab.cells).expand(codes.shape[0], -1)
        query_embeddings = table[query_codes.to(parameter.device)].to(parameter.dtype)      # (B, N, dim)
    return refiner(embeddings, query_embeddings, with_gate=True)


@torch.no_grad()
def refine_latents(refiner: SelfRefiner, backbone: nn.Module, vocab: Vocab, codes: torch.Tensor,
                   query_codes: torch.Tensor | None = None, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Drafted answer codes (B, N) -> g_phi's refined vectors e' (B, N, dim), before any snapping (Eq. 3)."""
    table = refine_table(refiner, backbone, vocab, codebook).to(next(refiner.parameters()).device)   # (C, dim)
    return _refined_vectors(refiner, table, vocab, codes, query_codes)[0]


@torch.no_grad()
def refine(refiner: SelfRefiner, backbone: nn.Module, vocab: Vocab, codes: torch.Tensor,
           query_codes: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
           gate: float = 0.0, learned_gate: float | bool | None = None, keep_copies: bool = False,
           keep_confident: float | None = None, scores: torch.Tensor | None = None,
           ) -> tuple[torch.LongTensor, torch.Tensor]:
    """`self_refine`'s refined codes (B, N), and the refined vectors e' (B, N, dim) they were snapped from.
    `keep_confident` (with `scores`, the draft's quality scores (B, N)): a cell the backbone scores at or above it
    keeps its draft code; VSR refines only the cells it doubts."""
    if keep_copies and query_codes is None:
        raise ValueError("keep_copies needs the query's codes (query_codes)")
    if keep_confident is not None and (scores is None or scores.shape != codes.shape):
        raise ValueError("keep_confident needs the draft's quality scores (scores), one per code")
    table = refine_table(refiner, backbone, vocab, codebook).to(next(refiner.parameters()).device)
    refined, logits = _refined_vectors(refiner, table, vocab, codes, query_codes)          # (B, N, dim), (B, N) | None
    new = snap_codes(refiner, refined, table)
    old = codes.to(new.device)
    if gate > 0:
        keep = _preference(refined, table.to(new.device), new, old, refiner.space) <= gate
        new = torch.where(keep, old, new)
    threshold = gate_threshold(refiner, learned_gate)
    if threshold is not None:
        probability = torch.sigmoid(logits.float()).to(new.device)                     # (B, N)
        if refiner.gate_scope == "answer":          # one decision per answer: its cells' mean probability
            probability = probability.mean(1, keepdim=True).expand_as(probability)
        new = torch.where(probability > threshold, new, old)
    if keep_copies:         # a cell the draft copied from the query stays (with paste, it shows the query's own pixels)
        copied = old == query_codes.reshape(-1, vocab.cells).to(new.device)
        new = torch.where(copied, old, new)
    if keep_confident is not None:      # a cell the backbone is sure of stays
        new = torch.where(scores.float().to(new.device) >= keep_confident, old, new)
    return new.to(codes.device), refined


def gated_latents(latents: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """A code-space g_phi's refined latents (B, N, dim) for the continuous decode, where a gate has the last word: a
    cell whose final code (B, N) is not the latent's own nearest code (a gate kept the draft's) shows that code's
    VQ vector instead; every other cell keeps its unsnapped latent."""
    table = codebook.to(latents.device, latents.dtype)
    codes = codes.to(latents.device)
    proposed = nearest_codes_l2(latents, table)
    return torch.where((proposed == codes)[..., None], latents, table[codes])


SCORE_GATES = ("off", "cells", "answer")


def score_gate(old: torch.Tensor, new: torch.Tensor, old_scores: torch.Tensor, new_scores: torch.Tensor,
               mode: str = "cells") -> torch.LongTensor:
    """VSR's proposals `new` (B, N) kept where the backbone scores them above the draft `old` (B, N): per cell
    ("cells": new_scores > old_scores, SCAN's Eq. 5 per token), per answer ("answer": the mean score rises), or
    all of them ("off"). Scores are (B, N), higher is better, as `score_answer` gives them."""
    if mode not in SCORE_GATES:
        raise ValueError(f"score gate must be one of {', '.join(SCORE_GATES)}, not {mode!r}")
    if old.shape != new.shape or old_scores.shape != new.shape or new_scores.shape != new.shape:
        raise ValueError(f"codes and scores must share one shape (B, N), got {tuple(old.shape)}, {tuple(new.shape)}, "
                         f"{tuple(old_scores.shape)}, {tuple(new_scores.shape)}")
    old = old.to(new.device)
    if mode == "off":
        return new
    if mode == "answer":
        better = new_scores.float().mean(1, keepdim=True) > old_scores.float().mean(1, keepdim=True)
        return torch.where(better.to(new.device), new, old)
    return torch.where((new_scores.float() > old_scores.float()).to(new.device), new, old)


def gate_threshold(refiner: SelfRefiner, learned_gate: float | bool | None = None) -> float | None:
    """The learned gate's threshold in use: None (no gate: a g_phi without one, or `learned_gate=False`), the
    stored `refiner.gate_threshold` (`learned_gate` None or True), or the float given."""
    if not refiner.learned_gate or learned_gate is False:
        return None
    if learned_gate is None or learned_gate is True:
        return refiner.gate_threshold
    return float(learned_gate)


def self_refine(refiner: SelfRefiner, backbone: nn.Module, vocab: Vocab, codes: torch.Tensor,
                query_codes: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
                gate: float = 0.0, learned_gate: float | bool | None = None, keep_copies: bool = False) -> torch.LongTensor:
    """Drafted answer codes (B, N) -> refined codes (B, N) on the codes' device (Sec. 3.3, Fig. 1 lower right).

    e = f_embed(y_q) -> e' = g_phi(e) (Eq. 3) -> nearest code: by cosine over the backbone's code embeddings
    (the paper), or by L2 over the VQ codebook for a g_phi of space "codes" (pass `codebook`, the tokenizer's).
    `query_codes` ((N,), (1, N) or (B, N)) is read only by a g_phi built `with_query`. `gate` > 0: a cell takes
    its new code only where e' prefers it over the draft's code by more than `gate` (cosine gain, or the L2 gain
    over the codebook's mean squared norm); elsewhere the draft's code stays. A g_phi with a learned gate applies it
    by default (its stored threshold; `learned_gate` a float: that threshold; False: off). `keep_copies`: cells whose
    draft code is the query's own (`query_codes` needed) keep it, whatever g_phi proposes.
    """
    return refine(refiner, backbone, vocab, codes, query_codes, codebook, gate, learned_gate, keep_copies)[0]
