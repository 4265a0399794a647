"""The finished run's report: quality maps, the SCAN timeline, metrics against a ground truth, timings, plots."""
from __future__ import annotations

import logging
from typing import Callable

import gradio as gr
import numpy as np

from demo_core import viz
from demo_core.events import Result
from demo_core.metrics import token_cosine_distances

from .presentation import RunView, _annotated, _bands_note, _mean, _status, frame, timeline_view

log = logging.getLogger("retouch.studio")


UNTAUGHT = "without adapter"


def finish_frame(engine, result: Result, stages, truth_image, elapsed: float, quality_source: str,
                 untaught: Callable[[], Result] | None = None) -> tuple:
    """The finished run's output tuple. `untaught`: for a run with a taught adapter, a callable that runs the same
    prompt, settings and seed without it; its final image joins the comparisons as "without adapter", and the
    before/after then shows without → with the adapter."""
    grid = engine.grid
    baseline = untaught() if untaught is not None else None
    final_name = list(result.stages)[-1]
    # a sequential prompt's query is its last frame and its ground truth the true next frame
    query_name, truth_name = ("last frame", "true next frame") if result.frames else ("query", "ground truth")
    images = dict(result.stages)
    if result.query is not None:
        images[query_name] = result.query
    if truth_image is not None:
        images[truth_name] = truth_image
    if baseline is not None:
        images[UNTAUGHT] = baseline.final
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
    rows = [(name, image, result, name) for name, image in result.stages.items()]
    if baseline is not None:
        rows.append((UNTAUGHT, baseline.final, baseline, list(baseline.stages)[-1]))
    for name, image, source, stage in rows:
        quality = source.quality.get(stage)
        changed = len(source.changed.get(stage, [])) if name != "draft" and name != UNTAUGHT else None
        seconds = source.timings.get(stage) if name != UNTAUGHT else baseline.timings.get("total")
        row = [viz.stage_title(name), None, None, None, None, None,
               round(_mean(quality), 3) if quality is not None else None, changed,
               round(seconds * 1000) if seconds is not None else None]
        if truth_image is not None:
            scores, lpips_ok = _image_scores(image, truth_image, lpips_ok)
            row[1:4] = [round(scores["psnr"], 2), round(scores["ssim"], 3),
                        round(scores["lpips"], 3) if "lpips" in scores else None]
            if truth_codes is not None:
                tokens = np.asarray(source.codes[stage]).reshape(-1)
                cosine = token_cosine_distances(engine.model.get_input_embeddings().weight, tokens, truth_codes)
                cosine_curves[name] = cosine
                row[4:6] = [round(float(np.mean(tokens == truth_codes)), 3), round(float(cosine.mean()), 4)]
            captions[name] = f"{scores['psnr']:.1f} dB"
        elif quality is not None:
            captions[name] = f"quality {_mean(quality):.2f}"
        metrics_rows.append(row)
    if truth_image is not None and result.query is not None:     # the yardstick: the query handed back unchanged
        scores, lpips_ok = _image_scores(result.query, truth_image, lpips_ok)
        metrics_rows.insert(0, [IDENTITY_ROW.format(query_name), round(scores["psnr"], 2), round(scores["ssim"], 3),
                                round(scores["lpips"], 3) if "lpips" in scores else None, None, None, None, None, None])
    grid_images = dict(result.stages)
    if baseline is not None:
        grid_images[UNTAUGHT] = baseline.final
    if truth_image is not None:
        grid_images[truth_name] = truth_image
    sheet = viz.stage_grid(grid_images, captions)

    timings_rows = [[phase, round(seconds * 1000)] for phase, seconds in result.timings.items()]
    timings_rows.append(["whole run, incl. live view", round(elapsed * 1000)])
    cosine_plot = (viz.cosine_distance_figure(cosine_curves, title=f"Per-token cosine distance to the {truth_name}")
                   if cosine_curves else None)
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
    metrics_note = (f"Metrics compare each stage with the {truth_name} you gave; the first row is the {query_name} "
                    f"handed back unchanged, what doing nothing scores." if truth_image is not None else
                    ("Add the true next frame (the optional image under the frames)" if result.frames else
                     "Add a ground-truth answer (the optional image under the query)") + " to see PSNR, SSIM, LPIPS, "
                    "token accuracy and the per-token cosine-distance curve.")
    accepted = sum(sum(s.accepted) for s in history)
    message = (f"Done in {elapsed:.1f} s: {len(result.codes['draft'].flat)} tokens drafted"
               + (f", SCAN kept {accepted} of {sum(len(s.cells) for s in history)} regenerated tokens" if history else "")
               + (f", VSR changed {len(result.changed['vsr'])} tokens" if "vsr" in result.changed else "")
               + "."
               + _kept_note(result, query_name) + _luma_note(result, query_name)
               + (" With your taught adapter; the before/after compares it with the same run without it."
                  if baseline is not None else ""))
    before, after_a = (baseline.final, UNTAUGHT) if baseline is not None else (result.draft, "draft")
    return frame(canvas=viz.upscale(result.final), status=_status(stages, None, 1.0, message, "done"),
                 quality_draft=_annotated(result.draft, result.quality["draft"], score_range), quality_final=quality_final,
                 quality_note=quality_note, timeline_slider=slider, timeline_image=timeline_image,
                 timeline_text=timeline_text, tensor_plot=tensor_plot, before_after=(viz.upscale(before), viz.upscale(result.final)),
                 compare_a=gr.update(choices=choices, value=after_a), compare_b=gr.update(choices=choices, value=final_name),
                 stage_grid=sheet, metrics_table=metrics_rows, timings_table=timings_rows, cosine_plot=cosine_plot,
                 quality_plot=quality_plot, metrics_note=metrics_note, run_state=run)


IDENTITY_ROW = "{} (doing nothing)"     # the metrics table's first row with a ground truth: the query handed back


def _kept_note(result: Result, query_name: str) -> str:
    """One sentence on the cells the answer copied from the query, and whether they show its own pixels."""
    if result.kept is None:
        return ""
    kept, cells = int(np.asarray(result.kept).sum()), int(np.asarray(result.kept).size)
    if not kept:
        return f" Every cell was redrawn (none keeps the {query_name}'s code)."
    shown = (f"they show the {query_name}'s own pixels" if result.pasted else
             "they are shown as the tokenizer decodes them (paste is off)")
    return f" {kept} of {cells} cells keep the {query_name}'s code: {shown}."


def _luma_note(result: Result, query_name: str) -> str:
    if not result.luma_carried:
        return ""
    return (f" The demonstrations' answers keep their inputs' brightness, so the answer takes its luminance from the "
            f"{query_name} and its colours from the model.")


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
        token_cosine_distances(engine.model.get_input_embeddings().weight, codes[:1], codes[:1])
        return codes
    except Exception as error:
        log.warning("token metrics skipped: %s", error)
        gr.Warning(f"Token accuracy and cosine distances are unavailable here ({type(error).__name__}); "
                   "image metrics are still shown.")
        return None
