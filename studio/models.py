"""Model handling in the studio: what the operator allows, the shared cache of loaded engines, each
visitor's own model choice (a gr.State holding a model id) and the choices a model offers.

The operator decides what can be loaded (`allowed_models`, from RETOUCH_MODELS and RETOUCH_ALLOW_LOCAL);
visitors pick from those in a dropdown. A request for anything else is refused with one line before any
file is looked at or any Hub call is made. Loaded engines live in one `EngineCache` shared by all
sessions: least recently used out within a memory budget, each model loaded under its own lock, so a
visitor loading a model never blocks another visitor's run.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

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
DRAFT_MODES = {"ar": "AR: one token per step", "tensor": "TensorAR: sliding windows, tokens revised"}
QUALITY_SCORE_CHOICES = [("quality head × token probability", "combined"), ("quality head only (SCAN paper)", "head")]
# demo_core/render.py: where the answer keeps the query's code, show the query's own pixels or the decode
PASTE_CHOICES = [("the model's default", "default"), ("the query's pixels", "on"), ("the tokenizer's decode", "off")]
LUMA_CHOICES = [("the model's default", "default"), ("from the query", "on"), ("the model's own", "off")]
DEFAULT_MODEL = "default"
LOCAL_PREFIX = "local:"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]{1,100})?$")
DEFAULT_BUDGET_MB = 4096


def canvas_slider(engine) -> dict:
    """The live-canvas slider for `engine`: its default (CANVAS_FRAMES canvases a draft) and a range up to a quarter
    of the answer's tokens."""
    return gr.update(value=engine.canvas_every_default, maximum=canvas_maximum(engine))


def canvas_maximum(engine) -> int:
    return max(16, engine.grid ** 2 // 4)


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


# ---------------------------------------------------------------------------------------------
# the operator's allow-list


@dataclass(frozen=True)
class ModelOption:
    """One loadable model: `id` is what the dropdown and the session state hold, `source` goes to load_engine."""

    id: str
    label: str
    source: str | None = None
    revision: str | None = None


def _gpu_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available()) or bool(os.environ.get("SPACES_ZERO_GPU"))
    except Exception:
        return False


def parse_model_entry(entry: str, allow_local: bool) -> ModelOption | None:
    """One RETOUCH_MODELS entry -> a ModelOption (None, with a log line, for one this server may not offer)."""
    entry = entry.strip()
    if not entry:
        return None
    if entry.lower() in ("default", "embedded", "embedded default"):
        return ModelOption(DEFAULT_MODEL, "embedded default (retouch-tiny)")
    if entry.lower() in ("lvm-7b", "lvm"):
        return ModelOption("lvm-7b", "LVM-7B (Hub: Emma02/LVM_ckpts)", "lvm-7b")
    local = entry[len(LOCAL_PREFIX):] if entry.startswith(LOCAL_PREFIX) else entry
    if local.startswith(("/", "./", "../", "~")):
        if not allow_local:
            log.warning("RETOUCH_MODELS entry %r is a local folder; set RETOUCH_ALLOW_LOCAL=1 to offer it", entry)
            return None
        path = os.path.expanduser(local)
        return ModelOption(LOCAL_PREFIX + path, f"local bundle {os.path.basename(path.rstrip('/')) or path}", path)
    if HUB_ID.match(entry):
        repo, _, revision = entry.partition("@")
        return ModelOption(entry, f"Hub {entry}", repo, revision or None)
    log.warning("RETOUCH_MODELS entry %r is neither default, lvm-7b, a Hub id (org/name[@revision]) "
                "nor a local folder; left out", entry)
    return None


def allowed_models(spec: str | None = None, allow_local: bool | None = None, gpu: bool | None = None) -> list[ModelOption]:
    """The models this server offers: RETOUCH_MODELS (comma-separated: default, lvm-7b, org/name[@revision],
    and local folders only with RETOUCH_ALLOW_LOCAL=1); unset: the embedded default, plus lvm-7b with a GPU."""
    spec = os.environ.get("RETOUCH_MODELS") if spec is None else spec
    allow_local = local_allowed() if allow_local is None else allow_local
    if spec is None or not spec.strip():
        spec = "default,lvm-7b" if (_gpu_present() if gpu is None else gpu) else "default"
    options: dict[str, ModelOption] = {}
    for entry in spec.split(","):
        option = parse_model_entry(entry, allow_local)
        if option is not None:
            options.setdefault(option.id, option)
    return list(options.values())


def local_allowed() -> bool:
    return os.environ.get("RETOUCH_ALLOW_LOCAL", "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------
# the shared cache of loaded engines


def engine_bytes(engine) -> int:
    """Memory the engine's weights take (parameters and buffers of every part, shared tensors once)."""
    import torch

    seen, total = set(), 0
    bundle = getattr(engine, "bundle", None)
    parts = [getattr(bundle, name, None) for name in ("backbone", "vsr", "tensor")]
    parts.append(getattr(getattr(bundle, "tokenizer", None), "model", None))
    for part in parts:
        if not isinstance(part, torch.nn.Module):
            continue
        for tensor in [*part.parameters(), *part.buffers()]:
            key = (tensor.device, tensor.data_ptr())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


class EngineCache:
    """Loaded engines shared by every session, least recently used out beyond `budget_bytes`.

    Each model loads under its own lock (two visitors asking for the same model load it once) and never
    under the cache's lock, so a load does not hold up runs with models already loaded. An evicted engine
    stays alive for the runs that hold it; the next request for it loads it again. Pinned engines (the one
    the server started with) are never evicted.
    """

    def __init__(self, budget_bytes: int | None = None, loader: Callable | None = None, measure: Callable = engine_bytes):
        if budget_bytes is None:
            budget_bytes = int(float(os.environ.get("RETOUCH_MODEL_MEMORY_MB", DEFAULT_BUDGET_MB)) * 2**20)
        self.budget_bytes = budget_bytes
        self.loader = loader or (lambda option: load_engine(option.source, revision=option.revision))
        self.measure = measure
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self._loading: dict[str, threading.Lock] = {}

    def put(self, model_id: str, engine, pinned: bool = False) -> None:
        with self._lock:
            self._entries[model_id] = (engine, self.measure(engine))
            self._entries.move_to_end(model_id)
            if pinned:
                self._pinned.add(model_id)
            self._evict()

    def peek(self, model_id: str):
        """The engine if loaded (no load, no change of order)."""
        with self._lock:
            entry = self._entries.get(model_id)
        return entry[0] if entry else None

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def get(self, option: ModelOption):
        """The engine for `option`, loading it (and evicting others) if it is not loaded."""
        with self._lock:
            entry = self._entries.get(option.id)
            if entry is not None:
                self._entries.move_to_end(option.id)
                return entry[0]
            key_lock = self._loading.setdefault(option.id, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._entries.get(option.id)
                if entry is not None:
                    self._entries.move_to_end(option.id)
                    return entry[0]
            engine = self.loader(option)                  # slow: no cache lock held
            size = self.measure(engine)
            with self._lock:
                self._entries[option.id] = (engine, size)
                self._evict()
            return engine

    def _evict(self) -> None:
        total = sum(size for _, size in self._entries.values())
        for model_id in list(self._entries):
            if total <= self.budget_bytes or len(self._entries) <= 1:
                break
            if model_id in self._pinned or model_id == next(reversed(self._entries)):
                continue
            _, size = self._entries.pop(model_id)
            total -= size
            log.info("model %s evicted from the cache (%.0f MB)", model_id, size / 2**20)


# ---------------------------------------------------------------------------------------------
# the studio's side: each visitor's model


class ModelHolder:
    """The allow-list, the shared engine cache and the per-visitor model (its id is the session's gr.State).

    `self.engine` is the engine the server started with (every new visitor's model); handlers take the
    visitor's model id and use `engine_for(model_id)`.
    """

    def __init__(self, engine, model_label: str = "embedded default", models: Sequence[ModelOption] | None = None,
                 model_id: str = DEFAULT_MODEL, cache: EngineCache | None = None):
        self.engine = engine
        self.model_label = model_label
        self.default_model = model_id
        options = list(allowed_models() if models is None else models)
        if model_id not in {option.id for option in options}:
            options.insert(0, ModelOption(model_id, model_label))
        else:                                         # the running engine's own label wins
            options = [ModelOption(o.id, model_label, o.source, o.revision) if o.id == model_id else o for o in options]
        self.options: dict[str, ModelOption] = {option.id: option for option in options}
        self.allow_local = local_allowed()
        self.cache = cache or EngineCache()
        self.cache.put(model_id, engine, pinned=True)

    # -- which model ------------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        return [(option.label, option.id) for option in self.options.values()]

    def resolve(self, model_id: str | None) -> ModelOption:
        """The allowed option for a model id, or a gr.Error (nothing read, nothing fetched)."""
        if model_id is None or model_id == "":
            return self.options[self.default_model]
        if not isinstance(model_id, str):
            raise gr.Error(f"Choose a model from the list ({', '.join(self.options)}).")
        option = self.options.get(model_id)
        if option is not None:
            return option
        if self.allow_local and model_id.startswith(("/", "./", "../", "~", LOCAL_PREFIX)):
            path = os.path.expanduser(model_id[len(LOCAL_PREFIX):] if model_id.startswith(LOCAL_PREFIX) else model_id)
            if not os.path.isdir(path):
                raise gr.Error(f"No folder at {path}; give the path of a bundle folder on this machine.")
            return ModelOption(LOCAL_PREFIX + path, f"local bundle {os.path.basename(path.rstrip('/')) or path}", path)
        shown = model_id if len(model_id) <= 80 else model_id[:77] + "…"
        raise gr.Error(f"{shown!r} is not offered on this server; choose one of: {', '.join(self.options)}.")

    def engine_for(self, model_id: str | None):
        """The engine of a visitor's model (loaded again if the cache let it go)."""
        option = self.resolve(model_id)
        if option.id == self.default_model:
            return self.cache.peek(option.id) or self.engine
        return self._load(option)

    def label_for(self, model_id: str | None) -> str:
        return self.resolve(model_id).label

    def _load(self, option: ModelOption):
        try:
            return self.cache.get(option)
        except (BundleError, EngineInputError, ImageInputError) as error:
            raise gr.Error(f"Could not load {option.label}: {error}. Your current model stays loaded.")
        except gr.Error:
            raise
        except Exception as error:   # a bundle we cannot use must never take the studio down
            log.exception("loading %s failed", option.label)
            raise gr.Error(f"Could not load {option.label} ({type(error).__name__}: {error}). "
                           f"Your current model stays loaded.")

    # -- model selector ---------------------------------------------------------------------------
    def model_info(self, model_id: str | None = None, engine=None) -> str:
        engine = engine or self.engine_for(model_id)
        label = self.label_for(model_id)
        refiners = ", ".join(viz.stage_title(r) for r in engine.available_refiners)
        tasks = ", ".join(engine.bundle.info.get("tasks", [])) or "—"
        return (f"**Model:** {label} · {engine.image_size}×{engine.image_size} px images as "
                f"{engine.grid}×{engine.grid} tokens · up to {engine.max_pairs} pairs · refiners: {refiners} · "
                f"trained on: {tasks}")

    def sampling_note(self, model_id: str | None = None, engine=None) -> str:
        """The info line under the sampling sliders: this model's defaults and where they come from."""
        engine = engine or self.engine_for(model_id)
        defaults = engine.sampling_defaults
        top_k = f", top-k {int(defaults['top_k'])}" if defaults["top_k"] else ""
        return (f"Defaults for this model: temperature {float(defaults['temperature'])!r}, "
                f"top-p {float(defaults['top_p'])!r}{top_k} — {engine.sampling_source}.")

    def model_outputs(self, model_id: str | None = None, refiner_value: str | None = None, draft_value: str | None = None):
        """Updates that follow a model change: info, refiner choices, SCAN c range, max pairs, draft modes,
        the sampling sliders reset to the new model's defaults with their info line, and the live-canvas slider
        (its default and range follow the model's grid)."""
        engine = self.engine_for(model_id)
        available = engine.available_refiners
        choices = refiner_choices(available)
        value = refiner_value if refiner_value in choices else default_refiner(available)
        cells = engine.grid ** 2
        sampling = engine.sampling_defaults
        return (self.model_info(model_id, engine), gr.update(choices=choices, value=value), gr.update(maximum=cells),
                engine.max_pairs, draft_mode_update(engine, draft_value),
                gr.update(value=sampling["temperature"]), gr.update(value=sampling["top_p"]),
                gr.update(value=sampling["top_k"]), self.sampling_note(model_id, engine), canvas_slider(engine))

    def load_model(self, model_id: str | None, refiner_value: str | None = None, draft_value: str | None = None,
                   current: str | None = None):
        """Model selector: make an allowed model this visitor's model (loaded into the shared cache if needed).

        Returns (the visitor's new model id, *model_outputs). On any failure the visitor's model stays and a
        gr.Error says why; a model that is not allowed is refused before anything is read or fetched.
        """
        option = self.resolve(model_id)
        if option.id == self.default_model:          # loaded into the shared cache; model_outputs reads it there
            self.engine_for(option.id)
        else:
            self._load(option)
        if option.id not in self.options:            # a local folder typed by the operator's choice
            self.options[option.id] = option
        gr.Info(f"Loaded {option.label}.")
        return (option.id, *self.model_outputs(option.id, refiner_value, draft_value))
