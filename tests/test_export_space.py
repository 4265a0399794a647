"""`python -m demo_core export` (a push_to_hub-ready bundle copy with a model card) and
`python -m demo_core space` (a deployable Hugging Face Space folder), on tiny bundles."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from demo_core import export, lvm, space
from demo_core.bundle import DEFAULT_BUNDLE, BundleError, load_bundle, read_safetensors
from demo_core.testing import build_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
TRAINING = {"step": 1200, "elapsed_minutes": 35.2, "command": "python -m demo_core.train backbone",
            "validation": {"token_accuracy": 0.51, "quality_auroc": 0.8, "per_task": {"inpainting": 0.7}}}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    try:
        import demo_core.refiners.self_refine  # noqa: F401
        with_refiner = True
    except ImportError:
        with_refiner = False
    folder = build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", refiner=with_refiner)
    (folder / "backbone" / "training.json").write_text(json.dumps(TRAINING))
    (folder / "backbone" / "checkpoint.pt").write_bytes(b"not part of a bundle")
    (folder / "tokenizer" / "pytorch_model.bin").write_bytes(b"a pickle must not travel")
    return folder


def test_export_round_trips_strictly_with_a_model_card(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "export"
    assert export.main(["--out", str(out), "--bundle", str(tiny_bundle), "--repo-id", "someone/retouch-tiny"]) == 0
    printed = capsys.readouterr().out
    assert "loaded back strictly" in printed and "hf upload someone/retouch-tiny" in printed
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "README.md" in files and "bundle.json" in files and "backbone/training.json" in files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))]
    assert {f.rsplit(".", 1)[-1] for f in files} <= {"json", "safetensors", "md"}

    original, copy = load_bundle(tiny_bundle), load_bundle(out)       # strict loads both
    assert copy.info == original.info
    for part in original.info["parts"]:
        a, b = read_safetensors(tiny_bundle / part, part), read_safetensors(out / part, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "image-to-image" and meta["license"] == "apache-2.0"
    assert meta["library_name"] and "retouch" in meta["tags"]
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.pipeline_tag == "image-to-image"
    assert 'load_engine("someone/retouch-tiny"' in card and 'subfolder="backbone"' in card and 'subfolder="tokenizer"' in card
    assert "steps: 1200" in card and "token_accuracy 0.51" in card
    assert "reads and writes RGB in [-1, 1]" in card


def test_export_of_a_bundle_by_hub_id_and_revision(tiny_bundle, tmp_path, monkeypatch, capsys):
    from test_lvm import serve_from_hub_cache, use_cache      # the offline Hub cache helpers

    use_cache(monkeypatch, tmp_path / "hub")
    commit = serve_from_hub_cache(tmp_path / "hub", "someone/retouch-tiny", tiny_bundle)
    out = tmp_path / "copy"
    assert export.main(["--out", str(out), "--bundle", "someone/retouch-tiny", "--revision", commit]) == 0
    assert "loaded back strictly" in capsys.readouterr().out
    assert load_bundle(out).info == load_bundle(tiny_bundle).info
    assert export.main(["--out", str(tmp_path / "nope"), "--bundle", "someone/other"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: someone/other") and "\n" not in error


def test_export_refuses_a_non_empty_folder(tiny_bundle, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert export.main(["--out", str(tmp_path), "--bundle", str(tiny_bundle)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "--force" in error and "\n" not in error
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _space_bundle(tiny_bundle) -> Path:
    """The repo's embedded default when it exists, else the tiny random bundle in its place."""
    return DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "bundle.json").is_file() else tiny_bundle


@pytest.fixture(scope="module")
def space_folder(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "retouch-space"
    summary = space.assemble(out, bundle=_space_bundle(tiny_bundle))
    return out, summary


def test_space_card_front_matter(space_folder):
    out, _ = space_folder
    meta = front_matter((out / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == "6.31.0" and meta["app_file"] == "app.py"
    assert meta["python_version"] == "3.11" and meta["title"] and meta["emoji"]
    assert len(meta["short_description"]) <= 60
    assert meta["models"] == [lvm.LVM_BACKBONE_REPO, lvm.LVM_TOKENIZER_REPO]
    assert meta["suggested_hardware"] == "a10g-small"
    revisions = lvm.revisions()
    entries = [entry.split() for entry in meta["preload_from_hub"]]
    assert [e[0] for e in entries] == meta["models"] and all(len(e) == 3 for e in entries)
    assert [e[2] for e in entries] == list(revisions)                      # pinned to the revision constants
    assert entries[0][1].split(",") == lvm.BACKBONE_FILES and entries[1][1].split(",") == lvm.TOKENIZER_FILES


def test_space_folder_holds_only_what_the_space_runs(space_folder):
    out, summary = space_folder
    files = summary["files"]
    top = {f.split("/")[0] for f in files}
    assert top <= {"README.md", "requirements.txt", "app.py", "retouch_app.py", "studio", "demo_core", "assets"}
    assert {"README.md", "requirements.txt", "app.py", "demo_core", "assets"} <= top
    assert "assets/retouch-tiny/bundle.json" in files and "demo_core/lvm.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".pt", ".bin")) or f.startswith(("tests/", "runs/"))]
    load_bundle(out / "assets" / "retouch-tiny")
    requirements = [line.split("#")[0].strip() for line in (out / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in requirements if line]
    assert requirements and not [r for r in requirements if "/" in r or r.startswith(("-e", "file:")) or ".whl" in r]
    names = {r.split("=")[0].split(">")[0].split("<")[0].lower() for r in requirements}
    assert {"torch", "transformers", "diffusers", "huggingface_hub"} <= names and "gradio" not in names


def test_space_pinning(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.delenv("RETOUCH_LVM_REVISION", raising=False)
    monkeypatch.delenv("RETOUCH_LVM_VQ_REVISION", raising=False)
    assert lvm.revisions()[1] == "e4b5f5f83d9588ed52b6d1b65b91262f9f2d804b"           # the tokenizer is pinned
    if not all(space.COMMIT.match(r) for r in lvm.revisions()):
        with pytest.raises(BundleError, match="not pinned") as error:
            space.assemble(tmp_path / "a", bundle=tiny_bundle, require_pinned=True)
        assert f"{lvm.LVM_BACKBONE_REPO}@main" in str(error.value) and lvm.LVM_TOKENIZER_REPO not in str(error.value)
        card = space.render_card(REPO / "spaces" / "README.md", *lvm.revisions())
        assert f"Not pinned to a commit: {lvm.LVM_BACKBONE_REPO}@main" in card
    monkeypatch.setenv("RETOUCH_LVM_REVISION", "main")                 # one branch name is enough to refuse
    with pytest.raises(BundleError, match=r"not pinned to commits \(Emma02/LVM_ckpts@main\)"):
        space.assemble(tmp_path / "c", bundle=tiny_bundle, require_pinned=True)
    monkeypatch.setenv("RETOUCH_LVM_REVISION", "a" * 40)
    monkeypatch.setenv("RETOUCH_LVM_VQ_REVISION", "b" * 40)
    summary = space.assemble(tmp_path / "b", bundle=tiny_bundle, require_pinned=True)
    assert not [w for w in summary["warnings"] if "pinned" in w]
    meta = front_matter((tmp_path / "b" / "README.md").read_text())
    assert [entry.split()[2] for entry in meta["preload_from_hub"]] == ["a" * 40, "b" * 40]


SPACE_CHECK = r"""
import json, runpy, sys, types
import gradio as gr

plain = runpy.run_path("app.py", run_name="space_app")          # no `spaces` package: nothing wrapped

calls = []
def GPU(func=None, duration=60):                                 # a stand-in for ZeroGPU's decorator
    def wrap(function):
        def wrapper(*args, **kwargs):
            calls.append(duration)
            return function(*args, **kwargs)
        return wrapper
    return wrap(func) if func is not None else wrap
sys.modules["spaces"] = types.SimpleNamespace(GPU=GPU)
zero = runpy.run_path("app.py", run_name="space_app")

import numpy as np
from PIL import Image
engine = zero["served"]
size = engine.image_size
picture = lambda seed: Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
result = engine.run([(picture(0), picture(1))], picture(2), refine=("scan",), seed=0, scan_iterations=2)
import demo_core
print(json.dumps({
    "plain_demo": isinstance(plain["demo"], gr.Blocks), "plain_engine": type(plain["served"]).__name__,
    "zero_demo": isinstance(zero["demo"], gr.Blocks), "zero_engine": type(engine).__name__,
    "calls": calls, "final": list(result.final.size), "label": plain["model_label"],
    "demo_core": demo_core.__file__, "max_pairs": engine.max_pairs,
}))
"""


def test_space_app_imports_and_builds_the_demo_on_cpu(space_folder, tmp_path):
    out, _ = space_folder
    if not (REPO / "app.py").is_file():
        pytest.skip("the repository's app.py (build_demo) does not exist yet: the Space folder has no UI to build")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACES_ZERO_GPU")}
    env.update(RETOUCH_MODEL="default", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_DISABLE_TELEMETRY="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SPACE_CHECK], cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["plain_demo"] and facts["plain_engine"] == "Engine"              # effect-free without `spaces`
    assert facts["zero_demo"] and facts["zero_engine"] == "GPUEngine"
    assert facts["calls"] == [120]                                                # one GPU reservation per generation
    assert facts["final"] and facts["label"] == "embedded default"
    assert Path(facts["demo_core"]).resolve().is_relative_to(out.resolve())         # the folder's own copy, not the repo's
