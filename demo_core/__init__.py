"""Retouch engine: in-context AR image generation that fixes its own mistakes (VSR, SCAN, TensorAR).

Importable without gradio. Entry point: `load_engine()`.
"""
__version__ = "0.1.0"


def load_engine(source=None, revision=None, device=None):
    from .engine import load_engine as _load_engine

    return _load_engine(source, revision=revision, device=device)
