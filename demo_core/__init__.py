"""Retouch engine: in-context AR image generation that fixes its own mistakes (VSR, SCAN, TensorAR).

Importable without gradio. Entry point: `load_engine()`; `Engine.run` returns a `Result`, `Engine.stream`
yields the typed events of `events.py`. The names below load lazily (torch, transformers and diffusers are
imported on first use, so `python -m demo_core --help` stays instant).

    from demo_core import load_engine
    engine = load_engine()          # embedded default; or a folder, a Hub id (+revision), "lvm-7b"
    result = engine.run(pairs=[(x1, y1)], query=q, refine=("scan", "vsr"), seed=0)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_engine": "engine", "Engine": "engine", "RunSettings": "engine", "EngineInputError": "engine",
    "REFINERS": "engine", "DRAFT_MODES": "engine",
    "Bundle": "bundle", "load_bundle": "bundle", "BundleError": "errors",
    "Result": "events", "Event": "events", "GenerationStarted": "events", "TokensWritten": "events",
    "WindowSlid": "events", "DraftDone": "events", "ScanStep": "events", "StageDone": "events", "Finished": "events",
    "ImageInputError": "images",
    "TaskAdapter": "teach.adapter", "AdapterError": "teach.adapter", "TeachConfig": "teach.trainer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
