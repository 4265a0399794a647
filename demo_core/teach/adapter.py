"""A LoRA adapter over a frozen LlamaForCausalLM backbone, applied per run, never copied into it.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., arXiv:2106.09685), Eq. 3:
h = W0 x + (alpha / r) B A x, with A random and B = 0 at the start, so an untrained adapter is the
backbone exactly. Targets: the attention q/k/v/o and the SwiGLU MLP gate/up/down projections of every
layer. The quality tokens <good>/<bad> are ordinary vocabulary logits, so the same adapter moves the
quality head too.

Applying: `applied(model, adapter)` is a context manager that (1) registers forward hooks on the target
Linear layers (transformers' forward: training, `TransformersRunner`) and (2) hands the adapter to the
fast path (`fast_llama.FastLlama` adds `delta(...)` to its fused projections); on exit both are removed.
It holds the model's own lock meanwhile, so one adapter (or none) is in force at a time, whichever
thread asks: the engine applies it around each step of a run, never across a yield, so a run without the
adapter always sees the plain backbone. The backbone's weights are never written.

On disk (a bundle part): a folder with `adapter.safetensors` + `config.json` (rank, alpha, targets, the
backbone's shape, the base bundle's name and the fingerprint of the base backbone's weights).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import weakref
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..drafts.tensor_adapter import LoRA

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
FORMAT = "retouch-task-adapter"
WEIGHTS = "adapter.safetensors"
CONFIG = "config.json"
MAX_BYTES = 2 * 2**20           # an adapter file stays small enough to download and keep in a session


class AdapterError(ValueError):
    """An adapter that cannot be used here (wrong backbone, unreadable folder); the message is one line."""


@dataclass
class AdapterConfig:
    """What an adapter is; every field is JSON (config.json)."""

    rank: int = 8                                   # r: 8 keeps the default's adapter at 0.66 MB (fp32)
    alpha: float = 16.0                             # scale alpha / r = 2
    targets: tuple[str, ...] = TARGETS              # which projections of every layer get A, B
    hidden_size: int = 0                            # the backbone's shape (filled by `for_backbone`)
    num_layers: int = 0
    kv_size: int = 0
    intermediate_size: int = 0
    base_name: str = ""                             # the base bundle's name (bundle.json "name")
    base_fingerprint: str = ""                      # backbone_fingerprint() of the weights it was taught on
    info: dict = field(default_factory=dict)        # free-form: steps, pairs, loss (shown, never checked)


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex) over the backbone's state dict (names, shapes, values), cached until a weight changes.

    Floating-point values are hashed rounded to float16, so the same bundle loaded in float32 (CPU) or float16 (a
    GPU) gives the same fingerprint and an adapter taught on one runs on the other."""
    signature = tuple((name, p.data_ptr(), p._version) for name, p in model.state_dict(keep_vars=True).items())
    cached = getattr(model, "_retouch_fingerprint", None)
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu()
        tensor = (tensor.to(torch.float16) if tensor.is_floating_point() else tensor).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    value = digest.hexdigest()[:16]
    object.__setattr__(model, "_retouch_fingerprint", (signature, value))
    return value


def _projection(layer: nn.Module, target: str) -> nn.Linear:
    return getattr(layer.self_attn if target in ATTENTION_TARGETS else layer.mlp, target)


class TaskAdapter(nn.Module):
    """LoRA (down, up: drafts/tensor_adapter.LoRA) on the chosen projections of every layer of one backbone shape. Float32 always."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        unknown = [t for t in config.targets if t not in TARGETS]
        if unknown:
            raise AdapterError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
        if config.rank < 1:
            raise AdapterError(f"LoRA rank must be at least 1, got {config.rank}")
        config.targets = tuple(config.targets)
        self.config = config
        d, kv, m = config.hidden_size, config.kv_size, config.intermediate_size
        shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
                  "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}        # (in, out)
        self.layers = nn.ModuleList(nn.ModuleDict({t: LoRA(*shapes[t], config.rank, config.alpha) for t in config.targets})
                                    for _ in range(config.num_layers))

    @classmethod
    def for_backbone(cls, model: nn.Module, base_name: str = "", rank: int = 8, alpha: float = 16.0,
                     targets=TARGETS, seed: int = 0) -> "TaskAdapter":
        """A fresh adapter shaped for `model` (any LlamaForCausalLM), fingerprinted to its current weights."""
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        config = AdapterConfig(rank=int(rank), alpha=float(alpha), targets=tuple(targets), hidden_size=int(c.hidden_size),
                               num_layers=int(c.num_hidden_layers), kv_size=int(c.num_key_value_heads * head_dim),
                               intermediate_size=int(c.intermediate_size), base_name=base_name,
                               base_fingerprint=backbone_fingerprint(model))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = cls(config)
        return adapter.to(next(model.parameters()).device)

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    # -- matching a backbone ------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """AdapterError (one line) unless this adapter was taught on exactly these backbone weights."""
        c = self.config
        if int(model.config.num_hidden_layers) != c.num_layers or int(model.config.hidden_size) != c.hidden_size:
            raise AdapterError(f"this adapter was taught on a backbone of {c.num_layers} layers of width {c.hidden_size} "
                               f"({c.base_name or 'unnamed'}), not this model's {model.config.num_hidden_layers} of width "
                               f"{model.config.hidden_size}; teach it again on this model")
        if c.base_fingerprint != backbone_fingerprint(model):
            raise AdapterError(f"this adapter was taught on other backbone weights ({c.base_name or 'unnamed'}, fingerprint "
                               f"{c.base_fingerprint}, this model's is {backbone_fingerprint(model)}); teach it again on this model")

    # -- the fast path's deltas -------------------------------------------------------------------------
    def delta(self, layer: int, targets: tuple[str, ...], sizes: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        """The summed-in delta of a fused projection: each target's LoRA output (zeros where it has none), concatenated."""
        loras = self.layers[layer]
        parts = [loras[t](x.float()) if t in loras else x.new_zeros(*x.shape[:-1], size, dtype=torch.float32)
                 for t, size in zip(targets, sizes)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).to(x.dtype)

    # -- files ------------------------------------------------------------------------------------------
    def save(self, folder) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))
        config = asdict(self.config)
        config["targets"] = list(config["targets"])
        (folder / CONFIG).write_text(json.dumps({"format": FORMAT, **config}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder, model: nn.Module | None = None) -> "TaskAdapter":
        """Read an adapter folder strictly; with `model`, also refuse it unless it was taught on that backbone."""
        folder = Path(folder)
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise AdapterError(f"{folder} is not an adapter folder (it needs {CONFIG} and {WEIGHTS})")
        return cls.from_bytes((folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes(), model, where=str(folder))

    @classmethod
    def from_bytes(cls, config: bytes, weights: bytes, model: nn.Module | None = None,
                   where: str = "the adapter") -> "TaskAdapter":
        """An adapter from its two files' contents (a folder's or a zip's, read in memory), as strictly as `load`."""
        from safetensors.torch import load as load_weights

        try:
            raw = json.loads(config)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AdapterError(f"{where}: {CONFIG} is not valid JSON ({getattr(error, 'msg', error)})") from error
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise AdapterError(f"{where}: {CONFIG} is not a {FORMAT} config")
        if len(weights) > MAX_BYTES + 2**16:
            raise AdapterError(f"{where}: {WEIGHTS} is {len(weights) / 2**20:.1f} MB; an adapter is at most "
                               f"{MAX_BYTES / 2**20:.0f} MB")
        try:
            adapter = cls(AdapterConfig(**raw))
            state = load_weights(bytes(weights))
        except (TypeError, ValueError, OSError, RuntimeError) as error:
            raise AdapterError(f"{where}: cannot read the adapter ({error})") from error
        own = adapter.state_dict()
        if set(state) != set(own) or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
            raise AdapterError(f"{where}: the weights in {WEIGHTS} do not match {CONFIG}")
        adapter.load_state_dict(state, strict=True)
        if model is not None:
            adapter.check(model)
            adapter.to(next(model.parameters()).device)
        return adapter.eval()


# -- applying it -----------------------------------------------------------------------------------------

def _model_lock(model: nn.Module) -> threading.RLock:
    """The model's adapter lock (kept beside the model, not on it: a deepcopy of the model must not copy a lock)."""
    with _CREATE_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    return lock


_CREATE_LOCK = threading.Lock()
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()


def _hook(lora: LoRA, module, args, output):
    return output + lora(args[0].to(lora.up.dtype)).to(output.dtype)


def active_adapter(model: nn.Module) -> TaskAdapter | None:
    """The adapter in force on `model` right now (the fast path asks on every forward)."""
    return getattr(model, "_retouch_adapter", None)


@contextlib.contextmanager
def applied(model: nn.Module, adapter: TaskAdapter | None):
    """Run `model` with `adapter` (None: the plain backbone) inside the block; holds the model's adapter lock.

    Re-entrant in one thread (the same adapter again is a no-op; a different one is refused)."""
    with _model_lock(model):
        current = active_adapter(model)
        if current is not None:
            if current is not adapter:
                raise AdapterError("another adapter is already applied to this backbone in this thread")
            yield model
            return
        if adapter is None:
            yield model
            return
        handles = []
        try:
            for layer, loras in zip(model.model.layers, adapter.layers, strict=True):
                for target, lora in loras.items():
                    handles.append(_projection(layer, target).register_forward_hook(partial(_hook, lora)))
            object.__setattr__(model, "_retouch_adapter", adapter)
            yield model
        finally:
            for handle in handles:
                handle.remove()
            if "_retouch_adapter" in model.__dict__:
                del model.__dict__["_retouch_adapter"]
