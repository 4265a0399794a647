import json
import shutil

import pytest
import torch

from demo_core.sequence import Vocab
from demo_core.testing import build_tiny_bundle
from demo_core.train import backbone as trainer

VOCAB = Vocab(codebook_size=32, cells=16)


def batch(seed=0, refine=16):
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, 32, (6, 48), generator=g)
    answer = torch.randint(0, 32, (6, 16), generator=g)
    tf = torch.randint(0, 32, (6, 16), generator=g)
    return context, answer, trainer.build_batch(VOCAB, context, answer, tf, g, max_refine=refine)


def test_batch_layout_and_targets():
    context, answer, (ids, pos, gen_t, q_t, tail) = batch()
    assert ids.shape == pos.shape and ids.shape[1] == 48 + tail and tail % 2 == 0
    assert torch.equal(ids[:, :48], context)
    at_ids, code_ids = ids[:, 48::2], ids[:, 49::2]
    assert ((at_ids >= VOCAB.at_base) & (at_ids < VOCAB.good)).all() and (code_ids < 32).all()
    cells = at_ids - VOCAB.at_base
    assert torch.equal(cells[:, :16].sort(1).values, torch.arange(16).expand(6, 16))   # every cell drafted once
    assert torch.equal(pos[:, 48::2], 48 + cells) and torch.equal(pos[:, 49::2], 48 + cells)  # cell-aligned
    assert torch.equal(gen_t, answer.gather(1, cells))                                   # target = ground truth
    assert torch.equal(q_t, (code_ids == gen_t).long())                                  # good iff equal to truth


def test_negative_ratio_is_bounded():
    shares = []
    for seed in range(20):
        _, _, (ids, _, _, q_t, _) = batch(seed, refine=0)
        shares.append(1 - q_t.float().mean().item())
    assert 0.05 < sum(shares) / len(shares) < 0.3        # r ~ U[0, 0.4] (minus accidental matches)


def test_drafted_examples_take_their_draft_whole_in_raster_order():
    g = torch.Generator().manual_seed(0)
    context, answer = torch.randint(0, 32, (4, 48), generator=g), torch.randint(0, 32, (4, 16), generator=g)
    drafts = torch.full_like(answer, -1)
    drafts[1] = torch.randint(0, 32, (16,), generator=g)
    drafts[1, :5] = answer[1, :5]                                       # a few right, the rest (mostly) wrong
    ids, pos, gen_t, q_t, tail = trainer.build_batch(VOCAB, context, answer, None, g, max_refine=4, drafts=drafts)
    cells = ids[:, 48::2] - VOCAB.at_base
    assert torch.equal(cells[1, :16], torch.arange(16))                 # raster, like the engine's draft
    assert torch.equal(ids[1, 49:48 + 32:2], drafts[1])                 # the draft, every cell
    assert torch.equal(q_t[1, :16], (drafts[1] == answer[1]).long())    # labelled against the truth
    assert torch.equal(gen_t, answer.gather(1, cells))                  # targets stay the ground truth
    refined = cells[1, 16:]                                             # re-asked cells: the draft's wrong ones first
    wrong = (drafts[1] != answer[1]).nonzero().flatten().tolist()
    assert set(refined.tolist()) <= set(wrong) or len(wrong) < len(refined)


def test_task_weights():
    import numpy as np
    import pytest

    weights = trainer.parse_task_weights("edges=2, posterize=2")
    names = list(trainer.TASKS)
    assert np.isclose(weights.sum(), 1) and np.isclose(weights[names.index("edges")], 2 * weights[names.index("invert")])
    assert np.allclose(trainer.parse_task_weights(""), 1 / len(names))
    with pytest.raises(SystemExit, match="unknown task"):
        trainer.parse_task_weights("sketch=2")
    with pytest.raises(SystemExit, match="not a number"):
        trainer.parse_task_weights("edges=lots")
    assert np.allclose(trainer.parse_k_weights("1,2,2"), [0.2, 0.4, 0.4])
    for bad, message in (("1,2", "three numbers"), ("1,x,2", "not a number"), ("0,0,0", "not all zero")):
        with pytest.raises(SystemExit, match=message):
            trainer.parse_k_weights(bad)


def test_quality_weights_mask_tokens_out_of_the_quality_loss():
    torch.manual_seed(0)
    vocab = trainer.Vocab(16, 4)
    model = trainer.build_backbone(trainer.BackboneConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64), vocab)
    context, answer = torch.randint(0, 16, (2, 12)), torch.randint(0, 16, (2, 4))
    ids, pos, gen_t, q_t, tail = trainer.build_batch(vocab, context, answer, None, torch.Generator().manual_seed(0), max_refine=0)
    q_t = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]])
    full = trainer.losses(model, vocab, ids, pos, gen_t, q_t, tail)
    ones = trainer.losses(model, vocab, ids, pos, gen_t, q_t, tail, torch.ones(2, 4))
    assert torch.allclose(full[1], ones[1]) and torch.equal(full[0], ones[0])
    # weight 0 on row 0: the quality loss is the mean over row 1 only, whatever row 0's labels say
    masked = trainer.losses(model, vocab, ids, pos, gen_t, q_t, tail, torch.tensor([[0.0] * 4, [1.0] * 4]))
    flipped = trainer.losses(model, vocab, ids, pos, gen_t, torch.stack([1 - q_t[0], q_t[1]]), tail,
                             torch.tensor([[0.0] * 4, [1.0] * 4]))
    row1 = torch.nn.functional.cross_entropy(full[3][1].float(), q_t[1])
    assert torch.allclose(masked[1], row1) and torch.allclose(flipped[1], row1)


def test_change_weights_weigh_the_cells_the_task_changes():
    torch.manual_seed(0)
    vocab = trainer.Vocab(16, 4)
    model = trainer.build_backbone(trainer.BackboneConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64), vocab)
    context = torch.randint(0, 16, (2, 12))
    answer = context[:, -4:].clone()
    answer[0, 2] = (answer[0, 2] + 1) % 16           # row 0 changes cell 2; row 1 copies its query
    cells: list = []
    ids, pos, gen_t, q_t, tail = trainer.build_batch(vocab, context, answer, None, torch.Generator().manual_seed(3),
                                                     max_refine=2, cells_out=cells)
    weights = trainer.change_weights(context, answer, cells[0], 5.0)
    assert weights.shape == gen_t.shape
    assert torch.equal(weights == 5.0, (cells[0] == 2) & (torch.arange(2)[:, None] == 0))
    # weight 1 everywhere is the plain mean; a weight of 0 on the copied cells leaves the changed ones alone
    plain, ones = (trainer.losses(model, vocab, ids, pos, gen_t, q_t, tail, gen_weights=w)[0] for w in (None, torch.ones(gen_t.shape)))
    assert torch.allclose(plain, ones)
    only_changed = trainer.losses(model, vocab, ids, pos, gen_t, q_t, tail, gen_weights=(weights == 5.0).float())[0]
    logits = trainer.TrainingForward(model)(ids, pos, tail)[0][:, 0::2, :16]
    expected = torch.nn.functional.cross_entropy(logits[weights == 5.0].float(), gen_t[weights == 5.0])
    assert torch.allclose(only_changed, expected, atol=1e-6)


def test_auroc():
    import numpy as np

    from demo_core.metrics import auroc

    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0


def test_schedule_start_begins_a_leg_with_its_own_warm_up_and_cosine():
    from types import SimpleNamespace

    whole = SimpleNamespace(steps=1000, lr=1e-3, warmup=10)
    leg = SimpleNamespace(steps=1000, lr=1e-4, warmup=10, schedule_start=800)
    assert trainer.leg_lr(5, whole) == pytest.approx(1e-3 * 6 / 10)            # no start: the whole run's schedule
    assert trainer.leg_lr(800, leg) == pytest.approx(1e-4 / 10)                # the leg warms up again
    assert trainer.leg_lr(810, leg) == pytest.approx(1e-4)                     # to its own peak
    assert trainer.leg_lr(1000, leg) == pytest.approx(1e-5)                    # and anneals to a tenth at --steps
    assert trainer.leg_lr(700, leg) == trainer.leg_lr(800, leg)                # before the start: the start's value
    assert trainer.leg_lr(900, leg) < trainer.leg_lr(850, leg) < 1e-4


def test_trainer_runs_exports_and_resumes(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "b")
    shutil.rmtree(bundle / "backbone")
    args = ["--data", "five", "--steps", "3", "--batch", "4", "--bundle", str(bundle), "--run-dir", str(tmp_path / "run"), "--pool", "40",
            "--hidden", "32", "--layers", "1", "--heads", "4", "--validate-every", "3"]
    trainer.main(args)
    info = json.loads((bundle / "backbone" / "training.json").read_text())
    assert info["step"] == 3 and info["validation"]["token_accuracy"] >= 0
    assert json.loads((bundle / "bundle.json").read_text())["parts"]["backbone"] == "backbone"
    trainer.main([*args[:3], "5", *args[4:], "--draft-negatives", "0.5", "--draft-quality", "0", "--k-weights", "0,1,1",
                  "--task-weights", "edges=3"])                  # resume to 5 steps with the other data options
    info = json.loads((bundle / "backbone" / "training.json").read_text())
    assert info["step"] == 5 and set(info["validation"]["draft_auroc"]) <= set(trainer.TASKS)
    assert [(h["from_step"], h["to_step"]) for h in info["history"]] == [(0, 3), (3, 5)]
    assert "--draft-negatives 0.5" in info["command"] == info["history"][-1]["command"]
    from demo_core.bundle import load_bundle
    assert load_bundle(bundle).backbone.config.hidden_size == 32


def test_family_trainer_trains_on_episodes_and_sequences_and_resumes(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "b")
    shutil.rmtree(bundle / "backbone")
    args = ["--steps", "4", "--batch", "2", "--bundle", str(bundle), "--run-dir", str(tmp_path / "run"), "--images", "builtin",
            "--episodes", "8", "--sequences", "4", "--sequence-share", "0.5", "--hidden", "32", "--layers", "1",
            "--heads", "4", "--validate-every", "4", "--task-weights", "inpaint=3", "--context-loss", "0.5", "--autocast", "off"]
    trainer.main(args)
    info = json.loads((bundle / "backbone" / "training.json").read_text())
    validation = info["validation"]
    assert info["step"] == 4 and info["codes_sha256_16"] == trainer.tokenizer_fingerprint(bundle)
    assert {"val k=1", "val k=3", "heldout-params k=2", "heldout-kind k=2", "sequences frames=3"} <= set(validation["per_group"])
    assert "solarize@heldout-kind" in validation["per_task"] and "sequence:pan" in validation["draft_accuracy"]
    assert set(validation["copy_accuracy"]) <= set(validation["per_task"])
    assert set(validation["change_accuracy"]) <= set(validation["per_task"])
    assert all(0.0 <= value <= 1.0 for part in ("copy_accuracy", "change_accuracy") for value in validation[part].values())
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["name"] == "retouch-16" and "solarize" in manifest["tasks"] and manifest["max_frames"] == 4
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(bundle / "backbone" / "model.safetensors").values()} == {torch.float16}   # half the bytes
    # resumes from the checkpoint, in bf16, with the changed cells weighed, on the device asked for
    trainer.main([*args[:1], "6", *args[2:], "--autocast", "bf16", "--change-weight", "3", "--device", "cpu"])
    resumed = json.loads((bundle / "backbone" / "training.json").read_text())
    assert resumed["step"] == 6 and resumed["args"]["autocast"] == "bf16" and resumed["args"]["change_weight"] == "3.0"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "training forward in float32 on cpu" in log and "training forward in bf16 autocast on cpu" in log
    weights = load_file(bundle / "backbone" / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    validate_at = args.index("--validate-every") + 1                   # no validation: none recorded, none built
    trainer.main([*args[:1], "7", *args[2:validate_at], "0", *args[validate_at + 1:]])
    unvalidated = json.loads((bundle / "backbone" / "training.json").read_text())
    assert unvalidated["step"] == 7 and unvalidated["validation"] is None
    with pytest.raises(SystemExit, match="held-out kind"):
        trainer.main([*args, "--task-weights", "solarize=2"])


def test_output_rows_predict_the_output_images():
    assert torch.equal(trainer.output_rows("k=1", 4), torch.arange(3, 7))              # [x1 y1 xq]: y1 is tokens 4..7
    assert torch.equal(trainer.output_rows("k=2", 4), torch.cat([torch.arange(3, 7), torch.arange(11, 15)]))
    assert torch.equal(trainer.output_rows("frames=3", 4), torch.arange(3, 11))        # frames 2 and 3


def test_context_loss_is_next_token_cross_entropy_on_output_images():
    torch.manual_seed(0)
    vocab = trainer.Vocab(16, 4)
    model = trainer.build_backbone(trainer.BackboneConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64), vocab)
    g = torch.Generator().manual_seed(0)
    context, answer = torch.randint(0, 16, (2, 12), generator=g), torch.randint(0, 16, (2, 4), generator=g)
    ids, pos, gen_t, q_t, tail = trainer.build_batch(vocab, context, answer, None, g, max_refine=0)
    rows = trainer.output_rows("k=1", 4)
    plain = trainer.losses(model, vocab, ids, pos, gen_t, q_t, tail)
    *same, context_loss = trainer.losses(model, vocab, ids, pos, gen_t, q_t, tail, context_rows=rows)
    assert torch.allclose(plain[0], same[0], atol=1e-5) and torch.allclose(plain[1], same[1], atol=1e-5)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits[:, rows, :16]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, rows + 1].reshape(-1))
    assert torch.allclose(context_loss, expected, atol=1e-5)


def test_autocast_choice(monkeypatch):
    from demo_core.train import common

    cpu = torch.device("cpu")
    assert common.autocast_dtype("off", cpu) is None and common.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(common, "native_bf16", lambda device: False)
    assert common.autocast_dtype("auto", cpu) is None                  # emulated bf16 would be slower: float32
    monkeypatch.setattr(common, "native_bf16", lambda device: True)
    assert common.autocast_dtype("auto", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="choose from"):
        common.autocast_dtype("fp8", cpu)
    with common.autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with common.autocast(cpu, None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
