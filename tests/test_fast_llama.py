"""The plain-torch decoder must reproduce transformers' LlamaForCausalLM exactly (to float tolerance)."""
import pytest
import torch

from demo_core.fast_llama import FastLlama, fast_runner, supported


def hf_logits(model, ids, positions, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, attention_mask=mask if mask is not None else torch.ones_like(ids),
                     use_cache=False).logits


def gqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("which", ["default", "gqa"])
def test_prefill_then_steps_match_an_uncached_forward(tiny_model, which):
    model = tiny_model if which == "default" else gqa_model()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 40), generator=generator)
    positions = torch.cat([torch.arange(30), 30 + torch.randperm(10, generator=generator)])[None].repeat(2, 1)  # cell-aligned jumps
    reference = hf_logits(model, ids, positions)
    runner = FastLlama(model)
    out = runner(ids[:, :30], positions[:, :30])
    assert torch.allclose(out.logits, reference[:, :30], atol=1e-5)
    cache = out.past_key_values
    for start in range(30, 40, 2):                       # two tokens per step, as the draft loop feeds them
        out = runner(ids[:, start:start + 2], positions[:, start:start + 2], past_key_values=cache)
        assert torch.allclose(out.logits, reference[:, start:start + 2], atol=1e-5)
    assert cache.get_seq_length() == 40
    last = runner(ids, positions, logits_to_keep=1).logits
    assert last.shape[1] == 1 and torch.allclose(last, reference[:, -1:], atol=1e-5)


def test_cache_grows_keeps_and_selects_every_layer_alike(tiny_model):
    """One buffer holds all layers: growing past 256 slots, a SCAN edit and a candidate pick move them together."""
    from demo_core.refiners.scan import select_cache_batch, select_cache_positions

    ids = torch.randint(0, 30, (2, 300))
    positions = torch.arange(300)[None].repeat(2, 1)
    runner = FastLlama(tiny_model)
    cache = runner(ids[:, :200], positions[:, :200]).past_key_values
    out = runner(ids[:, 200:], positions[:, 200:], past_key_values=cache)
    assert torch.allclose(out.logits, hf_logits(tiny_model, ids, positions)[:, 200:], atol=1e-5)
    before = [(layer.key_buffer[..., :300, :].clone(), layer.value_buffer[..., :300, :].clone()) for layer in cache.layers]
    keep = torch.tensor([0, 1, 2, 150, 299])
    select_cache_positions(cache, keep)
    select_cache_batch(cache, 1)
    assert cache.get_seq_length() == 5 == cache.layers[1].get_seq_length()
    for layer, (keys, values) in zip(cache.layers, before):
        assert torch.equal(layer.key_buffer[..., :5, :], keys[1:2].index_select(-2, keep))
        assert torch.equal(layer.value_buffer[..., :5, :], values[1:2].index_select(-2, keep))


def test_four_d_mask_and_cache_edits_match_transformers(tiny_model):
    """SCAN's forward: new pairs that see the cache and only themselves, then keep some positions."""
    from transformers.cache_utils import DynamicCache

    from demo_core.refiners.scan import select_cache_positions

    ids = torch.randint(0, 30, (1, 20))
    positions = torch.arange(20)[None]
    runner = FastLlama(tiny_model)
    fast_cache = runner(ids, positions).past_key_values
    hf_cache = DynamicCache()
    with torch.no_grad():
        tiny_model(input_ids=ids, position_ids=positions, past_key_values=hf_cache, use_cache=True)
    new = torch.randint(0, 30, (1, 4))
    new_positions = torch.tensor([[3, 3, 7, 7]])
    mask = torch.zeros(1, 1, 4, 24, dtype=torch.bool)
    mask[..., :20] = True
    for i in range(4):
        mask[0, 0, i, 20 + i] = True
    mask[0, 0, 1, 20] = mask[0, 0, 3, 22] = True
    fast = runner(new, new_positions, past_key_values=fast_cache, attention_mask=mask).logits
    with torch.no_grad():
        slow = tiny_model(input_ids=new, position_ids=new_positions, past_key_values=hf_cache, use_cache=True,
                          attention_mask=mask).logits
    assert torch.allclose(fast, slow, atol=1e-5)
    keep = torch.tensor([0, 1, 5, 20, 21])
    select_cache_positions(fast_cache, keep)
    assert fast_cache.get_seq_length() == 5
    assert torch.equal(fast_cache.layers[1].key_buffer[..., :5, :], hf_cache.layers[1].keys.index_select(-2, keep))


def test_runner_follows_weight_changes_and_falls_back_when_unsupported(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    runner = fast_runner(model)
    assert isinstance(runner, FastLlama) and fast_runner(model) is runner and "_retouch_fast" not in model.state_dict()
    ids, positions = torch.randint(0, 30, (1, 8)), torch.arange(8)[None]
    before = runner(ids, positions).logits
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)     # e.g. a trainer stepped in between
    after = runner(ids, positions).logits
    assert not torch.allclose(before, after) and torch.allclose(after, hf_logits(model, ids, positions), atol=1e-5)
    model.config.hidden_act = "gelu"
    assert not supported(model)


def test_runner_refuses_foreign_caches_and_masks_and_sees_assigned_weights(tiny_model):
    import copy

    from transformers.cache_utils import DynamicCache

    model = copy.deepcopy(tiny_model)
    runner = FastLlama(model)
    ids, positions = torch.randint(0, 30, (1, 6)), torch.arange(6)[None]
    with pytest.raises(TypeError, match="FastCache"):
        runner(ids, positions, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="padding"):
        runner(ids, positions, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="booleans"):
        runner(ids, positions, attention_mask=torch.zeros(1, 1, 6, 6))
    before = runner(ids, positions).logits
    state = {k: v * 1.5 if k.endswith("o_proj.weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)                     # new tensors, fresh version counters
    after = runner(ids, positions).logits
    assert not torch.allclose(before, after) and torch.allclose(after, hf_logits(model, ids, positions), atol=1e-5)


def test_bfloat16_compute_keeps_float32_weights_and_stays_close(tiny_model, monkeypatch):
    """The CPU fast path: bf16 copies of the fused weights, float32 logits near the float32 forward's."""
    import copy

    from demo_core.fast_llama import compute_dtype

    model = copy.deepcopy(tiny_model)
    ids, positions = torch.randint(0, 30, (2, 24)), torch.arange(24)[None].repeat(2, 1)
    reference = hf_logits(model, ids, positions)
    runner = FastLlama(model, torch.bfloat16)
    out = runner(ids[:, :20], positions[:, :20])
    step = runner(ids[:, 20:], positions[:, 20:], past_key_values=out.past_key_values)
    logits = torch.cat([out.logits, step.logits], 1)
    assert logits.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert runner.weights[0][0][1].dtype == torch.bfloat16 and out.past_key_values.layers[0].key_buffer.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (logits - reference).abs().max() < 0.05 * scale
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    monkeypatch.setenv("RETOUCH_FAST_DTYPE", "bfloat16")
    assert compute_dtype(model) == torch.bfloat16 and fast_runner(model).dtype == torch.bfloat16
    monkeypatch.setenv("RETOUCH_FAST_DTYPE", "float32")
    assert compute_dtype(model) == torch.float32 and fast_runner(model).dtype == torch.float32   # rebuilt on change
    monkeypatch.setenv("RETOUCH_FAST_DTYPE", "half-ish")
    with pytest.raises(ValueError, match="RETOUCH_FAST_DTYPE"):
        compute_dtype(model)


def test_auto_precision_is_the_faster_one_measured_once(tiny_model, monkeypatch):
    """On a bf16-capable CPU a small float32 model computes in whichever dtype its decoding step measured faster;
    bfloat16 must win by CALIBRATION_MARGIN (a near tie keeps float32); a large model takes bfloat16 outright."""
    import copy

    from demo_core import fast_llama

    monkeypatch.setenv("RETOUCH_FAST_DTYPE", "auto")
    monkeypatch.setattr(fast_llama, "bf16_supported", lambda: True)
    measured = []

    def fake(speeds):
        def step_ms(model, dtype, steps, prefill):
            measured.append(dtype)
            return speeds[dtype]
        return step_ms

    model = copy.deepcopy(tiny_model)
    monkeypatch.setattr(fast_llama, "_step_ms", fake({torch.float32: 10.0, torch.bfloat16: 5.0}))
    assert fast_llama.compute_dtype(model) == torch.bfloat16 and fast_runner(model).dtype == torch.bfloat16
    assert fast_llama.compute_dtype(model) == torch.bfloat16 and len(measured) == 2          # measured once
    assert fast_llama.calibration(model) == {"dtype": torch.bfloat16, "float32_ms": 10.0, "bfloat16_ms": 5.0}
    model = copy.deepcopy(tiny_model)
    monkeypatch.setattr(fast_llama, "_step_ms", fake({torch.float32: 10.0, torch.bfloat16: 9.5}))
    assert fast_llama.compute_dtype(model) == torch.float32                                   # within the margin
    model = copy.deepcopy(tiny_model)
    monkeypatch.setattr(fast_llama, "CALIBRATION_MAX_PARAMS", 0)
    assert fast_llama.compute_dtype(model) == torch.bfloat16 and len(measured) == 4           # not measured
    monkeypatch.setattr(fast_llama, "bf16_supported", lambda: False)
    assert fast_llama.compute_dtype(copy.deepcopy(tiny_model)) == torch.float32               # no native bf16


def test_the_calibration_step_really_runs(tiny_model):
    from demo_core import fast_llama

    assert fast_llama._step_ms(tiny_model, torch.float32, steps=3, prefill=16) > 0
    assert fast_llama._step_ms(tiny_model, torch.bfloat16, steps=3, prefill=16) > 0
