"""Model bundles: one folder (or Hub repo) holding everything a pipeline needs.

    bundle.json     format version, image size, grid, tokens per image, codebook size,
                    the tokenizer's pixel range, sequence format, special token ids, tasks,
                    which parts are present, and optionally the model's default sampling
    tokenizer/      diffusers.VQModel (save_pretrained layout)
    backbone/       transformers.LlamaForCausalLM (save_pretrained layout)
    refiner/        VSR g_phi (PyTorchModelHubMixin layout: config.json + model.safetensors), optional
    tensor/         TensorAR adapter over the backbone (same layout), optional; tensor-control/ its
                    equal-steps control (LoRA only), optional, not loaded here (eval loads it)

`pixel_range` is the interval the tokenizer's VQ model reads and writes, [low, high]: [-1, 1] for
the embedded default (and for any bundle.json without the field, which predates it), [0, 1] for
LVM's MUSE VQGAN. `sampling` (optional) overrides the engine's defaults, e.g. LVM-7B's
{"temperature": 1.0, "top_p": 1.0, "source": "..."}.

Loading is strict (missing, unexpected or mis-shaped weights name the part and the keys) and
reads safetensors only. A Hub repo id goes through `huggingface_hub.snapshot_download`
(pinned with `revision=`); named recipes (`lvm-7b`) live in `lvm.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BundleError
from .hub import HUB_ID, hub_snapshot
from .sequence import Vocab, max_frames, max_pairs

FORMAT = "retouch-bundle"
FORMAT_VERSION = 1
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "assets" / "retouch-tiny"


@dataclass
class Bundle:
    """A loaded bundle: the parts as live objects plus the manifest."""

    info: dict
    tokenizer: object                 # VQTokenizer
    backbone: torch.nn.Module         # LlamaForCausalLM
    vsr: torch.nn.Module | None = None       # VSR g_phi (refiner/), optional
    source: str = ""
    extras: dict = field(default_factory=dict)
    tensor: torch.nn.Module | None = None    # drafts.tensor.TensorAR over `backbone` (tensor/), optional
    folder: Path | None = None               # where the parts were read from (a local folder or the Hub snapshot)

    @property
    def refiner(self) -> torch.nn.Module | None:
        """Deprecated name of `vsr` (the VSR g_phi)."""
        return self.vsr

    @property
    def vocab(self) -> Vocab:
        return Vocab(int(self.info["codebook_size"]), int(self.info["tokens_per_image"]))

    @property
    def sequence_format(self) -> str:
        return self.info.get("sequence_format", "scan")

    @property
    def sampling_defaults(self) -> dict:
        """This model's own default sampling (bundle.json "sampling": temperature, top_p, top_k), {} if none."""
        return sampling_defaults(self.info)

    @property
    def scan_temperature(self) -> float | None:
        """SCAN's regeneration temperature (bundle.json "sampling": "scan_temperature"); None: the draft's."""
        value = (self.info.get("sampling") or {}).get("scan_temperature")
        return None if value is None else float(value)

    @property
    def vsr_defaults(self) -> dict:
        """VSR's decode rules a run uses unless told otherwise (bundle.json "vsr": "keep_copies", "score_gate",
        "gate"), as RunSettings fields (vsr_keep_copies, vsr_score_gate, vsr_gate); {} if the bundle says nothing."""
        section = self.info.get("vsr") or {}
        return {f"vsr_{key}": section[key] for key in VSR_FIELDS if key in section}

    @property
    def luma_carry(self) -> bool:
        """Whether answers take the query's luminance where the demonstrations show their answers keep their inputs'
        (`render.luminance_map`): bundle.json "luma_carry", off when it says nothing (measured per bundle)."""
        return bool(self.info.get("luma_carry", False))

    @property
    def paste_query(self) -> bool:
        """Whether answers show the query's own pixels where they keep its codes (`render.py`): bundle.json
        "paste_query" when it says, else on exactly for a tokenizer with local codes."""
        if "paste_query" in self.info:
            return bool(self.info["paste_query"])
        return bool(getattr(self.tokenizer, "local_codes", False))

    @property
    def max_pairs(self) -> int:
        return int(self.info.get("max_pairs") or max_pairs(self.backbone.config.max_position_embeddings,
                                                           int(self.info["tokens_per_image"])))

    @property
    def max_frames(self) -> int:
        """Context frames a sequential prompt may hold (the answer is the frame after them)."""
        return int(self.info.get("max_frames") or max_frames(self.backbone.config.max_position_embeddings,
                                                             int(self.info["tokens_per_image"]),
                                                             self.info.get("max_context_images")))


SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
VSR_FIELDS = ("keep_copies", "keep_confident", "score_gate", "gate")


def sampling_defaults(info: dict) -> dict:
    """The sampling settings a manifest overrides ({} for a bundle that keeps the engine's defaults)."""
    sampling = info.get("sampling") or {}
    return {key: sampling[key] for key in SAMPLING_FIELDS if key in sampling}


def pixel_range_of(info: dict, where: str = "bundle.json") -> tuple[float, float]:
    """The tokenizer's pixel range a manifest records; [-1, 1] when it has none (bundles made before the field)."""
    from .tokenizer import check_pixel_range

    try:
        return check_pixel_range(info.get("pixel_range"))
    except ValueError as error:
        raise BundleError(f"tokenizer: {where}: {error}") from error


def bundle_pixel_range(folder: Path) -> tuple[float, float]:
    """The pixel range of the tokenizer in bundle folder `folder` (from its bundle.json, if it has one)."""
    path = Path(folder) / "bundle.json"
    return pixel_range_of(_read_json(path, "bundle") if path.exists() else {}, str(path))


def manifest(tokenizer, backbone, *, name: str, tasks: list[str], sequence_format: str = "scan", refiner: bool = False,
             extra: dict | None = None, tensor: bool = False) -> dict:
    """bundle.json contents for parts in hand."""
    vocab = Vocab(tokenizer.codebook_size, tokenizer.grid ** 2)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "image_size": tokenizer.image_size, "grid": tokenizer.grid, "tokens_per_image": tokenizer.grid ** 2,
        "codebook_size": tokenizer.codebook_size, "pixel_range": list(tokenizer.pixel_range),
        "sequence_format": sequence_format, "special_tokens": vocab.special_ids() if sequence_format == "scan" else {},
        "vocab_size": int(backbone.config.vocab_size),
        "max_pairs": max_pairs(backbone.config.max_position_embeddings, tokenizer.grid ** 2),
        "tasks": list(tasks),
        "parts": {"tokenizer": "tokenizer", "backbone": "backbone", **({"refiner": "refiner"} if refiner else {}),
                  **({"tensor": "tensor"} if tensor else {})},
    }
    info.update(extra or {})
    return info


def save_bundle(folder, tokenizer, backbone, vsr=None, *, name: str = "bundle", tasks=(), sequence_format="scan",
                tensor=None) -> Path:
    """Write a bundle folder (every part in its library's own layout, safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save_pretrained(folder / "tokenizer", safe_serialization=True)
    backbone.save_pretrained(folder / "backbone", safe_serialization=True)
    if vsr is not None:                             # the VSR part keeps its folder name, refiner/
        vsr.save_pretrained(folder / "refiner")
    if tensor is not None:                          # a TensorAdapter (or a TensorAR: only its adapter is written)
        getattr(tensor, "adapter", tensor).save_pretrained(folder / "tensor")
    info = manifest(tokenizer, backbone, name=name, tasks=list(tasks), sequence_format=sequence_format, refiner=vsr is not None,
                    tensor=tensor is not None)
    (folder / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def read_safetensors(folder: Path, part: str, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a part folder: one *.safetensors file or a sharded set with its index.

    With `device`/`dtype`, each tensor is moved and cast as it is read, so a 7B checkpoint never
    needs a second full copy in host memory (peak = the loaded model + one tensor).
    """
    from safetensors import safe_open

    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BundleError(f"{part}: no .safetensors weights in {folder}")
    state = {}
    for file in files:
        if not file.exists():
            raise BundleError(f"{part}: shard {file.name} listed in the index is missing from {folder}")
        try:
            with safe_open(file, framework="pt", device=str(device or "cpu")) as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except Exception as error:
            raise BundleError(f"{part}: cannot read {file.name} ({error}); the file is corrupt or incomplete") from error
    return state


def load_strict(module: torch.nn.Module, state: dict, part: str) -> None:
    """load_state_dict(strict=True) with a one-line error naming what differs."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        problems = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                    f"wrong shape {few(wrong)}" if wrong else ""]
        raise BundleError(f"{part}: weights do not match the config: " + "; ".join(p for p in problems if p))
    module.load_state_dict(state, strict=True, assign=any(p.is_meta for p in module.parameters()))


def _read_json(path: Path, part: str) -> dict:
    if not path.exists():
        raise BundleError(f"{part}: {path.name} is missing in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{part}: {path} is not valid JSON ({error.msg} at line {error.lineno})") from error


def load_tokenizer_part(folder: Path, pixel_range=None):
    """A tokenizer/ folder as a VQTokenizer reading and writing `pixel_range` (None: [-1, 1], see pixel_range_of)."""
    from diffusers import VQModel

    from .local_vq import LocalVQModel
    from .tokenizer import VQTokenizer

    config = _read_json(folder / "config.json", "tokenizer")
    model_class = LocalVQModel if config.get("_class_name") == "LocalVQModel" else VQModel   # 2nd / 1st generation
    try:
        model = model_class.from_config(config)
    except Exception as error:
        raise BundleError(f"tokenizer: config.json does not describe a {model_class.__name__} ({error})") from error
    load_strict(model, read_safetensors(folder, "tokenizer"), "tokenizer")
    return VQTokenizer(model.float().eval(), pixel_range=pixel_range)


def load_backbone_part(folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    _read_json(folder / "config.json", "backbone")
    try:
        config = LlamaConfig.from_pretrained(folder)
    except Exception as error:
        raise BundleError(f"backbone: config.json is not a Llama config ({error})") from error
    config._attn_implementation = "sdpa"
    with torch.device("meta"):           # no random init: a 7B model loads without a second copy
        model = LlamaForCausalLM(config)
    state = read_safetensors(folder, "backbone", device=device, dtype=dtype)
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    load_strict(model, state, "backbone")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)   # buffers are not in the state dict
    model = model.to(device=device, dtype=dtype).eval()
    # rebuilt after the cast so inv_freq stays float32 (as transformers' from_pretrained keeps it):
    # fp16 RoPE frequencies drift by radians at position 4096
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model


def load_refiner_part(folder: Path):
    from .refiners.self_refine import SelfRefiner

    config = _read_json(folder / "config.json", "refiner")
    try:
        refiner = SelfRefiner(**config)
    except (TypeError, ValueError) as error:
        raise BundleError(f"refiner: config.json does not match the g_phi arguments ({error})") from error
    load_strict(refiner, read_safetensors(folder, "refiner"), "refiner")
    return refiner.eval()


def load_tensor_part(folder, backbone: torch.nn.Module, part: str = "tensor"):
    """A bundle's `tensor/` (or `tensor-control/`) folder -> TensorAR over `backbone`; strict, safetensors only."""
    from .drafts.tensor import TensorAdapter, attach

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


def resolve(source: str | Path | None, revision: str | None = None) -> Path:
    """A local folder for a bundle: the default, a path, or a Hub repo id (snapshot_download)."""
    if source is None or str(source) in ("", "default", "retouch-tiny"):
        return DEFAULT_BUNDLE
    path = Path(str(source)).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(str(source)):
        return hub_snapshot(str(source), revision)
    raise BundleError(f"{source}: no such folder, and not a Hub repo id of the form org/name")


def load_bundle(source: str | Path | None = None, revision: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Bundle:
    """Load a bundle strictly from the default, a local folder or a Hub repo id (+ revision)."""
    folder = resolve(source, revision)
    info = _read_json(folder / "bundle.json", "bundle")
    if info.get("format") != FORMAT:
        raise BundleError(f"bundle: {folder / 'bundle.json'} is not a {FORMAT} manifest")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"bundle: format version {info['format_version']} is newer than this code ({FORMAT_VERSION}); update Retouch")
    parts = info.get("parts", {})
    for part in ("tokenizer", "backbone"):
        if part not in parts or not (folder / parts[part]).is_dir():
            raise BundleError(f"bundle: the {part} part is missing in {folder} (expected folder {parts.get(part, part)}/)")
    tokenizer = load_tokenizer_part(folder / parts["tokenizer"], pixel_range_of(info, str(folder / "bundle.json")))
    tokenizer.model.to(device)
    backbone = load_backbone_part(folder / parts["backbone"], dtype=dtype, device=device)
    if int(backbone.config.vocab_size) != int(info.get("vocab_size", backbone.config.vocab_size)):
        raise BundleError(f"backbone: vocabulary {backbone.config.vocab_size} does not match bundle.json ({info['vocab_size']})")
    if tokenizer.codebook_size != int(info["codebook_size"]):
        raise BundleError(f"tokenizer: {tokenizer.codebook_size} codes, bundle.json says {info['codebook_size']}")
    refiner = None
    if "refiner" in parts:
        if not (folder / parts["refiner"]).is_dir():
            raise BundleError(f"bundle: the refiner part is listed but {parts['refiner']}/ is missing in {folder}")
        refiner = load_refiner_part(folder / parts["refiner"]).to(device)
    tensor = None
    if "tensor" in parts:
        if not (folder / parts["tensor"]).is_dir():
            raise BundleError(f"bundle: the tensor part is listed but {parts['tensor']}/ is missing in {folder}")
        tensor = load_tensor_part(folder / parts["tensor"], backbone)
    return Bundle(info=info, tokenizer=tokenizer, backbone=backbone, vsr=refiner, source=str(source or "default"),
                  tensor=tensor, folder=folder)
