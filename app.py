"""Retouch studio: the Gradio Blocks UI. Builds the page and wires events to `studio.handlers`;
no model code here.

    python app.py            # serves http://127.0.0.1:7860 with the embedded default bundle
    RETOUCH_BUNDLE=path/to/bundle python app.py
"""
import os

# No outbound calls: analytics, Hub and telemetry off before gradio / huggingface_hub are imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import sys  # noqa: E402

import gradio as gr  # noqa: E402

from demo_core import viz  # noqa: E402
from studio.handlers import (DEFAULT_MODEL, DRAFT_MODES, LIVE_OUTPUTS, MAX_ROWS, PROMPT_KINDS, REPORT_OUTPUTS,  # noqa: E402
                             METRIC_COLUMNS, TIMING_COLUMNS, LUMA_CHOICES, PASTE_CHOICES, QUALITY_SCORE_CHOICES, Studio, add_pair, clear_frames, clear_refusal, compare_view,
                             default_refiner, draft_modes, example_preview, list_examples, list_sequence_examples, move_earlier,
                             move_later, prompt_kind_updates, refiner_choices, remove_frame, remove_pair, report, select_frame,
                             sequence_preview, stopped_status, timeline_view)
from studio.layout import CSS, HEADER, IDLE_STATUS, TITLE, legend, theme  # noqa: E402
from studio.models import canvas_maximum  # noqa: E402
from studio.teach import (DEFAULT_STEPS, MAX_STEPS, STATE_SECONDS, TEACH_IDLE, export as export_adapter,  # noqa: E402
                          download_allowed as adapter_download_allowed,
                          loss_frame, preview as preview_pairs, stopped as teach_stopped)

MAX_FILE_SIZE = "10mb"            # uploads above this are refused by the server before any handler runs
DEFAULT_PAIRS = 2                 # pair rows shown at start


def image_input(label: str, **options) -> gr.Image:
    """An upload widget that hands the handler a file path; the engine opens it and explains bad files.

    gradio opens uploads with PIL before the handler; for a file PIL cannot identify that would be
    a bare exception, so the path is passed on as is and `demo_core.images` reports the problem.
    """
    component = gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                         format="png", **options)
    strict = component.preprocess

    def lenient(payload):
        try:
            return strict(payload)
        except Exception:
            return str(payload.path) if getattr(payload, "path", None) else None

    component.preprocess = lenient
    return component


def output_image(label: str, **options) -> gr.Image:
    return gr.Image(label=label, format="png", interactive=False, buttons=["download", "fullscreen"], **options)


def build_demo(engine, model_label: str = "embedded default", models=None, model_id: str = DEFAULT_MODEL,
               cache=None) -> gr.Blocks:
    """The studio page around a loaded engine (`demo_core.load_engine()`), every visitor's first model.

    `models`: the ModelOptions visitors may choose from (default: `studio.models.allowed_models()`, i.e.
    RETOUCH_MODELS / RETOUCH_ALLOW_LOCAL); `model_id`: the id of `engine` among them; `cache`: the shared
    `EngineCache` (default: one within RETOUCH_MODEL_MEMORY_MB)."""
    studio = Studio(engine, model_label, models=models, model_id=model_id, cache=cache)
    examples = list_examples()
    sequence_examples = list_sequence_examples()
    available = engine.available_refiners
    modes = draft_modes(engine)
    pairs_shown = min(DEFAULT_PAIRS, engine.max_pairs, MAX_ROWS)

    with gr.Blocks(title=TITLE, delete_cache=(1800, 3600)) as demo:
        gr.HTML(HEADER)
        run_state = gr.State(None)
        pair_count = gr.State(pairs_shown)
        max_pairs = gr.State(engine.max_pairs)
        model_state = gr.State(studio.default_model)     # this visitor's model id (others keep theirs)
        selected_frame = gr.State(None)                  # the frame clicked last in the frames gallery (remove / move)
        taught_state = gr.State(None, time_to_live=STATE_SECONDS)   # this visitor's taught adapter (studio.teach.Taught)

        prompt_kind = gr.Radio(PROMPT_KINDS, value="pairs", label="Prompt", elem_id="prompt-kind",
                               info="pairs: the model infers a task from input → answer pairs; "
                                    "sequence: it writes the frame that comes after yours")
        with gr.Row(equal_height=True, elem_classes="rt-examples") as pair_examples:
            gallery = gr.Gallery(value=[(example_preview(e), e.title) for e in examples.values()],
                                 label="Examples (click one to load it)",
                                 columns=len(examples) or 1, rows=1, height=190, allow_preview=False, object_fit="contain",
                                 format="png", interactive=False, elem_id="examples", scale=4)
            task = gr.Dropdown(choices=[(e.title, name) for name, e in examples.items()], value=None, label="Task hint",
                               info="Loads that task's example. The model is never told the task: it only sees the pairs.",
                               elem_id="task", scale=1, min_width=220)
        with gr.Row(equal_height=True, elem_classes="rt-examples", visible=False) as sequence_examples_row:
            sequence_gallery = gr.Gallery(value=[(sequence_preview(e), e.title) for e in sequence_examples.values()],
                                          label="Sequence examples (click one to load its frames and the true next frame)",
                                          columns=len(sequence_examples) or 1, rows=1, height=130, allow_preview=False,
                                          object_fit="contain", format="png", interactive=False, elem_id="sequence-examples",
                                          elem_classes="rt-wide-thumbs")

        with gr.Row(equal_height=False):
            # ------------------------------------------------------------------ inputs
            with gr.Column(scale=5, min_width=380, elem_id="inputs"):
                with gr.Column(elem_id="pair-inputs") as pair_inputs:  # pairs mode
                    gr.Markdown("**Demonstration pairs** — input → answer; the model infers the task from these.")
                    rows, pair_images = [], []
                    for index in range(MAX_ROWS):
                        with gr.Row(visible=index < pairs_shown, elem_classes="rt-pair-row") as row:
                            pair_images.append(image_input(f"Pair {index + 1} · input", height=150))
                            gr.Markdown("→", elem_classes="rt-arrow")
                            pair_images.append(image_input(f"Pair {index + 1} · answer", height=150))
                        rows.append(row)
                    with gr.Row():
                        add_button = gr.Button("+ Add pair", size="sm", variant="secondary")
                        remove_button = gr.Button("− Remove last pair", size="sm", variant="secondary")

                    gr.Markdown("**Query** — the model answers it the way the pairs show. A ground-truth answer is optional; "
                                "it adds metrics.")
                    with gr.Row(elem_classes="rt-pair-row"):
                        query = image_input("Query", height=170, elem_id="query")
                        truth = image_input("Ground truth", height=170, elem_id="truth")
                with gr.Column(elem_id="sequence-inputs", visible=False) as sequence_inputs:  # sequence mode
                    gr.Markdown("**Frames**, oldest first — the model writes the next one. Give at least 2; click a frame "
                                "to move it or remove it.")
                    frames = gr.Gallery(value=[], label="Frames, oldest first", type="filepath", format="png", interactive=False,
                                        columns=5, height=240, allow_preview=False, object_fit="contain", elem_id="frames",
                                        elem_classes="rt-pixelated")
                    with gr.Row():
                        small = dict(size="sm", variant="secondary", min_width=70)
                        add_frames_button = gr.UploadButton("+ Add frames", file_types=["image"], file_count="multiple",
                                                            elem_id="add-frames", **{**small, "min_width": 120})
                        earlier_button = gr.Button("◀ Earlier", elem_id="frame-earlier", **small)
                        later_button = gr.Button("Later ▶", elem_id="frame-later", **small)
                        remove_frame_button = gr.Button("Remove", elem_id="frame-remove", **small)
                        clear_frames_button = gr.Button("Clear", elem_id="frames-clear", **small)
                    gr.Markdown("**True next frame** (optional) — adds metrics and a comparison with what the model wrote.")
                    next_truth = image_input("True next frame", height=170, elem_id="next-truth")
                use_adapter = gr.Checkbox(False, label="use taught adapter", elem_id="use-adapter",
                                          info="run with the task you taught in the Teach tab (this run only; "
                                               "untick for the model as it is)")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)

                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    draft_mode = gr.Radio([(DRAFT_MODES.get(m, m), m) for m in modes], value="ar", label="Draft",
                                          visible=len(modes) > 1, elem_id="draft-mode")
                    refiners = gr.Radio(refiner_choices(available), value=default_refiner(available),
                                        label="Refiners after the draft, in order")
                    with gr.Row():
                        scan_iterations = gr.Slider(0, 100, value=30, step=1, label="SCAN T", info="iterations")
                        scan_cells = gr.Slider(1, engine.grid ** 2, value=min(4, engine.grid ** 2), step=1, label="SCAN c",
                                               info="tokens regenerated per iteration")
                    sampling = engine.sampling_defaults          # the model's own (LVM-7B: its reference scripts')
                    with gr.Row():
                        temperature = gr.Slider(0.0, 2.0, value=sampling["temperature"], step=0.05, label="temperature",
                                                info="0 = greedy")
                        top_p = gr.Slider(0.05, 1.0, value=sampling["top_p"], step=0.05, label="top-p", info="nucleus")
                    with gr.Row():
                        top_k = gr.Slider(0, 1024, value=sampling["top_k"], step=1, label="top-k", info="0 = off")
                        candidates = gr.Slider(1, 8, value=1, step=1, label="candidates", info="best mean quality wins")
                    sampling_note = gr.Markdown(studio.sampling_note(), elem_classes="rt-hint", elem_id="sampling-note")
                    quality_score = gr.Radio(QUALITY_SCORE_CHOICES, value="combined", label="Quality score",
                                             info="what the heatmap shows and SCAN ranks and compares "
                                                  "(LVM-format models: always the token probability)",
                                             elem_id="quality-score")
                    paste = gr.Radio(PASTE_CHOICES, value="default", label="Cells the answer copies from the query",
                                     info="show the query's own pixels there, or the tokenizer's decode of the copied "
                                          "code (default: pixels for models with local codes)", elem_id="paste")
                    luma = gr.Radio(LUMA_CHOICES, value="default", label="Brightness where the examples keep it",
                                    info="when the demonstrations' answers keep their inputs' brightness (colourising, "
                                         "inverting, tone curves), take it from the query and the colours from the "
                                         "model, or show the model's own", elem_id="luma")
                    with gr.Row(equal_height=True):
                        seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                        randomize = gr.Checkbox(value=False, label="randomize seed")
                    with gr.Row():
                        canvas_every = gr.Slider(1, canvas_maximum(engine), value=engine.canvas_every_default,
                                                 step=1, label="live canvas", info="decode every n tokens", elem_id="canvas-every")
                        frame_ms = gr.Slider(0, 500, value=60, step=10, label="live view pace",
                                             info="ms per frame; 0 = as fast as it runs", elem_id="pace")

                with gr.Accordion("Model", open=False, elem_id="model"):
                    model_info = gr.Markdown(studio.model_info(), elem_classes="rt-model")
                    model_choice = gr.Dropdown(studio.model_choices(), value=studio.default_model, label="Model",
                                               allow_custom_value=studio.allow_local, elem_id="model-choice",
                                               info="the models this server offers" +
                                                    (" (or type a bundle folder)" if studio.allow_local else ""))
                    load_button = gr.Button("Load model", size="sm")
                    gr.Markdown("Your choice is yours alone: other visitors keep their models. Runs take turns.",
                                elem_classes="rt-hint")

            # ------------------------------------------------------------------ outputs
            with gr.Column(scale=7, min_width=420, elem_id="outputs"):
                status = gr.HTML(IDLE_STATUS, elem_id="status")
                with gr.Tabs():
                    with gr.Tab("Live", id="live"):
                        canvas = output_image("Canvas", elem_id="canvas", elem_classes="rt-canvas", height=420)
                        gr.HTML(legend("written", *(["window"] if "tensor" in modes else []), "accepted", "rejected", "vsr"))
                    with gr.Tab("Quality", id="quality"):
                        with gr.Row():
                            quality_draft = gr.AnnotatedImage(label="Draft: per-token quality", format="png",
                                                              color_map=viz.quality_band_colours(), elem_id="quality-draft",
                                                              elem_classes="rt-pixelated")
                            quality_final = gr.AnnotatedImage(label="After refinement", format="png",
                                                              color_map=viz.quality_band_colours(), elem_id="quality-final",
                                                              elem_classes="rt-pixelated")
                        quality_note = gr.Markdown("")
                    with gr.Tab("Timeline", id="timeline"):
                        timeline_slider = gr.Slider(0, 1, value=0, step=1, label="SCAN iteration (0 = the draft)", visible=False,
                                                    elem_id="timeline-slider")
                        with gr.Row():
                            timeline_image = output_image("After this iteration",
                                                          elem_id="timeline-image", elem_classes="rt-pixelated", height=360)
                            vsr_image = output_image("VSR changes", visible=False, elem_classes="rt-pixelated",
                                                     height=360)
                        gr.HTML(legend("accepted", "rejected", "vsr"))
                        timeline_text = gr.Markdown("Run a generation with SCAN to see its iterations here.")
                        tensor_plot = gr.Plot(label="TensorAR revisions per slide", format="png", show_label=False,
                                              visible=False, elem_id="tensor-plot")
                    with gr.Tab("Before / after", id="compare"):
                        before_after = gr.ImageSlider(label="Draft ↔ final", format="png", interactive=False,
                                                      elem_classes="rt-pixelated", max_height=440, elem_id="before-after")
                        with gr.Row():
                            compare_a = gr.Dropdown(choices=[], label="Left", interactive=True)
                            compare_b = gr.Dropdown(choices=[], label="Right", interactive=True)
                        stage_grid = output_image("Every stage side by side", elem_id="stage-grid", height=260)
                    with gr.Tab("Metrics", id="metrics"):
                        metrics_note = gr.Markdown("")
                        metrics_table = gr.Dataframe(headers=METRIC_COLUMNS, interactive=False, label="Per stage",
                                                     elem_id="metrics-table")
                        cosine_plot = gr.Plot(label="Per-token cosine distance (VSR Fig. 2)", format="png", show_label=False)
                        quality_plot = gr.Plot(label="SCAN progress", format="png", show_label=False)
                        timings_table = gr.Dataframe(headers=TIMING_COLUMNS, interactive=False, label="Timings")
                    with gr.Tab("Teach", id="teach-tab", elem_id="teach-tab"):
                        gr.Markdown("**Teach it a new task** from your own pairs: image files named `NAME_input.png` and "
                                    "`NAME_answer.png` (any image type), or a zip of them, 2 to 50 pairs. A small LoRA "
                                    "adapter is trained for a couple of minutes; the model itself never changes, and the "
                                    "adapter stays in your session only.", elem_classes="rt-hint")
                        teach_files = gr.File(label="Pairs (several files or a zip)", file_count="multiple",
                                              file_types=["image", ".zip"], elem_id="teach-files", height=120)
                        teach_grid = gr.Gallery(label="Your pairs (input, answer)", columns=8, height=200, format="png",
                                                allow_preview=False, object_fit="contain", interactive=False,
                                                elem_id="teach-pairs", elem_classes="rt-pixelated")
                        teach_steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Step budget",
                                                info="each step trains on 4 leave-one-out examples; the default is "
                                                     "about two minutes for 20 pairs on two CPU cores",
                                                elem_id="teach-steps")
                        with gr.Row():
                            teach_button = gr.Button("Teach", variant="primary", elem_id="teach", scale=3)
                            teach_stop = gr.Button("Stop", variant="stop", elem_id="teach-stop", scale=1)
                        teach_status = gr.HTML(TEACH_IDLE, elem_id="teach-status")
                        loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=220,
                                                elem_id="teach-loss")
                        with gr.Row():
                            export_button = gr.Button("Download adapter (.zip)", size="sm", elem_id="teach-export",
                                                      scale=1, visible=adapter_download_allowed())
                            load_button = gr.UploadButton("Load adapter (.zip)", file_types=[".zip"], size="sm",
                                                          elem_id="teach-load", scale=1)
                            adapter_file = gr.File(label="Adapter", interactive=False, elem_id="teach-file", height=60,
                                                   scale=2, visible=adapter_download_allowed())

        components = dict(canvas=canvas, status=status, seed=seed, quality_draft=quality_draft, quality_final=quality_final,
                          quality_note=quality_note, timeline_slider=timeline_slider, timeline_image=timeline_image,
                          timeline_text=timeline_text, vsr_image=vsr_image, tensor_plot=tensor_plot, before_after=before_after,
                          compare_a=compare_a, compare_b=compare_b, stage_grid=stage_grid, metrics_table=metrics_table,
                          timings_table=timings_table, cosine_plot=cosine_plot, quality_plot=quality_plot,
                          metrics_note=metrics_note, run_state=run_state)
        live_outputs = [components[name] for name in LIVE_OUTPUTS]
        report_outputs = [components[name] for name in REPORT_OUTPUTS]

        # ---------------------------------------------------------------------- events
        cheap = dict(concurrency_limit=None, api_visibility="private")
        add_button.click(add_pair, [pair_count, max_pairs], [pair_count, *rows], **cheap)
        remove_button.click(remove_pair, [pair_count], [pair_count, *rows, *pair_images], **cheap)
        example_outputs = [pair_count, *rows, *pair_images, query, truth, task]
        gallery.select(studio.select_example, [model_state], example_outputs, **cheap)
        task.input(studio.load_example, [task, model_state], example_outputs, api_name="load_example", concurrency_limit=None)

        prompt_kind.change(prompt_kind_updates, [prompt_kind, status],
                           [pair_examples, sequence_examples_row, pair_inputs, sequence_inputs, status], **cheap)
        frame_outputs = [frames, selected_frame]
        frame_edits = [
            sequence_gallery.select(studio.select_sequence_example, [model_state], [*frame_outputs, next_truth], **cheap),
            add_frames_button.upload(studio.add_frames, [frames, add_frames_button, model_state], frame_outputs, **cheap),
            earlier_button.click(move_earlier, frame_outputs, frame_outputs, **cheap),
            later_button.click(move_later, frame_outputs, frame_outputs, **cheap),
            remove_frame_button.click(remove_frame, frame_outputs, frame_outputs, **cheap),
            clear_frames_button.click(clear_frames, None, frame_outputs, **cheap),
        ]
        for edit in frame_edits:
            edit.then(clear_refusal, [status], [status], **cheap)
        frames.select(select_frame, None, [selected_frame], **cheap)

        generation = generate_button.click(
            studio.generate_endpoint(),
            [*pair_images, query, truth, refiners, scan_iterations, scan_cells, temperature, top_p, top_k, seed,
             randomize, candidates, canvas_every, frame_ms, draft_mode, quality_score, prompt_kind, frames, next_truth,
             use_adapter, taught_state, model_state, paste, luma],
            live_outputs, api_name="generate", concurrency_limit=1, concurrency_id="model", show_progress="full",
            show_progress_on=[status])
        # the finished run's other views, once (a stopped or refused run leaves them as they were)
        generation.success(report, [run_state], report_outputs, api_name="report", concurrency_limit=None,
                           show_progress="hidden")
        # cancel first, then mark the status: a frame still in flight from the cancelled run cannot overwrite it
        stop_button.click(None, None, None, cancels=[generation], queue=False).then(stopped_status, [status], [status], **cheap)

        # teaching: the same queue as generation (one model run at a time); Stop keeps the adapter taught so far
        teach_files.change(preview_pairs, [teach_files], [teach_grid, teach_status], **cheap)
        teaching = teach_button.click(studio.teach, [teach_files, teach_steps, model_state], [teach_status, loss_plot, taught_state],
                                      api_name="teach", concurrency_limit=1, concurrency_id="model", show_progress="hidden")
        teach_stop.click(None, None, None, cancels=[teaching], queue=False).then(
            teach_stopped, [teach_status, taught_state], [teach_status], **cheap)
        export_button.click(export_adapter, [taught_state], [adapter_file], **cheap)
        load_button.upload(studio.load_adapter, [load_button, model_state], [teach_status, taught_state], **cheap)

        timeline_slider.input(timeline_view, [timeline_slider, run_state], [timeline_image, timeline_text],
                              api_name="timeline", concurrency_limit=None, trigger_mode="always_last", show_progress="hidden")
        for dropdown in (compare_a, compare_b):
            dropdown.input(compare_view, [compare_a, compare_b, run_state], [before_after], concurrency_limit=None,
                           api_visibility="private")
        # loading has its own queue: it never waits for, nor holds up, other visitors' runs
        load_button.click(studio.load_model, [model_choice, refiners, draft_mode, model_state],
                          [model_state, model_info, refiners, scan_cells, max_pairs, draft_mode, temperature, top_p, top_k,
                           sampling_note, canvas_every], api_name="load_model",
                          concurrency_limit=2, concurrency_id="load", show_progress="hidden")
    demo.queue(max_size=32)
    demo.studio = studio          # tests and scripts reach the handlers through the page
    return demo


def launch_options() -> dict:
    """launch() arguments every way of serving the studio shares (theme and CSS moved there in Gradio 6)."""
    return dict(theme=theme(), css=CSS, max_file_size=MAX_FILE_SIZE, show_error=True)


def warm_up(engine) -> None:
    """One short run so the first click does not pay for lazy initialisation (LPIPS, kernels)."""
    from demo_core.metrics import image_metrics
    from studio.handlers import list_examples as examples

    example = next(iter(examples().values()), None)
    if example is None:
        return
    result = engine.run(example.pairs[:engine.max_pairs], example.query, refine=("scan",), scan_iterations=1)
    try:
        image_metrics(result.final, result.final)
    except Exception:
        pass


def main() -> int:
    from demo_core.bundle import BundleError
    from demo_core.engine import load_engine

    source = os.environ.get("RETOUCH_BUNDLE") or None
    try:
        engine = load_engine(source)
    except BundleError as error:
        print(f"error: cannot load the model bundle: {error}\n"
              f"Set RETOUCH_BUNDLE to a bundle folder (python -c 'from demo_core.testing import build_tiny_bundle; "
              f"build_tiny_bundle(\"/tmp/tiny\")' makes a random one).", file=sys.stderr)
        return 1
    warm_up(engine)
    from studio.models import LOCAL_PREFIX

    model_id = DEFAULT_MODEL if source is None else (source if source.lower() in ("lvm-7b", "lvm") or not os.path.isdir(source)
                                                     else LOCAL_PREFIX + source)
    demo = build_demo(engine, model_label="embedded default" if source is None else source, model_id=model_id)
    try:
        host, port = server_address()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo.launch(server_name=host, server_port=port, **launch_options())
    return 0


def server_address(environ=None) -> tuple[str, int]:
    """(host, port): Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (what Docker and Spaces set), with
    RETOUCH_HOST / RETOUCH_PORT as aliases; 127.0.0.1:7860 when none is set."""
    environ = os.environ if environ is None else environ
    host = environ.get("GRADIO_SERVER_NAME") or environ.get("RETOUCH_HOST") or "127.0.0.1"
    port_text = environ.get("GRADIO_SERVER_PORT") or environ.get("RETOUCH_PORT") or "7860"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"GRADIO_SERVER_PORT / RETOUCH_PORT must be a port number, got {port_text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"GRADIO_SERVER_PORT / RETOUCH_PORT must be between 1 and 65535, got {port}")
    return host, port


if __name__ == "__main__":
    sys.exit(main())
