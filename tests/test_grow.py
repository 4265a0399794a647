import json
import shutil

import pytest
import torch

from demo_core.backbone import BackboneConfig, build_backbone
from demo_core.sequence import Vocab
from demo_core.testing import build_tiny_bundle
from demo_core.train import backbone as trainer
from demo_core.train.grow import grow_depth, layer_sources


def test_layer_sources_copy_each_layer_once_exactly_and_the_rest_silent():
    assert layer_sources(4, 8) == [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
    assert layer_sources(2, 3) == [(0, False), (0, True), (1, False)]
    assert layer_sources(3, 3) == [(0, False), (1, False), (2, False)]
    with pytest.raises(ValueError, match="only adds layers"):
        layer_sources(4, 2)


def test_grown_model_computes_the_same_logits_and_its_new_layers_can_learn():
    vocab = Vocab(64, 16)
    torch.manual_seed(0)
    small = build_backbone(BackboneConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=96, max_positions=128), vocab)
    for p in small.parameters():                       # a "trained" model: no zero matrices anywhere
        torch.nn.init.normal_(p, std=0.1) if p.dim() >= 2 else None
    big = build_backbone(BackboneConfig(hidden_size=32, num_layers=5, num_heads=4, intermediate_size=96, max_positions=128), vocab)
    grow_depth(small, big)
    ids = torch.randint(0, vocab.size, (2, 40))
    with torch.no_grad():
        assert torch.allclose(small(ids).logits, big(ids).logits, atol=1e-5)
    loss = big(ids, labels=ids).loss
    loss.backward()
    silent = [j for j, (_, is_silent) in enumerate(layer_sources(2, 5)) if is_silent]
    assert silent and all(big.model.layers[j].self_attn.o_proj.weight.grad.abs().sum() > 0 for j in silent)
    wider = build_backbone(BackboneConfig(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=192, max_positions=128), vocab)
    with pytest.raises(ValueError, match="keeps the width"):
        grow_depth(small, wider)


def test_trainer_grows_an_exported_backbone_and_then_resumes_its_own(tmp_path):
    source = build_tiny_bundle(tmp_path / "small")
    shutil.rmtree(source / "backbone")
    common = ["--batch", "2", "--run-dir", str(tmp_path / "run-small"), "--images", "builtin", "--episodes", "8",
              "--sequences", "4", "--sequence-share", "0.5", "--hidden", "32", "--heads", "4", "--validate-every", "0",
              "--autocast", "off"]
    trainer.main(["--steps", "2", "--bundle", str(source), "--layers", "1", *common])
    target = tmp_path / "deep"
    target.mkdir()
    shutil.copytree(source / "tokenizer", target / "tokenizer")
    grow = ["--steps", "2", "--bundle", str(target), "--layers", "3", "--grow-from", str(source),
            *[a if a != str(tmp_path / "run-small") else str(tmp_path / "run-deep") for a in common]]
    trainer.main(grow)
    info = json.loads((target / "backbone" / "training.json").read_text())
    assert info["step"] == 2 and info["config"]["num_layers"] == 3
    assert info["history"][0].get("grown_from") == str(source) and "--grow-from" in info["history"][-1]["command"]
    log = (tmp_path / "run-deep" / "train.log").read_text()
    assert "grown from" in log and "to 3 layers" in log
    trainer.main([*grow[:1], "3", *grow[2:]])                     # resumes its own checkpoint, not the source again
    assert json.loads((target / "backbone" / "training.json").read_text())["step"] == 3
    shutil.copytree(source / "tokenizer", tmp_path / "shallow" / "tokenizer")
    with pytest.raises(SystemExit, match="only adds layers"):     # one line, not a traceback
        trainer.main(["--steps", "1", "--bundle", str(tmp_path / "shallow"), "--layers", "1", "--grow-from", str(target),
                      *[a if a != str(tmp_path / "run-small") else str(tmp_path / "run-x") for a in common]])
