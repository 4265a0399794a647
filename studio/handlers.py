"""Event handlers of the studio: widget values in, engine calls, widget values out.

Each handler is a plain function or generator of widget values, so tests call them directly
and app.py only wires them to components. Inputs the user must change raise `gr.Error` with
what to change (nothing else is touched, so the other inputs stay); things worth knowing but
not fatal are `gr.Warning`. The model itself lives behind `Studio.engine`; the only model
detail used here is the backbone's input-embedding table, for the per-token cosine distance
curve (VSR paper Fig. 2).
"""
from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from demo_core import viz
from demo_core.bundle import BundleError
from demo_core.engine import EngineInputError, load_engine
from demo_core.events import (DraftDone, Finished, GenerationStarted, Result, ScanStep, StageDone, TokensWritten,
                              WindowSlid)
from demo_core.images import ImageInputError, load_square
from demo_core.tasks import TASKS

from .layout import status_html

log = logging.getLogger("retouch.studio")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "assets" / "examples"
MAX_ROWS = 8                      # pair rows built in the page; the loaded model's max_pairs limits how many show
MAX_SEED = 2**31 - 1

# label in the UI -> stages after the draft, in order
REFINER_CHOICES = {
    "none (draft only)": (),
    "SCAN": ("scan",),
    "VSR": ("self",),
    "SCAN → VSR": ("scan", "self"),
    "VSR → SCAN": ("self", "scan"),
}
MODEL_KINDS = ("embedded default", "local bundle folder", "Hub repo id")
DRAFT_MODES = {"ar": "AR: one token per step", "tensor": "TensorAR: sliding windows, tokens revised"}
QUALITY_SCORE_CHOICES = [("quality head × token probability", "combined"), ("quality head only (SCAN paper)", "head")]

# Every generate() yield is a tuple in this order; app.py builds the components in the same order.
OUTPUTS = (
    "canvas", "status", "seed",
    "quality_draft", "quality_final", "quality_note",
    "timeline_slider", "timeline_image", "timeline_text", "vsr_image", "tensor_plot",
    "before_after", "compare_a", "compare_b", "stage_grid",
    "metrics_table", "timings_table", "cosine_plot", "quality_plot", "metrics_note",
    "run_state",
)
METRIC_COLUMNS = ["stage", "PSNR", "SSIM", "LPIPS", "tok. acc.", "cos. dist.", "quality", "changed", "ms"]
TIMING_COLUMNS = ["phase", "ms"]


def frame(**values) -> tuple:
    """A generate() output tuple: the given outputs by name, gr.skip() for the rest."""
    unknown = set(values) - set(OUTPUTS)
    if unknown:
        raise KeyError(f"unknown outputs {sorted(unknown)}")
    return tuple(values[name] if name in values else gr.skip() for name in OUTPUTS)


def refiner_choices(available: Sequence[str]) -> list[str]:
    """The refiner options a model supports (VSR only with a trained g_phi)."""
    return [label for label, stages in REFINER_CHOICES.items() if set(stages) <= set(available)]


def default_refiner(available: Sequence[str]) -> str:
    return "SCAN → VSR" if "self" in available else "SCAN"


def draft_modes(engine) -> tuple[str, ...]:
    """The draft modes an engine offers ("ar", and "tensor" with a TensorAR part)."""
    return tuple(getattr(engine, "available_draft_modes", ("ar",)))


def draft_mode_update(engine, value: str | None = None):
    """The draft-mode radio for a model: shown only when there is a choice."""
    modes = draft_modes(engine)
    return gr.update(choices=[(DRAFT_MODES.get(m, m), m) for m in modes], value=value if value in modes else "ar",
                     visible=len(modes) > 1)


# ---------------------------------------------------------------------------------------------
# examples


@dataclass
class Example:
    task: str
    pairs: list[tuple[str, str]]          # file paths
    query: str
    truth: str | None

    @property
    def title(self) -> str:
        return TASKS[self.task].title if self.task in TASKS else self.task


def list_examples(folder: Path = EXAMPLES_DIR) -> dict[str, Example]:
    """assets/examples/<task>/{pair1_input,pair1_answer,...,query,truth}.png, in TASKS order."""
    examples = {}
    if not folder.is_dir():
        return examples
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    names.sort(key=lambda n: list(TASKS).index(n) if n in TASKS else len(TASKS))
    for name in names:
        task_dir = folder / name
        pairs = []
        for number in range(1, MAX_ROWS + 1):
            x, y = task_dir / f"pair{number}_input.png", task_dir / f"pair{number}_answer.png"
            if not (x.exists() and y.exists()):
                break
            pairs.append((str(x), str(y)))
        query = task_dir / "query.png"
        if pairs and query.exists():
            truth = task_dir / "truth.png"
            examples[name] = Example(name, pairs, str(query), str(truth) if truth.exists() else None)
    return examples


def example_preview(example: Example, tile: int = 64, gap: int = 4) -> Image.Image:
    """The gallery thumbnail: pair 1 (input → answer) above, query → ground truth below."""
    first = [Image.open(path) for path in example.pairs[0]]
    second = [Image.open(example.query),
              Image.open(example.truth) if example.truth else Image.new("RGB", (tile, tile), (226, 232, 240))]
    top, bottom = viz.strip(first, tile=tile, gap=gap, arrows=[0]), viz.strip(second, tile=tile, gap=gap, arrows=[0])
    sheet = Image.new("RGB", (top.width, top.height + bottom.height - gap), (255, 255, 255))
    sheet.paste(top, (0, 0))
    sheet.paste(bottom, (0, top.height - gap))
    return sheet


def pair_row_updates(count: int, values: Sequence | None = None) -> list:
    """Updates for the MAX_ROWS pair rows: visible up to `count`; with `values`, also set the images."""
    rows = [gr.update(visible=index < count) for index in range(MAX_ROWS)]
    if values is None:
        return rows
    images = []
    for index in range(MAX_ROWS):
        x, y = values[index] if index < len(values) else (None, None)
        images += [x, y]
    return rows + images


def add_pair(count: int, max_pairs: int):
    """+ pair: one more row, up to what the model's context holds."""
    count = int(count)
    if count >= MAX_ROWS or count >= int(max_pairs):
        gr.Warning(f"This model holds at most {min(int(max_pairs), MAX_ROWS)} demonstration pairs.")
        return [count, *pair_row_updates(count)]
    return [count + 1, *pair_row_updates(count + 1)]


def remove_pair(count: int):
    """− pair: hide the last row and clear its images (so hidden rows never reach the model)."""
    count = int(count)
    if count <= 1:
        gr.Warning("At least one demonstration pair is needed; replace its images instead.")
        return [count, *pair_row_updates(count), *([gr.skip()] * (2 * MAX_ROWS))]
    cleared = [None if index // 2 >= count - 1 else gr.skip() for index in range(2 * MAX_ROWS)]
    return [count - 1, *pair_row_updates(count - 1), *cleared]


# ---------------------------------------------------------------------------------------------
# the run kept in the session


@dataclass
class RunView:
    """What a finished run leaves in the session (gr.State) for the timeline and the comparisons."""

    result: Result
    grid: int
    truth: Image.Image | None = None
    images: dict[str, Image.Image] = field(default_factory=dict)   # comparable images by name


def _mean(values) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def _scan_summary(step: ScanStep, grid: int) -> str:
    kept = sum(step.accepted)
    lines = [f"**Iteration {step.iteration + 1}** — regenerated {len(step.cells)} tokens, "
             f"kept {kept} (score improved), rejected {len(step.cells) - kept}; mean quality now {_mean(step.quality):.3f}.",
             "", "| cell (row, col) | token old → new | score old → new | |", "|---|---|---|---|"]
    for cell, old, new, s_old, s_new, ok in zip(step.cells, step.old_tokens, step.new_tokens, step.old_scores,
                                                 step.new_scores, step.accepted):
        row, col = divmod(int(cell), grid)
        lines.append(f"| ({row}, {col}) | {old} → {new} | {s_old:.3f} → {s_new:.3f} | {'✔ kept' if ok else '✖ rejected'} |")
    return "\n".join(lines)


def timeline_view(iteration, run: RunView | None):
    """The timeline slider moved: that SCAN iteration's image with its regenerated patches boxed (0: the draft)."""
    if run is None or not run.result.history:
        return None, "Run a generation with SCAN to see its iterations here."
    history = run.result.history
    index = min(max(int(iteration or 0), 0), len(history))
    if index == 0:
        draft_mean = _mean(run.result.quality["draft"])
        return viz.upscale(run.result.draft), (f"**The draft**, before SCAN — mean quality {draft_mean:.3f}. "
                                               "Move the slider to see each iteration.")
    step = history[index - 1]
    image = step.image if step.image is not None else run.result.stages.get("scan", run.result.final)
    return viz.patch_boxes(image, step.cells, step.accepted, run.grid), _scan_summary(step, run.grid)


def compare_view(name_a: str, name_b: str, run: RunView | None):
    """Before/after slider between any two stages (or the query / ground truth)."""
    if run is None:
        return None
    if name_a not in run.images or name_b not in run.images:
        raise gr.Error(f"Choose two of: {', '.join(run.images)}.")
    return viz.upscale(run.images[name_a]), viz.upscale(run.images[name_b])


# ---------------------------------------------------------------------------------------------
# the studio: the engine and the generation handler


class Studio:
    """Holds the loaded engine (shared by every session) and runs generations with it."""

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

    # -- examples ---------------------------------------------------------------------------------
    def load_example(self, task: str):
        """Fill pairs, query and ground truth with a task's example (the model still only sees the pairs)."""
        examples = list_examples()
        if task not in examples:
            raise gr.Error(f"No example for {task!r}; choose one of: {', '.join(examples) or 'none installed'}.")
        example = examples[task]
        pairs = example.pairs[:min(self.engine.max_pairs, MAX_ROWS)]
        if len(pairs) < len(example.pairs):
            gr.Warning(f"This model holds {len(pairs)} pairs; the example's other pairs were left out.")
        return [len(pairs), *pair_row_updates(len(pairs), pairs), example.query, example.truth, task]

    def select_example(self, event: gr.SelectData):
        """A click on an example thumbnail."""
        names = list(list_examples())
        if event is None or not (0 <= event.index < len(names)):
            raise gr.Error("Pick one of the examples.")
        return self.load_example(names[event.index])

    # -- generation -------------------------------------------------------------------------------
    def generate_from_widgets(self, *values):
        """The Generate button: MAX_ROWS (input, answer) image pairs, then the other widgets (see generate())."""
        images, rest = values[:2 * MAX_ROWS], values[2 * MAX_ROWS:]
        pairs = [(images[2 * i], images[2 * i + 1]) for i in range(MAX_ROWS)]
        yield from self.generate(pairs, *rest)

    def generate_endpoint(self):
        """generate_from_widgets with a named signature, so the /generate API lists real parameter names."""
        def generate(*values):
            yield from self.generate_from_widgets(*values)

        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        pair_parameters = [inspect.Parameter(f"pair{number}_{side}", keyword, **({} if number == 1 else {"default": None}))
                           for number in range(1, MAX_ROWS + 1) for side in ("input", "answer")]
        others = [inspect.Parameter(name, keyword, default=None if parameter.default is inspect.Parameter.empty else parameter.default)
                  for name, parameter in inspect.signature(self.generate).parameters.items() if name != "pairs"]
        generate.__signature__ = inspect.Signature(pair_parameters + others)
        generate.__doc__ = self.generate.__doc__
        return generate

    def generate(self, pairs, query, truth=None, refiners: str = "SCAN", scan_iterations=30, scan_cells=4,
                 temperature=None, top_p=None, top_k=None, seed=0, randomize_seed=False, candidates=1,
                 canvas_every=4, frame_ms=60, draft_mode="ar", quality_score="combined") -> Iterator[tuple]:
        """Draft the answer token by token, then refine; yields output tuples (OUTPUTS order) as it goes.

        temperature / top_p / top_k left out (None): the model's own defaults (`Engine.sampling_defaults`)."""
        engine = self.engine             # one model for the whole run, even if another is loaded meanwhile
        pairs = [(x, y) for x, y in (pairs or []) if x is not None or y is not None]
        filled = len(pairs)
        if filled > engine.max_pairs:
            raise gr.Error(f"{filled} pairs do not fit in this model's context (at most {engine.max_pairs}); "
                           f"remove {filled - engine.max_pairs}.")
        if refiners not in REFINER_CHOICES:
            raise gr.Error(f"Unknown refiner setting {refiners!r}; choose one of: {', '.join(REFINER_CHOICES)}.")
        refine = REFINER_CHOICES[refiners]
        if "self" in refine and "self" not in engine.available_refiners:
            raise gr.Error("This model has no VSR refiner (g_phi); choose SCAN or none, or load a bundle with refiner/.")
        settings = _settings(engine, scan_iterations, scan_cells, temperature, top_p, top_k, candidates, canvas_every)
        draft_mode = draft_mode or "ar"
        if draft_mode not in draft_modes(engine):
            raise gr.Error(f"This model cannot draft in mode {draft_mode!r}; choose one of: {', '.join(draft_modes(engine))}.")
        if draft_mode != "ar":
            settings["draft_mode"] = draft_mode
        quality_score = quality_score or "combined"
        if quality_score not in dict(QUALITY_SCORE_CHOICES).values():
            raise gr.Error(f"Unknown quality score {quality_score!r}; choose combined or head.")
        settings["quality_score"] = quality_score
        seed = random.randint(0, MAX_SEED) if randomize_seed else _number(seed, "seed", 0, MAX_SEED, int)
        frame_seconds = _number(frame_ms, "live view pace", 0, 2000, float) / 1000.0
        truth_image = None
        if truth is not None:
            try:
                truth_image = load_square(truth, engine.image_size, "ground truth")
            except ImageInputError as error:
                raise gr.Error(f"{error} Remove the ground truth or upload another image.")

        started = time.perf_counter()
        # all model work goes through engine.stream (on a ZeroGPU Space it alone runs under @spaces.GPU)
        stream = engine.stream(pairs, query, refine=refine, seed=seed, decode_scan_steps=True, **settings)
        try:
            first = next(stream)          # the engine validates pairs and query before its first event
        except EngineInputError as error:
            raise gr.Error(str(error))
        query_image = load_square(query, engine.image_size, "query")     # readable: the engine just checked it
        yield from self._present(engine, _chain(first, stream), refine, seed, query_image, truth_image, frame_seconds,
                                 settings["scan_iterations"], started, draft_mode == "tensor", quality_score)

    def _present(self, engine, events, refine, seed, query_image, truth_image, frame_seconds,
                 scan_iterations, started, tensor_draft=False, quality_score="combined") -> Iterator[tuple]:
        """Engine events -> output tuples, with the live canvas paced to at most one frame per frame_seconds."""
        grid = engine.grid
        stages = ["draft", *refine]
        last_frame = 0.0
        done_stages = 0
        # Engine timings are wall time inside stream(), so they include the time this generator spends
        # drawing, pacing and waiting for the browser between events; that is measured and taken out.
        viewer_seconds: dict[str, float] = {}
        quality_source = ("the SCAN quality head × the model's probability of the token" if quality_score == "combined"
                          else "the SCAN quality head alone")

        def paced(output):
            nonlocal last_frame
            wait = last_frame + frame_seconds - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            last_frame = time.perf_counter()
            return output

        try:
            for event in events:
                arrived = time.perf_counter()
                if isinstance(event, GenerationStarted):
                    total = event.total_tokens
                    if event.sequence_format == "lvm":
                        quality_source = "the model's probability of each sampled token: LVM has no quality head"
                    blank = np.zeros((grid, grid), dtype=bool)
                    yield frame(canvas=viz.canvas_view(query_image, blank),
                                status=_status(stages, "draft", 0.0, f"Drafting: 0 of {total} tokens…"),
                                seed=seed, quality_draft=None, quality_final=None, quality_note="",
                                timeline_slider=gr.update(visible=False, value=0, maximum=1), timeline_image=None,
                                timeline_text="", vsr_image=gr.update(value=None, visible=False),
                                tensor_plot=gr.update(value=None, visible=False), before_after=None,
                                stage_grid=None, metrics_table=None, timings_table=None, cosine_plot=None,
                                quality_plot=None, metrics_note="", run_state=None)
                elif isinstance(event, WindowSlid):      # TensorAR: predicted cells show, the window stays boxed
                    if event.canvas is not None:
                        total = event.final.size
                        view = viz.canvas_view(event.canvas, event.codes >= 0, current_cell=event.cells[0],
                                               window_cells=event.cells[1:], final=event.final, revisions=event.revisions)
                        yield paced(frame(canvas=view, status=_status(
                            stages, "draft", (event.step + 1) / total,
                            f"TensorAR step {event.step + 1} of {total}: window of {len(event.cells)} cells, "
                            f"{len(event.changed)} revised; {int(event.final.sum())} final (faded cells are not final yet; "
                            f"their number counts how often each was predicted)")))
                elif isinstance(event, TokensWritten):
                    if event.canvas is not None and not tensor_draft:   # TensorAR's frames came with WindowSlid
                        view = viz.canvas_view(event.canvas, event.written, current_cell=event.cell)
                        written = int(event.written.sum())
                        yield paced(frame(canvas=view, status=_status(stages, "draft", written / event.written.size,
                                                                      f"Drafting: {written} of {event.written.size} tokens written")))
                elif isinstance(event, DraftDone):
                    done_stages = 1
                    note = (f"Draft: mean quality {_mean(event.quality):.3f}"
                            + (f" (best of {len(event.candidates)} candidates)" if len(event.candidates) > 1 else ""))
                    next_stage = refine[0] if refine else None
                    yield paced(frame(canvas=viz.upscale(event.image),
                                      status=_status(stages, next_stage or "draft", 0.0 if next_stage else 1.0,
                                                     note + (f"; refining with {viz.stage_title(next_stage)}…"
                                                             if next_stage else "."),
                                                     "running"),
                                      quality_draft=_annotated(event.image, event.quality, viz.quality_range(event.quality))))
                elif isinstance(event, ScanStep):
                    kept = sum(event.accepted)
                    view = viz.patch_boxes(event.image, event.cells, event.accepted, grid) if event.image is not None else gr.skip()
                    yield paced(frame(canvas=view, status=_status(
                        stages, "scan", (event.iteration + 1) / max(1, scan_iterations),
                        f"SCAN iteration {event.iteration + 1}: regenerated {len(event.cells)} low-quality tokens, "
                        f"kept {kept}; mean quality {_mean(event.quality):.3f}")))
                elif isinstance(event, StageDone):
                    done_stages += 1
                    following = stages[done_stages] if done_stages < len(stages) else None
                    message = f"{viz.stage_title(event.stage)} done: changed {len(event.changed_cells)} tokens"
                    if following:
                        message += f"; refining with {viz.stage_title(following)}…"
                    outputs = dict(canvas=viz.upscale(event.image),
                                   status=_status(stages, following or event.stage, 0.0 if following else 1.0, message))
                    if event.stage.startswith("self"):
                        outputs["vsr_image"] = gr.update(value=viz.changed_cells_view(event.image, event.changed_cells, grid),
                                                         visible=True, label=f"VSR changed {len(event.changed_cells)} tokens (blue)")
                    yield paced(frame(**outputs))
                elif isinstance(event, Finished):
                    result = event.result
                    result.timings = _compute_timings(result.timings, viewer_seconds)
                    yield self._finish(engine, result, stages, truth_image, time.perf_counter() - started, quality_source)
                # only events yielded inside a timed engine stage count (see engine._stream_scan)
                stage = ("draft" if isinstance(event, (TokensWritten, WindowSlid)) else
                         "scan" if isinstance(event, ScanStep) else None)
                if stage:
                    viewer_seconds[stage] = viewer_seconds.get(stage, 0.0) + time.perf_counter() - arrived
        except EngineInputError as error:
            raise gr.Error(str(error))

    def _finish(self, engine, result: Result, stages, truth_image, elapsed: float, quality_source: str) -> tuple:
        grid = engine.grid
        final_name = list(result.stages)[-1]
        images = dict(result.stages)
        if result.query is not None:
            images["query"] = result.query
        if truth_image is not None:
            images["ground truth"] = truth_image
        run = RunView(result=result, grid=grid, truth=truth_image, images=images)

        quality_final = None
        refined_quality = [name for name in result.quality if name != "draft"]
        score_range = viz.quality_range(*result.quality.values())
        if refined_quality:
            last = refined_quality[-1]
            quality_final = _annotated(result.stages[last], result.quality[last], score_range)
        draft_mean = _mean(result.quality["draft"])
        quality_note = f"Mean quality: draft {draft_mean:.3f}"
        for name in refined_quality:
            quality_note += f" → {viz.stage_title(name)} {_mean(result.quality[name]):.3f}"
        quality_note += (f". Scores are the model's own estimate that each token is right ({quality_source}). "
                         + _bands_note(score_range) + " Hover a band in the legend to see only its tokens.")

        history = result.history
        if history:
            slider = gr.update(visible=True, minimum=0, maximum=len(history), value=len(history), step=1)
            timeline_image, timeline_text = timeline_view(len(history), run)
        else:
            slider = gr.update(visible=False, value=0, maximum=1)
            timeline_image, timeline_text = None, "SCAN did not run: choose a refiner setting with SCAN to see its iterations."

        choices = [(viz.stage_title(name), name) for name in images]
        captions = {}
        metrics_rows, cosine_curves = [], {}
        truth_codes = _truth_codes(engine, truth_image) if truth_image is not None else None
        lpips_ok = True
        for name, image in result.stages.items():
            quality = result.quality.get(name)
            changed = len(result.changed.get(name, [])) if name != "draft" else None
            seconds = result.timings.get(name)
            row = [viz.stage_title(name), None, None, None, None, None,
                   round(_mean(quality), 3) if quality is not None else None, changed,
                   round(seconds * 1000) if seconds is not None else None]
            if truth_image is not None:
                scores, lpips_ok = _image_scores(image, truth_image, lpips_ok)
                row[1:4] = [round(scores["psnr"], 2), round(scores["ssim"], 3),
                            round(scores["lpips"], 3) if "lpips" in scores else None]
                if truth_codes is not None:
                    tokens = np.asarray(result.tokens[name]).reshape(-1)
                    cosine = token_cosine_distances(engine, tokens, truth_codes)
                    cosine_curves[name] = cosine
                    row[4:6] = [round(float(np.mean(tokens == truth_codes)), 3), round(float(cosine.mean()), 4)]
                captions[name] = f"{scores['psnr']:.1f} dB"
            elif quality is not None:
                captions[name] = f"quality {_mean(quality):.2f}"
            metrics_rows.append(row)
        grid_images = dict(result.stages)
        if truth_image is not None:
            grid_images["ground truth"] = truth_image
        sheet = viz.stage_grid(grid_images, captions)

        timings_rows = [[phase, round(seconds * 1000)] for phase, seconds in result.timings.items()]
        timings_rows.append(["whole run, incl. live view", round(elapsed * 1000)])
        cosine_plot = viz.cosine_distance_figure(cosine_curves) if cosine_curves else None
        quality_plot = None
        if history:
            quality_plot = viz.quality_figure([s.iteration + 1 for s in history], [_mean(s.quality) for s in history],
                                              [sum(s.accepted) for s in history],
                                              [len(s.accepted) - sum(s.accepted) for s in history], draft_mean)
        tensor_plot = gr.update(value=None, visible=False)
        if result.slides:
            changed = [len(slide.changed) for slide in result.slides]
            window = max(len(slide.cells) for slide in result.slides)
            tensor_plot = gr.update(value=viz.revisions_figure(changed, window), visible=True)
        metrics_note = ("Metrics compare each stage with the ground truth you gave." if truth_image is not None else
                        "Add a ground-truth answer (the optional image under the query) to see PSNR, SSIM, LPIPS, "
                        "token accuracy and the per-token cosine-distance curve.")
        accepted = sum(sum(s.accepted) for s in history)
        message = (f"Done in {elapsed:.1f} s: {len(result.tokens['draft'].flat)} tokens drafted"
                   + (f", SCAN kept {accepted} of {sum(len(s.cells) for s in history)} regenerated tokens" if history else "")
                   + (f", VSR changed {len(result.changed.get('self', []))} tokens" if "self" in result.changed else "")
                   + ".")
        return frame(canvas=viz.upscale(result.final), status=_status(stages, None, 1.0, message, "done"),
                     quality_draft=_annotated(result.draft, result.quality["draft"], score_range), quality_final=quality_final,
                     quality_note=quality_note, timeline_slider=slider, timeline_image=timeline_image,
                     timeline_text=timeline_text, tensor_plot=tensor_plot, before_after=(viz.upscale(result.draft), viz.upscale(result.final)),
                     compare_a=gr.update(choices=choices, value="draft"), compare_b=gr.update(choices=choices, value=final_name),
                     stage_grid=sheet, metrics_table=metrics_rows, timings_table=timings_rows, cosine_plot=cosine_plot,
                     quality_plot=quality_plot, metrics_note=metrics_note, run_state=run)


def stopped_status(status: str):
    """Stop pressed: mark a running status as stopped (a finished one stays)."""
    if status and 'data-state="running"' in status:
        return _status(["draft"], None, 0.0, "Stopped. The canvas shows the last frame; press Generate to start again.",
                       "stopped")
    return gr.skip()


# ---------------------------------------------------------------------------------------------
# helpers


def _compute_timings(timings: dict[str, float], viewer_seconds: dict[str, float]) -> dict[str, float]:
    """Engine stage timings without the time the studio spent between events (drawing, pacing, sending)."""
    corrected = {name: max(0.0, seconds - viewer_seconds.get(name, 0.0)) for name, seconds in timings.items() if name != "total"}
    corrected["total"] = sum(corrected.values())
    return corrected


def _chain(first, rest):
    yield first
    yield from rest


def _status(stages, active, fraction, message, state="running") -> str:
    return status_html(stages, active, fraction, message, state)


def _number(value, name: str, low, high, kind=float):
    """A numeric widget value, or a gr.Error naming the field and its range."""
    try:
        number = kind(float(value))
    except (TypeError, ValueError, OverflowError):
        raise gr.Error(f"{name} must be a number between {low} and {high}, got {value!r}.")
    if not (low <= number <= high) or number != number:
        raise gr.Error(f"{name} must be between {low} and {high}, got {value}.")
    return number


def _settings(engine, scan_iterations, scan_cells, temperature, top_p, top_k, candidates, canvas_every) -> dict:
    cells = engine.grid ** 2
    defaults = engine.sampling_defaults
    temperature, top_p, top_k = (defaults[name] if value is None else value for name, value in
                                 (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)))
    return dict(
        scan_iterations=_number(scan_iterations, "SCAN T (iterations)", 0, 200, int),
        scan_cells=_number(scan_cells, "SCAN c (tokens per iteration)", 1, cells, int),
        temperature=_number(temperature, "temperature", 0.0, 5.0),
        top_p=_number(top_p, "top-p", 0.0, 1.0),
        top_k=_number(top_k, "top-k", 0, 100_000, int),
        candidates=_number(candidates, "candidates", 1, 16, int),
        canvas_every=_number(canvas_every, "canvas update rate (tokens per frame)", 1, cells, int),
    )


def _annotated(image: Image.Image, quality, score_range: tuple[float, float]) -> tuple:
    """AnnotatedImage value: the image upscaled, one semi-transparent mask per quality band of `score_range`."""
    base = viz.upscale(image)
    return base, viz.quality_bands(quality, base.width, *score_range)


def _bands_note(score_range: tuple[float, float]) -> str:
    edges = viz.quality_band_edges(*score_range)
    return ("Bands: " + ", ".join(f"{label} {edges[3 - i]:.2f}–{edges[4 - i]:.2f}" for i, (label, _) in enumerate(viz.QUALITY_BANDS))
            + " (quarters of this run's score range, the same for both maps).")


def _image_scores(image, truth, lpips_ok: bool) -> tuple[dict, bool]:
    from demo_core.metrics import image_metrics

    if lpips_ok:
        try:
            return image_metrics(image, truth, with_lpips=True), True
        except Exception as error:     # LPIPS weights come from optional packages; the rest still counts
            log.warning("LPIPS unavailable: %s", error)
            gr.Warning(f"LPIPS is unavailable here ({error}); showing PSNR and SSIM only.")
    return image_metrics(image, truth, with_lpips=False), False


def _truth_codes(engine, truth_image) -> np.ndarray | None:
    """The ground truth's tokens, or None (with a warning) when the model cannot be used outside a
    generation (on a ZeroGPU Space only engine.stream runs on the GPU)."""
    try:
        codes = engine.encode([truth_image])[0].numpy()
        token_cosine_distances(engine, codes[:1], codes[:1])
        return codes
    except Exception as error:
        log.warning("token metrics skipped: %s", error)
        gr.Warning(f"Token accuracy and cosine distances are unavailable here ({type(error).__name__}); "
                   "image metrics are still shown.")
        return None


def token_cosine_distances(engine, tokens, truth_tokens) -> np.ndarray:
    """1 - cos(e(token), e(truth token)) per position, with the backbone's input embeddings (VSR Fig. 2)."""
    import torch

    table = engine.model.get_input_embeddings().weight
    with torch.no_grad():
        predicted = table[torch.as_tensor(np.asarray(tokens).reshape(-1), device=table.device)].float()
        target = table[torch.as_tensor(np.asarray(truth_tokens).reshape(-1), device=table.device)].float()
        return (1.0 - torch.nn.functional.cosine_similarity(predicted, target, dim=-1)).cpu().numpy()
