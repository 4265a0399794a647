"""`python -m demo_core bench`: where the time goes, per image (VSR Table 5 style).

Per-stage medians over several runs after a warm-up: token generation (draft), SCAN, VSR
(g_phi + nearest-code lookup), VQ decode, total; draft tokens/s; our KV-cached loop vs
`model.generate` on the same prompt, measured in the same run; SCAN and VSR cost as a fraction
of the draft; peak memory; and what a studio user feels: request -> first canvas, -> final image.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .images import float_to_pil
from .tasks import ExampleSampler


def _median(values):
    return float(statistics.median(values)) if values else float("nan")


@torch.no_grad()
def generate_baseline(engine, context: torch.Tensor, new_tokens: int) -> float:
    """Seconds for `model.generate` to write `new_tokens` tokens after the prompt (sampling, KV cache, no early stop)."""
    model = engine.model
    device = next(model.parameters()).device
    prompt = torch.cat([context, torch.tensor([engine.vocab.at(0)] if engine.bundle.sequence_format == "scan" else [])]).long()
    start = time.perf_counter()
    model.generate(prompt[None].to(device), attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long, device=device),
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_p=0.9, temperature=1.0,
                   eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start


def bench(engine, runs: int, pairs: int, seed: int, scan_iterations: int, scan_cells: int, canvas_every: int | None = None) -> dict:
    from .events import Finished, TokensWritten

    canvas_every = engine.canvas_every_default if canvas_every is None else canvas_every
    sampler = ExampleSampler("val", engine.image_size, seed)
    refine = tuple(stage for stage in ("scan", "vsr") if stage in engine.available_refiners)
    rows = []
    for index in range(runs + 1):                         # run 0 is the warm-up
        example = sampler.sample(task="colorization", k=pairs)
        pair_images = [(float_to_pil(x), float_to_pil(y)) for x, y in example.pairs]
        query = float_to_pil(example.query)
        start = time.perf_counter()
        first_canvas = None
        result = None
        for event in engine.stream(pair_images, query, refine=refine, seed=seed + index, scan_iterations=scan_iterations,
                                   scan_cells=scan_cells, canvas_every=canvas_every, decode_scan_steps=False):
            if isinstance(event, TokensWritten) and event.canvas is not None and first_canvas is None:
                first_canvas = time.perf_counter() - start
            if isinstance(event, Finished):
                result = event.result
        final = time.perf_counter() - start
        # our loop vs model.generate: the same prompt, the same number of forwards
        context, _ = engine.build_context(pair_images, query)
        baseline = generate_baseline(engine, context, engine.vocab.cells)
        vsr_lookup = _time_vsr(engine, result) if "vsr" in refine else None
        if index:
            rows.append({"timings": result.timings, "first_canvas": first_canvas, "final": final, "generate": baseline,
                         "vsr_only": vsr_lookup})
    tokens = engine.vocab.cells
    draft = _median([r["timings"]["draft"] for r in rows])
    report = {
        "runs": runs, "pairs": pairs, "canvas_every": canvas_every, "refine": list(refine), "scan": {"T": scan_iterations, "c": scan_cells},
        "device": str(engine.device), "threads": torch.get_num_threads(),
        "per_stage_ms": {stage: 1000 * _median([r["timings"].get(stage, float("nan")) for r in rows])
                         for stage in ["encode", "draft", *refine, "decode", "total"]},
        "draft_tokens_per_s": tokens / draft,
        "generate_tokens_per_s": tokens / _median([r["generate"] for r in rows]),
        "scan_vs_draft": _median([r["timings"].get("scan", 0) for r in rows]) / draft if "scan" in refine else None,
        # the same ratio run by run (draft and SCAN of one request share the machine's momentary speed): quartiles
        "scan_vs_draft_per_run": ([float(q) for q in np.percentile([r["timings"]["scan"] / r["timings"]["draft"] for r in rows],
                                                                   [25, 50, 75])] if "scan" in refine else None),
        "vsr_vs_draft": (_median([r["vsr_only"] for r in rows]) / draft) if "vsr" in refine else None,
        "first_canvas_ms": 1000 * _median([r["first_canvas"] for r in rows if r["first_canvas"] is not None]),
        "final_ms": 1000 * _median([r["final"] for r in rows]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    report["loop_vs_generate"] = report["draft_tokens_per_s"] / report["generate_tokens_per_s"]
    report["fast_path"] = fast_path_info(engine.model)
    if torch.cuda.is_available():
        report["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return report


def fast_path_info(model) -> dict:
    """Which forward the loops ran (fast_llama or transformers), in which dtype, and the calibration behind it."""
    from . import fast_llama

    runner = fast_llama.fast_runner(model)
    if not isinstance(runner, fast_llama.FastLlama):
        return {"runner": "transformers", "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    measured = fast_llama.calibration(model) or {}
    return {"runner": "fast_llama", "dtype": str(runner.dtype).replace("torch.", ""),
            "calibration_ms_per_step": {name: measured.get(f"{name}_ms") for name in ("float32", "bfloat16")}
            if measured.get("float32_ms") is not None else None}


def _time_vsr(engine, result) -> float:
    """g_phi + nearest-code lookup alone on the draft's tokens (no re-scoring)."""
    from .refiners.self_refine import self_refine

    codes = torch.as_tensor(result.codes["draft"]).view(1, -1).to(engine.device)
    start = time.perf_counter()
    self_refine(engine.vsr, engine.model, engine.vocab, codes, codebook=engine.tokenizer.codebook)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_core bench", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up; medians are reported")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-iterations", type=int, default=30)
    parser.add_argument("--scan-cells", type=int, default=4)
    parser.add_argument("--canvas-every", type=int, default=None,
                        help="decode the live canvas every n tokens (default: the engine's, 16 canvases a draft; 0: none)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    from .bundle import BundleError
    from .engine import load_engine

    try:
        engine = load_engine(args.bundle)
    except BundleError as error:
        print(f"error: {error}")
        return 1
    if not 1 <= args.pairs <= engine.max_pairs:
        print(f"error: --pairs must be between 1 and {engine.max_pairs}")
        return 1
    report = bench(engine, args.runs, args.pairs, args.seed, args.scan_iterations, args.scan_cells, args.canvas_every)
    lines = [f"device {report['device']} ({report['threads']} threads), K={report['pairs']}, medians of {report['runs']} runs, "
             f"live canvas every {report['canvas_every']} tokens",
             "per image: " + ", ".join(f"{k} {v:.1f} ms" for k, v in report["per_stage_ms"].items()),
             f"draft {report['draft_tokens_per_s']:.0f} tokens/s; model.generate {report['generate_tokens_per_s']:.0f} tokens/s; "
             f"our loop / generate = {report['loop_vs_generate']:.2f}x"]
    fast = report["fast_path"]
    measured = fast.get("calibration_ms_per_step")
    lines.append(f"loops' forward: {fast['runner']} in {fast['dtype']}" + (
        f" (measured at load: float32 {measured['float32']:.2f} ms, bfloat16 {measured['bfloat16']:.2f} ms a step)"
        if measured else ""))
    if report["scan_vs_draft"] is not None:
        q1, mid, q3 = report["scan_vs_draft_per_run"]
        lines.append(f"SCAN (T={args.scan_iterations}, c={args.scan_cells}) = {report['scan_vs_draft']:.2f}x the draft time "
                     f"(run by run: median {mid:.2f}x, quartiles {q1:.2f}-{q3:.2f}x)")
    if report["vsr_vs_draft"] is not None:
        lines.append(f"VSR g_phi + nearest-code lookup = {100 * report['vsr_vs_draft']:.1f}% of the draft time")
    lines.append(f"request -> first canvas {report['first_canvas_ms']:.0f} ms, -> final image {report['final_ms']:.0f} ms; "
                 f"peak RSS {report['peak_rss_mb']:.0f} MB")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0
