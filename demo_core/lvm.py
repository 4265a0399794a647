"""LVM-7B from the Hub as a Retouch bundle, and its generation loop.

Owns the named recipe `load_engine("lvm-7b")`: two Hub repos composed into one `Bundle`
(sequence_format "lvm"), a memory estimate checked before the weights are downloaded, and
`lvm_stream`, which yields the same typed events as the default engine's SCAN loop.

    backbone   Emma02/LVM_ckpts     transformers.LlamaForCausalLM, fp16 safetensors (sharded)
    tokenizer  Emma02/vqvae_ckpts   MUSE VQGAN (config.json + pickled pytorch_model.bin),
                                    converted to diffusers.VQModel by `muse_vqgan.py`, float32
    refiner    optional             a VSR g_phi trained on this backbone: RETOUCH_LVM_REFINER = a folder
                                    or a Hub repo id (+ RETOUCH_LVM_REFINER_REVISION)

Training that refiner needs a GPU (drafting with the 7B backbone): one process,
    python -m demo_core.train refiner --bundle lvm-7b --device cuda --dtype bfloat16 --out runs/lvm-refiner
    HF_HUB_OFFLINE=0 RETOUCH_BUNDLE=lvm-7b RETOUCH_LVM_REFINER=runs/lvm-refiner python app.py
(the trainer is single-process today; it does not shard drafting across GPUs with accelerate).

Revisions: the tokenizer is pinned, `LVM_VQ_REVISION` = e4b5f5f83d9588ed52b6d1b65b91262f9f2d804b
(Emma02/vqvae_ckpts' main). The backbone is NOT: Emma02/LVM_ckpts' main was re-uploaded twice and
its head sha cannot be read from this offline workplace, so `LVM_REVISION` stays "main". Override
either with the environment (RETOUCH_LVM_REVISION, RETOUCH_LVM_VQ_REVISION) or the function
arguments, and put the backbone's 40-hex sha here once known: a branch name is not reproducible
(`python -m demo_core space --require-pinned` refuses it). The commit actually used is recorded in
`bundle.info["sources"]`.

Pixels: the MUSE VQGAN reads RGB in [0, 1] as is and its decodes are clamped to [0, 1]
(`muse_vqgan.MUSE_PIXEL_RANGE`; LVM's utils.py `read_image_to_tensor` and inference.py
`generate_once`), recorded as bundle.json "pixel_range" [0, 1] so an exported copy keeps it.

Sampling defaults: the reference scripts' (ytongbai/LVM evaluation/vqlm_demo/batch_generation.py
flags temperature=1.0, top_p=1.0, which inference.py `generate_once` passes to `generate`), in
`LVM_SAMPLING`, recorded as bundle.json "sampling"; a run's own settings override them. Top-k is
off: `generate_once` passes none (transformers' `generate` then applies its generation config's
top_k, 50 unless the checkpoint's generation_config.json says otherwise; set top_k=50 to match).

Sequence (LVM paper; DESIGN.md "Reference facts about LVM"): each image is tokenized alone, 256
raster codes, and the images are concatenated with no BOS and no separators, `[x1, y1, ..., xK,
yK, xq]`; then 256 codes are sampled for yq, one forward per token with a KV cache. Ids >= 8192
(LVM's 100 special tokens) are never sampled: only the code logits are read. The checkpoint's
`eos_token_id` is 2, which is also a VQ code, so nothing here ever stops early on it.

Quality without a trained quality signal (DESIGN.md, "training-free fallback"): a token's score
is the model's own probability of it given everything before it, p(y_n | context, y_<n). The
SCAN stage becomes: pick the c cells with the lowest probability, resample each from its
position's distribution, and keep a change only if the log-likelihood of the whole answer,
log p(y | context), improves. What a causal LM allows, honestly: the proposal for cell n sees
only the context and the cells before n (raster order), but the acceptance test scores every
later cell too, so a change is kept only if the whole image, after it included, becomes more
likely. Candidates are scored in one teacher-forced forward (a block-diagonal attention mask
puts them side by side after the shared context cache).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .backbone import SamplingConfig, sample_from_logits
from .bundle import FORMAT, FORMAT_VERSION, HUB_ID, Bundle, BundleError, load_backbone_part, load_refiner_part
from .events import DraftDone, Event, Finished, GenerationStarted, Result, ScanStep, StageDone, TokensWritten
from .refiners.scan import ScanConfig, ScanIteration, lowest_cells

LVM_BACKBONE_REPO = "Emma02/LVM_ckpts"
LVM_TOKENIZER_REPO = "Emma02/vqvae_ckpts"
# The backbone's main was re-uploaded and its sha cannot be read offline: unpinned (see above).
LVM_REVISION = "main"
LVM_VQ_REVISION = "e4b5f5f83d9588ed52b6d1b65b91262f9f2d804b"     # Emma02/vqvae_ckpts' main

# What is fetched: only what loading needs (the backbone repo may hold other formats too).
BACKBONE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json"]
TOKENIZER_FILES = ["config.json", "pytorch_model.bin"]
# The same files by name, for the Space's preload_from_hub (which takes names): transformers'
# names for a 3-shard checkpoint, as DESIGN.md describes LVM_ckpts. Check them against the repo
# at the pinned commit when pinning.
BACKBONE_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json",
                  *[f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]]

MAX_CONTEXT_IMAGES = 16       # LVM's context limit: [x1, y1, ..., xK, yK, xq] plus the answer
QUALITY_SIGNAL = ("training-free fallback: quality = the model's own probability of each token; SCAN keeps a "
                  "resampled token only if the answer's log-likelihood improves")
GiB = 2 ** 30
LVM_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "source": "the LVM reference scripts' (ytongbai/LVM evaluation/vqlm_demo/batch_generation.py, "
                          "inference.py generate_once)"}


def revisions(revision: str | None = None, vq_revision: str | None = None) -> tuple[str, str]:
    """(backbone, tokenizer) revisions: argument > environment > module constant."""
    return (revision or os.environ.get("RETOUCH_LVM_REVISION") or LVM_REVISION,
            vq_revision or os.environ.get("RETOUCH_LVM_VQ_REVISION") or LVM_VQ_REVISION)


def lvm_max_pairs(max_positions: int, tokens_per_image: int, max_images: int = MAX_CONTEXT_IMAGES) -> int:
    """Pairs K that fit: 2K+1 context images plus the answer within the positions and the image cap.

    LVM-7B: 4096 positions / 256 tokens = 16 images -> K = 7 (15 context images + the answer).
    """
    images = min(max_positions // tokens_per_image, max_images)
    return max(0, (images - 2) // 2)


# --------------------------------------------------------------------------------------------
# Hub access
# --------------------------------------------------------------------------------------------

def _hub_error(repo: str, revision: str, error: Exception) -> BundleError:
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from huggingface_hub import constants

    where = f"{repo}@{revision}"
    if isinstance(error, LocalEntryNotFoundError):
        why = "downloads are off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        missing = re.search(r"(\d+ file\(s\) are missing \([^)]*\))", str(error))
        what = f"the cached copy is incomplete: {missing.group(1)}" if missing else "it is not in the local Hugging Face cache"
        return BundleError(f"{where}: {what}, and {why}; download it where there is internet "
                           f"(hf download {repo} --revision {revision}) or allow downloads")
    if isinstance(error, GatedRepoError):
        return BundleError(f"{where}: the repo is gated; accept its terms on huggingface.co and log in (hf auth login)")
    if isinstance(error, RepositoryNotFoundError):
        return BundleError(f"{where}: no such model repo on the Hub (or it is private)")
    if isinstance(error, RevisionNotFoundError):
        return BundleError(f"{where}: revision {revision!r} does not exist in {repo}")
    if isinstance(error, EntryNotFoundError):
        return BundleError(f"{where}: a required file is missing from the repo ({str(error).splitlines()[0][:160]})")
    return BundleError(f"{where}: could not download from the Hub ({type(error).__name__}: {str(error).splitlines()[0][:160]})")


def hub_file(repo: str, filename: str, revision: str) -> Path:
    """One file of a Hub repo through the cache (`hf_hub_download`), errors as one-line BundleErrors."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as error:
        raise _hub_error(repo, revision, error) from error


def hub_snapshot(repo: str, revision: str, allow_patterns: list[str]) -> Path:
    """The files of a Hub repo matching `allow_patterns` (`snapshot_download`), errors as BundleErrors."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:
        raise _hub_error(repo, revision, error) from error


# --------------------------------------------------------------------------------------------
# memory estimate
# --------------------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """What loading and running the recipe needs on its device, in bytes (estimated before loading)."""

    parameters: int             # backbone parameters (from its config)
    weights: int                # parameters x bytes of the run dtype
    kv_cache: int               # context KV cache at the longest context, twice: kept + one working copy
    tokenizer: int              # the VQ in float32
    working: int                # activations, logits, CUDA context
    context_tokens: int         # the longest sequence the KV cache is sized for
    dtype: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.tokenizer + self.working

    def describe(self) -> str:
        return (f"weights {self.weights / GiB:.1f} GiB ({self.parameters / 1e9:.2f}B parameters in {self.dtype}) + "
                f"KV cache {self.kv_cache / GiB:.1f} GiB ({self.context_tokens} tokens) + tokenizer "
                f"{self.tokenizer / GiB:.2f} GiB + working memory {self.working / GiB:.1f} GiB")


def _bytes_per(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def llama_parameter_count(config) -> int:
    """Parameters of a LlamaForCausalLM from its config alone (instantiating 7B, even on meta, takes seconds)."""
    hidden, layers, vocab = int(config.hidden_size), int(config.num_hidden_layers), int(config.vocab_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inner = int(config.intermediate_size)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2          # q, o + k, v
    if getattr(config, "attention_bias", False):
        attention += heads * head_dim + 2 * kv_heads * head_dim + hidden
    mlp = 3 * hidden * inner + ((2 * inner + hidden) if getattr(config, "mlp_bias", False) else 0)
    per_layer = attention + mlp + 2 * hidden                                              # + two RMSNorms
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embeddings + layers * per_layer + hidden                                       # + final norm


def estimate_memory(llama_config, muse_config: dict, dtype: torch.dtype, cells_per_iteration: int = 4) -> MemoryEstimate:
    """Count parameters from the configs (meta tensors: no memory) and size the KV cache for the longest context."""
    from diffusers import VQModel

    from .muse_vqgan import muse_config_to_vqmodel_kwargs

    vq_kwargs = muse_config_to_vqmodel_kwargs(muse_config)
    with torch.device("meta"):
        vq_parameters = sum(p.numel() for p in VQModel(**vq_kwargs).parameters())
    parameters = llama_parameter_count(llama_config)
    size = _bytes_per(dtype)
    grid = int(vq_kwargs["sample_size"]) // 2 ** (len(vq_kwargs["block_out_channels"]) - 1)
    tokens_per_image = grid * grid
    tokens = min(int(llama_config.max_position_embeddings), MAX_CONTEXT_IMAGES * tokens_per_image)
    heads = int(llama_config.num_attention_heads)
    kv_heads = int(getattr(llama_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(llama_config, "head_dim", None) or llama_config.hidden_size // heads)
    kv_cache = 2 * 2 * int(llama_config.num_hidden_layers) * kv_heads * head_dim * tokens * size
    # one layer's prefill activations (hidden, q/k/v/o, SwiGLU), fp32 code log-probs of a scored
    # candidate set, and a CUDA context's worth of slack
    prefill = tokens * (6 * int(llama_config.hidden_size) + 3 * int(llama_config.intermediate_size)) * size
    logits = cells_per_iteration * tokens_per_image * int(llama_config.vocab_size) * (size + 4 + 4)
    working = prefill + logits + GiB // 2
    return MemoryEstimate(int(parameters), int(parameters) * size, kv_cache, int(vq_parameters) * 4, working, tokens,
                          str(dtype).replace("torch.", ""))


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for the model on `device`, what was measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    if device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()), "MPS recommended working set"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free RAM"


def check_memory(estimate: MemoryEstimate, device: torch.device, name: str = "lvm-7b") -> None:
    """Raise a one-line BundleError when the estimate does not fit (RETOUCH_SKIP_MEMORY_CHECK=1 skips)."""
    if os.environ.get("RETOUCH_SKIP_MEMORY_CHECK", "").lower() in ("1", "true", "yes"):
        return
    free, what = available_memory(device)
    if estimate.total > free:
        hint = ("use a GPU with more memory" if torch.device(device).type == "cuda"
                else "use a CUDA GPU (fp16/bf16 halves the weights)")
        raise BundleError(f"{name} needs about {estimate.total / GiB:.1f} GiB on {device} ({estimate.describe()}) but "
                          f"only {free / GiB:.1f} GiB is {what}; {hint}, free memory, or set "
                          f"RETOUCH_SKIP_MEMORY_CHECK=1 to try anyway")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def _refiner_folder(source: str | Path) -> Path:
    """A VSR refiner folder: local (a refiner/ folder or a bundle holding one) or a Hub repo id."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        if not HUB_ID.match(str(source)):
            raise BundleError(f"refiner: {source} is neither a folder nor a Hub repo id (org/name)")
        path = hub_snapshot(str(source), os.environ.get("RETOUCH_LVM_REFINER_REVISION") or "main",
                            ["config.json", "*.safetensors", "refiner/*", "training.json"])
    if (path / "refiner" / "config.json").is_file():
        path = path / "refiner"
    if not (path / "config.json").is_file():
        raise BundleError(f"refiner: {path} holds no config.json (expected a g_phi saved with save_pretrained)")
    return path


def load_lvm_bundle(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16, *,
                    backbone_repo: str = LVM_BACKBONE_REPO, tokenizer_repo: str = LVM_TOKENIZER_REPO,
                    revision: str | None = None, vq_revision: str | None = None,
                    refiner: str | Path | None = None) -> Bundle:
    """LVM-7B + its MUSE VQGAN (+ an optional VSR refiner) as a Bundle with sequence_format "lvm".

    The configs are fetched first and the memory estimate is checked before the weights are
    downloaded; then only the needed files come down (`allow_patterns`). Backbone in `dtype`,
    tokenizer always float32. Every failure is a one-line BundleError.
    """
    import json

    from transformers import LlamaConfig

    from .muse_vqgan import MUSE_PIXEL_RANGE, load_muse_vqgan
    from .tokenizer import VQTokenizer

    device = torch.device(device)
    revision, vq_revision = revisions(revision, vq_revision)
    config_path = hub_file(backbone_repo, "config.json", revision)
    vq_config_path = hub_file(tokenizer_repo, "config.json", vq_revision)
    try:
        llama_config = LlamaConfig.from_pretrained(config_path.parent)
        muse_config = json.loads(vq_config_path.read_text())
        estimate = estimate_memory(llama_config, muse_config, dtype)
    except BundleError:
        raise
    except Exception as error:
        raise BundleError(f"{backbone_repo} / {tokenizer_repo}: configs cannot be read as Llama + MUSE VQGAN "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:160]})") from error
    check_memory(estimate, device)

    backbone_folder = hub_snapshot(backbone_repo, revision, BACKBONE_PATTERNS)
    tokenizer_folder = hub_snapshot(tokenizer_repo, vq_revision, TOKENIZER_FILES)
    try:
        vqmodel = load_muse_vqgan(tokenizer_folder)
    except ValueError as error:
        raise BundleError(f"tokenizer ({tokenizer_repo}): {error}") from error
    # VQTokenizer looks the codes up itself and hands VQModel.decode the code *vectors*; aMUSEd's
    # lookup_from_codebook=True would make decode expect indices instead
    vqmodel.register_to_config(lookup_from_codebook=False)
    # float32, always (LVM's VQGAN gives NaNs in fp16); RGB in [0, 1] as is, decodes clamped to [0, 1]
    tokenizer = VQTokenizer(vqmodel, pixel_range=MUSE_PIXEL_RANGE)
    tokenizer.model.to(device)
    backbone = load_backbone_part(backbone_folder, dtype=dtype, device=device)
    vocab_size = int(backbone.config.vocab_size)
    if vocab_size < tokenizer.codebook_size:
        raise BundleError(f"backbone ({backbone_repo}): vocabulary {vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.codebook_size} codes; these two checkpoints do not belong together")
    tokens_per_image = tokenizer.grid ** 2
    pairs = lvm_max_pairs(int(backbone.config.max_position_embeddings), tokens_per_image)
    if pairs < 1:
        raise BundleError(f"backbone ({backbone_repo}): {backbone.config.max_position_embeddings} positions hold no "
                          f"demonstration pair of {tokens_per_image}-token images")

    refiner_source = refiner or os.environ.get("RETOUCH_LVM_REFINER")
    refiner_module, refiner_folder = None, None
    if refiner_source:
        refiner_folder = _refiner_folder(refiner_source)
        refiner_module = load_refiner_part(refiner_folder).to(device)
        width = int(backbone.get_input_embeddings().weight.shape[1])
        if getattr(refiner_module, "dim", width) != width or getattr(refiner_module, "grid", tokenizer.grid) != tokenizer.grid:
            raise BundleError(f"refiner: {refiner_folder} was built for width {refiner_module.dim} and a "
                              f"{refiner_module.grid}x{refiner_module.grid} grid; this backbone has width {width} "
                              f"and a {tokenizer.grid}x{tokenizer.grid} grid")

    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": "lvm-7b",
        "image_size": tokenizer.image_size, "grid": tokenizer.grid, "tokens_per_image": tokens_per_image,
        "codebook_size": tokenizer.codebook_size, "pixel_range": list(tokenizer.pixel_range),
        "sequence_format": "lvm", "special_tokens": {},
        "vocab_size": vocab_size, "max_pairs": pairs, "max_context_images": MAX_CONTEXT_IMAGES,
        "quality_signal": QUALITY_SIGNAL, "sampling": dict(LVM_SAMPLING), "tasks": [],
        "parts": {"tokenizer": "tokenizer", "backbone": "backbone", **({"refiner": "refiner"} if refiner_module else {})},
        "sources": {
            "backbone": {"repo": backbone_repo, "revision": revision, "commit": backbone_folder.name},
            "tokenizer": {"repo": tokenizer_repo, "revision": vq_revision, "commit": tokenizer_folder.name,
                          "converted_from": "MUSE VQGAN (pytorch_model.bin) -> diffusers.VQModel"},
            **({"refiner": {"path": str(refiner_folder)}} if refiner_module else {}),
        },
        "memory_estimate_bytes": asdict(estimate),
    }
    return Bundle(info=info, tokenizer=tokenizer, backbone=backbone, refiner=refiner_module, source="lvm-7b",
                  extras={"folders": {"backbone": str(backbone_folder), "tokenizer": str(tokenizer_folder)}})


# --------------------------------------------------------------------------------------------
# generation: the draft (KV cache, one forward per token) and teacher-forced scoring
# --------------------------------------------------------------------------------------------

@dataclass
class AnswerScore:
    """A full answer scored under the model, given the context."""

    log_likelihood: float          # sum_n log p(y_n | context, y_<n), codes only
    log_probs: torch.Tensor        # (N, C) float32 log p(. | context, y_<n) per cell: the proposals
    token_probs: torch.Tensor      # (N,) p(y_n | context, y_<n): the fallback quality score


@dataclass
class LvmDraft:
    """What the draft leaves for the refiners: the context's KV cache and the chosen answer."""

    context_kv: list               # per layer (keys, values), (1, heads, L, head_dim)
    first_log_probs: torch.Tensor  # (C,) log p(y_0 | context)
    codes: torch.Tensor            # (B, N) every candidate
    token_probs: torch.Tensor      # (B, N)


def _forward(model, input_ids, position_ids, cache, attention_mask=None, logits_to_keep: int = 0):
    out = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
                attention_mask=attention_mask, logits_to_keep=logits_to_keep)
    return out.logits, out.past_key_values


def _code_log_probs(logits: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(..., V) logits -> (..., C) float32 log-probabilities over the codes only (special ids masked out)."""
    return torch.log_softmax(logits[..., :codebook_size].float(), dim=-1)


@torch.no_grad()
def draft_lvm(model, context: torch.Tensor, cells: int, codebook_size: int, sampling: SamplingConfig,
              generator: torch.Generator | None, state_out: list) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Sample `cells` codes after `context` in raster order; yields (index, codes (B,), probs (B,)).

    Prefill once (only the last position's logits are computed), then one forward per token.
    There is no stop condition: exactly `cells` tokens are written whatever they are (id 2, the
    checkpoint's EOS, included). The LvmDraft is appended to `state_out` at the end.
    """
    device = next(model.parameters()).device
    batch = max(1, sampling.candidates)
    length = int(context.numel())
    logits, cache = _forward(model, context.to(device)[None], torch.arange(length, device=device)[None], None,
                             logits_to_keep=1)
    log_probs = _code_log_probs(logits[:, -1], codebook_size)                    # (1, C)
    first_log_probs = log_probs[0].clone()
    # the context cache, kept as views; the draft's own cache grows from copies (DynamicCache concatenates)
    context_kv = [(layer.keys, layer.values) for layer in cache.layers]
    if batch > 1:
        for layer in cache.layers:
            layer.keys = layer.keys.expand(batch, -1, -1, -1)
            layer.values = layer.values.expand(batch, -1, -1, -1)
        log_probs = log_probs.expand(batch, -1)
    codes = torch.zeros(batch, cells, dtype=torch.long, device=device)
    probs = torch.zeros(batch, cells, dtype=torch.float32, device=device)
    for index in range(cells):
        # sampling reads code logits only: ids >= codebook_size cannot be drawn
        new_codes = sample_from_logits(log_probs, sampling, generator)             # (B,)
        codes[:, index] = new_codes
        probs[:, index] = log_probs.gather(1, new_codes[:, None])[:, 0].exp()
        yield index, new_codes.clone(), probs[:, index].clone()
        if index + 1 < cells:
            logits, cache = _forward(model, new_codes[:, None], torch.full((batch, 1), length + index, device=device), cache)
            log_probs = _code_log_probs(logits[:, -1], codebook_size)
    state_out.append(LvmDraft(context_kv, first_log_probs, codes, probs))


@torch.no_grad()
def score_answers(model, draft: LvmDraft, answers: torch.Tensor, codebook_size: int) -> list[AnswerScore]:
    """Teacher-forced log-likelihood of B full answers (B, N) in ONE forward after the context cache.

    The B answers sit side by side in one sequence; a block-diagonal causal mask lets each answer
    see the context and its own earlier tokens only, and every block reuses the answer positions
    L..L+N-2, so each row is scored exactly as if it were alone.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    answers = answers.to(device)
    batch, cells = answers.shape
    length = int(draft.context_kv[0][0].shape[-2])
    first = draft.first_log_probs.to(device)[None].expand(batch, -1)              # (B, C)
    if cells > 1:
        inputs = answers[:, :-1].reshape(1, -1)                                   # (1, B*(N-1))
        span = cells - 1
        positions = (length + torch.arange(span, device=device)).repeat(batch)[None]
        causal = torch.ones(span, span, dtype=torch.bool, device=device).tril()
        block = torch.block_diag(*[causal] * batch)                               # (B*(N-1), B*(N-1))
        mask = torch.cat([torch.ones(batch * span, length, dtype=torch.bool, device=device), block], dim=1)[None, None]
        cache = DynamicCache(ddp_cache_data=[(keys, values) for keys, values in draft.context_kv])
        logits, _ = _forward(model, inputs, positions, cache, attention_mask=mask)
        rest = _code_log_probs(logits[0].view(batch, span, -1), codebook_size)    # (B, N-1, C)
        log_probs = torch.cat([first[:, None], rest], dim=1)                      # (B, N, C)
    else:
        log_probs = first[:, None]
    token_log_probs = log_probs.gather(2, answers[..., None])[..., 0]            # (B, N)
    return [AnswerScore(float(token_log_probs[b].double().sum()), log_probs[b], token_log_probs[b].exp())
            for b in range(batch)]


@torch.no_grad()
def scan_fallback(model, draft: LvmDraft, codes: torch.Tensor, current: AnswerScore, config: ScanConfig,
                  sampling: SamplingConfig, generator: torch.Generator | None,
                  codebook_size: int, result_out: list) -> Iterator[ScanIteration]:
    """The training-free SCAN fallback: resample the least likely cells, keep what raises log p(answer).

    Per iteration: the c cells with the lowest token probability (SCAN Eq. 2, with probability as
    the score) get a new code each, drawn from p(. | context, y_<n) with the current code excluded
    (the prefix is all a causal LM conditions a position on). The c single-change answers are
    scored in one forward; the changes that raise the answer's log-likelihood are kept — all of
    them together if that combination beats the best single one (one more forward), else only
    the best (the accept-if-improved rule of SCAN Eq. 5, on the sequence likelihood). Every
    accepted step strictly increases log p(answer | context). The final (codes, score) is
    appended to `result_out`.
    """
    codes = codes.clone()
    cells = codes.numel()
    tries = torch.zeros(cells, dtype=torch.long)
    idle = 0
    for iteration in range(config.iterations):
        if idle >= config.patience:
            break
        excluded = {cell for cell in range(cells) if tries[cell] >= config.max_tries}
        chosen = lowest_cells(current.token_probs, config.cells_per_iteration, excluded)
        if not chosen:
            break
        index = torch.tensor(chosen, device=codes.device)
        proposal = current.log_probs[index].clone()                               # (c, C)
        proposal[torch.arange(len(chosen)), codes[index]] = float("-inf")         # a *different* code
        new_codes = sample_from_logits(proposal, sampling, generator)
        singles = codes[None].repeat(len(chosen), 1)
        singles[torch.arange(len(chosen)), index] = new_codes
        scores = score_answers(model, draft, singles, codebook_size)
        improving = [i for i, score in enumerate(scores) if score.log_likelihood > current.log_likelihood]
        accepted_rows: list[int] = []
        following = current
        if improving:
            best = max(improving, key=lambda i: scores[i].log_likelihood)
            accepted_rows, following = [best], scores[best]
            if len(improving) > 1:
                combined = codes.clone()
                combined[index[improving]] = new_codes[improving]
                together = score_answers(model, draft, combined[None], codebook_size)[0]
                if together.log_likelihood > scores[best].log_likelihood:
                    accepted_rows, following = improving, together
        record = ScanIteration(iteration, list(chosen), [int(codes[c]) for c in chosen], new_codes.tolist(),
                               [float(current.token_probs[c]) for c in chosen],
                               # a single change leaves the prefix of its cell as it was: its new probability is exact here
                               [float(current.log_probs[c, int(n)].exp()) for c, n in zip(chosen, new_codes.tolist())],
                               [i in accepted_rows for i in range(len(chosen))])
        for i, cell in enumerate(chosen):
            if i in accepted_rows:
                codes[cell] = new_codes[i]
            else:
                tries[cell] += 1
        current = following
        idle = 0 if accepted_rows else idle + 1
        record.codes, record.scores = codes.clone(), current.token_probs.clone()
        yield record
    result_out.append((codes, current))


# --------------------------------------------------------------------------------------------
# the event stream (mirrors Engine._stream_scan)
# --------------------------------------------------------------------------------------------

def lvm_stream(engine, loaded_pairs, query_image, settings) -> Iterator[Event]:
    """Draft in LVM format, then the requested stages ("scan": training-free fallback, "self": VSR)."""
    model = engine.model
    vocab = engine.vocab
    codebook_size, cells = vocab.codebook_size, vocab.cells
    timings: dict[str, float] = {}
    start = time.perf_counter()
    context, query_codes = engine.build_context(loaded_pairs, query_image)
    timings["encode"] = time.perf_counter() - start
    yield GenerationStarted(total_tokens=cells, grid=engine.grid, pairs=len(loaded_pairs),
                            context_tokens=int(context.numel()), stages=["draft", *settings.refine], sequence_format="lvm")
    sampling = SamplingConfig(settings.temperature, settings.top_k, settings.top_p, settings.candidates)
    generator = torch.Generator(device=engine.device).manual_seed(settings.seed)

    # 1. draft, token by token (raster order: the cell is the index)
    start = time.perf_counter()
    decode_time = 0.0
    drafts: list[LvmDraft] = []
    written = np.zeros((engine.grid, engine.grid), dtype=bool)
    canvas_codes = query_codes.clone()             # unwritten cells show the query's codes (the UI dims them)
    for index, step_codes, step_probs in draft_lvm(model, context, cells, codebook_size, sampling, generator, drafts):
        written.flat[index] = True
        canvas_codes[index] = int(step_codes[0])
        canvas = None
        if settings.canvas_every and ((index + 1) % settings.canvas_every == 0 or index + 1 == cells):
            tick = time.perf_counter()
            canvas = engine.decode(canvas_codes)
            decode_time += time.perf_counter() - tick
        yield TokensWritten(index, index, int(step_codes[0]), float(step_probs[0]), written.copy(), canvas)
    draft = drafts[0]
    mean_quality = draft.token_probs.mean(1)
    chosen = int(mean_quality.argmax())
    candidate_images = [engine.decode(draft.codes[b].cpu()) for b in range(draft.codes.shape[0])]
    answer = draft.codes[chosen].clone()
    timings["draft"] = time.perf_counter() - start - decode_time
    timings["decode"] = decode_time
    draft_image = candidate_images[chosen]
    draft_quality = draft.token_probs[chosen]
    stage_images = {"draft": draft_image}
    stage_tokens = {"draft": engine._grid(answer).astype(np.int64)}
    stage_quality = {"draft": engine._grid(draft_quality)}
    yield DraftDone(draft_image, stage_tokens["draft"], stage_quality["draft"], candidate_images,
                    [float(q) for q in mean_quality], chosen)

    history: list[ScanStep] = []
    changed: dict[str, list[int]] = {}
    score: AnswerScore | None = None
    for stage in settings.refine:
        start = time.perf_counter()
        before = answer.clone()
        if stage == "scan":
            if score is None:
                score = score_answers(model, draft, answer[None], codebook_size)[0]
            config = ScanConfig(iterations=settings.scan_iterations, cells_per_iteration=settings.scan_cells)
            final: list = []
            for record in scan_fallback(model, draft, answer, score, config, sampling, generator, codebook_size, final):
                image = None
                if settings.decode_scan_steps:
                    tick = time.perf_counter()
                    image = engine.decode(record.codes.cpu())
                    timings["decode"] += time.perf_counter() - tick
                event = ScanStep(record.iteration, record.cells, record.old_tokens, record.new_tokens, record.old_scores,
                                 record.new_scores, record.accepted, image, engine._grid(record.scores),
                                 engine._grid(record.codes).astype(np.int64))
                history.append(event)
                yield event
            answer, score = final[0]
        else:
            from .refiners.self_refine import self_refine

            answer = self_refine(engine.refiner, model, vocab, answer[None], query_codes=query_codes[None])[0]
            score = score_answers(model, draft, answer[None], codebook_size)[0]      # re-score the new image
        name = stage if stage not in stage_images else f"{stage}#{len(stage_images)}"
        changed[name] = torch.nonzero(answer.cpu() != before.cpu()).flatten().tolist()
        stage_tokens[name] = engine._grid(answer).astype(np.int64)
        stage_quality[name] = engine._grid(score.token_probs)
        timings[name] = time.perf_counter() - start
        stage_images[name] = engine.decode(answer.cpu())
        yield StageDone(name, stage_images[name], stage_tokens[name], stage_quality[name], changed[name])
    final_name = list(stage_images)[-1]
    timings["total"] = sum(timings.values())
    result = Result(draft=draft_image, final=stage_images[final_name], stages=stage_images, tokens=stage_tokens,
                    quality=stage_quality, history=history, changed=changed, timings=timings,
                    candidates=candidate_images, query=query_image)
    yield Finished(result)
