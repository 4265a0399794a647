"""Model handling in the studio: the loaded engine, the model selector and the choices a model offers."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Sequence

import gradio as gr

from demo_core import viz
from demo_core.bundle import BundleError
from demo_core.engine import EngineInputError, load_engine
from demo_core.images import ImageInputError

log = logging.getLogger("retouch.studio")

# label in the UI -> stages after the draft, in order
REFINER_CHOICES = {
    "none (draft only)": (),
    "SCAN": ("scan",),
    "VSR": ("vsr",),
    "SCAN → VSR": ("scan", "vsr"),
    "VSR → SCAN": ("vsr", "scan"),
}
MODEL_KINDS = ("embedded default", "local bundle folder", "Hub repo id")
DRAFT_MODES = {"ar": "AR: one token per step", "tensor": "TensorAR: sliding windows, tokens revised"}
QUALITY_SCORE_CHOICES = [("quality head × token probability", "combined"), ("quality head only (SCAN paper)", "head")]


def refiner_choices(available: Sequence[str]) -> list[str]:
    """The refiner options a model supports (VSR only with a trained g_phi)."""
    return [label for label, stages in REFINER_CHOICES.items() if set(stages) <= set(available)]


def default_refiner(available: Sequence[str]) -> str:
    return "SCAN → VSR" if "vsr" in available else "SCAN"


def draft_modes(engine) -> tuple[str, ...]:
    """The draft modes an engine offers ("ar", and "tensor" with a TensorAR part)."""
    return tuple(getattr(engine, "available_draft_modes", ("ar",)))


def draft_mode_update(engine, value: str | None = None):
    """The draft-mode radio for a model: shown only when there is a choice."""
    modes = draft_modes(engine)
    return gr.update(choices=[(DRAFT_MODES.get(m, m), m) for m in modes], value=value if value in modes else "ar",
                     visible=len(modes) > 1)


class ModelHolder:
    """Holds the loaded engine (shared by every session); a model change swaps it under a lock."""

    def __init__(self, engine, model_label: str = "embedded default"):
        self.engine = engine
        self.model_label = model_label
        self._swap = threading.Lock()

    # -- model selector ---------------------------------------------------------------------------
    def model_info(self) -> str:
        engine = self.engine
        refiners = ", ".join(viz.stage_title(r) for r in engine.available_refiners)
        tasks = ", ".join(engine.bundle.info.get("tasks", [])) or "—"
        return (f"**Model:** {self.model_label} · {engine.image_size}×{engine.image_size} px images as "
                f"{engine.grid}×{engine.grid} tokens · up to {engine.max_pairs} pairs · refiners: {refiners} · "
                f"trained on: {tasks}")

    def sampling_note(self) -> str:
        """The info line under the sampling sliders: this model's defaults and where they come from."""
        defaults = self.engine.sampling_defaults
        top_k = f", top-k {int(defaults['top_k'])}" if defaults["top_k"] else ""
        return (f"Defaults for this model: temperature {float(defaults['temperature'])!r}, "
                f"top-p {float(defaults['top_p'])!r}{top_k} — {self.engine.sampling_source}.")

    def model_outputs(self, refiner_value: str | None = None, draft_value: str | None = None):
        """Updates that follow a model change: info, refiner choices, SCAN c range, max pairs, draft modes,
        and the sampling sliders reset to the new model's defaults with their info line."""
        available = self.engine.available_refiners
        choices = refiner_choices(available)
        value = refiner_value if refiner_value in choices else default_refiner(available)
        cells = self.engine.grid ** 2
        sampling = self.engine.sampling_defaults
        return (self.model_info(), gr.update(choices=choices, value=value), gr.update(maximum=cells),
                self.engine.max_pairs, draft_mode_update(self.engine, draft_value),
                gr.update(value=sampling["temperature"]), gr.update(value=sampling["top_p"]),
                gr.update(value=sampling["top_k"]), self.sampling_note())

    def load_model(self, kind: str, location: str, refiner_value: str | None = None, draft_value: str | None = None):
        """Model selector: load the embedded default, a local bundle folder or a Hub repo id.

        On any failure the current model stays and a gr.Error says why (offline Hub ids fail fast).
        """
        location = (location or "").strip()
        if kind == "embedded default":
            source, label = None, "embedded default"
        elif kind == "local bundle folder":
            if not location:
                raise gr.Error("Type the path of a bundle folder (it holds bundle.json, tokenizer/ and backbone/).")
            path = Path(location).expanduser()
            if not path.is_dir():
                raise gr.Error(f"No folder at {location}; give the path of a bundle folder on this machine.")
            source, label = str(path), f"local bundle {path.name}"
        elif kind == "Hub repo id":
            if not location:
                raise gr.Error("Type a Hub repo id such as org/name (or lvm-7b).")
            if location.lower() not in ("lvm-7b", "lvm") and (location.count("/") != 1 or " " in location):
                raise gr.Error(f"{location!r} is not a Hub repo id; use the form org/name.")
            source, label = location, f"Hub {location}"
        else:
            raise gr.Error(f"Choose one of: {', '.join(MODEL_KINDS)}.")
        try:
            engine = load_engine(source)
        except (BundleError, EngineInputError, ImageInputError) as error:
            raise gr.Error(f"Could not load {label}: {error}. The current model ({self.model_label}) stays loaded.")
        except Exception as error:   # a bundle we cannot use must never take the studio down
            log.exception("loading %s failed", label)
            raise gr.Error(f"Could not load {label} ({type(error).__name__}: {error}). "
                           f"The current model ({self.model_label}) stays loaded.")
        with self._swap:
            self.engine, self.model_label = engine, label
        gr.Info(f"Loaded {label}.")
        return self.model_outputs(refiner_value, draft_value)
