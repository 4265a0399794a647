"""Presentation: engine events -> the studio's output tuples (the live canvas, status, heatmaps, timeline).

Every generate() yield is a tuple in `OUTPUTS` order, built by `frame(**values)`; app.py builds the
components in the same order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import gradio as gr
import numpy as np
from PIL import Image

from demo_core import viz
from demo_core.engine import EngineInputError
from demo_core.events import DraftDone, Finished, GenerationStarted, Result, ScanStep, StageDone, TokensWritten, WindowSlid

from .layout import status_html

# Every generate() yield is a tuple in this order; app.py builds the components in the same order.
OUTPUTS = (
    "canvas", "status", "seed",
    "quality_draft", "quality_final", "quality_note",
    "timeline_slider", "timeline_image", "timeline_text", "vsr_image", "tensor_plot",
    "before_after", "compare_a", "compare_b", "stage_grid",
    "metrics_table", "timings_table", "cosine_plot", "quality_plot", "metrics_note",
    "run_state",
)
# The served generate event sends only these (plain values, each cheap to send: a gr.skip() or gr.update() output
# costs Gradio a component rebuilt and its config re-serialised, ~10 ms per output per frame); the other outputs
# reach the page once, from the report event that follows a finished run (`Studio.report`).
LIVE_OUTPUTS = ("canvas", "status", "seed", "run_state")
REPORT_OUTPUTS = tuple(name for name in OUTPUTS if name not in LIVE_OUTPUTS)
METRIC_COLUMNS = ["stage", "PSNR", "SSIM", "LPIPS", "tok. acc.", "cos. dist.", "quality", "changed", "ms"]
TIMING_COLUMNS = ["phase", "ms"]


def frame(**values) -> tuple:
    """A generate() output tuple: the given outputs by name, gr.skip() for the rest."""
    unknown = set(values) - set(OUTPUTS)
    if unknown:
        raise KeyError(f"unknown outputs {sorted(unknown)}")
    return tuple(values[name] if name in values else gr.skip() for name in OUTPUTS)


@dataclass
class RunView:
    """What a finished run leaves in the session (gr.State) for the timeline and the comparisons."""

    result: Result
    grid: int
    truth: Image.Image | None = None
    images: dict[str, Image.Image] = field(default_factory=dict)   # comparable images by name
    report: dict = field(default_factory=dict)     # the served run's views not sent live, until the report event


def _mean(values) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def _scan_summary(step: ScanStep, grid: int) -> str:
    kept = sum(step.accepted)
    lines = [f"**Iteration {step.iteration + 1}** — regenerated {len(step.cells)} tokens, "
             f"kept {kept} (score improved), rejected {len(step.cells) - kept}; mean quality now {_mean(step.quality):.3f}.",
             "", "| cell (row, col) | token old → new | score old → new | |", "|---|---|---|---|"]
    for cell, old, new, s_old, s_new, ok in zip(step.cells, step.old_codes, step.new_codes, step.old_scores,
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


def stopped_status(status: str):
    """Stop pressed: mark a running status as stopped (a finished one stays)."""
    if status and 'data-state="running"' in status:
        return _status(["draft"], None, 0.0, "Stopped. The canvas shows the last frame; press Generate to start again.",
                       "stopped")
    return gr.skip()


def error_status(message: str) -> str:
    """The status line of a refused run: the one line that says what to change."""
    return _status(["draft"], None, 0.0, message, "error")


def _status(stages, active, fraction, message, state="running") -> str:
    return status_html(stages, active, fraction, message, state)


def _annotated(image: Image.Image, quality, score_range: tuple[float, float]) -> tuple:
    """AnnotatedImage value: the image upscaled, one semi-transparent mask per quality band of `score_range`."""
    base = viz.upscale(image)
    return base, viz.quality_bands(quality, base.width, *score_range)


def _bands_note(score_range: tuple[float, float]) -> str:
    edges = viz.quality_band_edges(*score_range)
    return ("Bands: " + ", ".join(f"{label} {edges[3 - i]:.2f}–{edges[4 - i]:.2f}" for i, (label, _) in enumerate(viz.QUALITY_BANDS))
            + " (quarters of this run's score range, the same for both maps).")


LIVE_SIDE = 192     # live canvas frames: the browser enlarges them (CSS pixelated), a quarter of the pixels to
                    # draw, encode and send of the 384-pixel stage images; token squares look the same


def _live_scale(image) -> int:
    return viz.display_scale(image.width, LIVE_SIDE)


def present(engine, events, refine, seed, query_image, truth_image, frame_seconds, scan_iterations, started,
            finish: Callable, tensor_draft=False, quality_score="combined") -> Iterator[tuple]:
    """Engine events -> output tuples, with the live canvas paced to at most one frame per frame_seconds; the
    finished run's tuple comes from `finish(engine, result, stages, truth_image, elapsed, quality_source)`."""
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
                yield frame(canvas=viz.canvas_view(query_image, blank, scale=_live_scale(query_image)),
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
                    view = viz.canvas_view(event.canvas, event.codes >= 0, scale=_live_scale(event.canvas), current_cell=event.cells[0],
                                           window_cells=event.cells[1:], final=event.final, revisions=event.revisions)
                    yield paced(frame(canvas=view, status=_status(
                        stages, "draft", (event.step + 1) / total,
                        f"TensorAR step {event.step + 1} of {total}: window of {len(event.cells)} cells, "
                        f"{len(event.changed)} revised; {int(event.final.sum())} final (faded cells are not final yet; "
                        f"their number counts how often each was predicted)")))
            elif isinstance(event, TokensWritten):
                if event.canvas is not None and not tensor_draft:   # TensorAR's frames came with WindowSlid
                    view = viz.canvas_view(event.canvas, event.written, scale=_live_scale(event.canvas), current_cell=event.cell)
                    written = int(event.written.sum())
                    yield paced(frame(canvas=view, status=_status(stages, "draft", written / event.written.size,
                                                                  f"Drafting: {written} of {event.written.size} tokens written")))
            elif isinstance(event, DraftDone):
                done_stages = 1
                note = (f"Draft: mean quality {_mean(event.quality):.3f}"
                        + (f" (best of {len(event.candidates)} candidates)" if len(event.candidates) > 1 else ""))
                next_stage = refine[0] if refine else None
                yield paced(frame(canvas=viz.upscale(event.image, _live_scale(event.image)),
                                  status=_status(stages, next_stage or "draft", 0.0 if next_stage else 1.0,
                                                 note + (f"; refining with {viz.stage_title(next_stage)}…"
                                                         if next_stage else "."),
                                                 "running"),
                                  quality_draft=_annotated(event.image, event.quality, viz.quality_range(event.quality))))
            elif isinstance(event, ScanStep):
                kept = sum(event.accepted)
                view = viz.patch_boxes(event.image, event.cells, event.accepted, grid, scale=_live_scale(event.image)) if event.image is not None else gr.skip()
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
                outputs = dict(canvas=viz.upscale(event.image, _live_scale(event.image)),
                               status=_status(stages, following or event.stage, 0.0 if following else 1.0, message))
                if event.stage.startswith("vsr"):
                    outputs["vsr_image"] = gr.update(value=viz.changed_cells_view(event.image, event.changed_cells, grid),
                                                     visible=True, label=f"VSR changed {len(event.changed_cells)} tokens (blue)")
                yield paced(frame(**outputs))
            elif isinstance(event, Finished):
                result = event.result
                result.timings = viewer_free_timings(result.timings, viewer_seconds)
                yield finish(engine, result, stages, truth_image, time.perf_counter() - started, quality_source)
            # only events yielded inside a timed engine stage count (see Engine._stream)
            stage = ("draft" if isinstance(event, (TokensWritten, WindowSlid)) else
                     "scan" if isinstance(event, ScanStep) else None)
            if stage:
                viewer_seconds[stage] = viewer_seconds.get(stage, 0.0) + time.perf_counter() - arrived
    except EngineInputError as error:
        raise gr.Error(str(error))


def viewer_free_timings(timings: dict[str, float], viewer_seconds: dict[str, float]) -> dict[str, float]:
    """Engine stage timings without the time the studio spent between events (drawing, pacing, sending)."""
    corrected = {name: max(0.0, seconds - viewer_seconds.get(name, 0.0)) for name, seconds in timings.items() if name != "total"}
    corrected["total"] = sum(corrected.values())
    return corrected
