"""VSR g_phi (refiners/self_refine.py) and its trainer (train/refiner.py), on tiny random bundles."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from demo_core.backbone import BackboneConfig, build_backbone
from demo_core.bundle import BundleError, load_bundle, save_bundle
from demo_core.engine import load_engine
from demo_core.events import StageDone
from demo_core.refiners.self_refine import (KINDS, SelfRefiner, code_embeddings, gated_latents, nearest_codes,
                                           nearest_codes_l2, refine_latents, score_gate, self_refine)
from demo_core.testing import build_tiny_bundle, tiny_parts
from demo_core.train import refiner as trainer


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def randomised(refiner, seed=0, std=0.05):
    """An untrained g_phi is the identity (zero-initialised output): give it weights that change things."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in refiner.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return refiner


@pytest.mark.parametrize("scale", [1.0, 0.01, 37.0])
def test_nearest_code_of_an_exact_code_embedding_is_that_code(parts, scale):
    _, backbone, vocab = parts
    table = code_embeddings(backbone, vocab)
    assert torch.equal(nearest_codes(table * scale, table), torch.arange(vocab.codebook_size))   # cosine: scale-free
    codes = torch.randint(0, vocab.codebook_size, (3, vocab.cells), generator=torch.Generator().manual_seed(1))
    assert torch.equal(nearest_codes(table[codes] * scale, table), codes)                         # batched shapes kept


def test_nearest_codes_matches_brute_force_cosine(parts):
    _, backbone, vocab = parts
    table = code_embeddings(backbone, vocab)
    queries = torch.randn(5, 7, table.shape[1], generator=torch.Generator().manual_seed(2))
    similarity = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    assert torch.equal(nearest_codes(queries, table, chunk=4), similarity.argmax(-1))


def test_special_tokens_are_never_returned(parts):
    _, backbone, vocab = parts
    special = backbone.get_input_embeddings().weight[vocab.codebook_size:]     # <at_n>, <good>, <bad>
    assert len(special) == vocab.cells + 2
    assert (nearest_codes(special, code_embeddings(backbone, vocab)) < vocab.codebook_size).all()
    refiner = randomised(SelfRefiner.for_backbone(backbone, grid=int(vocab.cells ** 0.5)), std=0.5)
    codes = torch.randint(0, vocab.codebook_size, (4, vocab.cells), generator=torch.Generator().manual_seed(3))
    refined = self_refine(refiner, backbone, vocab, codes)
    assert refined.dtype == torch.long and refined.shape == codes.shape and (refined < vocab.codebook_size).all()


def test_untrained_refiner_returns_the_draft(parts):
    _, backbone, vocab = parts
    refiner = SelfRefiner.for_backbone(backbone, grid=4)
    codes = torch.randint(0, vocab.codebook_size, (2, vocab.cells), generator=torch.Generator().manual_seed(4))
    assert torch.equal(self_refine(refiner, backbone, vocab, codes), codes)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_query", [False, True])
def test_every_ablation_builds_and_runs(parts, kind, with_query):
    _, backbone, vocab = parts
    refiner = randomised(SelfRefiner.for_backbone(backbone, grid=4, kind=kind, with_query=with_query))
    embeddings = torch.randn(2, vocab.cells, refiner.dim, requires_grad=True)
    query = torch.randn(2, vocab.cells, refiner.dim) if with_query else None
    refined = refiner(embeddings, query)
    assert refined.shape == (2, vocab.cells, refiner.dim)
    refined.square().sum().backward()
    assert all(p.grad is not None for p in refiner.parameters())
    codes = torch.randint(0, vocab.codebook_size, (3, vocab.cells))
    assert self_refine(refiner, backbone, vocab, codes, query_codes=codes[:1]).shape == codes.shape
    with pytest.raises(ValueError, match="4x4 grid"):
        refiner(embeddings[:, :9], None if query is None else query[:, :9])
    if with_query:
        with pytest.raises(ValueError, match="query"):
            self_refine(refiner, backbone, vocab, codes)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown g_phi kind"):
        SelfRefiner(dim=32, grid=4, kind="lstm")
    with pytest.raises(ValueError, match="not divisible"):
        SelfRefiner(dim=30, grid=4, heads=8)


def test_width_comes_from_the_backbone(parts):
    tokenizer, _, vocab = parts
    wide = build_backbone(BackboneConfig(hidden_size=48, num_layers=1, num_heads=4, intermediate_size=64, max_positions=160), vocab)
    assert SelfRefiner.for_backbone(wide, grid=tokenizer.grid).dim == 48


def test_save_load_round_trip_is_exact_and_strict(parts, tmp_path):
    _, backbone, _ = parts
    refiner = randomised(SelfRefiner.for_backbone(backbone, grid=4, kind="conv", with_query=True, ffn_multiple=2))
    refiner.save_pretrained(tmp_path / "g")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config == {"dim": 32, "grid": 4, "heads": 8, "ffn_multiple": 2, "kind": "conv", "with_query": True,
                      "space": "backbone", "width": None, "learned_gate": False, "gate_threshold": 0.5, "gate_scope": "cells"}
    rebuilt = SelfRefiner(**config)                     # what bundle.py does, then a strict load
    rebuilt.load_state_dict(load_file(tmp_path / "g" / "model.safetensors"), strict=True)
    for loaded in (SelfRefiner.from_pretrained(tmp_path / "g"), rebuilt):
        assert loaded.state_dict().keys() == refiner.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in refiner.state_dict().items())
    state = load_file(tmp_path / "g" / "model.safetensors")
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "g" / "model.safetensors")
    with pytest.raises(RuntimeError, match="extra.weight"):
        SelfRefiner.from_pretrained(tmp_path / "g")


def test_bundle_loads_the_refiner_strictly(tmp_path):
    folder = build_tiny_bundle(tmp_path / "b", refiner=True)
    bundle = load_bundle(folder)
    assert isinstance(bundle.vsr, SelfRefiner) and not bundle.vsr.training
    reference = SelfRefiner.from_pretrained(folder / "refiner")
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in bundle.vsr.state_dict().items())
    state = load_file(folder / "refiner" / "model.safetensors")
    del state["out.weight"]
    save_file(state, folder / "refiner" / "model.safetensors")
    with pytest.raises(BundleError, match="refiner: weights do not match the config: missing out.weight"):
        load_bundle(folder)


def small_config(**overrides):
    settings = dict(drafts=24, val_drafts=6, epochs=2, batch=4, lr=1e-4)
    settings.update(overrides)
    return trainer.RefinerTrainConfig(**settings)


def wide_lvm_bundle(folder):
    """An LVM-format bundle (plain raster drafts, as a Hub LVM) whose backbone is wider (48) than the tiny default's (32)."""
    tokenizer, _, vocab = tiny_parts()
    backbone = build_backbone(BackboneConfig(hidden_size=48, num_layers=1, num_heads=4, intermediate_size=64, max_positions=160), vocab)
    return save_bundle(folder, tokenizer, backbone, name="wide-lvm", tasks=["colorization", "inpainting", "edges"],
                       sequence_format="lvm")


@pytest.mark.parametrize("make, overrides", [
    (build_tiny_bundle, {}),
    (wide_lvm_bundle, dict(drafts=12, loss="l2", kind="conv", with_query=True)),
    (build_tiny_bundle, dict(loss="ce", kind="mlp")),
    (build_tiny_bundle, dict(loss="l2", space="codes", width=16, heads=4)),      # the tokenizer's code space
])
def test_trainer_lowers_its_loss_and_leaves_the_backbone_bit_identical(tmp_path, make, overrides):
    bundle = load_bundle(make(tmp_path / "b"))
    before = {name: tensor.clone() for name, tensor in bundle.backbone.state_dict().items()}
    refiner, report = trainer.train_refiner(bundle, small_config(**overrides), tmp_path / "run")
    assert report["train_loss"]["after"] < report["train_loss"]["before"]
    if overrides.get("space") == "codes":
        assert refiner.space == "codes" and refiner.dim == bundle.tokenizer.codebook.shape[1] and refiner.width == 16
    else:
        assert refiner.dim == bundle.backbone.config.hidden_size
    after = bundle.backbone.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not bundle.backbone.training and not any(p.requires_grad for p in bundle.backbone.parameters())
    validation = report["validation"]
    assert validation["examples"] == 6 and len(validation["cosine_curve"]["draft"]) == bundle.vocab.cells
    assert set(validation["per_task"]) == {"colorization", "inpainting", "edges"}


def test_draft_cache_is_reused_and_extends_deterministically(tmp_path):
    bundle = load_bundle(build_tiny_bundle(tmp_path / "b"))
    recipe = trainer.DraftRecipe("train", 0, 16, ("colorization", "edges"), (1, 3), "scan", (1.0, 0, 0.9, 1),
                                 "backbone-hash", "tokenizer-hash", "torch.float32")
    logger = trainer.setup_logging(tmp_path / "log", "refiner-test")
    fresh = trainer.load_or_make_drafts(bundle, recipe, 6, tmp_path / "a", logger)
    trainer.load_or_make_drafts(bundle, recipe, 3, tmp_path / "b", logger)
    extended = trainer.load_or_make_drafts(bundle, recipe, 6, tmp_path / "b", logger)
    again = trainer.load_or_make_drafts(bundle, recipe, 4, tmp_path / "b", logger)
    for key in ("query", "answer", "draft"):
        assert torch.equal(fresh[key], extended[key]) and torch.equal(again[key], fresh[key][:4])
    assert fresh["tasks"] == extended["tasks"] == ["colorization", "edges"] * 3
    assert ((fresh["draft"] >= 0) & (fresh["draft"] < bundle.vocab.codebook_size)).all()


def test_batched_drafts_are_whole_blocks_that_extend_deterministically(tmp_path):
    """--draft-batch: blocks of consecutive indices drafted together, grouped by K; a block depends on itself alone."""
    bundle = load_bundle(build_tiny_bundle(tmp_path / "b"))
    recipe = trainer.DraftRecipe("train", 0, 16, ("colorization", "edges"), (1, 3), "scan", (1.0, 0, 0.9, 1),
                                 "backbone-hash", "tokenizer-hash", "torch.float32", draft_batch=4)
    single = trainer.DraftRecipe(**{**recipe.__dict__, "draft_batch": 1})
    assert recipe.key() != single.key()
    logger = trainer.setup_logging(tmp_path / "log", "refiner-test")
    fresh = trainer.load_or_make_drafts(bundle, recipe, 8, tmp_path / "a", logger)
    short = trainer.load_or_make_drafts(bundle, recipe, 3, tmp_path / "b", logger)       # drafts the whole first block
    stored = torch.load(next((tmp_path / "b").glob("drafts-*.pt")), weights_only=True)
    assert len(short["tasks"]) == 3 and len(stored["tasks"]) == 4
    extended = trainer.load_or_make_drafts(bundle, recipe, 8, tmp_path / "b", logger)
    for key in ("query", "answer", "draft"):
        assert torch.equal(fresh[key], extended[key])
    assert fresh["tasks"] == ["colorization", "edges"] * 4 and fresh["pairs"] == extended["pairs"]
    # the same examples as one-at-a-time drafting: queries and answers agree, only the sampled drafts may differ
    one = trainer.load_or_make_drafts(bundle, single, 8, tmp_path / "c", logger)
    assert torch.equal(one["query"], fresh["query"]) and torch.equal(one["answer"], fresh["answer"])
    assert ((fresh["draft"] >= 0) & (fresh["draft"] < bundle.vocab.codebook_size)).all()


def test_drafts_follow_the_bundles_pixel_range_and_sampling(tmp_path):
    """What `train refiner --bundle lvm-7b` drafts with: the tokenizer's own range, the engine's sampling for it."""
    folder = wide_lvm_bundle(tmp_path / "b")
    info = json.loads((folder / "bundle.json").read_text())
    info.update(pixel_range=[0.0, 1.0], sampling={"temperature": 1.0, "top_p": 1.0, "top_k": 0, "source": "a test"})
    (folder / "bundle.json").write_text(json.dumps(info))
    bundle = load_bundle(folder)
    assert bundle.tokenizer.pixel_range == (0.0, 1.0)
    trainer.train_refiner(bundle, small_config(drafts=4, val_drafts=2, epochs=1), tmp_path / "run")
    caches = sorted((tmp_path / "run").glob("drafts-*.pt"))
    recipes = [json.loads(torch.load(path, weights_only=True)["recipe"]) for path in caches]
    assert len(recipes) == 2 and all(r["pixel_range"] == [0.0, 1.0] for r in recipes)
    assert all(dict(zip(("temperature", "top_k", "top_p", "candidates"), r["sampling"])) ==
               {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "candidates": 1} for r in recipes)


def test_draft_cache_keys_of_minus_one_to_one_tokenizers_are_unchanged():
    import hashlib
    from dataclasses import asdict, replace

    recipe = trainer.DraftRecipe("train", 0, 16, ("colorization",), (1, 3), "scan", (1.0, 0, 0.9, 1),
                                 "backbone-hash", "tokenizer-hash", "torch.float32")
    before_the_field = {k: v for k, v in asdict(recipe).items() if k not in ("pixel_range", "pool", "draft_batch")}
    assert recipe.key() == hashlib.sha256(json.dumps(before_the_field, sort_keys=True).encode()).hexdigest()[:16]
    assert replace(recipe, pixel_range=(0.0, 1.0)).key() != recipe.key()


def test_command_line_saves_the_refiner_into_the_bundle(tmp_path):
    folder = build_tiny_bundle(tmp_path / "b")
    assert trainer.main(["--bundle", str(folder), "--drafts", "8", "--val-drafts", "3", "--epochs", "1",
                         "--run-dir", str(tmp_path / "run")]) == 0
    info = json.loads((folder / "bundle.json").read_text())
    assert info["parts"]["refiner"] == "refiner"
    training = json.loads((folder / "refiner" / "training.json").read_text())
    assert training["command"].startswith("python -m demo_core.train refiner --bundle")
    assert training["backbone_unchanged"] and "token_accuracy" in training["validation"]
    assert (tmp_path / "run" / "train.log").exists()
    assert isinstance(load_bundle(folder).vsr, SelfRefiner) and load_bundle(folder).refiner is not None   # old name kept


def images(seed, count):
    rng = np.random.default_rng(seed)
    return [rng.random((20, 20, 3)).astype(np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = load_engine(str(build_tiny_bundle(tmp_path_factory.mktemp("bundle"), refiner=True)))
    randomised(engine.vsr, std=0.05)
    return engine


@pytest.mark.parametrize("refine", [("vsr",), ("scan", "vsr"), ("scan", "self")])     # "self": VSR's old name
def test_engine_runs_self_refinement(engine, refine):
    x, y, q = images(0, 3)
    events = list(engine.stream([(x, y)], q, refine=refine, seed=0, scan_iterations=3))
    result = events[-1].result
    refine = tuple("vsr" if stage == "self" else stage for stage in refine)
    assert list(result.stages) == ["draft", *refine]
    before = result.codes[refine[-2] if len(refine) > 1 else "draft"]
    changed = np.flatnonzero(result.codes["vsr"].reshape(-1) != before.reshape(-1)).tolist()
    assert result.changed["vsr"] == changed and changed                    # a randomised g_phi changes some cells
    done = [e for e in events if isinstance(e, StageDone) and e.stage == "vsr"]
    assert len(done) == 1 and done[0].changed_cells == changed and result.final.size == (16, 16)
    assert ((result.codes["vsr"] >= 0) & (result.codes["vsr"] < engine.vocab.codebook_size)).all()


def test_engine_feeds_the_query_to_a_query_aware_refiner(engine):
    x, y, q = images(1, 3)
    original = engine.vsr
    try:
        engine.vsr = randomised(SelfRefiner.for_backbone(engine.model, grid=engine.grid, with_query=True))
        result = engine.run([(x, y)], q, refine=("vsr",), seed=1)
    finally:
        engine.vsr = original
    assert list(result.stages) == ["draft", "vsr"] and result.codes["vsr"].shape == (4, 4)


def test_a_code_space_refiner_snaps_by_l2_over_the_vq_codebook(parts):
    """space "codes": g_phi refines the tokenizer's own code vectors (8 wide, in a wider block) and snaps by L2,
    the quantizer's rule; untrained it is the identity; the refined latents come out unsnapped too."""
    tokenizer, backbone, vocab = parts
    codebook = tokenizer.codebook.detach()
    refiner = SelfRefiner(dim=codebook.shape[1], grid=tokenizer.grid, heads=4, space="codes", width=32)
    codes = torch.randint(0, vocab.codebook_size, (2, vocab.cells), generator=torch.Generator().manual_seed(4))
    assert torch.equal(self_refine(refiner, backbone, vocab, codes, codebook=codebook), codes)
    assert torch.equal(refine_latents(refiner, backbone, vocab, codes, codebook=codebook), codebook[codes])
    with pytest.raises(ValueError, match="pass codebook"):
        self_refine(refiner, backbone, vocab, codes)
    randomised(refiner, std=0.3)
    refined = refine_latents(refiner, backbone, vocab, codes, codebook=codebook)
    assert refined.shape == (2, vocab.cells, codebook.shape[1])
    brute = torch.cdist(refined.reshape(-1, codebook.shape[1]), codebook).argmin(-1).view(2, vocab.cells)
    assert torch.equal(self_refine(refiner, backbone, vocab, codes, codebook=codebook), brute)
    assert torch.equal(nearest_codes_l2(codebook, codebook), torch.arange(len(codebook)))


@pytest.mark.parametrize("space", ["backbone", "codes"])
def test_the_confidence_gate_only_ever_keeps_draft_codes(parts, space):
    tokenizer, backbone, vocab = parts
    codebook = tokenizer.codebook.detach()
    dim = codebook.shape[1] if space == "codes" else None
    refiner = (SelfRefiner(dim=dim, grid=tokenizer.grid, heads=4, space="codes", width=32) if space == "codes"
               else SelfRefiner.for_backbone(backbone, grid=tokenizer.grid))
    randomised(refiner, std=0.3)
    codes = torch.randint(0, vocab.codebook_size, (3, vocab.cells), generator=torch.Generator().manual_seed(5))
    free = self_refine(refiner, backbone, vocab, codes, codebook=codebook)
    changed = [int((self_refine(refiner, backbone, vocab, codes, codebook=codebook, gate=g) != codes).sum())
               for g in (0.0, 0.01, 0.1, 1e9)]
    assert changed[0] == int((free != codes).sum()) > 0
    assert changed == sorted(changed, reverse=True) and changed[-1] == 0        # a higher margin changes fewer cells
    gated = self_refine(refiner, backbone, vocab, codes, codebook=codebook, gate=0.01)
    assert bool(((gated == codes) | (gated == free)).all())                     # each cell: the draft's or g_phi's


def test_the_learned_gate_keeps_the_draft_where_it_doubts_and_loads_with_its_threshold(parts, tmp_path):
    tokenizer, backbone, vocab = parts
    refiner = randomised(SelfRefiner.for_backbone(backbone, grid=tokenizer.grid, learned_gate=True, gate_threshold=0.7),
                         std=0.3)
    codes = torch.randint(0, vocab.codebook_size, (3, vocab.cells), generator=torch.Generator().manual_seed(5))
    free = self_refine(refiner, backbone, vocab, codes, learned_gate=False)
    refined, logits = refiner(code_embeddings(backbone, vocab)[codes], with_gate=True)
    assert logits.shape == codes.shape and torch.equal(refined, refiner(code_embeddings(backbone, vocab)[codes]))
    probability = torch.sigmoid(logits)
    for threshold in (0.0, 0.5, 0.7, 1.0):
        gated = self_refine(refiner, backbone, vocab, codes, learned_gate=threshold)
        expected = torch.where(probability > threshold, free, codes)
        assert torch.equal(gated, expected)
    assert torch.equal(self_refine(refiner, backbone, vocab, codes), self_refine(refiner, backbone, vocab, codes, learned_gate=0.7))
    assert torch.equal(self_refine(refiner, backbone, vocab, codes, learned_gate=1.0), codes)     # never sure enough
    refiner.save_pretrained(tmp_path / "g")
    loaded = SelfRefiner.from_pretrained(tmp_path / "g")
    assert loaded.learned_gate and loaded.gate_threshold == 0.7
    assert torch.equal(self_refine(loaded, backbone, vocab, codes), self_refine(refiner, backbone, vocab, codes))


def test_keep_copies_leaves_every_cell_the_draft_copied_from_the_query(parts):
    tokenizer, backbone, vocab = parts
    refiner = randomised(SelfRefiner.for_backbone(backbone, grid=tokenizer.grid), std=0.3)
    generator = torch.Generator().manual_seed(7)
    query = torch.randint(0, vocab.codebook_size, (vocab.cells,), generator=generator)
    codes = torch.randint(0, vocab.codebook_size, (2, vocab.cells), generator=generator)
    codes[:, : vocab.cells // 2] = query[: vocab.cells // 2]                       # the first half copied
    free = self_refine(refiner, backbone, vocab, codes)
    kept = self_refine(refiner, backbone, vocab, codes, query_codes=query, keep_copies=True)
    copied = codes == query[None]
    assert bool((free[copied] != codes[copied]).any())                            # g_phi alone would move copies
    assert torch.equal(kept[copied], codes[copied]) and torch.equal(kept[~copied], free[~copied])
    with pytest.raises(ValueError, match="query_codes"):
        self_refine(refiner, backbone, vocab, codes, keep_copies=True)


def test_gate_labels_mark_proposals_that_bring_the_vq_vector_closer():
    vq = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    table = vq.clone()
    refiner = SelfRefiner(dim=2, grid=1, heads=1, space="codes", width=4, learned_gate=True)
    refined = torch.tensor([[[1.1, 0.0]], [[2.9, 0.0]], [[0.1, 0.0]]])          # snaps to codes 1, 2, 0
    draft = torch.tensor([[0], [1], [0]])
    answer = torch.tensor([[1], [0], [2]])
    proposed, helps = trainer.gate_labels(refiner, refined, table, draft, answer, vq)
    assert proposed.tolist() == [[True], [True], [False]]
    assert helps.tolist() == [[1.0], [0.0], [0.0]]       # 0 -> 1 reaches the answer; 1 -> 2 moves away from 0
    logits = torch.zeros(3, 1, requires_grad=True)
    loss = trainer.gate_loss(logits, proposed, helps)
    assert abs(loss.item() - np.log(2)) < 1e-6
    assert trainer.gate_loss(logits, torch.zeros_like(proposed), helps).item() == 0.0


def test_the_trainer_learns_a_gate_and_stores_its_threshold(tmp_path):
    folder = build_tiny_bundle(tmp_path / "b")
    bundle = load_bundle(folder)
    refiner, report = trainer.train_refiner(bundle, small_config(learned_gate=True, lr=1e-3), tmp_path / "run")
    gate = report["learned_gate"]
    assert refiner.learned_gate and refiner.gate_threshold == gate["threshold"]
    assert gate["threshold"] == 1.0 or gate["candidates"][f"{gate['threshold']:g}"]["error_change"] < 0
    assert report["refiner_config"]["gate_threshold"] == gate["threshold"]
    assert report["train_loss"]["after"] < report["train_loss"]["before"]
    refiner.save_pretrained(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["gate_threshold"] == gate["threshold"]


def test_the_engine_runs_a_code_space_vsr_gated_and_its_continuous_decode(parts, tmp_path):
    """refine=("vsr", "vsr-continuous") with a code-space g_phi: the continuous stage's image is the refined latents
    decoded unsnapped, its codes their L2-nearest; the gate keeps more draft codes; a backbone-space g_phi refuses
    the continuous decode in one line."""
    from demo_core.engine import EngineInputError

    tokenizer, backbone, vocab = parts
    refiner = randomised(SelfRefiner(dim=tokenizer.codebook.shape[1], grid=tokenizer.grid, heads=4, space="codes",
                                     width=16), std=0.3)
    engine = load_engine(save_bundle(tmp_path / "codes", tokenizer, backbone, vsr=refiner, name="codes-vsr",
                                     tasks=["colorization"]))
    assert engine.available_refiners == ("scan", "vsr", "vsr-continuous")
    rng = np.random.default_rng(0)
    image = lambda: rng.random((16, 16, 3)).astype(np.float32)          # noqa: E731
    pairs, query = [(image(), image())], image()
    result = engine.run(pairs, query, refine=("vsr", "vsr-continuous"), seed=0)
    assert list(result.stages) == ["draft", "vsr", "vsr-continuous"]
    snapped = engine.decode(result.codes["vsr-continuous"])
    assert np.abs(np.asarray(result.stages["vsr-continuous"], float) - np.asarray(snapped, float)).max() > 0
    gated = engine.run(pairs, query, refine=("vsr",), seed=0, vsr_gate=1e9)
    assert np.array_equal(gated.codes["vsr"], gated.codes["draft"]) and gated.changed["vsr"] == []
    plain = load_engine(save_bundle(tmp_path / "plain", tokenizer, backbone, vsr=SelfRefiner.for_backbone(backbone, grid=tokenizer.grid),
                                    name="plain-vsr", tasks=["colorization"]))
    assert plain.available_refiners == ("scan", "vsr")
    with pytest.raises(EngineInputError, match="code space"):
        plain.run(pairs, query, refine=("vsr-continuous",), seed=0)


def test_a_family_bundle_drafts_its_training_kinds_with_shared_parameters(tmp_path):
    folder = build_tiny_bundle(tmp_path / "b")
    info = json.loads((folder / "bundle.json").read_text())
    info["tasks"] = ["colorize", "inpaint", "posterize", "solarize"]   # solarize: a held-out kind, never trained on
    (folder / "bundle.json").write_text(json.dumps(info))
    # posterize is a five-task name too: a family bundle still drafts every training kind, not the five tasks' two
    assert trainer.recipe_tasks(load_bundle(folder)) == ("colorize", "inpaint", "posterize")
    info["tasks"] = ["colorize", "inpaint", "solarize"]
    (folder / "bundle.json").write_text(json.dumps(info))
    assert trainer.recipe_tasks(load_bundle(folder)) == ("colorize", "inpaint")
    recipe = trainer.DraftRecipe("train", 0, 16, ("colorize", "inpaint"), (2, 2), "scan", (1.0, 0, 0.9, 1),
                                 "b", "t", "torch.float32")
    first, second = recipe.example(0), recipe.example(1)
    assert (first.kind, second.kind) == ("colorize", "inpaint") and len(second.pairs) == 2
    assert recipe.example(1).params == second.params                 # from (seed, index) alone
    assert trainer.main(["--bundle", str(folder), "--drafts", "4", "--val-drafts", "2", "--epochs", "1",
                         "--run-dir", str(tmp_path / "run")]) == 0
    training = json.loads((folder / "refiner" / "training.json").read_text())
    assert training["tasks"] == ["colorize", "inpaint"]
    assert set(training["validation"]["per_task"]) == {"colorize", "inpaint"}


def test_the_pool_enters_the_draft_cache_key_only_when_it_is_not_the_default():
    from dataclasses import replace

    recipe = trainer.DraftRecipe("train", 0, 16, ("colorize",), (1, 3), "scan", (1.0, 0, 0.9, 1), "b", "t", "torch.float32")
    assert replace(recipe, pool="debian").key() != recipe.key()


def test_eval_vsr_compares_variants_on_the_same_drafts(parts, tmp_path, capsys):
    """`eval-vsr`: every g_phi refines the same draft and SCAN answer; an untrained (identity) g_phi reproduces the
    draft exactly, a code-space one also gets a continuous row, and a bad --variant is one error line."""
    from demo_core.eval import vsr as eval_vsr

    tokenizer, backbone, vocab = parts
    folder = save_bundle(tmp_path / "b", tokenizer, backbone, name="b", tasks=["colorization"])
    dim = tokenizer.codebook.shape[1]
    SelfRefiner(dim=dim, grid=tokenizer.grid, heads=4, space="codes", width=16).save_pretrained(tmp_path / "same")
    randomised(SelfRefiner(dim=dim, grid=tokenizer.grid, heads=4, space="codes", width=16), std=0.3).save_pretrained(tmp_path / "moves")
    randomised(SelfRefiner(dim=dim, grid=tokenizer.grid, heads=4, space="codes", width=16, learned_gate=True,
                           gate_threshold=1.0), std=0.3).save_pretrained(tmp_path / "doubts")
    code = eval_vsr.main(["--bundle", str(folder), "--variant", f"same={tmp_path / 'same'}", "--variant",
                          f"moves={tmp_path / 'moves'}", "--variant", f"doubts={tmp_path / 'doubts'}", "--gates", "0.01",
                          "--tasks", "colorization", "--n", "2", "--pool", "builtin", "--out", str(tmp_path / "out")])
    assert code == 0
    rows = json.loads((tmp_path / "out/results.json").read_text())["table"]["colorization"]
    for base in ("", "+SCAN"):
        for name in ("same", "moves"):
            for suffix in ("", " gate 0.01", " keep copies", " continuous", " score gate (cells)", " score gate (answer)",
                           " keep copies, score gate (cells)", " keep copies, score gate (answer)"):
                assert f"{base}+VSR[{name}]{suffix}" in rows
    assert {"*identity*", "*ceiling*", "draft", "+SCAN"} <= set(rows)
    assert rows["+VSR[same]"]["psnr"] == rows["draft"]["psnr"] and rows["+VSR[same]"]["changed"] == 0
    assert rows["+VSR[same]"]["better"] == rows["+VSR[same]"]["worse"] == 0 and rows["draft"]["better"] is None
    assert rows["+VSR[same]"]["pooled_psnr"] == rows["draft"]["pooled_psnr"]
    assert rows["+SCAN+VSR[same]"]["psnr"] == rows["+SCAN"]["psnr"]
    assert rows["+VSR[moves]"]["changed"] > 0 and rows["+VSR[moves]"]["vsr_share"] > 0
    for gate in ("cells", "answer"):       # the backbone's score gate only ever takes back proposals
        assert rows[f"+VSR[moves] score gate ({gate})"]["changed"] <= rows["+VSR[moves]"]["changed"]
        assert rows[f"+VSR[same] score gate ({gate})"]["psnr"] == rows["draft"]["psnr"]
    assert "+VSR[moves] learned gate 0.5" not in rows
    assert rows["+VSR[doubts]"]["changed"] > 0                           # its ungated row moves cells...
    assert rows["+VSR[doubts] learned gate 1"]["changed"] == 0          # ...its gate at 1.0 keeps every draft code
    assert rows["+VSR[doubts] keep copies, learned gate 1"]["changed"] == 0
    assert len(rows["+VSR[moves]"]["curve"]) == vocab.cells
    assert "| colorization | +VSR[moves] |" in (tmp_path / "out/results.md").read_text()
    capsys.readouterr()
    assert eval_vsr.main(["--bundle", str(folder), "--variant", "nofolder", "--n", "1"]) == 1
    assert capsys.readouterr().out.startswith("error: --variant takes name=folder")


def test_the_score_gate_keeps_a_proposal_only_where_the_backbone_scores_it_higher():
    """SCAN's Eq. 5 on VSR's proposals: per cell, the new code only where its score beats the draft's; per answer,
    all of them or none, by the mean score; "off" takes every proposal; a wrong mode or shape is one clear error."""
    old = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    new = torch.tensor([[9, 2, 9, 9], [9, 9, 9, 9]])
    old_scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.9, 0.9, 0.9, 0.9]])
    new_scores = torch.tensor([[0.6, 0.1, 0.4, 1.0], [0.8, 0.8, 0.8, 1.0]])
    assert score_gate(old, new, old_scores, new_scores, "cells").tolist() == [[9, 2, 3, 9], [5, 6, 7, 9]]
    assert score_gate(old, new, old_scores, new_scores, "answer").tolist() == [[9, 2, 9, 9], [5, 6, 7, 8]]
    assert torch.equal(score_gate(old, new, old_scores, new_scores, "off"), new)
    assert torch.equal(score_gate(old, new, new_scores, new_scores, "cells"), old)      # a tie keeps the draft
    with pytest.raises(ValueError, match="score gate must be one of"):
        score_gate(old, new, old_scores, new_scores, "best")
    with pytest.raises(ValueError, match="one shape"):
        score_gate(old, new[:1], old_scores, new_scores, "cells")


def test_gated_latents_show_a_kept_cell_as_its_code_and_leave_the_rest_unsnapped(parts):
    tokenizer, _, _ = parts
    codebook = tokenizer.codebook
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 6, codebook.shape[1], generator=generator)
    proposed = nearest_codes_l2(latents, codebook)
    final = proposed.clone()
    final[0, 2] = (proposed[0, 2] + 1) % codebook.shape[0]           # a gate kept another code at cell 2
    out = gated_latents(latents, final, codebook)
    assert torch.equal(out[0, 2], codebook[final[0, 2]])
    keep = [i for i in range(6) if i != 2]
    assert torch.equal(out[0, keep], latents[0, keep])


def code_space_bundle(parts, tmp_path, seed):
    """A tiny bundle with a randomised code-space g_phi, and one pair and a query of random 16x16 images."""
    tokenizer, backbone, _ = parts
    refiner = randomised(SelfRefiner(dim=tokenizer.codebook.shape[1], grid=tokenizer.grid, heads=4, space="codes",
                                     width=16), std=0.3)
    folder = save_bundle(tmp_path / "codes", tokenizer, backbone, vsr=refiner, name="codes-vsr", tasks=["colorization"])
    rng = np.random.default_rng(seed)
    image = lambda: rng.random((16, 16, 3)).astype(np.float32)          # noqa: E731
    return folder, [(image(), image())], image()


def test_the_engine_takes_vsr_decode_rules_from_the_bundle_and_per_run(parts, tmp_path):
    """vsr_keep_copies and vsr_score_gate: from bundle.json "vsr", overridden per run; with the score gate, the final
    answer's cells are each the draft's or VSR's proposal, and its scores are the re-scored answer's; a wrong gate
    name is one EngineInputError line."""
    from demo_core.engine import EngineInputError

    folder, pairs, query = code_space_bundle(parts, tmp_path, seed=0)
    engine = load_engine(folder)
    assert engine.settings(("vsr",), 0, {}).vsr_score_gate == "off" and not engine.settings(("vsr",), 0, {}).vsr_keep_copies
    plain = engine.run(pairs, query, refine=("vsr",), seed=0)
    gated = engine.run(pairs, query, refine=("vsr",), seed=0, vsr_score_gate="cells")
    draft, proposal, final = (np.asarray(x).reshape(-1) for x in (plain.codes["draft"], plain.codes["vsr"], gated.codes["vsr"]))
    assert np.array_equal(np.asarray(gated.codes["draft"]).reshape(-1), draft)
    assert ((final == draft) | (final == proposal)).all()
    answer = engine.run(pairs, query, refine=("vsr", "vsr-continuous"), seed=0, vsr_score_gate="answer")
    assert np.array_equal(np.asarray(answer.codes["vsr"]).reshape(-1), draft) or np.array_equal(
        np.asarray(answer.codes["vsr"]).reshape(-1), proposal)
    with pytest.raises(EngineInputError, match="score gate"):
        engine.run(pairs, query, refine=("vsr",), seed=0, vsr_score_gate="best")
    info = json.loads((folder / "bundle.json").read_text())
    info["vsr"] = {"keep_copies": True, "score_gate": "cells", "source": "measured"}
    (folder / "bundle.json").write_text(json.dumps(info))
    engine = load_engine(folder)
    settings = engine.settings(("vsr",), 0, {})
    assert settings.vsr_keep_copies and settings.vsr_score_gate == "cells"
    assert engine.settings(("vsr",), 0, {"vsr_score_gate": "off"}).vsr_score_gate == "off"
    again = engine.run(pairs, query, refine=("vsr",), seed=0)
    assert np.array_equal(again.codes["vsr"], engine.run(pairs, query, refine=("vsr",), seed=0, vsr_keep_copies=True,
                                                         vsr_score_gate="cells").codes["vsr"])


def test_pixel_labels_mark_proposals_whose_decoded_cells_near_the_answer(parts):
    """The learned gate's pixel label: a proposal helps where its decoded cell is nearer the right answer's decode
    than the draft's; a cell whose draft code is the query's (a copy) is never a proposal; the right answers' and
    drafts' decodes are made once per draft set."""
    tokenizer, _, vocab = parts
    codes = lambda seed: torch.randint(0, vocab.codebook_size, (3, vocab.cells), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    answer, draft = codes(5), codes(6)
    query = (draft + 1) % vocab.codebook_size
    query[:, 0] = draft[:, 0]                            # cell 0 is a copy of the query in every draft
    drafts = {"draft": draft, "answer": answer, "query": query, "tasks": ["t"] * 3}
    table = tokenizer.codebook
    refiner = SelfRefiner(dim=table.shape[1], grid=tokenizer.grid, heads=4, space="codes", width=16, learned_gate=True)
    labels = trainer.PixelLabels(tokenizer)
    index = torch.arange(3)
    proposed, helps, change = labels(refiner, table[answer], table, drafts, index)     # g_phi proposes the right answer
    assert not proposed[:, 0].any()
    snapped = nearest_codes_l2(table[answer], table)
    assert proposed[:, 1:].equal((snapped != draft)[:, 1:])
    assert (change <= 1e-6).all() and torch.equal(helps, (change < 0).float())         # the answer itself: never worse
    assert len(labels.cache) == 1
    labels(refiner, table[draft], table, drafts, index)                                 # proposing the draft: no change
    assert len(labels.cache) == 1
    _, _, same = labels(refiner, table[draft], table, drafts, index)
    assert same.abs().max() < 1e-5


def test_the_trainer_learns_a_pixel_gate(tmp_path):
    folder = build_tiny_bundle(tmp_path / "b")
    bundle = load_bundle(folder)
    refiner, report = trainer.train_refiner(bundle, small_config(learned_gate=True, gate_label="pixels", lr=1e-3),
                                            tmp_path / "run")
    gate = report["learned_gate"]
    assert gate["label"] == "pixels" and refiner.gate_threshold == gate["threshold"]
    assert gate["threshold"] == 1.0 or gate["candidates"][f"{gate['threshold']:g}"]["error_change"] < 0
    with pytest.raises(ValueError, match="unknown gate label"):
        trainer.train_refiner(bundle, small_config(learned_gate=True, gate_label="vibes"), tmp_path / "run")


def test_an_answer_scoped_learned_gate_takes_all_proposals_or_none(parts):
    """gate_scope "answer": one decision per answer on its cells' mean gate probability; a bad scope is refused."""
    from demo_core.refiners.self_refine import refine

    tokenizer, backbone, vocab = parts
    refiner = randomised(SelfRefiner(dim=tokenizer.codebook.shape[1], grid=tokenizer.grid, heads=4, space="codes",
                                     width=16, learned_gate=True, gate_scope="answer"), std=0.3)
    codes = torch.randint(0, vocab.codebook_size, (2, vocab.cells), generator=torch.Generator().manual_seed(8))
    ungated, latents = refine(refiner, backbone, vocab, codes, codebook=tokenizer.codebook, learned_gate=False)
    with torch.no_grad():
        logits = refiner(tokenizer.codebook[codes], with_gate=True)[1]
    means = torch.sigmoid(logits.float()).mean(1)
    for row in range(2):
        for threshold, taken in ((float(means[row]) - 1e-4, True), (float(means[row]) + 1e-4, False)):
            gated = refine(refiner, backbone, vocab, codes, codebook=tokenizer.codebook, learned_gate=threshold)[0]
            assert torch.equal(gated[row], ungated[row] if taken else codes[row])
    with pytest.raises(ValueError, match="gate scope"):
        SelfRefiner(dim=8, grid=4, heads=4, learned_gate=True, gate_scope="image")


def test_keep_confident_leaves_every_cell_the_backbone_is_sure_of(parts):
    """keep_confident: a cell whose draft quality score is at or above the level keeps its code; without scores (or
    with scores of another shape) it is one clear error; the engine takes it per run and from bundle.json "vsr"."""
    from demo_core.refiners.self_refine import refine

    tokenizer, backbone, vocab = parts
    refiner = randomised(SelfRefiner(dim=tokenizer.codebook.shape[1], grid=tokenizer.grid, heads=4, space="codes",
                                     width=16), std=0.3)
    codes = torch.randint(0, vocab.codebook_size, (2, vocab.cells), generator=torch.Generator().manual_seed(9))
    scores = torch.rand(2, vocab.cells, generator=torch.Generator().manual_seed(10))
    free = refine(refiner, backbone, vocab, codes, codebook=tokenizer.codebook)[0]
    kept = refine(refiner, backbone, vocab, codes, codebook=tokenizer.codebook, keep_confident=0.5, scores=scores)[0]
    sure = scores >= 0.5
    assert torch.equal(kept[sure], codes[sure]) and torch.equal(kept[~sure], free[~sure])
    with pytest.raises(ValueError, match="quality scores"):
        refine(refiner, backbone, vocab, codes, codebook=tokenizer.codebook, keep_confident=0.5)
    with pytest.raises(ValueError, match="quality scores"):
        refine(refiner, backbone, vocab, codes, codebook=tokenizer.codebook, keep_confident=0.5, scores=scores[:, :3])


def test_the_engine_keeps_the_cells_it_is_sure_of(parts, tmp_path):
    folder, pairs, query = code_space_bundle(parts, tmp_path, seed=1)
    engine = load_engine(folder)
    everything = engine.run(pairs, query, refine=("vsr",), seed=0, vsr_keep_confident=0.0)
    assert everything.changed["vsr"] == []                              # every score is >= 0: nothing changes
    info = json.loads((folder / "bundle.json").read_text())
    info["vsr"] = {"keep_confident": 0.0}
    (folder / "bundle.json").write_text(json.dumps(info))
    assert load_engine(folder).settings(("vsr",), 0, {}).vsr_keep_confident == 0.0
