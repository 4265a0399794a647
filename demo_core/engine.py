"""The engine: composes tokenizer, backbone and refiners into `run()` and `stream()`.

    from demo_core import load_engine
    engine = load_engine()     # embedded default; or a folder, a Hub id, "lvm-7b"
    result = engine.run(pairs=[(x1, y1)], query=q, refine=("scan", "vsr"), seed=0)      # analogy prompt
    result = engine.run(frames=[f1, f2, f3], refine=("scan",), seed=0)                 # sequential prompt
    for event in engine.stream(pairs=..., query=..., refine=..., seed=0): ...

Owns device and dtype (chosen once, here), input validation, and the order of stages.
Returns typed events (`events.py`); never imports gradio.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .backbone import QUALITY_SCORES, SamplingConfig
from .bundle import Bundle, load_bundle
from .drafts.tensor import WindowStep
from .events import (DraftDone, Event, Finished, GenerationStarted, Result, ScanStep, StageDone, TokensWritten, WindowSlid,
                     as_grid)
from .formats import sequence_format
from .images import ImageInputError, float_to_pil, load_square, open_image, to_square
from .refiners.self_refine import SCORE_GATES, gated_latents, refine, score_gate
from .render import kept_cells, luminance_map, render
from .sequence import context_tokens, frames_context
from .teach.adapter import AdapterError, TaskAdapter, applied

REFINERS = ("scan", "vsr", "vsr-continuous")  # vsr-continuous: a code-space g_phi's latents decoded unsnapped
STAGE_ALIASES = {"self": "vsr"}       # VSR's old stage name, still accepted on input
DRAFT_MODES = ("ar", "tensor")
CANVAS_FRAMES = 16                    # live-canvas decodes a draft makes by default (Engine.canvas_every_default)
OWN_SAMPLING = "Retouch's own defaults, measured on the embedded default (README results)"


class EngineInputError(ValueError):
    """Input the user must change; the message says what."""


@dataclass
class RunSettings:
    """Everything a run can be asked to do besides its images."""

    refine: tuple[str, ...] = ("scan",)   # stages after the draft, in order: "scan", "vsr"
    draft_mode: str = "ar"                # "ar": SCAN-form draft, one token per step; "tensor": TensorAR windows (tensor/)
    seed: int = 0
    # sampling: the embedded default's measured defaults; a bundle's "sampling" replaces them (LVM-7B: top-p 1.0)
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    candidates: int = 1
    scan_temperature: float | None = None  # SCAN's regeneration temperature (None: the draft's); a bundle may set it
    scan_iterations: int = 30             # SCAN T
    scan_cells: int = 4                   # SCAN c
    quality_score: str = "combined"       # backbone.token_score: "combined" p(<good>) x p(code), or "head" (SCAN paper)
    vsr_gate: float = 0.0                 # VSR changes a cell only where g_phi prefers its new code by this margin
    vsr_keep_copies: bool = False         # VSR leaves the cells the draft copied from the query as they are
    vsr_keep_confident: float | None = None  # VSR leaves the cells whose draft quality score is at least this
    vsr_score_gate: str = "off"           # VSR's proposals kept only where ("cells") or if ("answer") the backbone
                                          # scores them above the draft (SCAN's Eq. 5); a bundle's "vsr" sets these
    canvas_every: int = 4                 # decode the live canvas every n tokens (0: never); a run's default is the
                                          # engine's `canvas_every_default` (CANVAS_FRAMES canvases a draft)
    decode_scan_steps: bool = True        # decode an image after every SCAN iteration
    paste_query: bool | None = None       # show the query's pixels where the answer keeps its codes (render.py);
                                          # None: the bundle's default (on for local codes)
    luma_carry: bool | None = None        # answers take the query's luminance where the pairs show their answers keep
                                          # their inputs' (render.py); None: the bundle's default (bundle.json)


@dataclass
class Prompt:
    """A run's prepared images: an analogy prompt (pairs + query) or a sequential prompt (frames)."""

    pairs: list[tuple[Image.Image, Image.Image]]
    query: Image.Image              # the pairs' query; for frames, the last frame (the canvas's backdrop, VSR's query)
    frames: list[Image.Image] | None = None

    @property
    def kind(self) -> str:
        return "frames" if self.frames is not None else "pairs"


def choose_device(preference: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16 where supported, else fp16) > MPS > CPU float32. Chosen once, at load."""
    if preference:
        device = torch.device(preference)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "mps":
        dtype = torch.float16
    else:
        dtype = torch.float32
    return device, dtype


class Engine:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer
        self.model = bundle.backbone
        self.vsr = bundle.vsr                         # VSR g_phi, or None
        self.format = sequence_format(bundle)         # how this backbone drafts, scores and SCAN-refines
        self.vocab = bundle.vocab
        self.device = next(self.model.parameters()).device
        self.grid = self.tokenizer.grid
        self.image_size = self.tokenizer.image_size

    # -- inputs ---------------------------------------------------------------------------------
    @property
    def max_pairs(self) -> int:
        return self.bundle.max_pairs

    @property
    def max_frames(self) -> int:
        """Context frames a sequential prompt may hold (LVM-7B: 15); the model writes the frame after them."""
        return self.bundle.max_frames

    @property
    def canvas_every_default(self) -> int:
        """Tokens per live-canvas decode unless told otherwise: CANVAS_FRAMES canvases a draft whatever the grid (every
        4th token of 64, every 16th of 256). A canvas decode costs about what 3 draft tokens do on retouch-16, and the
        studio shows at most ~10 frames a second, so decoding more often only slows the draft."""
        return max(1, self.grid ** 2 // CANVAS_FRAMES)

    @property
    def sampling_defaults(self) -> dict:
        """temperature, top_p, top_k a run uses unless told otherwise: the bundle's own, else RunSettings'."""
        fields = RunSettings.__dataclass_fields__
        return {key: self.bundle.sampling_defaults.get(key, fields[key].default) for key in ("temperature", "top_p", "top_k")}

    @property
    def sampling_source(self) -> str:
        """Where `sampling_defaults` come from, in words (the studio shows it)."""
        return (self.bundle.info.get("sampling") or {}).get("source") or OWN_SAMPLING

    @property
    def available_refiners(self) -> tuple[str, ...]:
        if self.vsr is None:
            return ("scan",)
        return REFINERS if getattr(self.vsr, "space", "backbone") == "codes" else ("scan", "vsr")

    @property
    def available_draft_modes(self) -> tuple[str, ...]:
        return DRAFT_MODES if self.bundle.tensor is not None else ("ar",)

    def prepare(self, pairs: Sequence, query) -> tuple[list[tuple[Image.Image, Image.Image]], Image.Image]:
        """Validate and load the images (any size or mode: centre-cropped, resized, converted to RGB)."""
        if pairs is not None and not isinstance(pairs, (list, tuple)):
            raise EngineInputError("pairs must be a list of (input, answer) image pairs.")
        for number, pair in enumerate(pairs or [], 1):
            if pair is not None and not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise EngineInputError(f"Pair {number} must be an (input, answer) pair of two images.")
        pairs = [tuple(pair) if pair is not None else (None, None) for pair in (pairs or [])]
        pairs = [pair for pair in pairs if not (pair[0] is None and pair[1] is None)]
        if not pairs:
            raise EngineInputError("Give at least one demonstration pair (an input image and its answer).")
        if len(pairs) > self.max_pairs:
            raise EngineInputError(f"{len(pairs)} pairs do not fit in the context: this model holds at most "
                                   f"{self.max_pairs}; remove {len(pairs) - self.max_pairs}.")
        if query is None:
            raise EngineInputError("Give a query image: the model answers it the way the pairs show.")
        loaded = []
        for number, pair in enumerate(pairs, 1):
            if len(pair) != 2 or pair[0] is None or pair[1] is None:
                side = "input" if len(pair) < 1 or pair[0] is None else "answer"
                raise EngineInputError(f"Pair {number} has no {side} image; add it or remove the pair.")
            try:
                loaded.append((load_square(pair[0], self.image_size, f"pair {number} input"),
                               load_square(pair[1], self.image_size, f"pair {number} answer")))
            except ImageInputError as error:
                raise EngineInputError(str(error)) from error
        try:
            query_image = load_square(query, self.image_size, "query")
        except ImageInputError as error:
            raise EngineInputError(str(error)) from error
        return loaded, query_image

    def prepare_frames(self, frames: Sequence) -> list[Image.Image]:
        """Validate and load a frame sequence (oldest first): 2 to `max_frames` images, all of one size, each then
        centre-cropped and resized like any input (the same crop for every frame, so motion is kept)."""
        if isinstance(frames, np.ndarray) and frames.ndim == 4:          # (F, H, W, C): one array of frames
            frames = list(frames)
        if not isinstance(frames, (list, tuple)):
            raise EngineInputError("frames must be a list of images, oldest first (the model writes the next one).")
        if len(frames) < 2:
            raise EngineInputError(f"A sequence needs at least 2 frames (the model writes the next one); "
                                   f"{'add 1 more' if frames else 'give 2'}.")
        if len(frames) > self.max_frames:
            raise EngineInputError(f"{len(frames)} frames do not fit in the context: this model holds at most "
                                   f"{self.max_frames}; remove {len(frames) - self.max_frames}.")
        opened = []
        for number, frame in enumerate(frames, 1):
            if frame is None:
                raise EngineInputError(f"Frame {number} has no image; add it or remove the frame.")
            try:
                opened.append(open_image(frame, f"frame {number}"))
            except ImageInputError as error:
                raise EngineInputError(str(error)) from error
        first = opened[0].size
        for number, image in enumerate(opened[1:], 2):
            if image.size != first:
                raise EngineInputError(f"Frame {number} is {image.size[0]}x{image.size[1]} but frame 1 is "
                                       f"{first[0]}x{first[1]}: a sequence's frames must all be the same size.")
        return [to_square(image, self.image_size) for image in opened]

    def prepare_prompt(self, pairs=None, query=None, frames=None) -> Prompt:
        """Either pairs + query (`prepare`) or frames (`prepare_frames`), never both."""
        if frames is not None:
            if (pairs is not None and len(pairs) > 0) or query is not None:
                raise EngineInputError("Give either demonstration pairs and a query or a frame sequence, not both "
                                       "(a sequence's query is its last frame).")
            loaded = self.prepare_frames(frames)
            return Prompt([], loaded[-1], loaded)
        loaded, query_image = self.prepare(pairs, query)
        return Prompt(loaded, query_image)

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        return self.tokenizer.encode(images).view(len(images), -1).cpu()

    def build_context(self, loaded, query_image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared pairs + query -> the context [x1, y1, ..., xK, yK, xq] (1-D) and the query's codes (N,)."""
        codes = self.encode([image for pair in loaded for image in pair] + [query_image])   # (2K+1, N)
        return context_tokens([(codes[2 * i], codes[2 * i + 1]) for i in range(len(loaded))], codes[-1]), codes[-1]

    def build_frames_context(self, frames: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared frames -> the context [f1, ..., fF] (1-D) and the last frame's codes (N,)."""
        codes = self.encode(list(frames))                                                     # (F, N)
        return frames_context(codes), codes[-1]

    def decode(self, codes) -> Image.Image:
        codes = torch.as_tensor(codes).detach().cpu().view(1, self.grid, self.grid)
        return self.tokenizer.decode_pil(codes)

    def render(self, codes, query: Image.Image | None, query_codes, paste: bool | None = None,
               decoded: Image.Image | None = None, luminance=None) -> Image.Image:
        """What a user sees of an answer's `codes` (render.py): their decode (`decoded` when already made), with the
        prepared `query`'s pixels where they keep `query_codes` when `paste` (None: the bundle's default), and the
        query's luminance through `luminance` (`luminance_for`'s map of the prompt's pairs) when given."""
        paste = self.bundle.paste_query if paste is None else bool(paste)
        return render(self.decode(codes) if decoded is None else decoded, codes, query, query_codes, self.grid, paste,
                      luminance)

    def luminance_for(self, pairs, carry: bool | None = None):
        """The luminance map an answer to these demonstration pairs is rendered with (render.luminance_map), or None:
        when `carry` (None: the bundle's default) and the pairs show their answers' luminance following their
        inputs'. `pairs`: prepared (x, y) images, or float arrays of the model's size."""
        carry = self.bundle.luma_carry if carry is None else bool(carry)
        return luminance_map(pairs) if carry and pairs else None

    # -- generation -----------------------------------------------------------------------------
    def stream(self, pairs: Sequence | None = None, query=None, refine: Sequence[str] = ("scan",), seed: int = 0, *,
               frames: Sequence | None = None, adapter=None, **settings) -> Iterator[Event]:
        """Generate, then refine: yields typed events (events.py), last `Finished(result)`.

        Two prompt kinds (LVM's): pairs + query (analogy), or frames (sequential), not both.

        Args:
            pairs: K demonstration (input, answer) pairs; any image type `images.load_square` reads (PIL, numpy,
                a path), any size (centre-cropped and resized to the model's).
            query: the image to answer the way the pairs show.
            frames: instead of pairs + query, 2 to `max_frames` consecutive frames, oldest first, all of one size;
                the answer is the next frame. The last frame plays the query's part (the live canvas shows it
                where no cell is written yet, `Result.query` is it: the "repeat the last frame" baseline).
            refine: stages after the draft, in order: "scan" and/or "vsr" (the old name "self" is accepted).
            seed: the seed of the run's one `torch.Generator`; same seed, same image.
            adapter: a taught `teach.adapter.TaskAdapter` for this run only (None: the backbone as it is). It must
                have been taught on this backbone (else EngineInputError); it is applied around each step of the run
                under the backbone's adapter lock and removed before every yield, so no other run ever sees it.
            **settings: any other `RunSettings` field (draft_mode, temperature, top_p, top_k, candidates,
                scan_iterations, scan_cells, quality_score, canvas_every, decode_scan_steps).

        Returns:
            An iterator of events: GenerationStarted, TokensWritten per token (WindowSlid too for a TensorAR
            draft), DraftDone, ScanStep per SCAN iteration, StageDone per stage, Finished(Result).

        Raises:
            EngineInputError: input the user must change (the message says what).

        Example:
            >>> for event in engine.stream([(x1, y1)], query, refine=("scan",), seed=0):
            ...     if isinstance(event, TokensWritten) and event.canvas is not None:
            ...         show(event.canvas)
        """
        settings = self.settings(refine, seed, settings)
        self.check_adapter(adapter)
        prompt = self.prepare_prompt(pairs, query, frames)
        yield from self._with_adapter(self._stream(prompt, settings), adapter)

    def check_adapter(self, adapter) -> None:
        """EngineInputError (one line) unless `adapter` is None or was taught on this engine's backbone."""
        if adapter is None:
            return
        if not isinstance(adapter, TaskAdapter):
            raise EngineInputError(f"adapter must be a TaskAdapter (teach.adapter), not {type(adapter).__name__}.")
        if self.format.name != "scan":
            raise EngineInputError("Taught adapters work with SCAN-form backbones only (this model is LVM format).")
        try:
            adapter.check(self.model)
        except AdapterError as error:
            raise EngineInputError(f"Cannot use the adapter: {error}.") from error

    def _with_adapter(self, events: Iterator[Event], adapter) -> Iterator[Event]:
        """`events`, each step computed with `adapter` applied (None: the plain backbone) under the backbone's lock;
        nothing is applied while the consumer holds an event, so other runs interleave safely."""
        while True:
            with applied(self.model, adapter):
                try:
                    event = next(events)
                except StopIteration:
                    return
            yield event

    def run(self, pairs: Sequence | None = None, query=None, refine: Sequence[str] = ("scan",), seed: int = 0, *,
            frames: Sequence | None = None, adapter=None, **settings) -> Result:
        """`stream()` to the end, decoding no canvases on the way.

        Args: as `stream` (canvas_every and decode_scan_steps default to off here).

        Returns:
            The Result: draft, final and per-stage images, codes, quality, SCAN history, timings.

        Raises:
            EngineInputError: input the user must change. RuntimeError if the stream ends without a result.

        Example:
            >>> result = engine.run([(x1, y1), (x2, y2)], query, refine=("scan", "vsr"), seed=0)
            >>> result.final.save("out.png")
            >>> next_frame = engine.run(frames=[f1, f2, f3, f4], refine=("scan",), seed=0).final
        """
        settings.setdefault("canvas_every", 0)
        settings.setdefault("decode_scan_steps", False)
        result = None
        for event in self.stream(pairs, query, refine=refine, seed=seed, frames=frames, adapter=adapter, **settings):
            if isinstance(event, Finished):
                result = event.result
        if result is None:
            raise RuntimeError("the engine's stream ended without a result")
        return result

    def settings(self, refine, seed: int, settings: dict) -> RunSettings:
        """Checked RunSettings of a run (EngineInputError names what is wrong)."""
        unknown_settings = sorted(set(settings) - set(RunSettings.__dataclass_fields__))
        if unknown_settings:
            raise EngineInputError(f"Unknown setting {unknown_settings[0]!r}; see RunSettings for the options.")
        stages = tuple(STAGE_ALIASES.get(stage, stage) for stage in (refine or ()))
        settings = RunSettings(refine=stages, seed=int(seed), **{**self.sampling_defaults, "canvas_every": self.canvas_every_default,
                                                                 "scan_temperature": self.bundle.scan_temperature,
                                                                 **self.bundle.vsr_defaults, **settings})
        if settings.paste_query is None:
            settings.paste_query = self.bundle.paste_query
        if settings.luma_carry is None:
            settings.luma_carry = self.bundle.luma_carry
        if settings.temperature < 0 or not 0 < settings.top_p <= 1 or settings.top_k < 0:
            raise EngineInputError("Sampling needs temperature >= 0 (0 = greedy), 0 < top-p <= 1 and top-k >= 0 (0 = off).")
        unknown = [stage for stage in settings.refine if stage not in REFINERS]
        if unknown:
            raise EngineInputError(f"Unknown refiner {unknown[0]!r}; choose from {', '.join(REFINERS)}.")
        if any(stage.startswith("vsr") for stage in settings.refine) and self.vsr is None:
            raise EngineInputError("This model has no VSR refiner (g_phi); choose SCAN only or load a bundle with refiner/.")
        if "vsr-continuous" in settings.refine and "vsr-continuous" not in self.available_refiners:
            raise EngineInputError("VSR's continuous decode needs a g_phi trained in the tokenizer's code space "
                                   "(train refiner --space codes); this model's refines the backbone's embeddings.")
        if settings.draft_mode not in DRAFT_MODES:
            raise EngineInputError(f"Unknown draft mode {settings.draft_mode!r}; choose from {', '.join(DRAFT_MODES)}.")
        if settings.draft_mode == "tensor" and self.bundle.tensor is None:
            raise EngineInputError("This model has no TensorAR part (tensor/); choose the AR draft or load a bundle with tensor/.")
        if settings.quality_score not in QUALITY_SCORES:
            raise EngineInputError(f"Unknown quality score {settings.quality_score!r}; choose from {', '.join(QUALITY_SCORES)}.")
        if settings.quality_score not in self.format.quality_scores:
            raise EngineInputError(f"This model has no quality token ({self.format.name} format): it scores a token by "
                                   f"its probability; choose the quality score {self.format.quality_scores[0]!r}.")
        if settings.vsr_score_gate not in SCORE_GATES:
            raise EngineInputError(f"Unknown VSR score gate {settings.vsr_score_gate!r}; choose from {', '.join(SCORE_GATES)}.")
        if settings.candidates < 1 or settings.scan_iterations < 0 or settings.scan_cells < 1:
            raise EngineInputError("candidates and SCAN c must be at least 1, SCAN T at least 0.")
        return settings

    def _stream(self, prompt: Prompt, settings: RunSettings) -> Iterator[Event]:
        fmt = self.format
        timings: dict[str, float] = {"decode": 0.0}
        start = time.perf_counter()
        if prompt.frames is not None:
            context, query_codes = self.build_frames_context(prompt.frames)
        else:
            context, query_codes = self.build_context(prompt.pairs, prompt.query)
        query_image = prompt.query
        luminance = self.luminance_for(prompt.pairs, settings.luma_carry) if prompt.frames is None else None

        def decode(codes, decoded: Image.Image | None = None) -> Image.Image:
            """What the user sees of `codes` (render.py; `decoded`: their decode when already made); every decode
            counts under "decode", never in a stage's time."""
            tick = time.perf_counter()
            image = self.render(codes, query_image, query_codes, settings.paste_query, decoded, luminance)
            timings["decode"] += time.perf_counter() - tick
            return image
        timings["encode"] = time.perf_counter() - start
        cells = self.vocab.cells
        yield GenerationStarted(total_tokens=cells, grid=self.grid, pairs=len(prompt.pairs), context_tokens=int(context.numel()),
                                stages=["draft", *settings.refine], sequence_format=fmt.name, draft_mode=settings.draft_mode,
                                frames=len(prompt.frames or ()))
        sampling = SamplingConfig(settings.temperature, settings.top_k, settings.top_p, settings.candidates)
        generator = torch.Generator(device=self.device).manual_seed(settings.seed)

        # 1. the draft, token by token (a TensorAR draft: window by window)
        start, decoded = time.perf_counter(), timings["decode"]
        raw: list = []
        slides: list[WindowSlid] = []
        written = np.zeros((self.grid, self.grid), dtype=bool)
        canvas_codes = query_codes.clone()          # unwritten cells show the query's codes (the UI dims them)
        for index, step in enumerate(fmt.draft(context, settings, sampling, generator, raw)):
            window = step if isinstance(step, WindowStep) else None
            cell = window.final_cell if window else step.cell
            written.flat[cell] = True
            if window:                              # TensorAR: each step re-predicts k cells; the front one is final
                latest = window.current[0].cpu()
                canvas_codes = torch.where(latest >= 0, latest, query_codes)
                code, quality = int(window.codes[0, 0]), float(window.probs[0, 0])
            else:
                canvas_codes[cell] = code = int(step.codes[0])
                quality = float(step.scores[0])
            canvas = None
            if settings.canvas_every and ((index + 1) % settings.canvas_every == 0 or index + 1 == cells):
                canvas = decode(canvas_codes)
            if window:
                slide = WindowSlid(window.step, window.cells, window.codes[0].tolist(), window.changed(0),
                                   as_grid(latest), written.copy(), as_grid(window.revisions), canvas)
                slides.append(slide)
                yield slide
            # the finalised cell (TensorAR: its quality is the model's probability of the code)
            yield TokensWritten(index, cell, code, quality, written.copy(), canvas)
        tick = time.perf_counter()
        state = fmt.finish(raw[0], context, settings)
        scored = time.perf_counter() - tick
        if settings.draft_mode == "tensor":
            timings["score"] = scored
        mean_quality = state.scores.mean(1)
        chosen = int(mean_quality.argmax())
        candidate_images = [decode(codes) for codes in state.codes]
        fmt.choose(state, chosen)
        timings["draft"] = time.perf_counter() - start - (timings["decode"] - decoded) - scored
        draft_image = candidate_images[chosen]
        stage_images = {"draft": draft_image}
        stage_codes = {"draft": as_grid(state.codes[0])}
        stage_quality = {"draft": as_grid(state.scores[0])}
        yield DraftDone(draft_image, stage_codes["draft"], stage_quality["draft"], candidate_images,
                        [float(q) for q in mean_quality], chosen)

        # 2. the refiners, in the order asked
        history: list[ScanStep] = []
        changed: dict[str, list[int]] = {}
        for stage in settings.refine:
            start, decoded = time.perf_counter(), timings["decode"]
            before = state.codes[0].clone()
            if stage == "scan":
                scan_sampling = sampling if settings.scan_temperature is None else replace(
                    sampling, temperature=float(settings.scan_temperature))
                for record in fmt.scan(state, settings, scan_sampling, generator):
                    if settings.decode_scan_steps:
                        record.image = decode(record.codes)
                    history.append(record)
                    yield record
            else:       # "vsr" (snapped) or "vsr-continuous" (the refined latents decoded as they are): g_phi, re-scored
                new_codes, latents = refine(self.vsr, self.model, self.vocab, state.codes, query_codes=query_codes[None],
                                            codebook=self.tokenizer.codebook, gate=settings.vsr_gate,
                                            keep_copies=settings.vsr_keep_copies,
                                            keep_confident=settings.vsr_keep_confident, scores=state.scores)
                draft_codes, draft_scores = state.codes, state.scores
                fmt.rescore(state, new_codes, context, settings)  # its codes, for the scores and later stages: snapped
                if settings.vsr_score_gate != "off":               # the backbone keeps only the proposals it prefers
                    kept = score_gate(draft_codes, state.codes, draft_scores, state.scores, settings.vsr_score_gate)
                    if not torch.equal(kept, state.codes):
                        fmt.rescore(state, kept, context, settings)
            name = stage if stage not in stage_images else f"{stage}#{len(stage_images)}"
            changed[name] = torch.nonzero(state.codes[0].cpu() != before.cpu()).flatten().tolist()
            stage_codes[name] = as_grid(state.codes[0])
            stage_quality[name] = as_grid(state.scores[0])
            timings[name] = time.perf_counter() - start - (timings["decode"] - decoded)
            if stage == "vsr-continuous":
                tick = time.perf_counter()
                latents = gated_latents(latents[:1], state.codes[:1], self.tokenizer.codebook)   # a kept cell: its code
                continuous = float_to_pil(self.tokenizer.decode_latents(latents)[0])
                timings["decode"] += time.perf_counter() - tick
                stage_images[name] = decode(state.codes[0], continuous)
            else:
                stage_images[name] = decode(state.codes[0])
            yield StageDone(name, stage_images[name], stage_codes[name], stage_quality[name], changed[name])
        final_name = list(stage_images)[-1]
        order = ("encode", "score", "draft", "decode")           # the phases first, then the stages as they ran
        timings = {**{phase: timings[phase] for phase in order if phase in timings}, **timings}
        timings["total"] = sum(timings.values())
        result = Result(draft=draft_image, final=stage_images[final_name], stages=stage_images, codes=stage_codes,
                        quality=stage_quality, history=history, changed=changed, timings=timings,
                        candidates=candidate_images, query=query_image, slides=slides, frames=len(prompt.frames or ()),
                        kept=as_grid(kept_cells(state.codes[0], query_codes)),
                        pasted=bool(settings.paste_query), luma_carried=luminance is not None)
        yield Finished(result)


def load_engine(source=None, revision: str | None = None, device: str | None = None) -> Engine:
    """The embedded default (None), a bundle folder, a Hub repo id (+revision) or a named recipe ("lvm-7b")."""
    target_device, dtype = choose_device(device)
    if isinstance(source, str) and source.lower() in ("lvm-7b", "lvm"):
        from .lvm import load_lvm_bundle

        return Engine(load_lvm_bundle(device=target_device, dtype=dtype, revision=revision))
    # the backbone takes the device's dtype (float32 on a CPU); the tokenizer always stays float32
    bundle = load_bundle(source, revision=revision, device=target_device, dtype=dtype)
    return Engine(bundle)
