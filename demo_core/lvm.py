"""The LVM-7B recipe: two Hub repos composed into one Retouch bundle.

Paper: "Sequential Modeling Enables Scalable Learning for Large Vision Models" (LVM, Bai et al., CVPR 2024,
arXiv:2312.00785). Owns the named recipe `load_engine("lvm-7b")`: its revisions, a memory estimate checked
before the weights are downloaded, and the composition (MUSE VQGAN converted by `muse_vqgan.py`) into a
`Bundle` with sequence_format "lvm".

    backbone   Emma02/LVM_ckpts     transformers.LlamaForCausalLM, fp16 safetensors (sharded)
    tokenizer  Emma02/vqvae_ckpts   MUSE VQGAN (config.json + pickled pytorch_model.bin),
                                    converted to diffusers.VQModel by `muse_vqgan.py`, float32
    refiner    optional             a VSR g_phi trained on this backbone: RETOUCH_LVM_REFINER = a folder
                                    or a Hub repo id (+ RETOUCH_LVM_REFINER_REVISION)

Training that refiner needs a GPU (drafting with the 7B backbone): one process,
    python -m demo_core.train refiner --bundle lvm-7b --device cuda --dtype bfloat16 --out runs/lvm-refiner
    HF_HUB_OFFLINE=0 RETOUCH_BUNDLE=lvm-7b RETOUCH_LVM_REFINER=runs/lvm-refiner python app.py
or on several GPUs, drafting split between them (README "Training on several GPUs"):
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 -m demo_core.train refiner
        --bundle lvm-7b --dtype float16 --batch 8 --out runs/lvm-refiner

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

Generation is not here: the raster draft and its scorer are `drafts/raster.py`, SCAN's training-free
fallback `refiners/scan_fallback.py`, and the engine runs them through `formats.LvmRaster`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bundle import FORMAT, FORMAT_VERSION, Bundle, load_backbone_part, load_refiner_part
from .errors import BundleError
from .hub import HUB_ID, hub_file, hub_snapshot
from .sequence import max_frames

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

MAX_CONTEXT_IMAGES = 16       # LVM's context limit: [x1, y1, ..., xK, yK, xq] (or [f1, ..., fF]) plus the answer
MAX_CONTEXT_FRAMES = MAX_CONTEXT_IMAGES - 1     # a sequential prompt: at most 15 frames, the model writes the 16th
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


def lvm_max_frames(max_positions: int, tokens_per_image: int, max_images: int = MAX_CONTEXT_IMAGES) -> int:
    """Context frames F of a sequential prompt that fit: F frames plus the answer within the positions and the cap.

    LVM-7B: 16 images -> 15 frames. The layout is its reference scripts' (ytongbai/LVM evaluation/vqlm_demo
    generate_videos.py, 12 context frames by default): each frame tokenized on its own, 256 codes, concatenated
    with no BOS and no separators, then the next frame's 256 codes in raster order (`sequence.frames_context`).
    """
    return max_frames(max_positions, tokens_per_image, max_images)


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
        "max_frames": lvm_max_frames(int(backbone.config.max_position_embeddings), tokens_per_image),
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
    return Bundle(info=info, tokenizer=tokenizer, backbone=backbone, vsr=refiner_module, source="lvm-7b",
                  extras={"folders": {"backbone": str(backbone_folder), "tokenizer": str(tokenizer_folder)}})
