"""Eval of sequential prompts: the predicted next frame against repeating the last frame (a sequence's identity)
and the true next frame through the tokenizer (its ceiling), per sequence kind, draft and +SCAN."""
from __future__ import annotations


def evaluate_sequences(engine, n: int, frames: int, seed: int, settings: dict, pool: str, progress: bool = True) -> dict:
    """{kind: {"identity": psnr, "ceiling": psnr, "draft": psnr, "+SCAN": psnr, "n": n}} on validation photos."""
    from tqdm import tqdm

    from ..images import float_to_pil, pil_to_float
    from ..metrics import mean_psnr, psnr
    from ..sequences import SEQUENCE_KINDS, SequenceSampler

    frames = max(2, min(frames, engine.max_frames))
    sampler = SequenceSampler("val", engine.image_size, seed + 5, frames_range=(frames, frames), pool=pool)
    scan = "scan" in engine.available_refiners
    table = {}
    bar = tqdm(total=n * len(SEQUENCE_KINDS), desc="eval sequences", disable=not progress, dynamic_ncols=True)
    for kind in SEQUENCE_KINDS:
        rows = {"identity": [], "ceiling": [], "draft": [], "+SCAN": []}
        for index in range(n):
            sequence = sampler.sample(kind=kind)
            truth = pil_to_float(float_to_pil(sequence.next_frame))
            result = engine.run(frames=[float_to_pil(f) for f in sequence.frames], refine=("scan",) if scan else (),
                                seed=seed + index, **settings)
            last = float_to_pil(sequence.frames[-1])
            rows["identity"].append(psnr(pil_to_float(last), truth))
            codes, last_codes = engine.encode([float_to_pil(sequence.next_frame), last])
            rows["ceiling"].append(psnr(pil_to_float(engine.render(codes, last, last_codes, settings.get("paste_query"))), truth))
            rows["draft"].append(psnr(pil_to_float(result.stages["draft"]), truth))
            if scan:
                rows["+SCAN"].append(psnr(pil_to_float(result.stages["scan"]), truth))
            bar.update(1)
        table[kind] = {name: mean_psnr(values) for name, values in rows.items() if values}
        table[kind]["n"] = n
    bar.close()
    return {"frames": frames, "table": table}


def markdown(report: dict) -> list[str]:
    lines = ["", f"Sequences ({report['frames']} context frames, validation photos): PSNR of the next frame",
             "", "| kind | *identity* (last frame repeated) | *ceiling* | draft | +SCAN | draft vs identity |",
             "|---|---|---|---|---|---|"]
    for kind, row in report["table"].items():
        scan = f"{row['+SCAN']:.2f}" if "+SCAN" in row else ""
        lines.append(f"| {kind} | {row['identity']:.2f} | {row['ceiling']:.2f} | {row['draft']:.2f} | {scan} | "
                     f"{row['draft'] - row['identity']:+.2f} |")
    return lines
