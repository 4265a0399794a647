"""A plain-torch forward for small `LlamaForCausalLM`s: the draft loop's and SCAN's hot path on CPU.

The default backbone is 4 layers of width 256: one decoding step is ~30 tiny matmuls, and
transformers' per-call machinery (mask building, cache wrappers, module hooks, config lookups)
costs about as much as the maths. This module runs the same weights with fused q/k/v and
gate/up projections, `F.rms_norm`, SDPA and its own KV buffer, and nothing else.

It reads the model's own parameters (re-fused whenever one changes, tracked by tensor version
counters), uses the model's rotary module for cos/sin, and answers the subset of the HF call
signature the loops use: `runner(input_ids=, position_ids=, past_key_values=, attention_mask=,
logits_to_keep=)` -> `.logits`, `.past_key_values`. `fast_runner(model)` returns a
`TransformersRunner` (the model's own forward behind the same interface, its cache a `TransformersCache`)
when its config is outside what this path implements (LVM-7B on a GPU keeps HF's path).
Tests check its logits against transformers' for prefill, steps and SCAN's 4-D masks.

Precision: on a CPU with native bfloat16 matmuls (AVX512-BF16/AMX, `bf16_supported()`), the
fused copies of a float32 model may be kept in bfloat16, the forward computing in bfloat16 and
returning float32 logits. Which is faster depends on the model and the CPU: a decoding step
multiplies a 2-token activation by every weight, so a model whose weights do not stay in cache is
bound by reading them and half the bytes win (retouch-tiny on one Xeon: 0.21 s vs 0.33 s a draft),
while one whose per-layer weights fit in L2 is bound by per-call overhead, where oneDNN's bf16
kernels cost more than float32's (retouch-16 on a Sapphire Rapids Xeon: 1.04 s vs 0.73 s for 255
steps). So a small model's choice is measured once, at its first forward (`calibrated_dtype`: a
few decoding steps in each dtype, ~0.1 s; bfloat16 only when it is at least CALIBRATION_MARGIN
faster), and a large one (LVM-7B) takes bfloat16 outright. `python -m demo_core bench` reports
the choice and both timings. The model's own float32 weights are untouched (training, VSR and
transformers' path use them). RETOUCH_FAST_DTYPE=float32 (or bfloat16) overrides the choice; the
test suite pins float32 so its comparisons with transformers stay exact, and checks the bfloat16
path separately.

A taught task adapter (`teach/adapter.py`, LoRA) in force on the model adds its deltas to the fused
projections (unmerged: the fused weights stay the backbone's own).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def unchanged_prefix(index: torch.Tensor) -> int:
    """How many leading entries of a sorted, distinct position list are 0, 1, 2, ... (positions that stay put)."""
    count = int(index.numel())
    if count == 0 or int(index[-1]) == count - 1:
        return count
    return int((index != torch.arange(count, device=index.device)).int().argmax())


class FastCache:
    """The KV cache of `FastLlama`: the keys and values of `num_layers` layers in one preallocated buffer
    (layers, 2, B, H, capacity, d), grown by doubling. A step writes only its new entries; SCAN's cache edits
    (`keep`, `select_batch`) move every layer's keys and values in one operation instead of two per layer.
    `layers` are per-layer views (the forward's API)."""

    def __init__(self, num_layers: int):
        self.buffer = None
        self.lengths = [0] * num_layers
        self.layers = [FastLayer(self, i) for i in range(num_layers)]

    def update_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        begin = self.lengths[layer]
        end = begin + keys.shape[-2]
        if self.buffer is None or end > self.buffer.shape[-2]:
            capacity = max(256, 1 << (end - 1).bit_length())
            grown = keys.new_empty(len(self.lengths), 2, *keys.shape[:2], capacity, keys.shape[-1])
            used = max(self.lengths)
            if used:
                grown[..., :used, :] = self.buffer[..., :used, :]
            self.buffer = grown
        self.buffer[layer, 0, ..., begin:end, :] = keys
        self.buffer[layer, 1, ..., begin:end, :] = values
        self.lengths[layer] = end
        return self.buffer[layer, 0, ..., :end, :], self.buffer[layer, 1, ..., :end, :]

    def get_seq_length(self) -> int:
        return self.lengths[0]

    def keep(self, index: torch.Tensor, start: int | None = None) -> None:
        """Keep only sequence positions `index` (sorted, distinct) of every layer, compacted to the front. `start`:
        `unchanged_prefix(index)` when the caller already knows it; only the entries after it move."""
        if self.buffer is None:
            return
        if len(set(self.lengths)) != 1:
            raise RuntimeError(f"cache edit between the layers of one forward (lengths {self.lengths})")
        if start is None:
            start = unchanged_prefix(index)      # SCAN keeps the whole committed prefix: move only the tail
        kept = self.buffer[..., : self.lengths[0], :].index_select(-2, index[start:])
        count = int(index.numel())
        self.buffer[..., start:count, :] = kept
        self.lengths = [count] * len(self.lengths)

    def select_batch(self, row: int) -> None:
        """Keep one batch row (the chosen candidate)."""
        self.buffer = self.buffer[:, :, row:row + 1].clone()

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (what a scoring pass appended after a kept prefix)."""
        self.lengths = [min(length, used) for used in self.lengths]

    def repeated(self, count: int) -> "FastCache":
        """A new cache holding this one's (batch-1) entries `count` times over the batch: one row per candidate."""
        copy = FastCache(len(self.lengths))
        copy.buffer, copy.lengths = self.buffer.repeat(1, 1, count, 1, 1, 1), list(self.lengths)
        return copy


class FastLayer:
    """One layer's view of a `FastCache`."""

    def __init__(self, store: FastCache, index: int):
        self.store, self.index = store, index

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        return self.store.update_layer(self.index, keys, values)

    def get_seq_length(self) -> int:
        return self.store.lengths[self.index]

    @property
    def key_buffer(self) -> torch.Tensor:
        return self.store.buffer[self.index, 0]

    @property
    def value_buffer(self) -> torch.Tensor:
        return self.store.buffer[self.index, 1]


class TransformersCache:
    """transformers' `DynamicCache` behind the `FastCache` interface (`get_seq_length`, `keep`, `select_batch`), for
    `TransformersRunner`: the caches of both runners are edited the same way, so the loops never ask which they have."""

    def __init__(self, dynamic=None):
        from transformers.cache_utils import DynamicCache

        self.dynamic = DynamicCache() if dynamic is None else dynamic

    @property
    def layers(self):
        return self.dynamic.layers

    def get_seq_length(self) -> int:
        return int(self.dynamic.get_seq_length())

    def keep(self, index: torch.Tensor, start: int | None = None) -> None:
        """Keep only sequence positions `index` (sorted, distinct) of every layer."""
        for layer in self.dynamic.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)

    def select_batch(self, row: int) -> None:
        """Keep one batch row (the chosen candidate)."""
        for layer in self.dynamic.layers:
            layer.keys = layer.keys[row:row + 1].contiguous()
            layer.values = layer.values[row:row + 1].contiguous()

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on."""
        for layer in self.dynamic.layers:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

    def repeated(self, count: int) -> "TransformersCache":
        """A new cache holding this one's (batch-1) entries `count` times over the batch (views: updates concatenate)."""
        from transformers.cache_utils import DynamicCache

        return TransformersCache(DynamicCache(ddp_cache_data=[(layer.keys.expand(count, -1, -1, -1),
                                                               layer.values.expand(count, -1, -1, -1))
                                                              for layer in self.dynamic.layers]))


@dataclass
class FastOutput:
    logits: torch.Tensor
    past_key_values: FastCache | TransformersCache


class TransformersRunner:
    """A model's own transformers forward behind the runner interface (`FastLlama`'s call signature and a cache with
    `keep`/`select_batch`): for models the fast path does not reproduce, and as the reference the fast path is
    checked against."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 past_key_values: TransformersCache | None = None, attention_mask: torch.Tensor | None = None,
                 logits_to_keep: int = 0, use_cache: bool = True) -> FastOutput:
        cache = past_key_values if past_key_values is not None else TransformersCache()
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache.dynamic, use_cache=True,
                         attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        return FastOutput(out.logits, cache)


def supported(model) -> bool:
    """True when `model` is a LlamaForCausalLM this path reproduces exactly."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return False
    rope = getattr(config, "rope_scaling", None) or {}
    return (config.hidden_act == "silu" and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False) and getattr(config, "pretraining_tp", 1) == 1
            and rope.get("rope_type", rope.get("type", "default")) == "default"
            and next(model.parameters()).device.type == "cpu")


@functools.cache                          # the CPU does not change; fast_runner asks on every forward
def bf16_supported() -> bool:
    """True on CPUs whose oneDNN has native bfloat16 matmuls (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "AVX512" in torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False


CALIBRATION_MARGIN = 1.15          # bfloat16 must be this much faster to be chosen: a near tie keeps float32's numbers
CALIBRATION_MAX_PARAMS = 200_000_000   # above this a decoding step is bound by reading the weights: bfloat16 outright


def compute_dtype(model) -> torch.dtype:
    """The dtype `fast_runner` computes in for `model`: RETOUCH_FAST_DTYPE, else, for a float32 model on a
    bf16-capable CPU, the faster of float32 and bfloat16 (`calibrated_dtype`), else the model's own dtype."""
    own = next(model.parameters()).dtype
    wanted = os.environ.get("RETOUCH_FAST_DTYPE", "auto").strip().lower()
    if wanted in ("float32", "fp32"):
        return torch.float32
    if wanted in ("bfloat16", "bf16"):
        return torch.bfloat16
    if wanted not in ("", "auto"):
        raise ValueError(f"RETOUCH_FAST_DTYPE must be auto, float32 or bfloat16, not {wanted!r}")
    if own != torch.float32 or not bf16_supported():
        return own
    return calibrated_dtype(model)


def calibration(model) -> dict | None:
    """The measurement behind `calibrated_dtype` for `model` (None before its first auto choice):
    {"dtype", "float32_ms", "bfloat16_ms"} (ms per 2-token decoding step; None when not measured)."""
    record = getattr(model, "_retouch_fast_choice", None)
    return None if record is None else record[1]


def calibrated_dtype(model, steps: int = 12, prefill: int = 256) -> torch.dtype:
    """float32 or bfloat16, whichever runs `model`'s 2-token decoding step faster on this CPU (bfloat16 only when
    at least CALIBRATION_MARGIN faster). Measured once per model weights' shapes and kept on the model."""
    config = model.config
    signature = (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size)
    record = getattr(model, "_retouch_fast_choice", None)
    if record is not None and record[0] == signature:
        return record[1]["dtype"]
    if sum(p.numel() for p in model.parameters()) > CALIBRATION_MAX_PARAMS:
        result = {"dtype": torch.bfloat16, "float32_ms": None, "bfloat16_ms": None}
    else:
        times = {dtype: _step_ms(model, dtype, steps, prefill) for dtype in (torch.float32, torch.bfloat16)}
        faster = times[torch.float32] >= CALIBRATION_MARGIN * times[torch.bfloat16]
        result = {"dtype": torch.bfloat16 if faster else torch.float32,
                  "float32_ms": times[torch.float32], "bfloat16_ms": times[torch.bfloat16]}
    object.__setattr__(model, "_retouch_fast_choice", (signature, result))     # not a submodule: no state_dict entry
    return result["dtype"]


@torch.no_grad()
def _step_ms(model, dtype: torch.dtype, steps: int, prefill: int) -> float:
    """Median ms of `steps` cached 2-token forwards after a `prefill`-token prompt (after two warm-up steps)."""
    import time

    runner = FastLlama(model, dtype)
    length = min(prefill, max(2, getattr(model.config, "max_position_embeddings", prefill) - steps * 2 - 8))
    cache = runner(torch.zeros(1, length, dtype=torch.long), torch.arange(length)[None], logits_to_keep=1).past_key_values
    ids = torch.zeros(1, 2, dtype=torch.long)
    times = []
    for step in range(steps + 2):
        position = torch.tensor([[length + 2 * step, length + 2 * step + 1]])
        start = time.perf_counter()
        runner(ids, position, past_key_values=cache)
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    return 1000 * times[len(times) // 2]


class FastLlama:
    """Runs a `LlamaForCausalLM`'s weights with fused projections (see the module docstring).

    `dtype` is the compute dtype (default: the model's); the fused weights are kept in it.
    """

    def __init__(self, model, dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = dtype or next(model.parameters()).dtype
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.num_layers = config.num_hidden_layers
        self._signature = None
        # the modules that hold parameters, found once (walking the module tree costs ~0.25 ms a call); their
        # `_parameters` dicts are read on every call, so replaced Parameters (load_state_dict(assign=True)) are seen
        self._owners = [module for module in model.modules() if module._parameters]
        self._rotary = None               # (cos, sin) of every position up to max_position_embeddings, built at first use
        self._refresh()

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, d) in x's dtype for `position_ids`: rows of a table the model's own rotary module made
        once for every position (each entry is one product and a cos/sin, so a row equals a per-call computation
        exactly); positions past the table fall back to the module."""
        inner = self.model.model
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        if self._rotary is None and limit:
            probe = torch.zeros(1, 1, dtype=torch.float32, device=x.device)
            cos, sin = inner.rotary_emb(probe, torch.arange(limit, device=x.device)[None])
            self._rotary = (cos[0], sin[0])
        if self._rotary is not None and int(position_ids.max()) < self._rotary[0].shape[0]:
            cos, sin = self._rotary[0][position_ids], self._rotary[1][position_ids]
        else:
            cos, sin = inner.rotary_emb(x, position_ids)
        return cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)

    def _refresh(self) -> None:
        # storage, version counter and dtype of every parameter: in-place updates, `p.data = ...`,
        # load_state_dict(assign=True) and casts all re-fuse the projections
        signature = tuple((p.data_ptr(), p._version, p.dtype) for module in self._owners
                          for p in module._parameters.values() if p is not None)
        if signature == self._signature:
            return
        inner = self.model.model
        layers = []                       # built aside, then swapped in: a concurrent call never sees half a list
        dtype = self.dtype
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                layers.append(tuple(w.to(dtype) for w in (
                    layer.input_layernorm.weight,
                    torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    mlp.down_proj.weight,
                )))
            head = (inner.norm.weight.to(dtype), self.model.lm_head.weight.to(dtype))
        self.weights = (layers, head)      # one assignment: a concurrent call sees the old set or the new one
        self._signature = signature

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_key_values: FastCache | None = None,
                 attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0, use_cache: bool = True) -> FastOutput:
        self._refresh()
        inner = self.model.model
        cache = past_key_values if past_key_values is not None else FastCache(self.num_layers)
        if not isinstance(cache, FastCache):
            raise TypeError(f"FastLlama needs its own FastCache, got {type(cache).__name__} (a cache built by another forward)")
        if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dim() == 4:
            raise ValueError("FastLlama takes 4-D attention masks as booleans (True = may attend)")
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError("FastLlama does not implement padding masks; use the transformers forward")
        batch, length = input_ids.shape
        past = cache.get_seq_length()
        x = inner.embed_tokens(input_ids).to(self.dtype)
        cos, sin = self.rotary(x, position_ids)                                  # (B, 1, T, d)
        mask, causal = None, False
        if attention_mask is not None and attention_mask.dim() == 4:   # additive, in the compute dtype, once: SDPA
            mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device).masked_fill_(   # would convert a
                attention_mask.logical_not(), float("-inf"))                                        # boolean per layer
        elif length > 1 and past:   # causal among the new tokens, all of the past visible: only the new block's upper triangle
            mask = torch.zeros(length, past + length, dtype=x.dtype, device=x.device)
            mask[:, past:] = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        elif length > 1:
            causal = True
        q_size = self.heads * self.head_dim
        half = self.head_dim // 2
        layers, (norm, head) = self.weights
        adapter = getattr(self.model, "_retouch_adapter", None)      # a taught LoRA in force (teach/adapter.py), or None
        kv_size = self.kv_heads * self.head_dim
        for index, ((norm_in, w_qkv, w_o, norm_post, w_gate_up, w_down), layer_cache) in enumerate(
                zip(layers, cache.layers, strict=True)):
            h = F.rms_norm(x, (x.shape[-1],), norm_in, self.eps)
            qkv = F.linear(h, w_qkv)
            if adapter is not None:
                qkv = qkv + adapter.delta(index, ("q_proj", "k_proj", "v_proj"), (q_size, kv_size, kv_size), h)
            qkv = qkv.view(batch, length, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            qk, v = qkv[:, : self.heads + self.kv_heads], qkv[:, self.heads + self.kv_heads:]
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin      # rotary on q and k at once
            q, k = qk.split([self.heads, self.kv_heads], dim=1)
            keys, values = layer_cache.update(k, v)
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                      enable_gqa=self.kv_heads != self.heads)
            attended = attended.transpose(1, 2).reshape(batch, length, q_size)
            out = F.linear(attended, w_o)
            if adapter is not None:
                out = out + adapter.delta(index, ("o_proj",), (x.shape[-1],), attended)
            x = x + out
            h = F.rms_norm(x, (x.shape[-1],), norm_post, self.eps)
            gate_up = F.linear(h, w_gate_up)
            if adapter is not None:
                gate_up = gate_up + adapter.delta(index, ("gate_proj", "up_proj"), (w_down.shape[1],) * 2, h)
            gate, up = gate_up.chunk(2, dim=-1)
            inner_act = F.silu(gate) * up
            out = F.linear(inner_act, w_down)
            if adapter is not None:
                out = out + adapter.delta(index, ("down_proj",), (x.shape[-1],), inner_act)
            x = x + out
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(F.rms_norm(x, (x.shape[-1],), norm, inner.norm.variance_epsilon), head)
        return FastOutput(logits.to(self.model.lm_head.weight.dtype), cache)


def fast_runner(model):
    """The model's `FastLlama` (built once and kept on the model), or a `TransformersRunner` when unsupported.

    Its compute dtype is `compute_dtype(model)`; a change (of the model's dtype or RETOUCH_FAST_DTYPE) builds a new one.
    """
    if not supported(model):            # checked every call: a model moved to a GPU goes back to transformers
        return TransformersRunner(model)
    dtype = compute_dtype(model)
    runner = getattr(model, "_retouch_fast", None)
    if runner is not None and runner.dtype == dtype:
        return runner
    runner = FastLlama(model, dtype)
    object.__setattr__(model, "_retouch_fast", runner)     # not a submodule: no state_dict entry
    return runner
