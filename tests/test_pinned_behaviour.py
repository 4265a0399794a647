"""Pinned behaviour: for fixed seeds, the codes every stage writes, recorded from the code as it was before the
engine was reorganised (issue 19), on the embedded default (assets/retouch-tiny), the tiny random bundle and the
LVM recipe on tiny Hub checkpoints. A refactor must leave every hash here unchanged; a deliberate change of
behaviour re-records them (`python tests/test_pinned_behaviour.py` prints the current values).

fast_llama computes in float32 here (conftest.py sets RETOUCH_FAST_DTYPE=float32), as the rest of the suite does.
What is hashed per case: the codes of every stage in order (draft first), and SCAN's history (cells, new codes,
accepted) -- stage names are left out, so renaming a stage keeps the pins.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("RETOUCH_FAST_DTYPE", "float32")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"


def stage_codes(result) -> dict:
    return getattr(result, "codes", None) or result.tokens


def fingerprint(result) -> str:
    """A short hash of every stage's codes (in order) and SCAN's per-iteration decisions."""
    parts = [",".join(str(int(c)) for c in np.asarray(codes).flat) for codes in stage_codes(result).values()]
    for step in result.history:
        parts.append(f"{list(step.cells)}{[int(c) for c in step.new_tokens]}{[bool(a) for a in step.accepted]}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def example(task: str):
    folder = EXAMPLES / task
    pairs = [(Image.open(folder / f"pair{i}_input.png"), Image.open(folder / f"pair{i}_answer.png")) for i in (1, 2)]
    return pairs, Image.open(folder / "query.png")


def random_images(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return [rng.random((24, 30, 3)).astype(np.float32) for _ in range(count)]


# case name -> (run keyword arguments); "vsr" runs the VSR stage under whichever name the engine takes
SCAN_CASES = {
    "draft": dict(refine=(), seed=0),
    "scan": dict(refine=("scan",), seed=0),
    "vsr": dict(refine=("vsr",), seed=0),
    "scan+vsr": dict(refine=("scan", "vsr"), seed=1),
    "head-score scan": dict(refine=("scan",), seed=2, quality_score="head", scan_iterations=10, scan_cells=2),
    "candidates": dict(refine=("scan",), seed=3, candidates=3, scan_iterations=6),
    "greedy": dict(refine=("scan",), seed=0, temperature=0.0, top_k=5),
    "tensor": dict(refine=(), seed=0, draft_mode="tensor"),
    "tensor+scan+vsr": dict(refine=("scan", "vsr"), seed=4, draft_mode="tensor"),
}
LVM_CASES = {
    "draft": dict(refine=(), seed=0),
    "scan": dict(refine=("scan",), seed=5, scan_iterations=12, scan_cells=4),
    "candidates": dict(refine=("scan",), seed=1, candidates=2, scan_iterations=4),
    "scan+vsr": dict(refine=("scan", "vsr"), seed=0, scan_iterations=3),
}


def run_case(settings: dict) -> dict:
    """The case's settings, the VSR stage under the engine's name for it ("vsr"; "self" before the rename)."""
    from demo_core import engine as engine_module

    name = "vsr" if "vsr" in engine_module.REFINERS else "self"
    return {**settings, "refine": tuple(name if stage == "vsr" else stage for stage in settings["refine"])}


def default_fingerprints() -> dict:
    import demo_core

    engine = demo_core.load_engine()
    out = {}
    for task in ("edges", "colorization"):
        pairs, query = example(task)
        for case, settings in SCAN_CASES.items():
            out[f"{task}: {case}"] = fingerprint(engine.run(pairs, query, **run_case(settings)))
    return out


def tiny_fingerprints(folder: Path) -> dict:
    import demo_core
    from demo_core.testing import build_tiny_bundle

    engine = demo_core.load_engine(str(build_tiny_bundle(folder, refiner=True, tensor=True)))
    with torch.no_grad():      # an untrained g_phi / adapter is the identity: perturb them so they move codes
        torch.manual_seed(0)
        for module in (getattr(engine.bundle, "vsr", None) or engine.bundle.refiner, engine.bundle.tensor.adapter):
            for parameter in module.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
    x1, y1, x2, y2, q = random_images(0, 5)
    out = {}
    for case, settings in SCAN_CASES.items():
        out[case] = fingerprint(engine.run([(x1, y1), (x2, y2)], q, **run_case(settings)))
    return out


def lvm_fingerprints(folder: Path) -> dict:
    import demo_core
    from demo_core.refiners.self_refine import SelfRefiner
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).parent))
    import test_lvm

    sources = {"backbone": test_lvm.write_tiny_lvm(folder / "lvm"), "tokenizer": test_lvm.write_tiny_vqgan(folder / "vq")}
    torch.manual_seed(0)
    refiner = SelfRefiner(dim=LlamaConfig.from_pretrained(sources["backbone"]).hidden_size, grid=4, heads=4)
    with torch.no_grad():
        refiner.out.weight.normal_(0, 0.5)
    refiner.save_pretrained(folder / "refiner")
    with pytest.MonkeyPatch.context() as monkeypatch:
        test_lvm.use_cache(monkeypatch, folder / "hub")
        test_lvm.serve_lvm(folder / "hub", sources)
        monkeypatch.setenv("RETOUCH_LVM_REFINER", str(folder / "refiner"))
        engine = demo_core.load_engine("lvm-7b")
    out = {}
    for k in (1, 2):
        pairs, query = test_lvm.pairs_and_query(k=k)
        for case, settings in LVM_CASES.items():
            out[f"K={k}: {case}"] = fingerprint(engine.run(pairs, query, **run_case(settings)))
    return out


# recorded from main at 8674e4a (before issue 19's refactor)
PINNED_DEFAULT = {
    'edges: draft': '380fc11a86e66437',
    'edges: scan': '3510e028cd14c4ef',
    'edges: vsr': '8833e8c550f03d41',
    'edges: scan+vsr': 'c20c225c2bec2064',
    'edges: head-score scan': '53316bd846710649',
    'edges: candidates': '93d0be096c44247f',
    'edges: greedy': '221b1853f22d2cd8',
    'edges: tensor': '41e26e6a188da0f6',
    'edges: tensor+scan+vsr': '9ccdd815f9d1bde2',
    'colorization: draft': 'd39ef74f1962ba21',
    'colorization: scan': 'fac5e2db62732340',
    'colorization: vsr': '2491d6630517cf62',
    'colorization: scan+vsr': '8ef1111e2f11b418',
    'colorization: head-score scan': '5b9a196930c074fc',
    'colorization: candidates': '121ae8535a34ef1c',
    'colorization: greedy': '27730dacdf62f7c2',
    'colorization: tensor': '42c14bdc76cbcc78',
    'colorization: tensor+scan+vsr': '91e13f54c36cdabb',
}
PINNED_TINY = {
    'draft': '90f9947c365e746a',
    'scan': '9e9e4c3439268894',
    'vsr': '254b47a73634963b',
    'scan+vsr': '5cd4474d6d8f2957',
    'head-score scan': '532546495518d9a5',
    'candidates': '1d55fbc5568498fa',
    'greedy': '1096377cb1ebe5ba',
    'tensor': 'd62a1ac9de38b03c',
    'tensor+scan+vsr': 'ab319914ca06fdd4',
}
PINNED_LVM = {
    'K=1: draft': '9771fbdd81e03a28',
    'K=1: scan': 'd5b7c27f9a544da1',
    'K=1: candidates': '1b7f035f8018d6b3',
    'K=1: scan+vsr': '728977ff4581778b',
    'K=2: draft': 'ca7936b880c497c4',
    'K=2: scan': '7d8491cc6e3f41d3',
    'K=2: candidates': 'e6ea4df3aba26439',
    'K=2: scan+vsr': '71a3a1f8660d64cd',
}


def check(actual: dict, pinned: dict) -> None:
    changed = {case: (pinned.get(case), value) for case, value in actual.items() if pinned.get(case) != value}
    assert set(actual) == set(pinned) and not changed, f"pinned codes changed (case: (pinned, now)): {changed}"


def test_default_bundle_codes_are_pinned():
    check(default_fingerprints(), PINNED_DEFAULT)


def test_tiny_random_bundle_codes_are_pinned(tmp_path):
    check(tiny_fingerprints(tmp_path), PINNED_TINY)


def test_lvm_recipe_codes_are_pinned(tmp_path):
    check(lvm_fingerprints(tmp_path), PINNED_LVM)


if __name__ == "__main__":          # print the current values, to re-record after a deliberate change
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tiny, tempfile.TemporaryDirectory() as hub:
        for name, values in (("PINNED_DEFAULT", default_fingerprints()), ("PINNED_TINY", tiny_fingerprints(Path(tiny))),
                             ("PINNED_LVM", lvm_fingerprints(Path(hub)))):
            print(f"{name} = {{")
            for case, value in values.items():
                print(f"    {case!r}: {value!r},")
            print("}")
