"""TensorAR (drafts/tensor.py) and its trainer (train/tensor.py), on tiny random backbones and bundles."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from demo_core.backbone import SamplingConfig
from demo_core.bundle import BundleError, load_bundle, load_tensor_part
from demo_core.drafts.tensor import (SCHEDULES, TensorAdapter, TensorAR, add_tensor_noise, answer_windows, attach,
                                     draft_tensor, noise_schedule, self_draft_windows, teacher_forced_logits)
from demo_core.testing import build_tiny_bundle, tiny_parts
from demo_core.train import tensor as trainer
from demo_core.train.refiner import state_fingerprint


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def wrapper(backbone, vocab, k=4, randomise=True, seed=0, **kwargs):
    """A TensorAR over `backbone`; untrained it is the identity, so tests give it weights that change things."""
    torch.manual_seed(seed)
    adapter = TensorAdapter.for_backbone(backbone, vocab.codebook_size, k=k, heads=4, **kwargs)
    if randomise:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in adapter.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return TensorAR(backbone, adapter.eval())


def context_of(vocab, images=3, seed=0, batch=None):
    generator = torch.Generator().manual_seed(seed)
    shape = (images * vocab.cells,) if batch is None else (batch, images * vocab.cells)
    return torch.randint(0, vocab.codebook_size, shape, generator=generator)


def run(draft, *args, **kwargs):
    states = []
    steps = list(draft(*args, state_out=states, **kwargs))
    return steps, states[0]


# -- noise -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_noise_schedule_starts_at_zero_rises_and_reaches_one(kind, k):
    beta = noise_schedule(k, kind)
    assert beta.shape == (k,) and beta[0] == 0.0 and beta[-1] == 1.0
    assert (beta[1:] > beta[:-1]).all()


def test_noise_schedule_edge_cases():
    assert noise_schedule(1).tolist() == [0.0]
    assert noise_schedule(4, "linear").tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert noise_schedule(4, "exponential")[1] < noise_schedule(4, "linear")[1] < noise_schedule(4, "sqrt")[1]
    with pytest.raises(ValueError, match="choose from"):
        noise_schedule(4, "cosine")


def test_noise_follows_beta_and_spares_the_front_and_padding():
    k, codebook = 4, 16
    answer = torch.randint(0, codebook, (512, 16), generator=torch.Generator().manual_seed(0))
    windows, valid = answer_windows(answer, k)
    assert torch.equal(windows[:, 3], answer[:, 3:7]) and not valid[0, -1, 1:].any() and valid[:, :, 0].all()
    beta = noise_schedule(k, "linear")
    noisy = add_tensor_noise(windows, valid, beta, codebook, torch.Generator().manual_seed(1))
    assert torch.equal(noisy[..., 0], windows[..., 0])             # beta(0) = 0: the front is never touched
    assert torch.equal(noisy[~valid], windows[~valid])              # padding stays padding
    for j in range(1, k):
        rate = (noisy[..., j] != windows[..., j])[valid[..., j]].float().mean().item()
        assert rate == pytest.approx(beta[j].item() * (1 - 1 / codebook), abs=0.02)


# -- the wrapper -----------------------------------------------------------------------------------------

def test_k1_wrapper_is_the_plain_backbone(parts):
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=1, randomise=False)
    assert model.adapter.encoder is None and model.adapter.decoder is None
    ids = context_of(vocab, batch=2)
    plain = backbone(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits[:, :, 0], plain)
    assert torch.equal(model(windows=ids[..., None]).logits[:, :, 0], plain)     # a 1-token window is the token
    model.remove_hooks()


def test_untrained_wrapper_predicts_the_plain_next_token_in_every_slot(parts):
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=4, randomise=False)
    ids = context_of(vocab, batch=2)
    windows, valid = answer_windows(ids[:, 30:], 4)
    logits = model(input_ids=ids[:, :30], windows=windows, window_valid=valid).logits      # (B, T, 4, V)
    plain = backbone(input_ids=ids).logits
    assert torch.allclose(logits, plain[:, :, None].expand_as(logits), atol=1e-6)
    model.remove_hooks()


def test_lora_only_acts_inside_the_wrapper(parts):
    _, backbone, vocab = parts
    ids = context_of(vocab, batch=1)
    before = backbone(input_ids=ids).logits
    model = wrapper(backbone, vocab, k=4)
    assert not torch.allclose(model(input_ids=ids).logits[:, :, 0], before, atol=1e-4)   # LoRA changes the wrapper ...
    assert torch.equal(backbone(input_ids=ids).logits, before)                          # ... not the shared backbone
    model.remove_hooks()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_cached_and_uncached_logits_agree(parts, k):
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=k, seed=k)
    context = context_of(vocab, images=3)
    steps, state = run(draft_tensor, model, context, vocab.cells, SamplingConfig(candidates=2), torch.Generator().manual_seed(0),
                       keep_logits=True)
    slots = torch.arange(k)
    valid = ((torch.arange(vocab.cells - 1)[:, None] + slots) < vocab.cells)[None].expand(2, -1, -1)
    uncached = teacher_forced_logits(model, context[None].repeat(2, 1), state.windows, valid)    # (2, N, k, V)
    for step, logits in enumerate(state.step_logits):
        assert torch.allclose(uncached[:, step, : logits.shape[1]], logits, atol=1e-4), step
    model.remove_hooks()


# -- decoding --------------------------------------------------------------------------------------------

def test_k1_sliding_decoding_of_an_untrained_adapter_is_the_backbones_raster_draft(parts):
    """k = 1 with an untrained adapter is plain AR in raster order: the same codes as the raster loop (drafts/raster.py)
    on the bare backbone, for the same generator."""
    from demo_core.drafts.raster import draft_raster

    _, backbone, vocab = parts
    sampling = SamplingConfig(temperature=0.0, candidates=3)
    context = context_of(vocab)
    untrained = wrapper(backbone, vocab, k=1, randomise=False)
    states = []
    for _ in draft_raster(backbone, context, vocab.cells, vocab.codebook_size, sampling, None, states):
        pass
    assert torch.equal(run(draft_tensor, untrained, context, vocab.cells, sampling)[1].codes, states[0].codes)
    untrained.remove_hooks()


def test_streaming_reports_every_window_and_finalises_every_cell_once(parts):
    _, backbone, vocab = parts
    k, cells = 4, vocab.cells
    model = wrapper(backbone, vocab, k=k, seed=1)
    steps, state = run(draft_tensor, model, context_of(vocab), cells, SamplingConfig(), torch.Generator().manual_seed(2))
    assert [s.step for s in steps] == list(range(cells))
    assert [s.cells for s in steps] == [list(range(s, min(s + k, cells))) for s in range(cells)]
    assert [s.final_cell for s in steps] == list(range(cells))                          # each cell finalised once, in order
    finals = torch.stack([s.codes[:, 0] for s in steps], 1)
    assert torch.equal(finals, state.codes) and (state.codes >= 0).all() and (state.codes < vocab.codebook_size).all()
    assert state.revisions.tolist() == [min(n + 1, k) for n in range(cells)]
    for before, after in zip(steps, steps[1:]):                         # `previous` is what the last window said
        overlap = len(before.cells) - 1
        assert torch.equal(after.previous[:, :overlap], before.codes[:, 1:])
        assert (after.previous[:, overlap:] == -1).all()
    changed = sum(len(s.changed()) for s in steps)
    assert changed == int(state.changes.sum()) and changed > 0            # random weights: some drafts get revised
    assert torch.equal(state.first[:, : k], steps[0].codes)
    model.remove_hooks()


def test_greedy_draft_of_batched_contexts_matches_single_rows(parts):
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=3, seed=4)
    contexts = context_of(vocab, batch=3)
    greedy = SamplingConfig(temperature=0.0)
    batched = run(draft_tensor, model, contexts, vocab.cells, greedy)[1].codes
    for row in range(3):
        assert torch.equal(run(draft_tensor, model, contexts[row], vocab.cells, greedy)[1].codes[0], batched[row])
    model.remove_hooks()


# -- save / load -----------------------------------------------------------------------------------------

def test_save_load_round_trip_is_strict(parts, tmp_path):
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=4, seed=5)
    model.adapter.save_pretrained(tmp_path / "tensor")
    config = json.loads((tmp_path / "tensor" / "config.json").read_text())
    assert config["k"] == 4 and config["codebook_size"] == vocab.codebook_size
    loaded = load_tensor_part(tmp_path / "tensor", backbone)
    ids = context_of(vocab, batch=1)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    loaded.remove_hooks()
    state = load_file(tmp_path / "tensor" / "model.safetensors")
    state.pop("decoder.slot")
    save_file(state, tmp_path / "tensor" / "model.safetensors")
    with pytest.raises(BundleError, match="tensor: .*missing decoder.slot"):
        load_tensor_part(tmp_path / "tensor", backbone)
    with pytest.raises(Exception):
        TensorAdapter.from_pretrained(tmp_path / "tensor")            # the mixin path is strict too
    model.remove_hooks()


def test_adapter_must_fit_the_backbone(parts):
    _, backbone, vocab = parts
    adapter = TensorAdapter(dim=64, layers=2, kv_dim=64, codebook_size=vocab.codebook_size, k=2, heads=4)
    with pytest.raises(ValueError, match="built for 2 layers of width 64"):
        TensorAR(backbone, adapter)


def test_self_draft_noise_fills_the_overlapped_slots_with_the_models_own_greedy_drafts(parts):
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=3, seed=4)
    context, answer = context_of(vocab, batch=2), context_of(vocab, images=1, seed=5, batch=2)
    windows, valid = answer_windows(answer, 3)
    windows, valid = windows[:, :-1], valid[:, :-1]
    noisy = self_draft_windows(model, context, windows, valid, SamplingConfig(temperature=0.0))
    assert torch.equal(noisy[..., 0], windows[..., 0])                  # the front is the final token, untouched
    assert torch.equal(noisy[~valid], windows[~valid])                  # padding stays padding
    # slot j of window a is what the model predicts for cell a + j when it sees only the fronts (no drafts)
    front_only = valid & (torch.arange(3) == 0)
    logits = teacher_forced_logits(model, context, windows, front_only)[..., : vocab.codebook_size]
    expected = logits[:, : windows.shape[1], 1:].argmax(-1)
    assert torch.equal(noisy[..., 1:][valid[..., 1:]], expected[valid[..., 1:]])
    # those drafts do not depend on the ground truth in slots >= 1
    scrambled = windows.clone()
    scrambled[..., 1:] = (scrambled[..., 1:] + 1) % vocab.codebook_size
    assert torch.equal(self_draft_windows(model, context, scrambled, valid, SamplingConfig(temperature=0.0))[..., 1:],
                       noisy[..., 1:].where(valid[..., 1:], scrambled[..., 1:]))
    one = wrapper(backbone, vocab, k=1, seed=4)
    assert self_draft_windows(one, context, answer[:, :-1, None], torch.ones_like(answer[:, :-1, None], dtype=torch.bool),
                              SamplingConfig()) is not None
    model.remove_hooks()
    one.remove_hooks()


# -- training --------------------------------------------------------------------------------------------

def test_training_steps_lower_the_loss_and_leave_the_backbone_bit_identical(parts):
    _, backbone, vocab = parts
    fingerprint = state_fingerprint(backbone)
    config = trainer.TensorTrainConfig(k=4, heads=4, lr=3e-3)
    torch.manual_seed(0)
    model = attach(backbone, TensorAdapter.for_backbone(backbone, vocab.codebook_size, **config.adapter_kwargs()))
    optimizer = trainer.make_optimizer(model.adapter, config)
    generator = torch.Generator().manual_seed(0)
    context, answer = context_of(vocab, batch=4), context_of(vocab, images=1, seed=9, batch=4)   # one fixed batch

    def loss():
        with torch.no_grad():
            return trainer.tensor_loss(model, *trainer.build_batch(model, context, answer, None, noise="none"))[0].item()

    before = loss()
    logs = [trainer.train_step(model, optimizer, context, answer, generator) for _ in range(12)]
    assert loss() < before - 0.5
    weighted = sum(w * v for w, v in zip(trainer.slot_weights(4).tolist(), logs[0]["slot_loss"]))   # the default: front
    assert len(logs[0]["slot_loss"]) == 4 and logs[0]["loss"] == pytest.approx(weighted, rel=1e-5)
    assert state_fingerprint(backbone) == fingerprint and not any(p.requires_grad for p in backbone.parameters())
    model.remove_hooks()


def test_loss_ignores_padding_and_sums_the_slots(parts):
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=4, seed=6)
    context, answer = context_of(vocab, batch=2), context_of(vocab, images=1, seed=3, batch=2)
    _, windows, valid, targets = trainer.build_batch(model, context, answer, None, noise="none")
    assert windows.shape == (2, vocab.cells - 1, 4) and targets.shape == (2, vocab.cells, 4)
    assert (targets[:, -1, 1:] == -100).all() and torch.equal(targets[:, :, 0], answer)
    total, per_slot, _ = trainer.tensor_loss(model, context, windows, valid, targets)
    logits = teacher_forced_logits(model, context, windows, valid)[..., : vocab.codebook_size]
    last = torch.nn.functional.cross_entropy(logits[:, : vocab.cells - 3, 3].reshape(-1, vocab.codebook_size),
                                             answer[:, 3:].reshape(-1))
    assert per_slot[3].item() == pytest.approx(last.item(), rel=1e-5) and total.item() == pytest.approx(per_slot.sum().item())
    model.remove_hooks()


def test_slot_weights_sum_to_k_and_weigh_the_loss(parts):
    assert trainer.slot_weights(4, "equal").tolist() == [1.0] * 4 and trainer.slot_weights(1).tolist() == [1.0]
    front = trainer.slot_weights(4)
    assert front.sum().item() == pytest.approx(4.0) and (front[1:] / front[:-1]).tolist() == pytest.approx([0.5] * 3)
    with pytest.raises(ValueError, match="choose from"):
        trainer.slot_weights(4, "back")
    _, backbone, vocab = parts
    model = wrapper(backbone, vocab, k=4, seed=2)
    context, answer = context_of(vocab, batch=2), context_of(vocab, images=1, seed=4, batch=2)
    batch = trainer.build_batch(model, context, answer, None, noise="none")
    with torch.no_grad():
        plain, per_slot, _ = trainer.tensor_loss(model, *batch)
        weighted, _, _ = trainer.tensor_loss(model, *batch, front)
    assert plain.item() == pytest.approx(per_slot.sum().item()) and weighted.item() == pytest.approx((per_slot * front).sum().item())
    model.remove_hooks()


@pytest.mark.parametrize("control", [False, True])
def test_main_trains_exports_lists_and_resumes(tmp_path, control):
    folder = build_tiny_bundle(tmp_path / "bundle")
    run_dir = tmp_path / "run"
    common = ["--bundle", str(folder), "--run-dir", str(run_dir), "--batch", "2", "--heads", "4", "--val-examples", "3",
              "--validate-every", "1"] + (["--control"] if control else ["--k", "3", "--schedule", "sine", "--noise", "uniform"])
    assert trainer.main(common + ["--steps", "1"]) == 0
    name = "tensor-control" if control else "tensor"
    info = json.loads((folder / "bundle.json").read_text())
    assert info["parts"]["tensor_control" if control else "tensor"] == name
    report = json.loads((folder / name / "training.json").read_text())
    assert report["step"] == 1 and report["backbone_unchanged"] and report["validation"]["examples"] == 3
    assert trainer.main(common + ["--steps", "2"]) == 0                # resumes at step 1
    report = json.loads((folder / name / "training.json").read_text())
    assert report["step"] == 2 and [h["step"] for h in report["validation_history"]] == [1, 2]
    assert "resumed from" in (run_dir / "train.log").read_text()
    bundle = load_bundle(folder)
    model = load_tensor_part(folder / name, bundle.backbone)
    assert model.k == (1 if control else 3) and model.adapter.schedule == ("exponential" if control else "sine")
    steps = list(draft_tensor(model, context_of(bundle.vocab), bundle.vocab.cells, SamplingConfig()))
    assert len(steps) == bundle.vocab.cells


def test_a_family_bundle_trains_its_adapter_on_its_training_kinds(tmp_path):
    """A task-family bundle (retouch-16's kinds) trains and validates TensorAR on FamilySampler examples of its
    training kinds (a held-out kind stays out), parameters shared by the pairs and the query."""
    folder = build_tiny_bundle(tmp_path / "bundle")
    info = json.loads((folder / "bundle.json").read_text())
    info["tasks"] = ["colorize", "inpaint", "posterize", "solarize"]      # solarize: held out of training
    (folder / "bundle.json").write_text(json.dumps(info))
    sampler = trainer.example_sampler("train", 16, 0, ("colorize", "inpaint", "posterize"), (2, 2), pool="builtin")
    example = sampler.sample(task="posterize", k=2)
    assert example.task == "posterize" and len(example.pairs) == 2 and "levels" in example.params
    assert not trainer.is_family_tasks(("colorization", "inpainting")) and trainer.is_family_tasks(("colorize", "posterize"))
    assert trainer.default_pool(("colorize", "posterize")) == "debian"        # retouch-16 trained on the photos
    assert trainer.default_pool(("colorization", "inpainting")) == "builtin"
    assert trainer.main(["--bundle", str(folder), "--run-dir", str(tmp_path / "run"), "--batch", "2", "--heads", "4",
                         "--val-examples", "3", "--validate-every", "1", "--k", "2", "--steps", "1", "--pool", "builtin"]) == 0
    report = json.loads((folder / "tensor" / "training.json").read_text())
    assert report["step"] == 1 and report["backbone_unchanged"]
    assert set(report["validation"]["per_task"]) <= {"colorize", "inpaint", "posterize"}
    assert "tasks colorize, inpaint, posterize (builtin pool)" in (tmp_path / "run" / "train.log").read_text()


# -- engine (runs once the engine has draft_mode="tensor"; see the wiring notes) -------------------------

def engine_wired() -> bool:
    from dataclasses import fields

    from demo_core.engine import RunSettings

    return "draft_mode" in {f.name for f in fields(RunSettings)}


@pytest.fixture(scope="module")
def tensor_engine(tmp_path_factory):
    if not engine_wired():
        pytest.skip("engine.RunSettings has no draft_mode yet")
    from demo_core.engine import load_engine

    folder = build_tiny_bundle(tmp_path_factory.mktemp("tensor-bundle"), refiner=True)
    backbone = load_bundle(folder).backbone
    wrapper(backbone, load_bundle(folder).vocab, k=4, seed=8).adapter.save_pretrained(folder / "tensor")
    info = json.loads((folder / "bundle.json").read_text())
    info["parts"]["tensor"] = "tensor"
    (folder / "bundle.json").write_text(json.dumps(info))
    return load_engine(folder), folder


def images(seed, count, size=16):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_engine_streams_tensor_windows_then_refines(tensor_engine):
    from demo_core.events import DraftDone, Finished, GenerationStarted, StageDone, TokensWritten, WindowSlid

    engine, _ = tensor_engine
    x, y, q = images(0, 3)
    events = list(engine.stream(pairs=[(x, y)], query=q, refine=("scan", "vsr"), seed=0, draft_mode="tensor", canvas_every=4,
                                scan_iterations=3))
    cells = engine.vocab.cells
    assert isinstance(events[0], GenerationStarted) and events[0].draft_mode == "tensor"
    slides = [e for e in events if isinstance(e, WindowSlid)]
    written = [e for e in events if isinstance(e, TokensWritten)]
    assert [s.step for s in slides] == list(range(cells)) and [w.cell for w in written] == list(range(cells))
    assert slides[-1].final.all() and slides[-1].revisions.max() == 4 and slides[3].canvas is not None
    result = [e for e in events if isinstance(e, Finished)][0].result
    draft = [e for e in events if isinstance(e, DraftDone)][0]
    assert (draft.codes.flatten() == [w.code for w in written]).all() and draft.quality.shape == (engine.grid, engine.grid)
    assert [e.stage for e in events if isinstance(e, StageDone)] == ["scan", "vsr"]
    assert len(result.slides) == cells and "score" in result.timings
    ar = engine.run(pairs=[(x, y)], query=q, refine=(), seed=0)
    assert ar.slides == []


def test_engine_refuses_tensor_mode_without_the_part(tensor_engine, tmp_path):
    from demo_core.engine import EngineInputError, load_engine

    engine = load_engine(build_tiny_bundle(tmp_path / "plain"))
    x, y, q = images(1, 3)
    with pytest.raises(EngineInputError, match="no TensorAR part"):
        engine.run(pairs=[(x, y)], query=q, draft_mode="tensor")
    with pytest.raises(EngineInputError, match="draft mode"):
        engine.run(pairs=[(x, y)], query=q, draft_mode="diffusion")
