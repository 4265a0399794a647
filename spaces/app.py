"""Hugging Face Space entry point for Retouch.

Loads ONE engine at module scope (ZeroGPU's rule: weights load at import, never in a request)
and builds the studio with the repository's `build_demo(engine)` (app.py, copied into the Space
folder as retouch_app.py by `python -m demo_core space`). When the `spaces` package is present,
the generation entry points (`engine.stream`, `engine.run`) run under `@spaces.GPU`; without it
nothing is wrapped and nothing changes.

Environment (Space variables):
    RETOUCH_MODEL         auto (default): lvm-7b when a GPU is present (CUDA or ZeroGPU), else the
                          embedded default; or default, lvm-7b, a bundle folder, a Hub repo id
    RETOUCH_GPU_DURATION  seconds ZeroGPU reserves per generation (default 120)
    RETOUCH_MODELS        what visitors may choose (each for their own session): default, lvm-7b, org/name[@rev];
                          unset: the embedded default, plus lvm-7b with a GPU (studio/models.py allowed_models)
    RETOUCH_ALLOW_LOCAL   1: local bundle folders may be listed too (never by default)
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# an assembled Space folder (demo_core beside this file, importable as the script's folder), or spaces/ in a
# checkout (demo_core importable once the package is installed: pip install -e .)
ROOT = HERE if (HERE / "demo_core").is_dir() else HERE.parent

# A Space is online: the studio's app.py defaults HF_HUB_OFFLINE to 1 for local runs, which would
# stop the model selector from fetching Hub bundles here. Analytics stay off.
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:                        # before torch: ZeroGPU patches CUDA initialisation
    import spaces
except ImportError:
    spaces = None

import torch  # noqa: E402

from demo_core.bundle import BundleError  # noqa: E402
from demo_core.engine import Engine, load_engine  # noqa: E402

log = logging.getLogger("retouch.space")
ZERO_GPU = spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))
GPU_DURATION = int(os.environ.get("RETOUCH_GPU_DURATION", "120"))


def load_build_demo():
    """`build_demo` from the repository's app.py (retouch_app.py in an assembled Space folder)."""
    for path in (ROOT / "retouch_app.py", ROOT / "app.py"):
        if path.is_file() and path.resolve() != Path(__file__).resolve():
            spec = importlib.util.spec_from_file_location("retouch_app", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["retouch_app"] = module
            spec.loader.exec_module(module)
            return module.build_demo
    raise ImportError(f"no Retouch app (retouch_app.py or app.py with build_demo) in {ROOT}")


def load_model(choice: str) -> tuple[Engine, str]:
    """(engine, label) for RETOUCH_MODEL; "auto" falls back to the embedded default if LVM-7B cannot load."""
    wanted = choice
    if choice == "auto":
        wanted = "lvm-7b" if (ZERO_GPU or torch.cuda.is_available()) else "default"
    try:
        if ZERO_GPU and wanted == "lvm-7b":
            # No GPU is attached at import on ZeroGPU: load on the CPU in bf16 (its GPUs support it) and move
            # with .to("cuda"), which ZeroGPU performs when a @spaces.GPU call starts. The memory check
            # would measure the host, not the GPU, so it is skipped.
            from demo_core.lvm import load_lvm_bundle

            os.environ.setdefault("RETOUCH_SKIP_MEMORY_CHECK", "1")
            bundle = load_lvm_bundle(device="cpu", dtype=torch.bfloat16)
            bundle.backbone.to("cuda")
            bundle.tokenizer.model.to("cuda")
            if bundle.vsr is not None:
                bundle.vsr.to("cuda")
            return Engine(bundle), "LVM-7B (ZeroGPU)"
        label = {"default": "embedded default", "lvm-7b": "LVM-7B"}.get(wanted, wanted)
        return load_engine(None if wanted == "default" else wanted), label
    except BundleError as error:
        if choice != "auto" or wanted == "default":
            raise
        log.warning("LVM-7B could not be loaded (%s); serving the embedded default instead", error)
        return load_engine(None), "embedded default"


class GPUEngine:
    """The engine with its generation entry points under @spaces.GPU; every other attribute passes through."""

    def __init__(self, engine: Engine, duration: int):
        self._engine = engine
        self.stream = spaces.GPU(duration=duration)(engine.stream)     # one GPU reservation per generation
        self.run = spaces.GPU(duration=duration)(engine.run)

    def __getattr__(self, name):
        return getattr(self._engine, name)


engine, model_label = load_model(os.environ.get("RETOUCH_MODEL", "auto"))
build_demo = load_build_demo()
served = GPUEngine(engine, GPU_DURATION) if spaces is not None else engine
parameters = inspect.signature(build_demo).parameters
if "model_id" in parameters:
    # visitors choose among RETOUCH_MODELS (default here: the embedded default, plus lvm-7b with a GPU);
    # engines loaded later get the same @spaces.GPU wrapping as the first
    def load_served(option):
        loaded = load_engine(option.source, revision=option.revision)
        return GPUEngine(loaded, GPU_DURATION) if spaces is not None else loaded

    from studio.models import EngineCache

    demo = build_demo(served, model_label=model_label, model_id="lvm-7b" if model_label.startswith("LVM-7B") else
                      "default" if model_label == "embedded default" else model_label, cache=EngineCache(loader=load_served))
elif "model_label" in parameters:
    demo = build_demo(served, model_label=model_label)
else:
    demo = build_demo(served)
demo.queue(max_size=16)

if __name__ == "__main__":
    demo.launch(max_file_size="10mb")
