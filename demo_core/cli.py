"""The `reconstruct` and `generate` commands (argument parsing and printing only; work is in the engine)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def reconstruct_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_core reconstruct",
                                     description="Encode an image to tokens and decode it back through a bundle's tokenizer.")
    parser.add_argument("image", help="any image file (centre-cropped and resized to the tokenizer's size)")
    parser.add_argument("--out", type=Path, default=None, help="write the reconstruction here (PNG)")
    parser.add_argument("--bundle", default=None, help="bundle folder or Hub id (default: the embedded retouch-tiny)")
    args = parser.parse_args(argv)
    from .bundle import BundleError, bundle_pixel_range, load_tokenizer_part, resolve
    from .images import ImageInputError, float_to_pil, load_square, pil_to_float
    from .metrics import psnr, ssim

    try:
        folder = resolve(args.bundle)
        tokenizer = load_tokenizer_part(folder / "tokenizer", bundle_pixel_range(folder))
        image = load_square(args.image, tokenizer.image_size, "image")
    except (BundleError, ImageInputError) as error:
        return _fail(str(error))
    codes = tokenizer.encode([image])
    reconstruction = tokenizer.decode(codes)[0]
    original = pil_to_float(image)
    print(f"{tokenizer.image_size}x{tokenizer.image_size} -> {tokenizer.grid}x{tokenizer.grid} tokens "
          f"({len(np.unique(codes.numpy()))} distinct codes); PSNR {psnr(original, reconstruction):.2f} dB, "
          f"SSIM {ssim(original, reconstruction):.3f}")
    if args.out:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            float_to_pil(reconstruction).save(args.out)
        except OSError as error:
            return _fail(f"cannot write {args.out}: {error.strerror or error}")
        print(f"wrote {args.out}")
    return 0


def generate_main(argv=None) -> int:
    from .backbone import QUALITY_SCORES
    from .refiners.self_refine import SCORE_GATES
    from .engine import DRAFT_MODES

    parser = argparse.ArgumentParser(prog="python -m demo_core generate",
                                     description="Answer a query the way the demonstration pairs show (or write the "
                                                 "frame after a sequence of frames), then refine.")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("X", "Y"), default=[], help="a demonstration pair (repeatable)")
    parser.add_argument("--query", required=False, help="the query image")
    parser.add_argument("--frames", nargs="+", metavar="F", default=None,
                        help="instead of --pair/--query: 2 or more consecutive frames, oldest first, all of one size; "
                             "the model writes the next one (lvm-7b: up to 15)")
    parser.add_argument("--truth", default=None,
                        help="the true answer (for --frames: the true next frame): print PSNR/SSIM of every stage "
                             "and of handing the query (the last frame) back")
    parser.add_argument("--refine", default="scan",
                        help="comma-separated stages after the draft: scan, vsr (old name: self), vsr-continuous (a "
                             "code-space g_phi's refined latents decoded unsnapped), or none")
    parser.add_argument("--draft-mode", choices=DRAFT_MODES, default="ar",
                        help="ar: one token per step (default); tensor: TensorAR sliding windows (bundles with tensor/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's own (1.0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="default: the model's own (0.9; lvm-7b: 1.0, its reference scripts')")
    parser.add_argument("--top-k", type=int, default=None, help="default: the model's own (0 = off)")
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--scan-temperature", type=float, default=None,
                        help="SCAN's regeneration temperature (default: the model's own, else the draft's)")
    parser.add_argument("--vsr-gate", type=float, default=None,
                        help="VSR changes a cell only where g_phi prefers its new code by more than this margin "
                             "(default: the bundle's, else 0)")
    parser.add_argument("--vsr-keep-copies", choices=("bundle", "on", "off"), default="bundle",
                        help="VSR leaves the cells the draft copied from the query (default: the bundle's choice)")
    parser.add_argument("--vsr-keep-confident", type=float, default=None,
                        help="VSR leaves the cells whose draft quality score is at least this (default: the bundle's, else off)")
    parser.add_argument("--vsr-score-gate", choices=("bundle", *SCORE_GATES), default="bundle",
                        help="keep VSR's proposals only where (cells) or if (answer) the backbone scores them above the "
                             "draft, SCAN's acceptance rule (default: the bundle's choice, else off)")
    parser.add_argument("--paste", choices=("bundle", "on", "off"), default="bundle",
                        help="where the answer keeps the query's code: on shows the query's own pixels, off the "
                             "tokenizer's decode (default: the bundle's choice, on for local codes; render.py)")
    parser.add_argument("--luma-carry", choices=("bundle", "on", "off"), default="bundle",
                        help="where the pairs show their answers keep their inputs' luminance, on takes the answer's "
                             "luminance from the query (default: the bundle's choice; render.py)")
    parser.add_argument("--scan-iterations", type=int, default=30, help="SCAN T")
    parser.add_argument("--scan-cells", type=int, default=4, help="SCAN c")
    parser.add_argument("--quality-score", choices=QUALITY_SCORES, default="combined",
                        help="the score SCAN ranks and compares: p(<good>) x p(code) (default), or the quality head alone")
    parser.add_argument("--revision", default=None, help="Hub revision of --bundle (a commit sha pins it)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--bundle", default=None, help="bundle folder, Hub id or lvm-7b (default: embedded retouch-tiny)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="a taught adapter folder (python -m demo_core teach ... --out ADAPTER) for this run")
    parser.add_argument("--out", type=Path, default=Path("out.png"))
    parser.add_argument("--heatmap", action="store_true", help="also write OUT.quality.png (per-token quality of the final image)")
    parser.add_argument("--stages", action="store_true", help="also write OUT.<stage>.png for every stage")
    args = parser.parse_args(argv)
    if args.frames is not None:
        if args.pair or args.query:
            return _fail("give either --pair X Y ... --query Q or --frames F1 F2 ..., not both")
    elif not args.query:
        return _fail("give --query IMAGE (or --frames F1 F2 ... for a sequence)")
    elif not args.pair:
        return _fail("give at least one --pair INPUT ANSWER")
    refine = tuple(s.strip() for s in args.refine.split(",") if s.strip() and s.strip() != "none")
    from .bundle import BundleError
    from .engine import EngineInputError, load_engine
    from .teach.adapter import AdapterError, TaskAdapter

    try:
        engine = load_engine(args.bundle, revision=args.revision, device=args.device)
        adapter = TaskAdapter.load(args.adapter, engine.model) if args.adapter is not None else None
        sampling = {name: value for name, value in (("temperature", args.temperature), ("top_p", args.top_p),
                                                    ("top_k", args.top_k), ("scan_temperature", args.scan_temperature))
                    if value is not None}
        options = dict(refine=refine, seed=args.seed, **sampling, candidates=args.candidates,
                       scan_iterations=args.scan_iterations, scan_cells=args.scan_cells, quality_score=args.quality_score,
                       draft_mode=args.draft_mode, adapter=adapter,
                       **({} if args.vsr_gate is None else {"vsr_gate": args.vsr_gate}),
                       **({} if args.vsr_keep_copies == "bundle" else {"vsr_keep_copies": args.vsr_keep_copies == "on"}),
                       **({} if args.vsr_score_gate == "bundle" else {"vsr_score_gate": args.vsr_score_gate}),
                       **({} if args.vsr_keep_confident is None else {"vsr_keep_confident": args.vsr_keep_confident}),
                       **({} if args.paste == "bundle" else {"paste_query": args.paste == "on"}),
                       **({} if args.luma_carry == "bundle" else {"luma_carry": args.luma_carry == "on"}))
        truth = _load_truth(args, engine.image_size) if args.truth else None
        if args.frames is not None:
            result = engine.run(frames=list(args.frames), **options)
        else:
            result = engine.run([tuple(p) for p in args.pair], args.query, **options)
    except (BundleError, EngineInputError, AdapterError) as error:
        return _fail(str(error))
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.final.save(args.out)
        if args.stages:
            for name, image in result.stages.items():
                image.save(args.out.with_suffix(f".{name}.png"))
        if args.heatmap:
            from .viz import quality_overlay

            last = list(result.quality)[-1]
            quality_overlay(result.final, result.quality[last]).save(args.out.with_suffix(".quality.png"))
    except OSError as error:
        return _fail(f"cannot write {args.out}: {error.strerror or error}")
    accepted = sum(sum(step.accepted) for step in result.history)
    print(f"wrote {args.out}; stages {', '.join(result.stages)}; SCAN accepted {accepted} of "
          f"{sum(len(s.cells) for s in result.history)} regenerated tokens; "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items()))
    if truth is not None:
        print(_truth_line(result, truth, "last frame" if args.frames is not None else "query"))
    return 0


def _load_truth(args, size: int):
    """The --truth image at the model's size; for a sequence it must be as large as the frames (EngineInputError)."""
    from .engine import EngineInputError
    from .images import ImageInputError, open_image, to_square

    try:
        truth = open_image(args.truth, "truth")
        if args.frames:
            first = open_image(args.frames[0], "frame 1")
            if truth.size != first.size:
                raise EngineInputError(f"truth is {truth.size[0]}x{truth.size[1]} but the frames are "
                                       f"{first.size[0]}x{first.size[1]}: the true next frame must be the frames' size")
    except ImageInputError as error:
        raise EngineInputError(str(error)) from error
    return to_square(truth, size)


def _truth_line(result, truth, baseline: str) -> str:
    """'vs truth: <baseline> (identity) PSNR .. dB SSIM ..; draft ...; scan ...' (the identity is handing the query back)."""
    from .metrics import image_metrics

    rows = ([(f"{baseline} (identity)", result.query)] if result.query is not None else []) + list(result.stages.items())
    parts = []
    for name, image in rows:
        scores = image_metrics(image, truth, with_lpips=False)
        parts.append(f"{name} PSNR {scores['psnr']:.2f} dB SSIM {scores['ssim']:.3f}")
    return "vs truth: " + "; ".join(parts)
