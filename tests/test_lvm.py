"""The LVM-7B recipe on tiny checkpoints in exactly LVM's two formats, served through the real
huggingface_hub cache code path offline (HF_HUB_OFFLINE=1, a pre-populated cache: blobs,
snapshots/<commit> symlinks, refs/main and the trees/<commit>.json listing), so that
`load_engine("lvm-7b")` runs `hf_hub_download` / `snapshot_download` for real."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo_core
from demo_core import lvm
from demo_core.drafts import raster
from demo_core.bundle import BundleError
from demo_core.events import DraftDone, Finished, GenerationStarted, ScanStep, StageDone, TokensWritten
from demo_core.muse_vqgan import LVM_MUSE_CONFIG
from demo_core.testing import make_tiny_muse_vqgan

CODES = 8192                  # LVM's VQ codes ...
VOCAB = CODES + 100           # ... and 100 special ids above them
EOS = 2                       # generation_config.json's eos_token_id: also a valid code
IMAGE, CELLS = 8, 16          # tiny MUSE VQGAN: 8x8 px, f2 -> 4x4 = 16 tokens per image
MAX_POSITIONS = 128           # 8 images -> at most 3 pairs


# --------------------------------------------------------------------------------------------
# tiny checkpoints and the offline Hub cache
# --------------------------------------------------------------------------------------------

def write_tiny_lvm(folder: Path, seed: int = 0, biased_to_eos: bool = False, max_positions: int = MAX_POSITIONS) -> Path:
    """A tiny LlamaForCausalLM with LVM's 8192 + 100 vocabulary, saved as LVM_ckpts is: fp16
    safetensors in several shards with an index, config.json and generation_config.json (eos 2)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)          # peaked, context-dependent distributions
        if biased_to_eos:
            # every hidden state gets a large positive dimension 0; rows reading it win: code 2 among the
            # codes, and the special ids above all (so only masking keeps them out)
            model.model.embed_tokens.weight[:, 0] = 20.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[EOS, 0] = 8.0
            model.lm_head.weight[CODES:, 0] = 16.0
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=EOS)
    model.half().save_pretrained(folder, max_shard_size="300KB")
    return folder


def write_tiny_vqgan(folder: Path) -> Path:
    """A tiny MUSE VQGAN in MUSE's own format (config.json + pickled pytorch_model.bin), 8192 codes of 4 dims."""
    make_tiny_muse_vqgan(folder, seed=0, num_embeddings=CODES, resolution=IMAGE, channel_mult=(1, 2),
                         z_channels=4, quantized_embed_dim=4)
    return folder


def serve_from_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str | None = None,
                         leave_out: tuple[str, ...] = ()) -> str:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo; returns the commit.

    models--org--name/blobs/<etag> (sha256 for LFS files, git blob sha1 otherwise),
    snapshots/<commit>/<path> -> ../../blobs/<etag> symlinks, refs/main = <commit>, and the
    trees/<commit>.json listing snapshot_download writes. `leave_out` files are listed but absent
    (an interrupted download).
    """
    commit = commit or hashlib.sha1(f"{repo_id}{folder}".encode()).hexdigest()
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    listing = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = name.endswith((".safetensors", ".bin"))
        sha256 = hashlib.sha256(data).hexdigest()
        listing[name] = {"size": len(data), "blob_id": git_sha1, **({"lfs_sha256": sha256, "lfs_size": len(data)} if lfs else {})}
        if name in leave_out:
            continue
        blob = storage / "blobs" / (sha256 if lfs else git_sha1)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return commit


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvm_sources")
    return {"backbone": write_tiny_lvm(root / "lvm"), "biased": write_tiny_lvm(root / "lvm_eos", biased_to_eos=True),
            "tokenizer": write_tiny_vqgan(root / "vq")}


def use_cache(monkeypatch, cache: Path) -> None:
    """Point huggingface_hub at `cache`, offline (constants are read at import, hence both)."""
    import huggingface_hub.constants as constants

    cache.mkdir(parents=True, exist_ok=True)
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in ("RETOUCH_LVM_REVISION", "RETOUCH_LVM_VQ_REVISION", "RETOUCH_LVM_REFINER", "RETOUCH_SKIP_MEMORY_CHECK"):
        monkeypatch.delenv(name, raising=False)


def serve_tokenizer(cache: Path, sources, leave_out: tuple[str, ...] = ()) -> str:
    """The tiny VQGAN as Emma02/vqvae_ckpts at its pinned commit (LVM_VQ_REVISION, also its main)."""
    return serve_from_hub_cache(cache, lvm.LVM_TOKENIZER_REPO, sources["tokenizer"], commit=lvm.LVM_VQ_REVISION,
                                leave_out=leave_out)


def serve_lvm(cache: Path, sources, backbone: str = "backbone") -> dict:
    return {"backbone": serve_from_hub_cache(cache, lvm.LVM_BACKBONE_REPO, sources[backbone]),
            "tokenizer": serve_tokenizer(cache, sources)}


@pytest.fixture(scope="module")
def engine(sources, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub_random")
    commits = serve_lvm(cache, sources)
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_cache(monkeypatch, cache)
        loaded = demo_core.load_engine("lvm-7b")
    loaded.commits = commits
    return loaded


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(count)]


def pairs_and_query(k: int = 2, seed: int = 0):
    pictures = images(2 * k + 1, seed)
    return [(pictures[2 * i], pictures[2 * i + 1]) for i in range(k)], pictures[-1]


@torch.no_grad()
def reference_log_probs(engine, pairs, query, answer) -> torch.Tensor:
    """(N,) log p(y_n | context, y_<n) over the codes, from ONE plain uncached forward of [x1, y1, ..., xq, y]."""
    codes = engine.encode([im for pair in pairs for im in pair] + [query])
    sequence = torch.cat([codes.reshape(-1), torch.as_tensor(np.asarray(answer)).reshape(-1)]).long()
    logits = engine.model(input_ids=sequence[None]).logits[0].float()
    log_probs = torch.log_softmax(logits[:, :CODES], dim=-1)
    start = codes.numel() - 1                    # the logits at position t predict token t + 1
    return log_probs[start:start + CELLS].gather(1, sequence[start + 1:, None])[:, 0]


# --------------------------------------------------------------------------------------------
# formats and loading
# --------------------------------------------------------------------------------------------

def test_tiny_checkpoints_have_lvms_formats_and_the_cache_is_valid(sources, tmp_path):
    from huggingface_hub import scan_cache_dir

    backbone = sources["backbone"]
    shards = sorted(p.name for p in backbone.glob("*.safetensors"))
    assert len(shards) >= 2 and (backbone / "model.safetensors.index.json").is_file()
    config = json.loads((backbone / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB
    assert json.loads((backbone / "generation_config.json").read_text())["eos_token_id"] == EOS
    from safetensors import safe_open

    with safe_open(backbone / shards[0], framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    state = torch.load(sources["tokenizer"] / "pytorch_model.bin", weights_only=True)
    assert state["quantize.embedding.weight"].shape == (CODES, 4) and "encoder.down.0.block.0.norm1.weight" in state

    commits = serve_lvm(tmp_path, sources)
    report = scan_cache_dir(tmp_path)                 # huggingface_hub's own reading of the layout
    assert not report.warnings
    repos = {repo.repo_id: repo for repo in report.repos}
    assert set(repos) == {lvm.LVM_BACKBONE_REPO, lvm.LVM_TOKENIZER_REPO}
    revision = next(iter(repos[lvm.LVM_BACKBONE_REPO].revisions))
    assert revision.commit_hash == commits["backbone"] and revision.refs == frozenset({"main"})


def test_load_engine_lvm_7b_through_the_hub_cache(engine):
    info = engine.bundle.info
    assert info["sequence_format"] == "lvm" and engine.bundle.sequence_format == "lvm"
    assert (info["image_size"], info["grid"], info["tokens_per_image"]) == (IMAGE, 4, CELLS)
    assert (info["codebook_size"], info["vocab_size"]) == (CODES, VOCAB)
    assert info["max_pairs"] == engine.max_pairs == 3
    assert "training-free fallback" in info["quality_signal"]
    assert info["sources"]["backbone"] == {"repo": lvm.LVM_BACKBONE_REPO, "revision": "main", "commit": engine.commits["backbone"]}
    assert info["sources"]["tokenizer"]["commit"] == engine.commits["tokenizer"]
    assert info["sources"]["tokenizer"]["revision"] == lvm.LVM_VQ_REVISION == "e4b5f5f83d9588ed52b6d1b65b91262f9f2d804b"
    assert info["pixel_range"] == [0.0, 1.0] and engine.tokenizer.pixel_range == (0.0, 1.0)     # MUSE: RGB as is
    assert next(engine.tokenizer.model.parameters()).dtype == torch.float32          # VQ always float32
    assert next(engine.model.parameters()).dtype == torch.float32                    # CPU: float32 (engine's choice)
    assert engine.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert engine.vsr is None and engine.available_refiners == ("scan",)


def test_context_cap_and_pairs():
    assert lvm.lvm_max_pairs(4096, 256) == 7          # 16 images: 15 of context + the answer
    assert lvm.lvm_max_pairs(MAX_POSITIONS, CELLS) == 3
    assert lvm.lvm_max_pairs(10 ** 6, CELLS) == 7     # capped at 16 images however long the context


def test_revision_from_the_environment_and_unknown_revision(sources, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path)
    commits = serve_lvm(tmp_path, sources)
    monkeypatch.setenv("RETOUCH_LVM_REVISION", commits["backbone"])     # a full sha: read from snapshots/ directly
    bundle = lvm.load_lvm_bundle(device="cpu", dtype=torch.float32)
    assert bundle.info["sources"]["backbone"]["revision"] == commits["backbone"]
    with pytest.raises(BundleError) as error:
        lvm.load_lvm_bundle(device="cpu", dtype=torch.float32, vq_revision="v9")
    assert "Emma02/vqvae_ckpts@v9" in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# pixels: the VQGAN sees and returns what it sees and returns in LVM
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def lvm_reference_round_trip(folder: Path, pictures: list[Image.Image]) -> tuple[torch.Tensor, np.ndarray]:
    """Codes (B, g, g) and pixels BxHxWx3 as LVM computes them: RGB / 255 fed straight into the VQGAN
    (utils.read_image_to_tensor), nearest code, decode, clamp to [0, 1] (inference.generate_once).
    The VQGAN is MUSE's computation on the MUSE-named weights (test_muse_vqgan), not the converted model."""
    from test_muse_vqgan import _muse_reference_forward

    config = json.loads((folder / "config.json").read_text())
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    pixels = np.stack([np.asarray(p.convert("RGB")) for p in pictures]) / 255.0
    batch = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2)     # (B, 3, H, W) in [0, 1], as is
    _, codes, decoded = _muse_reference_forward(state, config, batch)
    return codes, decoded.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


def test_lvm_round_trip_uses_lvms_pixel_range(engine, sources):
    pictures = images(6, seed=11)
    loaded, query = engine.prepare([(pictures[0], pictures[1]), (pictures[2], pictures[3])], pictures[4])
    shown = [image for pair in loaded for image in pair] + [query, pictures[5]]
    codes = engine.encode(shown)                                     # (B, N): the engine's context path
    pixels = engine.tokenizer.decode(codes)                          # BxHxWx3 floats; engine.decode rounds these
    ref_codes, ref_pixels = lvm_reference_round_trip(sources["tokenizer"], shown)
    assert torch.equal(codes.view_as(ref_codes), ref_codes), \
        f"{int((codes.view_as(ref_codes) == ref_codes).sum())} of {ref_codes.numel()} codes match LVM's"
    np.testing.assert_allclose(pixels, ref_pixels, rtol=0, atol=1e-4)
    for index in range(len(shown)):                                  # the canvas images are those pixels, rounded
        expected = (ref_pixels[index] * 255.0).round()
        assert np.abs(np.asarray(engine.decode(codes[index]), dtype=np.float64) - expected).max() <= 1


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------

def test_default_sampling_is_the_reference_scripts(engine):
    # ytongbai/LVM batch_generation.py: temperature=1.0, top_p=1.0 (passed on by inference.py generate_once)
    assert engine.sampling_defaults == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert "batch_generation.py" in engine.sampling_source and "generate_once" in engine.sampling_source
    pairs, query = pairs_and_query(k=1, seed=2)
    default = engine.run(pairs, query, refine=(), seed=3)
    reference = engine.run(pairs, query, refine=(), seed=3, temperature=1.0, top_p=1.0, top_k=0)
    nucleus = engine.run(pairs, query, refine=(), seed=3, top_p=0.9)        # the embedded default's setting
    assert np.array_equal(default.codes["draft"], reference.codes["draft"])
    assert not np.array_equal(default.codes["draft"], nucleus.codes["draft"])


def test_full_generation_with_the_scan_fallback(engine):
    pairs, query = pairs_and_query(k=2)
    # seed 5: under the recipe's default sampling (top-p 1.0) proposals come from every code, and most seeds
    # of this tiny random model find no improvement in 12 iterations; this one does
    events = list(engine.stream(pairs, query, refine=("scan",), seed=5, scan_iterations=12, scan_cells=4,
                                canvas_every=8, decode_scan_steps=True))
    started = events[0]
    assert isinstance(started, GenerationStarted) and started.sequence_format == "lvm"
    assert (started.total_tokens, started.context_tokens, started.stages) == (CELLS, 5 * CELLS, ["draft", "scan"])
    written = [e for e in events if isinstance(e, TokensWritten)]
    assert [e.index for e in written] == [e.cell for e in written] == list(range(CELLS))     # raster order
    assert [e.canvas is not None for e in written].count(True) == 2
    draft = next(e for e in events if isinstance(e, DraftDone))
    result = events[-1].result
    assert isinstance(events[-1], Finished) and isinstance(events[-2], StageDone) and events[-2].stage == "scan"
    assert list(result.stages) == ["draft", "scan"] and result.final.size == (IMAGE, IMAGE)
    assert all(0 <= t < CODES for tokens in result.codes.values() for t in tokens.flat)

    # the draft's quality is the model's own probability of each token (checked against a plain forward)
    reference = reference_log_probs(engine, pairs, query, draft.codes).exp().numpy().reshape(4, 4)
    np.testing.assert_allclose(draft.quality, reference, rtol=1e-4, atol=1e-7)

    # the fallback accepts only likelihood improvements, and every accepted step is one
    steps = [e for e in events if isinstance(e, ScanStep)]
    assert steps and result.history == steps
    previous_codes = draft.codes
    previous = float(reference_log_probs(engine, pairs, query, previous_codes).double().sum())
    for step in steps:
        now = float(reference_log_probs(engine, pairs, query, step.codes).double().sum())
        if any(step.accepted):
            assert now > previous
        else:
            assert now == pytest.approx(previous) and np.array_equal(step.codes, previous_codes)
        for cell, old, new, accepted in zip(step.cells, step.old_codes, step.new_codes, step.accepted):
            assert old != new                                  # a resample always proposes a different code
            assert step.codes.flat[cell] == (new if accepted else old)
        previous, previous_codes = now, step.codes
    assert sum(map(any, (s.accepted for s in steps))) >= 1, "this seed should improve at least once"
    final_probs = reference_log_probs(engine, pairs, query, result.codes["scan"]).exp().numpy().reshape(4, 4)
    np.testing.assert_allclose(result.quality["scan"], final_probs, rtol=1e-4, atol=1e-7)
    assert result.changed["scan"] == [int(c) for c in np.flatnonzero(result.codes["scan"] != result.codes["draft"])]

    # same seed, same image
    again = engine.run(pairs, query, refine=("scan",), seed=5, scan_iterations=12, scan_cells=4)
    assert np.array_equal(again.codes["scan"], result.codes["scan"])


def test_a_model_without_a_quality_token_refuses_the_head_only_score(engine):
    """LVM has no quality token: asking for the head's score is an input error, not silently ignored."""
    from demo_core.engine import EngineInputError

    pairs, query = pairs_and_query(k=1)
    with pytest.raises(EngineInputError, match="no quality token"):
        engine.run(pairs, query, refine=("scan",), quality_score="head")


def test_batched_candidate_scoring_matches_plain_forwards(engine):
    pairs, query = pairs_and_query(k=1, seed=3)
    codes = engine.encode([pairs[0][0], pairs[0][1], query])
    context = codes.reshape(-1)
    from demo_core.backbone import SamplingConfig

    drafts = []
    for _ in raster.draft_raster(engine.model, context, CELLS, CODES, SamplingConfig(candidates=3),
                           torch.Generator().manual_seed(1), drafts):
        pass
    answers = drafts[0].codes                                          # 3 different candidates
    scores = raster.score_answers(engine.model, drafts[0], answers, CODES)
    for answer, score in zip(answers, scores):
        reference = reference_log_probs(engine, pairs, query, answer)
        np.testing.assert_allclose(score.token_probs.numpy(), reference.exp().numpy(), rtol=1e-4, atol=1e-7)
        assert score.log_likelihood == pytest.approx(float(reference.double().sum()), abs=1e-3)
    np.testing.assert_allclose(drafts[0].token_probs.numpy(), torch.stack([s.token_probs for s in scores]).numpy(),
                               rtol=1e-4, atol=1e-7)


def test_special_ids_are_never_sampled_and_eos_does_not_stop(sources, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path)
    serve_lvm(tmp_path, sources, backbone="biased")
    engine = demo_core.load_engine("lvm-7b")
    pairs, query = pairs_and_query(k=1)
    codes = engine.encode([pairs[0][0], pairs[0][1], query]).reshape(-1)
    with torch.no_grad():
        logits = engine.model(input_ids=codes[None]).logits[0]
    assert (logits.argmax(-1) >= CODES).all()             # unmasked, a special id would win everywhere
    assert (logits[:, :CODES].argmax(-1) == EOS).all()    # among the codes, the checkpoint's EOS id
    result = engine.run(pairs, query, refine=("scan",), seed=0, candidates=2, top_p=1.0, top_k=0,
                        scan_iterations=2, scan_cells=2)
    assert result.codes["draft"].size == CELLS and (result.codes["draft"] == EOS).all()    # no early stop on id 2
    assert all((tokens < CODES).all() for tokens in result.codes.values())
    assert len(result.candidates) == 2


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

def test_missing_repo_in_the_offline_cache_is_one_line(sources, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path)
    with pytest.raises(BundleError) as error:
        demo_core.load_engine("lvm-7b")
    message = str(error.value)
    assert "Emma02/LVM_ckpts@main" in message and "cache" in message and "\n" not in message
    serve_from_hub_cache(tmp_path, lvm.LVM_BACKBONE_REPO, sources["backbone"])
    with pytest.raises(BundleError) as error:
        demo_core.load_engine("lvm-7b")
    assert f"Emma02/vqvae_ckpts@{lvm.LVM_VQ_REVISION}" in str(error.value) and "\n" not in str(error.value)


def test_incomplete_snapshot_is_one_line(sources, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path)
    shard = sorted(p.name for p in sources["backbone"].glob("*.safetensors"))[-1]
    serve_from_hub_cache(tmp_path, lvm.LVM_BACKBONE_REPO, sources["backbone"], leave_out=(shard,))
    serve_tokenizer(tmp_path, sources)
    with pytest.raises(BundleError) as error:
        demo_core.load_engine("lvm-7b")
    message = str(error.value)
    assert message.startswith("Emma02/LVM_ckpts@main: the cached copy is incomplete: 1 file(s) are missing")
    assert shard in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_memory_estimate_refuses_before_downloading_weights(sources, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path)
    weights = tuple(p.name for p in sources["backbone"].glob("*.safetensors"))
    serve_from_hub_cache(tmp_path, lvm.LVM_BACKBONE_REPO, sources["backbone"], leave_out=weights)   # configs only
    serve_tokenizer(tmp_path, sources, leave_out=("pytorch_model.bin",))
    monkeypatch.setattr(lvm, "available_memory", lambda device: (2 ** 20, "available RAM"))
    with pytest.raises(BundleError) as error:
        demo_core.load_engine("lvm-7b")
    message = str(error.value)
    assert message.startswith("lvm-7b needs about") and "only 0.0 GiB is available RAM" in message and "\n" not in message
    monkeypatch.setenv("RETOUCH_SKIP_MEMORY_CHECK", "1")            # skipping it reaches the (absent) weights
    with pytest.raises(BundleError, match=r"incomplete: \d+ file\(s\) are missing"):
        demo_core.load_engine("lvm-7b")


def test_memory_estimate_of_the_real_lvm_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    real = LlamaConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    estimate = lvm.estimate_memory(real, LVM_MUSE_CONFIG, torch.float16)
    assert estimate.parameters == 6_544_199_680 and estimate.weights == 2 * 6_544_199_680
    assert estimate.tokenizer == 4 * 146_244_675                  # the 585 MB MUSE VQGAN, float32
    assert estimate.context_tokens == 4096 and estimate.kv_cache == 4 * 2 ** 30     # 2 GiB, kept + working copy
    assert 17 < estimate.total / 2 ** 30 < 19
    tiny = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    assert lvm.llama_parameter_count(tiny) == sum(p.numel() for p in LlamaForCausalLM(tiny).parameters())


# --------------------------------------------------------------------------------------------
# VSR on LVM
# --------------------------------------------------------------------------------------------

def test_vsr_stage_with_a_refiner(sources, tmp_path, monkeypatch):
    try:
        from demo_core.refiners.self_refine import SelfRefiner
    except ImportError as error:
        pytest.skip(f"demo_core.refiners.self_refine is not in this checkout yet ({error})")
    use_cache(monkeypatch, tmp_path / "hub")
    serve_lvm(tmp_path / "hub", sources)
    from transformers import LlamaConfig

    torch.manual_seed(0)
    width = LlamaConfig.from_pretrained(sources["backbone"]).hidden_size
    refiner = SelfRefiner(dim=width, grid=4, heads=4)
    with torch.no_grad():
        refiner.out.weight.normal_(0, 0.5)                # an untrained g_phi is the identity: make it move codes
    refiner.save_pretrained(tmp_path / "refiner")
    monkeypatch.setenv("RETOUCH_LVM_REFINER", str(tmp_path / "refiner"))
    engine = demo_core.load_engine("lvm-7b")
    assert engine.available_refiners == ("scan", "vsr") and "refiner" in engine.bundle.info["parts"]
    pairs, query = pairs_and_query(k=1)
    events = list(engine.stream(pairs, query, refine=("scan", "vsr"), seed=0, scan_iterations=3))
    done = [e for e in events if isinstance(e, StageDone)]
    assert [e.stage for e in done] == ["scan", "vsr"]
    result = events[-1].result
    assert list(result.stages) == ["draft", "scan", "vsr"]
    assert result.changed["vsr"], "a perturbed g_phi should change some cells"
    reference = reference_log_probs(engine, pairs, query, result.codes["vsr"]).exp().numpy().reshape(4, 4)
    np.testing.assert_allclose(result.quality["vsr"], reference, rtol=1e-4, atol=1e-7)

    shutil.rmtree(tmp_path / "refiner")
    (tmp_path / "refiner").mkdir()
    with pytest.raises(BundleError, match="no config.json"):
        demo_core.load_engine("lvm-7b")


# --------------------------------------------------------------------------------------------
# the recipe exported as one standard bundle
# --------------------------------------------------------------------------------------------

def test_export_of_the_lvm_recipe_is_a_standard_bundle(engine, sources, tmp_path, monkeypatch, capsys):
    from demo_core import export

    use_cache(monkeypatch, tmp_path / "hub")
    serve_lvm(tmp_path / "hub", sources)
    out = tmp_path / "lvm-bundle"
    assert export.main(["--out", str(out), "--bundle", "lvm-7b", "--repo-id", "someone/lvm-7b-retouch"]) == 0
    assert "loaded back strictly" in capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "tokenizer/diffusion_pytorch_model.safetensors" in files and not [f for f in files if f.endswith(".bin")]
    assert json.loads((out / "tokenizer" / "config.json").read_text())["lookup_from_codebook"] is False
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["pixel_range"] == [0.0, 1.0] and manifest["sampling"] == engine.bundle.info["sampling"]
    card = (out / "README.md").read_text()
    assert "Emma02/LVM_ckpts" in card.split("---")[1] and "training-free fallback" in card
    assert "reads and writes RGB in [0, 1]" in card
    exported = demo_core.load_engine(str(out))                 # a plain folder: no Hub, no conversion
    assert exported.bundle.sequence_format == "lvm" and exported.max_pairs == 3
    assert exported.tokenizer.pixel_range == (0.0, 1.0) and exported.sampling_defaults == engine.sampling_defaults
    shown = images(3, seed=6)
    assert torch.equal(exported.encode(shown), engine.encode(shown))
    np.testing.assert_array_equal(exported.tokenizer.decode(engine.encode(shown)), engine.tokenizer.decode(engine.encode(shown)))
    pairs, query = pairs_and_query(k=1, seed=5)
    a = engine.run(pairs, query, refine=("scan",), seed=4, scan_iterations=3)
    b = exported.run(pairs, query, refine=("scan",), seed=4, scan_iterations=3)
    assert all(np.array_equal(a.codes[k], b.codes[k]) for k in ("draft", "scan"))    # the same model, token for token


# --------------------------------------------------------------------------------------------
# sequential prompting: LVM's second prompt kind (generate_videos.py: frames in, the next frame out)
# --------------------------------------------------------------------------------------------

LONG_POSITIONS = 32 * CELLS      # room for 32 images, so LVM's own cap of 16 (15 frames + the answer) is what binds


@pytest.fixture(scope="module")
def long_lvm(tmp_path_factory):
    """A tiny LVM whose positions outlast LVM's 16-image cap, served as Emma02/LVM_ckpts, and its engine."""
    root = tmp_path_factory.mktemp("lvm_long")
    sources = {"backbone": write_tiny_lvm(root / "lvm", seed=1, max_positions=LONG_POSITIONS),
               "tokenizer": write_tiny_vqgan(root / "vq")}
    cache = root / "hub"
    serve_lvm(cache, sources)
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_cache(monkeypatch, cache)
        loaded = demo_core.load_engine("lvm-7b")
    return loaded, cache


def test_frame_cap():
    assert lvm.MAX_CONTEXT_FRAMES == 15
    assert lvm.lvm_max_frames(4096, 256) == 15        # LVM-7B: 16 images of 256 tokens, the last the answer
    assert lvm.lvm_max_frames(MAX_POSITIONS, CELLS) == 7
    assert lvm.lvm_max_frames(10 ** 6, CELLS) == 15   # capped at 16 images however long the context


def test_the_sequence_context_is_lvms_reference_layout(long_lvm, engine):
    """15 frames, each tokenized on its own, 16 codes apiece, concatenated with no BOS and no separators, then the
    next frame in raster order; the draft's quality is p(code) from one plain forward of exactly that sequence."""
    long_engine, _ = long_lvm
    assert long_engine.max_frames == long_engine.bundle.info["max_frames"] == 15 and engine.max_frames == 7
    frames = images(15, seed=21)
    events = list(long_engine.stream(frames=frames, refine=(), seed=0))
    started, result = events[0], events[-1].result
    assert (started.frames, started.pairs, started.context_tokens, started.total_tokens) == (15, 0, 15 * CELLS, CELLS)
    written = [e for e in events if isinstance(e, TokensWritten)]
    assert [e.cell for e in written] == list(range(CELLS))                               # raster order
    assert all(0 <= t < CODES for t in result.codes["draft"].flat)                      # codes only, no special ids
    context, last = long_engine.build_frames_context(long_engine.prepare_frames(frames))
    one_by_one = torch.cat([long_engine.encode([frame]).reshape(-1) for frame in frames])
    assert context.shape == (15 * CELLS,) and torch.equal(context, one_by_one) and torch.equal(last, one_by_one[-CELLS:])
    assert int(context.max()) < CODES                                                    # nothing but VQ indices
    # the 15 frames are the token sequence of 7 pairs and a query: reuse the pairs' plain-forward reference
    draft = next(e for e in events if isinstance(e, DraftDone))
    reference = reference_log_probs(long_engine, [(frames[2 * i], frames[2 * i + 1]) for i in range(7)], frames[14],
                                    draft.codes).exp().numpy().reshape(4, 4)
    np.testing.assert_allclose(draft.quality, reference, rtol=1e-4, atol=1e-7)
    # SCAN's training-free fallback runs on a sequence unchanged
    scanned = long_engine.run(frames=frames[:3], refine=("scan",), seed=1, scan_iterations=2)
    assert list(scanned.stages) == ["draft", "scan"] and scanned.frames == 3


def test_more_than_15_frames_is_refused_in_one_line(long_lvm, tmp_path, monkeypatch, capsys):
    long_engine, cache = long_lvm
    from demo_core.engine import EngineInputError

    with pytest.raises(EngineInputError) as error:
        long_engine.run(frames=images(16, seed=22))
    assert str(error.value) == "16 frames do not fit in the context: this model holds at most 15; remove 1."
    paths = []
    for index, picture in enumerate(images(16, seed=23)):
        paths.append(tmp_path / f"f{index}.png")
        picture.save(paths[-1])
    use_cache(monkeypatch, cache)
    from demo_core.__main__ import main

    assert main(["generate", "--frames", *map(str, paths), "--bundle", "lvm-7b", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]       # (above it: huggingface_hub's fetch progress)
    assert err == "error: 16 frames do not fit in the context: this model holds at most 15; remove 1."
    assert main(["generate", "--frames", *map(str, paths[:15]), "--bundle", "lvm-7b", "--refine", "none",
                 "--truth", str(paths[15]), "--out", str(tmp_path / "o.png")]) == 0
    assert "last frame (identity) PSNR" in capsys.readouterr().out and (tmp_path / "o.png").exists()
