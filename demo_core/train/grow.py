"""Grow a trained backbone deeper without changing what it computes (function-preserving depth growth).

Why. On two CPU cores a backbone trained from scratch needs days, and retouch-16's 4-layer model has been flat at
~39 % validation token accuracy for thousands of steps with training accuracy no higher (docs/training.md, session
16). Growing it keeps every step already paid for: the grown model starts exactly where the small one is and the new
layers add capacity from there (the idea of Net2Net, Chen et al. 2016, and of stacking-based growth for
transformers, Gong et al. 2019).

How. Target layer j copies source layer floor(j * L / L'). The first copy of a source layer is exact; every later
copy has its attention output projection (o_proj) and MLP down projection (down_proj) zeroed, so it adds nothing to
the residual stream until training moves those matrices (their gradients are not zero: the copy's attention and MLP
activations are those of a trained layer). Embeddings, the final norm and the head are copied. The grown model's
logits equal the source's (a test checks it).
"""
from __future__ import annotations

import copy

import torch


def layer_sources(source_layers: int, target_layers: int) -> list[tuple[int, bool]]:
    """For each target layer, (source layer index, whether it starts as a no-op copy)."""
    if target_layers < source_layers:
        raise ValueError(f"cannot grow {source_layers} layers into {target_layers}: growing only adds layers")
    seen: set[int] = set()
    plan = []
    for j in range(target_layers):
        index = j * source_layers // target_layers
        plan.append((index, index in seen))
        seen.add(index)
    return plan


def grow_depth(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """Fill `target` (a LlamaForCausalLM of the same width and vocabulary, with at least as many layers) from `source`
    so that both compute the same logits; returns `target`."""
    small, big = source.model.layers, target.model.layers
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if getattr(source.config, name) != getattr(target.config, name):
            raise ValueError(f"depth growth keeps the width: source {name} {getattr(source.config, name)} != "
                             f"target {getattr(target.config, name)}")
    with torch.no_grad():
        target.model.embed_tokens.load_state_dict(source.model.embed_tokens.state_dict())
        target.model.norm.load_state_dict(source.model.norm.state_dict())
        target.lm_head.load_state_dict(source.lm_head.state_dict())
        for j, (index, silent) in enumerate(layer_sources(len(small), len(big))):
            layer = copy.deepcopy(small[index])
            if silent:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    if module.bias is not None:
                        module.bias.zero_()
            big[j].load_state_dict(layer.state_dict())
    return target
