"""Teaching (issue 21): the LoRA adapter over the frozen backbone, its training, files, the engine's per-run use,
the pair files and the `teach` / `generate --adapter` commands, on tiny random bundles (one test reads the
embedded default's shapes, without training)."""
import hashlib
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from demo_core.__main__ import main
from demo_core.engine import EngineInputError, load_engine
from demo_core.fast_llama import fast_runner
from demo_core.teach.adapter import MAX_BYTES, AdapterError, TaskAdapter, applied, backbone_fingerprint
from demo_core.teach.pairs import MAX_PAIRS, PairFilesError, read_pair_files
from demo_core.teach.trainer import TeachConfig, encode_pairs, example_batch, new_adapter, pairs_loss, teach
from demo_core.testing import build_tiny_bundle

TINY_TEACH = TeachConfig(steps=6, batch_size=4, learning_rate=1e-2, max_refine=2)


def state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("teach") / "tiny")


@pytest.fixture(scope="module")
def engine(bundle):
    return load_engine(str(bundle))


@pytest.fixture(scope="module")
def pairs():
    """4 pairs of one task (invert) on random images: something to learn."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        x = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        out.append((Image.fromarray(x), Image.fromarray(255 - x)))
    return out


def trained(engine, pairs, steps=2, rank=4):
    """A quickly taught adapter with a non-zero B (a few steps at a high rate)."""
    return teach(engine, pairs, TeachConfig(steps=steps, batch_size=2, learning_rate=5e-2, rank=rank, max_refine=2))


def logits(model, ids, positions):
    return fast_runner(model)(input_ids=ids, position_ids=positions).logits


# ---------------------------------------------------------------------------------------------
# the adapter


def test_an_untrained_adapter_is_the_backbone_exactly(engine):
    model = engine.model
    ids = torch.randint(0, engine.vocab.codebook_size, (2, 40))
    positions = torch.arange(40)[None].repeat(2, 1)
    adapter = new_adapter(engine, TeachConfig(rank=4))
    assert all(bool((lora.up == 0).all()) for layer in adapter.layers for lora in layer.values())
    plain_fast = logits(model, ids, positions)
    plain_hf = model(input_ids=ids, position_ids=positions).logits
    with applied(model, adapter):
        assert torch.equal(logits(model, ids, positions), plain_fast)                       # the fast path
        assert torch.equal(model(input_ids=ids, position_ids=positions).logits, plain_hf)   # transformers' forward
    result = engine.run([pairs_of(engine)[0]], pairs_of(engine)[1][0], refine=("scan",), seed=3, scan_iterations=3)
    with_adapter = engine.run([pairs_of(engine)[0]], pairs_of(engine)[1][0], refine=("scan",), seed=3, scan_iterations=3,
                              adapter=adapter)
    for stage in result.codes:
        assert np.array_equal(np.asarray(result.codes[stage]), np.asarray(with_adapter.codes[stage]))


def pairs_of(engine):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    return (images[0], images[1]), (images[2],)


def test_a_trained_adapter_changes_the_fast_path_and_transformers_alike(engine, pairs):
    model = engine.model
    adapter = trained(engine, pairs)
    assert any(bool((lora.up != 0).any()) for layer in adapter.layers for lora in layer.values())
    ids = torch.randint(0, engine.vocab.codebook_size, (1, 30))
    positions = torch.arange(30)[None]
    plain = logits(model, ids, positions)
    with applied(model, adapter):
        fast = logits(model, ids, positions)
        reference = model(input_ids=ids, position_ids=positions).logits
    assert not torch.allclose(fast, plain)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits(model, ids, positions), plain)          # removed again: the backbone exactly


def test_teaching_lowers_the_loss_on_the_pairs(engine, pairs):
    codes = encode_pairs(engine, pairs, flips=True)
    before = pairs_loss(engine, None, codes=codes)
    steps = []
    adapter = teach(engine, pairs, TINY_TEACH, progress=steps.append)
    after = pairs_loss(engine, adapter, codes=codes)
    assert [s.step for s in steps] == list(range(1, TINY_TEACH.steps + 1))
    assert all(np.isfinite(s.loss) for s in steps)
    assert after < before - 0.05, (before, after)
    assert adapter.config.info["steps"] == TINY_TEACH.steps


def test_the_adapter_form_follows_the_config(engine, pairs, tmp_path):
    """TeachConfig.targets picks the projections that get LoRA (the ablation's forms); the file keeps the form."""
    adapter = teach(engine, pairs, TeachConfig(steps=1, batch_size=2, rank=2, targets=("q_proj", "v_proj"), max_refine=2))
    assert all(set(layer) == {"q_proj", "v_proj"} for layer in adapter.layers)
    assert adapter.config.rank == 2 and adapter.config.targets == ("q_proj", "v_proj")
    loaded = TaskAdapter.load(adapter.save(tmp_path / "form"))
    assert loaded.config.targets == ("q_proj", "v_proj") and loaded.num_bytes() == adapter.num_bytes()


def test_stop_ends_teaching_early(engine, pairs):
    steps = []
    teach(engine, pairs, TeachConfig(steps=50, batch_size=2, max_refine=0), progress=steps.append, stop=lambda: len(steps) >= 2)
    assert len(steps) == 2


def test_the_backbone_is_bit_identical_after_teaching_and_generating(engine, pairs):
    before = state_hash(engine.model)
    grads_before = [p.grad for p in engine.model.parameters()]
    adapter = trained(engine, pairs, steps=3)
    engine.run(pairs[:2], pairs[2][0], refine=("scan",), seed=0, scan_iterations=2, adapter=adapter)
    assert state_hash(engine.model) == before
    assert [p.grad for p in engine.model.parameters()] == grads_before       # no gradient was written either
    assert "_retouch_adapter" not in engine.model.__dict__
    assert not any(m._forward_hooks for m in engine.model.modules())         # no hook left behind


def test_leave_one_out_examples_never_show_the_query_as_a_demonstration():
    cells = 4
    codes = torch.arange(2 * 5 * 2 * cells).view(2, 5, 2, cells)      # distinct codes per (view, pair, side)
    rng = np.random.default_rng(0)
    context, answer = example_batch(codes, 3, 10, rng)
    assert context.shape == (10, 7 * cells) and answer.shape == (10, cells)
    for row, target in zip(context, answer):
        query = row[-cells:]
        assert any(torch.equal(target, codes[v, p, 1]) and torch.equal(query, codes[v, p, 0])
                   for v in range(2) for p in range(5))
        demos = row[:-cells].view(6, cells)
        assert not any(torch.equal(d, target) for d in demos)


def test_generation_with_and_without_the_adapter_is_per_run(engine, pairs):
    adapter = trained(engine, pairs, steps=4)
    options = dict(refine=("scan",), seed=1, scan_iterations=2, temperature=0.0)
    plain = engine.run(pairs[:2], pairs[3][0], **options)
    taught = engine.run(pairs[:2], pairs[3][0], adapter=adapter, **options)
    again = engine.run(pairs[:2], pairs[3][0], **options)
    assert all(np.array_equal(plain.codes[s], again.codes[s]) for s in plain.codes)   # nothing left applied
    assert any(not np.array_equal(plain.codes[s], taught.codes[s]) for s in plain.codes)


def test_a_plain_run_interleaved_with_an_adapter_run_sees_the_backbone(engine, pairs):
    """Two streams stepped alternately (as two visitors' generators could be) each see only their own model."""
    adapter = trained(engine, pairs, steps=4)
    options = dict(refine=("scan",), seed=2, scan_iterations=2, temperature=0.0)
    plain_alone = engine.run(pairs[:2], pairs[1][0], **options)
    taught_alone = engine.run(pairs[:2], pairs[1][0], adapter=adapter, **options)
    plain_stream = engine.stream(pairs[:2], pairs[1][0], **options, canvas_every=0)
    taught_stream = engine.stream(pairs[:2], pairs[1][0], adapter=adapter, **options, canvas_every=0)
    results = {}
    streams = {"plain": plain_stream, "taught": taught_stream}
    done = set()
    while len(done) < 2:
        for name, stream in streams.items():
            if name in done:
                continue
            event = next(stream, None)
            if event is None:
                done.add(name)
            elif type(event).__name__ == "Finished":
                results[name] = event.result
    assert np.array_equal(results["plain"].codes["scan"], plain_alone.codes["scan"])
    assert np.array_equal(results["taught"].codes["scan"], taught_alone.codes["scan"])


def test_a_run_in_another_thread_waits_for_the_adapter_lock(engine, pairs):
    adapter = new_adapter(engine)
    entered = threading.Event()

    def plain_step():
        with applied(engine.model, None):
            entered.set()

    with applied(engine.model, adapter):
        thread = threading.Thread(target=plain_step)
        thread.start()
        thread.join(0.3)
        assert not entered.is_set()            # blocked while the adapter is in force
    thread.join(5)
    assert entered.is_set()


# ---------------------------------------------------------------------------------------------
# files


def test_export_load_round_trip_and_mismatch_refused(engine, pairs, tmp_path, bundle):
    adapter = trained(engine, pairs)
    folder = adapter.save(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "config.json"]
    loaded = TaskAdapter.load(folder, engine.model)
    assert loaded.config.base_fingerprint == backbone_fingerprint(engine.model)
    assert loaded.config.base_name == "tiny-random" and loaded.config.rank == 4
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    other = load_engine(str(build_tiny_bundle(tmp_path / "other", seed=1)))      # same shapes, other weights
    with pytest.raises(AdapterError, match="other backbone weights") as refused:
        TaskAdapter.load(folder, other.model)
    assert "\n" not in str(refused.value)
    with pytest.raises(EngineInputError, match="Cannot use the adapter"):
        other.run(pairs[:1], pairs[1][0], adapter=loaded)
    with pytest.raises(AdapterError, match="not an adapter folder"):
        TaskAdapter.load(tmp_path)


def test_the_default_bundles_adapter_is_under_2_mb(tmp_path):
    """Built for assets/retouch-tiny's backbone shapes (no training)."""
    from demo_core.bundle import DEFAULT_BUNDLE, load_backbone_part

    backbone = load_backbone_part(DEFAULT_BUNDLE / "backbone")
    adapter = TaskAdapter.for_backbone(backbone, base_name="retouch-tiny")
    folder = adapter.save(tmp_path / "default-adapter")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= MAX_BYTES, size
    assert adapter.config.num_layers == backbone.config.num_hidden_layers
    assert set(next(iter(adapter.layers)).keys()) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------------------------------------
# pair files


def write_pairs(folder, names, size=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        x = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        for side, image in (("input", x), ("answer", 255 - x)):
            path = folder / f"{name}_{side}.png"
            Image.fromarray(image).save(path)
            paths.append(path)
    return paths


def test_pair_files_and_zips(tmp_path):
    paths = write_pairs(tmp_path / "files", ["b", "a", "c"])
    pairs = read_pair_files(paths)
    assert [p.name for p in pairs] == ["a", "b", "c"] and pairs[0].input.size == (20, 20)
    archive = tmp_path / "pairs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in paths:
            zf.write(path, f"folder/{path.name}")
        zf.writestr("__MACOSX/._a_input.png", b"junk")
    assert [p.name for p in read_pair_files([archive])] == ["a", "b", "c"]


@pytest.mark.parametrize("case, message", [
    ("unpaired", "cat_input.png has no answer"),
    ("badname", "is not named NAME_input.EXT"),
    ("notimage", "not an image"),
    ("one", "at least 2"),
    ("toomany", "too many"),
])
def test_bad_pair_files_are_one_line(tmp_path, case, message):
    paths = write_pairs(tmp_path, ["a", "b"])
    if case == "unpaired":
        paths += write_pairs(tmp_path, ["cat"])[:1]
    elif case == "badname":
        Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
        paths.append(tmp_path / "photo.png")
    elif case == "notimage":
        (tmp_path / "z_input.png").write_text("not a picture")
        Image.new("RGB", (8, 8)).save(tmp_path / "z_answer.png")
        paths += [tmp_path / "z_input.png", tmp_path / "z_answer.png"]
    elif case == "one":
        paths = paths[:2]
    else:
        paths = write_pairs(tmp_path / "many", [f"p{i}" for i in range(MAX_PAIRS + 1)], size=4)
    with pytest.raises(PairFilesError, match=message) as error:
        read_pair_files(paths)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_teach_then_generate_with_the_adapter(bundle, tmp_path, capsys):
    paths = write_pairs(tmp_path / "pairs", ["a", "b", "c"], size=16)
    out = tmp_path / "adapter"
    assert main(["teach", *map(str, paths), "--out", str(out), "--steps", "2", "--batch", "2", "--bundle", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and "wrote" in printed and (out / "adapter.safetensors").exists()
    image = tmp_path / "out.png"
    common = ["generate", "--pair", str(paths[0]), str(paths[1]), "--query", str(paths[2]), "--bundle", str(bundle),
              "--scan-iterations", "2", "--out", str(image)]
    assert main([*common, "--adapter", str(out)]) == 0 and image.exists()
    assert main(common) == 0
    other = build_tiny_bundle(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert main([*common[:-6], "--bundle", str(other), "--scan-iterations", "2", "--out", str(image), "--adapter", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other backbone weights" in err and err.count("\n") == 1


@pytest.mark.parametrize("case, message", [("unpaired", "has no answer"), ("one", "at least 2"), ("notimage", "not an image")])
def test_cli_teach_bad_input_is_one_error_line(bundle, tmp_path, capsys, case, message):
    paths = write_pairs(tmp_path, ["a", "b"], size=16)
    if case == "unpaired":
        paths = paths[:3]
    elif case == "one":
        paths = paths[:2]
    else:
        (tmp_path / "a_input.png").write_text("text")
    assert main(["teach", *map(str, paths), "--out", str(tmp_path / "ad"), "--steps", "1", "--bundle", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "ad").exists()


def test_the_fingerprint_follows_the_weights_not_their_float_type(engine):
    import copy

    model = engine.model
    half = copy.deepcopy(model).to(torch.float16)
    assert backbone_fingerprint(half) == backbone_fingerprint(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1.0
    assert backbone_fingerprint(changed) != backbone_fingerprint(model)


def test_a_model_that_has_run_with_an_adapter_can_still_be_deep_copied(engine, pairs):
    import copy

    engine.run(pairs[:1], pairs[1][0], refine=(), adapter=new_adapter(engine))
    copy.deepcopy(engine.model)          # e.g. the backbone trainer's float16 export copies the model
