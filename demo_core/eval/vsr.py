"""`python -m demo_core eval-vsr`: VSR's variants side by side in pixels, on the same drafts (issue 20's ablation).

    python -m demo_core eval-vsr --bundle checkpoints/retouch16 --variant paper=runs/vsr16/paper \\
        --variant codes=runs/vsr16/codes --gates 0.05,0.1 --n 24 --seed 0 --pool debian --out runs/eval-vsr

Each validation example (the same ones, seeds and sampling as `demo_core eval`) is drafted once by the engine,
refined by SCAN once, and then every g_phi variant refines both the draft and the SCAN answer: snapped to codes
(its own nearest-code rule), snapped with each confidence gate, and, for a g_phi of the tokenizer's code space,
decoded continuously (its refined latents straight into the VQ decoder), and, for a g_phi with a learned gate, gated
by it (its ungated row is the same g_phi with the gate off); and every g_phi once more keeping the cells the draft
copied from the query (with paste, those show the query's own pixels), and gated by the backbone's own quality
score (SCAN's acceptance rule: a proposal stays only where, or only if, the re-scored answer scores higher; its
time includes the re-scoring forward). So the rows differ only by the refiner.
Beside them, as in `eval`: identity (the query handed back) and ceiling (the right answer through the tokenizer).

Per row: PSNR, token accuracy, the share of cells changed, g_phi's seconds as a share of the draft's, and the
per-token cosine distance to the right answer (VSR Fig. 2, in the backbone's embedding space, as `eval` measures it).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..images import float_to_pil, pil_to_float
from .family import FAMILY_CORE, example_sampler, is_family, validate_spec
from .quality import encode_example


def load_variants(items: list[str]) -> dict:
    """name=folder items -> {name: g_phi}; errors name the item."""
    from ..bundle import BundleError, load_refiner_part

    variants = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--variant takes name=folder, got {item!r}")
        name, folder = item.split("=", 1)
        try:
            variants[name.strip()] = load_refiner_part(Path(folder).expanduser())
        except (BundleError, OSError) as error:
            raise ValueError(f"--variant {name}: {error}") from error
    return variants


class Row(NamedTuple):
    """One decode of one g_phi."""

    label: str
    gate: float = 0.0           # margin gate
    continuous: bool = False    # refined latents into the VQ decoder, unsnapped
    learned: bool = False       # the g_phi's learned gate on
    keep: bool = False          # keep copies
    score: str = "off"          # the backbone's score gate (self_refine.SCORE_GATES)
    confident: float | None = None   # keep the cells whose draft quality score is at least this


def variant_rows(name: str, refiner, gates: list[float], score_gates=("cells", "answer"), confident=()) -> list[Row]:
    """The decodes of one g_phi: snapped, each margin gate, its learned gate (at its stored threshold) where it has
    one, snapped but keeping every cell the draft copied from the query (and with the learned gate too, where there
    is one; every other row has the learned gate off), the backbone's score gate per cell and per
    answer (alone and with keep copies), and its continuous decode where it has one."""
    rows = [Row(f"+VSR[{name}]")] + [Row(f"+VSR[{name}] gate {g:g}", gate=g) for g in gates]
    if refiner.learned_gate:
        rows.append(Row(f"+VSR[{name}] learned gate {refiner.gate_threshold:g}", learned=True))
    rows.append(Row(f"+VSR[{name}] keep copies", keep=True))
    if refiner.learned_gate:
        rows.append(Row(f"+VSR[{name}] keep copies, learned gate {refiner.gate_threshold:g}", learned=True, keep=True))
    for keep in (False, True):
        for score in score_gates:
            rows.append(Row(f"+VSR[{name}] {'keep copies, ' if keep else ''}score gate ({score})", keep=keep, score=score))
    for level in confident:
        rows.append(Row(f"+VSR[{name}] keep copies, keep confident {level:g}", keep=True, confident=level))
    if refiner.space == "codes":
        rows.append(Row(f"+VSR[{name}] continuous", continuous=True))
    return rows


@torch.no_grad()
def evaluate_variants(engine, variants: dict, tasks: list[str], n: int, pairs: int, seed: int, settings: dict,
                      gates: list[float], pool: str = "debian", split: str = "val", progress: bool = True,
                      score_gates=("cells", "answer"), confident=()) -> dict:
    """{task: {row: {psnr, token_acc, changed, vsr_share, curve}}} over `n` examples per task (see the module doc)."""
    from ..metrics import mean_psnr, pooled_psnr, psnr
    from ..drafts.scan_form import score_answer
    from ..refiners.self_refine import refine, score_gate
    from ..token_metrics import token_cosine_distances

    embeddings = engine.model.get_input_embeddings().weight
    table = {}
    bar = tqdm(total=len(tasks) * n, desc="eval-vsr", disable=not progress, dynamic_ncols=True)
    for task in tasks:
        sampler = example_sampler(task, split, engine.image_size, seed, pool)
        rows: dict[str, dict[str, list]] = {}

        def add(label, image, codes, truth, target, draft_codes, seconds=None, draft_seconds=None):
            row = rows.setdefault(label, {"psnr": [], "acc": [], "changed": [], "share": [], "curve": []})
            image = pil_to_float(image if isinstance(image, Image.Image) else float_to_pil(image))   # 8-bit, as `eval`'s
            row["psnr"].append(psnr(image, target))
            if codes is not None:
                codes = np.asarray(codes).reshape(-1)
                row["acc"].append(float((codes == truth).mean()))
                row["changed"].append(float((codes != draft_codes).mean()))
                row["curve"].append(token_cosine_distances(embeddings, codes, truth))
            if seconds is not None:
                row["share"].append(seconds / draft_seconds)

        for index in range(n):
            example = sampler.sample(task=task, k=pairs)
            pair_images = [(float_to_pil(x), float_to_pil(y)) for x, y in example.pairs]
            query = float_to_pil(example.query)
            target = pil_to_float(float_to_pil(example.answer))
            context, truth_codes = encode_example(engine, example)     # one VQ encode: the prompt and the right answer
            query_codes = context[-engine.grid ** 2:]
            truth = truth_codes.numpy()
            result = engine.run(pair_images, query, refine=("scan",), seed=seed + index, **settings)
            add("*identity*", query, None, truth, target, None)
            luminance = engine.luminance_for(pair_images, settings.get("luma_carry"))
            add("*ceiling*", pil_to_float(engine.render(truth_codes, query, query_codes, settings.get("paste_query"),
                                                        luminance=luminance)),
                truth_codes, truth, target, truth)
            draft_codes = np.asarray(result.codes["draft"]).reshape(-1)
            draft_seconds = result.timings["draft"]
            for base in ("draft", "scan"):
                codes = np.asarray(result.codes[base]).reshape(-1)
                prefix = "" if base == "draft" else "+SCAN"
                add("draft" if base == "draft" else "+SCAN", result.stages[base], codes, truth, target, draft_codes)
                codes_t = torch.as_tensor(codes).long()[None]
                # the draft's (or SCAN answer's) quality scores, as the engine holds them for keep-confident and the score gate
                base_quality = torch.as_tensor(np.asarray(result.quality[base], dtype=np.float32)).reshape(1, -1)
                for name, refiner in variants.items():
                    for label, gate, continuous, learned, keep, score, level in variant_rows(name, refiner, gates, score_gates,
                                                                                             confident):
                        start = time.perf_counter()
                        new, latents = refine(refiner, engine.model, engine.vocab, codes_t, query_codes=query_codes[None],
                                              codebook=engine.tokenizer.codebook, gate=gate, learned_gate=learned,
                                              keep_copies=keep, keep_confident=level, scores=base_quality)
                        if score != "off":    # the engine re-scores after VSR anyway; the gate adds that one forward
                            new_scores = score_answer(engine.model, engine.vocab, context, new)[1]
                            new = score_gate(codes_t, new, base_quality, new_scores, score)
                        seconds = time.perf_counter() - start
                        decoded = float_to_pil(engine.tokenizer.decode_latents(latents[:1])[0]) if continuous else None
                        image = engine.render(new[0], query, query_codes, settings.get("paste_query"), decoded, luminance)
                        add(prefix + label, image, new[0].cpu().numpy(), truth, target, draft_codes,
                            seconds if base == "draft" else None, draft_seconds)
            bar.update(1)
        table[task] = {label: {"psnr": mean_psnr(r["psnr"]), "pooled_psnr": pooled_psnr(r["psnr"]),
                               **versus(r["psnr"], rows[base_of(label)]["psnr"] if base_of(label) else None),
                               "token_acc": float(np.mean(r["acc"])) if r["acc"] else None,
                               "changed": float(np.mean(r["changed"])) if r["changed"] else None,
                               "vsr_share": float(np.median(r["share"])) if r["share"] else None,
                               "curve": np.mean(r["curve"], 0).tolist() if r["curve"] else None}
                       for label, r in rows.items()}
    bar.close()
    return table


def base_of(label: str) -> str | None:
    """The row a refined row is compared with: the SCAN answer for "+SCAN..." rows, else the draft; None for the
    references (identity, ceiling) and the two bases themselves."""
    if label.startswith("*") or label in ("draft", "+SCAN"):
        return None
    return "+SCAN" if label.startswith("+SCAN") else "draft"


def versus(psnrs: list, base: list | None) -> dict:
    """{better, worse}: the shares of examples whose PSNR is above / below the base row's (None without a base)."""
    if base is None:
        return {"better": None, "worse": None}
    return {"better": float(np.mean([a > b + 1e-9 for a, b in zip(psnrs, base)])),
            "worse": float(np.mean([a < b - 1e-9 for a, b in zip(psnrs, base)]))}


def markdown(report: dict) -> str:
    lines = [f"# VSR variants in pixels: {report['bundle']}", "",
             f"N = {report['n']} validation examples per task, K = {report['pairs']}, seed {report['seed']}, sampling "
             f"{report['settings']}; every row refines the same draft (or SCAN answer). Command: `{report['command']}`", "",
             "PSNR is the mean of per-example PSNRs (each capped at 100 dB); pooled is the PSNR of the examples' mean "
             "squared error, which one near-exact example (a blank edge map drafted exactly) cannot dominate; better / "
             "worse: the share of examples the row raises / lowers against its base.", "",
             "| task | row | PSNR ↑ | Δ vs draft (or +SCAN) | pooled PSNR (Δ) | better / worse | token acc | cells changed | g_φ time / draft |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, rows in report["table"].items():
        for label, row in rows.items():
            base_row = rows[base_of(label)] if base_of(label) else None
            delta = "" if base_row is None else f"{row['psnr'] - base_row['psnr']:+.2f}"
            pooled = row.get("pooled_psnr")
            pooled = "" if pooled is None else f"{pooled:.2f}" + ("" if base_row is None else f" ({pooled - base_row['pooled_psnr']:+.2f})")
            versus = "" if row.get("better") is None else f"{100 * row['better']:.0f}% / {100 * row['worse']:.0f}%"
            acc = "" if row["token_acc"] is None else f"{row['token_acc']:.3f}"
            pct = lambda v: "" if v is None else f"{100 * v:.1f}%"           # noqa: E731
            lines.append(f"| {task} | {label} | {row['psnr']:.2f} | {delta} | {pooled} | {versus} | {acc} | {pct(row['changed'])} | "
                         f"{pct(row['vsr_share'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_core eval-vsr", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, help="bundle folder (its backbone drafted the variants' training drafts)")
    parser.add_argument("--variant", action="append", default=[], help="name=folder of a trained g_phi (repeatable)")
    parser.add_argument("--gates", default="", help="confidence-gate margins to try for every variant, e.g. 0.05,0.1")
    parser.add_argument("--score-gates", default="cells,answer",
                        help="the backbone's score gates to try for every variant (cells, answer; '' for none: faster)")
    parser.add_argument("--confident", default="",
                        help="keep-confident levels to try for every variant with keep copies, e.g. 0.8,0.9 (the cells whose "
                             "draft quality score is at least the level keep their code)")
    parser.add_argument("--tasks", default=None, help=f"task specs (default for a family bundle: {','.join(FAMILY_CORE)})")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", choices=("builtin", "debian"), default="debian")
    parser.add_argument("--split", choices=("val", "heldout"), default="val")
    parser.add_argument("--out", type=Path, default=Path("runs/eval-vsr"))
    args = parser.parse_args(argv)
    from ..bundle import BundleError
    from ..engine import load_engine
    from ..photos import FetchError
    from ..refiners.self_refine import SCORE_GATES

    try:
        engine = load_engine(args.bundle)
        variants = load_variants(args.variant) if args.variant else ({"bundle": engine.vsr} if engine.vsr else {})
        if not variants:
            raise ValueError("no g_phi to compare: give --variant name=folder, or a bundle with refiner/")
        gates = [float(g) for g in args.gates.split(",") if g.strip()]
        score_gates = tuple(g.strip() for g in args.score_gates.split(",") if g.strip())
        confident = tuple(float(c) for c in args.confident.split(",") if c.strip())
        if any(g not in SCORE_GATES or g == "off" for g in score_gates):
            raise ValueError(f"--score-gates takes cells and/or answer, got {args.score_gates!r}")
        family = any(is_family(t) for t in engine.bundle.info.get("tasks", ()))
        tasks = [t.strip() for t in (args.tasks or ",".join(FAMILY_CORE if family else ("colorization", "inpainting", "edges"))).split(",")
                 if t.strip()]
        for task in tasks:
            validate_spec(task)
    except (ValueError, BundleError) as error:
        print(f"error: {error}")
        return 1
    sampling = engine.sampling_defaults
    settings = {"temperature": sampling["temperature"], "top_p": sampling["top_p"], "scan_iterations": 30, "scan_cells": 4,
                "paste_query": engine.bundle.paste_query, "luma_carry": engine.bundle.luma_carry}
    start = time.time()
    try:
        table = evaluate_variants(engine, variants, tasks, args.n, args.pairs, args.seed, settings, gates, args.pool, args.split,
                                   score_gates=score_gates, confident=confident)
    except FetchError as error:
        print(f"error: {error}")
        return 1
    report = {"bundle": args.bundle, "n": args.n, "pairs": args.pairs, "seed": args.seed, "settings": settings,
              "variants": {name: dict(r._hub_mixin_config) for name, r in variants.items()}, "gates": gates, "table": table,
              "seconds": round(time.time() - start, 1),
              "command": "python -m demo_core eval-vsr " + shlex.join(sys.argv[1:] if argv is None else list(argv))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0
