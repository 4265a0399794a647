"""Event handlers of the studio: widget values in, engine calls, widget values out.

Each handler is a plain function or generator of widget values, so tests call them directly
and app.py only wires them to components. The studio is split by concern: `examples` (one-click
examples, pair rows), `sequence` (sequence mode: the prompt-kind switch, the frames gallery), `models`
(the loaded engine and the model selector), `presentation` (events -> output tuples), `report` (the
finished run's metrics and plots); this module holds `Studio` and re-exports what app.py and the tests
use. Inputs the user must change raise `gr.Error` with what to change (nothing else is touched, so the
other inputs stay); on the page, a refused sequence-mode run ends with that one line in the status
instead (state "error"; again nothing else changes). Things worth knowing but not fatal are
`gr.Warning`. Each visitor's model is a model id in their session (gr.State) that every handler takes
last; `Studio.engine_for(model)` gives its engine from the shared cache. The only model detail used
here is the backbone's input-embedding table, for the per-token cosine distance curve (VSR paper Fig. 2).
"""
from __future__ import annotations

import functools
import inspect
import random
import time
from typing import Iterator

import gradio as gr

from demo_core.engine import EngineInputError
from demo_core.images import ImageInputError, load_square

from .examples import (EXAMPLES_DIR, MAX_ROWS, Example, SequenceExample, add_pair, example_preview, list_examples,  # noqa: F401
                       list_sequence_examples, pair_row_updates, remove_pair, sequence_preview)
from .models import (DEFAULT_MODEL, DRAFT_MODES, LUMA_CHOICES, PASTE_CHOICES, QUALITY_SCORE_CHOICES, REFINER_CHOICES, EngineCache, ModelHolder,  # noqa: F401
                     ModelOption, allowed_models, default_refiner, draft_mode_update, draft_modes, refiner_choices)
from .prefetch import batches
from .presentation import (LIVE_OUTPUTS, METRIC_COLUMNS, OUTPUTS, REPORT_OUTPUTS, TIMING_COLUMNS, RunView,  # noqa: F401
                           compare_view, error_status, frame, present, stopped_status, timeline_view)
from .report import finish_frame
from .teach import Taught, adapter_for_run, load_uploaded, run_teach  # noqa: F401
from .sequence import (PROMPT_KINDS, add_frames, clear_frames, clear_refusal, frame_paths, frames_gallery,  # noqa: F401
                       move_earlier, move_later, prompt_kind_updates, remove_frame, select_frame)

MAX_SEED = 2**31 - 1
LIVE_MIN_FRAME_S = 0.04     # served progress frames at most 25 a second: a browser shows no more, each costs a send
# unpaced (live view pace 0: "as fast as it goes"), at most 10 a second: each sent frame costs the server ~10-20 ms
# of the engine's CPU (scripts/api_speed: 29 frames at 0.04 s made the API 1.54x the engine; README, Serving)
UNPACED_MIN_FRAME_S = 0.1


class Studio(ModelHolder):
    """Runs generations, each with its own visitor's model (from the shared engine cache)."""

    # -- examples ---------------------------------------------------------------------------------
    def load_example(self, task: str, model: str | None = None):
        """Fill pairs, query and ground truth with a task's example (the model still only sees the pairs)."""
        examples = list_examples()
        if task not in examples:
            raise gr.Error(f"No example for {task!r}; choose one of: {', '.join(examples) or 'none installed'}.")
        example = examples[task]
        pairs = example.pairs[:min(self.engine_for(model).max_pairs, MAX_ROWS)]
        if len(pairs) < len(example.pairs):
            gr.Warning(f"This model holds {len(pairs)} pairs; the example's other pairs were left out.")
        return [len(pairs), *pair_row_updates(len(pairs), pairs), example.query, example.truth, task]

    def select_example(self, model: str | None = None, event: gr.SelectData = None):
        """A click on an example thumbnail."""
        names = list(list_examples())
        if event is None or not (0 <= event.index < len(names)):
            raise gr.Error("Pick one of the examples.")
        return self.load_example(names[event.index], model)

    def load_sequence_example(self, name: str, model: str | None = None):
        """Fill the frames gallery and the true next frame with a sequence example: [gallery, selected, next frame]."""
        examples = list_sequence_examples()
        if name not in examples:
            raise gr.Error(f"No sequence example {name!r}; choose one of: {', '.join(examples) or 'none installed'}.")
        example = examples[name]
        frames = example.frames[-self.engine_for(model).max_frames:]
        if len(frames) < len(example.frames):
            gr.Warning(f"This model holds {len(frames)} frames; the example's earliest frames were left out.")
        return [gr.update(value=frames_gallery(frames), selected_index=None), None, example.next_frame]

    def select_sequence_example(self, model: str | None = None, event: gr.SelectData = None):
        """A click on a sequence example's thumbnail."""
        names = list(list_sequence_examples())
        if event is None or not (0 <= event.index < len(names)):
            raise gr.Error("Pick one of the sequence examples.")
        return self.load_sequence_example(names[event.index], model)

    def add_frames(self, value, files, model: str | None = None):
        """+ Add frames, with this visitor's model's frame limit."""
        return add_frames(value, files, self.engine_for(model).max_frames)

    # -- teaching ---------------------------------------------------------------------------------
    def teach(self, files, steps, model: str | None = None):
        """The Teach button: (status, loss plot, taught state) after every step (studio.teach.run_teach)."""
        yield from run_teach(self.engine_for(model), model, files, steps)

    def load_adapter(self, file, model: str | None = None):
        """Load adapter: an uploaded adapter zip -> (Teach status, taught state), checked against this visitor's model."""
        return load_uploaded(self.engine_for(model), model, file)

    # -- generation -------------------------------------------------------------------------------
    def generate_from_widgets(self, *values):
        """The Generate button: MAX_ROWS (input, answer) image pairs, then the other widgets (see generate()).

        In sequence mode a refused run (too few or too many frames, frames of different sizes, an unreadable
        file...) ends with its one line in the status (state "error") rather than a gr.Error pop-up."""
        images, rest = values[:2 * MAX_ROWS], values[2 * MAX_ROWS:]
        pairs = [(images[2 * i], images[2 * i + 1]) for i in range(MAX_ROWS)]
        run = self.generate(pairs, *rest)
        if inspect.signature(self.generate).bind(pairs, *rest).arguments.get("prompt_kind") != "sequence":
            yield from run
            return
        try:
            yield from run
        except gr.Error as error:
            yield frame(status=error_status(error.message))

    def generate_endpoint(self):
        """The served generate event: generate_from_widgets as LIVE_OUTPUTS frames (see `live`), with a named
        signature, so the /generate API lists real parameter names."""
        def generate(*values):
            pace = bound(*values).arguments.get("frame_ms")
            try:
                unpaced = float(pace) <= 0
            except (TypeError, ValueError):
                unpaced = False             # generate() refuses it with its own line
            yield from live(self.generate_from_widgets(*values), threaded=True,
                            min_interval=UNPACED_MIN_FRAME_S if unpaced else LIVE_MIN_FRAME_S)

        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        pair_parameters = [inspect.Parameter(f"pair{number}_{side}", keyword, **({} if number == 1 else {"default": None}))
                           for number in range(1, MAX_ROWS + 1) for side in ("input", "answer")]
        others = [inspect.Parameter(name, keyword, default=None if parameter.default is inspect.Parameter.empty else parameter.default)
                  for name, parameter in inspect.signature(self.generate).parameters.items() if name != "pairs"]
        generate.__signature__ = inspect.Signature(pair_parameters + others)
        bound = generate.__signature__.bind_partial
        generate.__doc__ = self.generate.__doc__
        return generate

    def generate(self, pairs, query, truth=None, refiners: str = "SCAN", scan_iterations=30, scan_cells=4,
                 temperature=None, top_p=None, top_k=None, seed=0, randomize_seed=False, candidates=1,
                 canvas_every=4, frame_ms=60, draft_mode="ar", quality_score="combined", prompt_kind="pairs",
                 frames=None, next_frame=None, use_adapter=False, taught=None, model=None,
                 paste="default", luma="default") -> Iterator[tuple]:
        """Draft the answer token by token, then refine; yields output tuples (OUTPUTS order) as it goes.

        temperature / top_p / top_k left out (None): the model's own defaults (`Engine.sampling_defaults`).
        `prompt_kind` "sequence": `frames` (the frames gallery's value, oldest first) instead of pairs and query; the
        model writes the next frame, compared with `next_frame` (optional) instead of `truth`.
        `use_adapter`: run with the visitor's taught adapter (`taught`, their session's `studio.teach.Taught`), for
        this run only. `model` is the visitor's model id (their session state; None: the server's first model).
        `paste`: "on" shows the query's pixels where the answer keeps its codes, "off" the plain decode, "default" (or
        None) the model's own choice (`Bundle.paste_query`: on for local codes). `luma`: "on" takes the answer's
        luminance from the query where the pairs show their answers keep their inputs' (render.py), "off" never,
        "default" (or None) the model's own choice (`Bundle.luma_carry`)."""
        if prompt_kind not in (None, "pairs", "sequence"):
            raise gr.Error(f"Unknown prompt kind {prompt_kind!r}; choose pairs or sequence.")
        if prompt_kind == "sequence":
            pairs, query, truth, frames = None, None, next_frame, frame_paths(frames)
        else:
            frames = None
        engine = self.engine_for(model)  # this visitor's model for the whole run, whatever others load meanwhile
        pairs = [(x, y) for x, y in (pairs or []) if x is not None or y is not None]
        filled = len(pairs)
        if filled > engine.max_pairs:
            raise gr.Error(f"{filled} pairs do not fit in this model's context (at most {engine.max_pairs}); "
                           f"remove {filled - engine.max_pairs}.")
        if not isinstance(refiners, str) or refiners not in REFINER_CHOICES:
            raise gr.Error(f"Unknown refiner setting {refiners!r}; choose one of: {', '.join(REFINER_CHOICES)}.")
        refine = REFINER_CHOICES[refiners]
        if "vsr" in refine and "vsr" not in engine.available_refiners:
            raise gr.Error("This model has no VSR refiner (g_phi); choose SCAN or none, or load a bundle with refiner/.")
        settings = _settings(engine, scan_iterations, scan_cells, temperature, top_p, top_k, candidates, canvas_every)
        draft_mode = draft_mode or "ar"
        if not isinstance(draft_mode, str) or draft_mode not in draft_modes(engine):
            raise gr.Error(f"This model cannot draft in mode {draft_mode!r}; choose one of: {', '.join(draft_modes(engine))}.")
        if draft_mode != "ar":
            settings["draft_mode"] = draft_mode
        quality_score = quality_score or "combined"
        if not isinstance(quality_score, str) or quality_score not in dict(QUALITY_SCORE_CHOICES).values():
            raise gr.Error(f"Unknown quality score {quality_score!r}; choose combined or head.")
        settings["quality_score"] = quality_score
        for field, value, choices, what in (("paste_query", paste, PASTE_CHOICES, "paste"),
                                            ("luma_carry", luma, LUMA_CHOICES, "brightness")):
            chosen = _on_off(value, choices, what)
            if chosen is not None:
                settings[field] = chosen
        seed = random.randint(0, MAX_SEED) if randomize_seed else _number(seed, "seed", 0, MAX_SEED, int)
        frame_seconds = _number(frame_ms, "live view pace", 0, 2000, float) / 1000.0
        truth_image = None
        truth_name = "ground truth" if frames is None else "true next frame"
        if truth is not None:
            try:
                truth_image = load_square(truth, engine.image_size, truth_name)
            except ImageInputError as error:
                raise gr.Error(f"{error} Remove the {truth_name} or upload another image.")

        adapter = adapter_for_run(use_adapter, taught)
        if adapter is not None:
            gr.Info(f"This run uses your taught adapter ({taught.summary()}).")

        started = time.perf_counter()
        # all model work goes through engine.stream (on a ZeroGPU Space it alone runs under @spaces.GPU)
        stream = engine.stream(pairs, query, frames=frames, refine=refine, seed=seed, decode_scan_steps=True,
                               adapter=adapter, **settings)
        try:
            first = next(stream)          # the engine validates the prompt before its first event
        except EngineInputError as error:
            raise gr.Error(str(error))
        # readable: the engine just checked it (a sequence's last frame is the canvas's backdrop, as a query's is)
        query_image = load_square(query if frames is None else frames[-1], engine.image_size, "query")
        finish = finish_frame
        if adapter is not None:      # the before/after compares with the same run (prompt, settings, seed) untaught
            plain = {name: value for name, value in settings.items() if name != "canvas_every"}
            finish = functools.partial(finish_frame, untaught=lambda: engine.run(
                pairs, query, frames=frames, refine=refine, seed=seed, **plain))
        yield from present(engine, _chain(first, stream), refine, seed, query_image, truth_image, frame_seconds,
                           settings["scan_iterations"], started, finish, draft_mode == "tensor", quality_score)


def live(frames: Iterator[tuple], min_interval: float = 0.0, threaded: bool = False) -> Iterator[tuple]:
    """OUTPUTS frames -> LIVE_OUTPUTS frames: canvas, status and seed as plain values every frame; every other
    view's latest value is kept and handed to the finished run's RunView (`report`) for the report event.

    A progress-only frame (canvas and status) that comes less than `min_interval` seconds after the last one
    sent is dropped: the next frame replaces it anyway. The first frame, frames with other views and the
    finished run's frame are always sent. `threaded`: the frames are produced in their own thread
    (studio/prefetch.py), so sending a frame never holds the engine up; frames produced while one was being
    sent are folded into the next one sent (their views kept, their picture replaced by the newest)."""
    pending: dict = {}
    seed = gr.skip()
    last_sent = None
    groups = batches(frames) if threaded else ([output] for output in frames)
    for group in groups:
        changed, run = False, gr.skip()
        for output in group:
            values = dict(zip(OUTPUTS, output))
            views = {name: values[name] for name in REPORT_OUTPUTS if not _is_skip(values[name])}
            pending.update(views)
            changed = changed or bool(views)
            if not _is_skip(values["seed"]):
                seed = values["seed"]
            if isinstance(values["run_state"], RunView):
                run = values["run_state"]
                run.report = dict(pending)
            elif not _is_skip(values["run_state"]):
                run = values["run_state"]
        now = time.perf_counter()
        if (last_sent is not None and not changed and _is_skip(run) and now - last_sent < min_interval):
            continue
        last_sent = now
        yield values["canvas"], values["status"], seed, run


def _is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def report(run: RunView | None):
    """The report event after a finished run: every view that was not sent live, once (REPORT_OUTPUTS order)."""
    views = run.report if isinstance(run, RunView) else {}
    if isinstance(run, RunView):
        run.report = {}                    # sent: the session keeps only what the timeline and comparisons need
    return tuple(views.get(name, gr.skip()) for name in REPORT_OUTPUTS)


def _chain(first, rest):
    yield first
    yield from rest


def _on_off(value, choices, what: str) -> bool | None:
    """A default/on/off radio's value as a setting: None for "default" (or nothing), else on -> True, off -> False;
    gr.Error naming `what` for anything else."""
    value = value or "default"
    if not isinstance(value, str) or value not in dict(choices).values():
        raise gr.Error(f"Unknown {what} setting {value!r}; choose default, on or off.")
    return None if value == "default" else value == "on"


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
