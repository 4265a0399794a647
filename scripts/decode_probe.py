"""Is a draft's colour wrong because of sampling, or because of what the backbone believes? A probe.

    python -m scripts.decode_probe --bundle checkpoints/retouch16 --n 8 --seed 0 --candidates 4 \
        --out docs/results/decode_probe16.json

Per validation example (eval's examples, K = 2, the bundle's sampling and paste), beside identity and ceiling:
- draft: the engine's draft (the best-scored of `--candidates` drafts, as the engine picks);
- mean of the candidates: the pixel mean of the candidates' renders, a Monte-Carlo stand-in for the answer with the
  least squared error under the backbone's own distribution (what PSNR rewards);
- soft decode at temperature t: every cell's expected code vector under the backbone's teacher-forced distribution
  given the draft's prefix (sum_k p_k^(1/t) e_k, normalised), decoded by the VQ decoder unsnapped; cells the draft
  copied from the query keep their code.
If even the mean of several draws does not beat identity, no decode rule will: the backbone's belief is the limit.
Every row is rendered as the engine renders answers (paste, and luminance carry where the bundle turns it on).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TASKS = ("colorize", "inpaint:fill=grey", "inpaint:fill=black", "edges_canny", "edges_sobel")


def main(argv=None) -> int:
    from demo_core.drafts.scan_form import score_answer
    from demo_core.engine import load_engine
    from demo_core.eval.family import example_sampler
    from demo_core.eval.quality import encode_example
    from demo_core.images import float_to_pil, pil_to_float
    from demo_core.metrics import mean_psnr, psnr
    from demo_core.train.common import write_json

    parser = argparse.ArgumentParser(prog="python -m scripts.decode_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="checkpoints/retouch16")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--temperatures", default="1.0,0.8,0.6,0.4", help="soft-decode temperatures")
    parser.add_argument("--pool", default="debian")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    engine = load_engine(args.bundle)
    codebook = engine.tokenizer.codebook.float()
    temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    cells = engine.vocab.cells
    report = {"command": "python -m scripts.decode_probe " + " ".join(argv or sys.argv[1:]), "tasks": {}}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        sampler = example_sampler(task, "val", engine.image_size, args.seed, args.pool)
        rows: dict[str, list] = {}
        start = time.time()

        def add(name, image, target):
            image = pil_to_float(image if isinstance(image, Image.Image) else float_to_pil(image))
            rows.setdefault(name, []).append(psnr(image, target))

        for index in range(args.n):
            example = sampler.sample(task=task, k=2)
            pairs = [(float_to_pil(x), float_to_pil(y)) for x, y in example.pairs]
            query, target = float_to_pil(example.query), pil_to_float(float_to_pil(example.answer))
            context, truth = encode_example(engine, example)
            query_codes = context[-cells:]
            add("*identity*", query, target)
            add("*ceiling*", engine.render(truth, query, query_codes, None, None, engine.luminance_for(pairs)), target)
            result = engine.run(pairs, query, refine=(), seed=args.seed + index, candidates=args.candidates)
            add("draft", result.final, target)
            if args.candidates > 1:
                add(f"mean of {args.candidates} drafts", np.stack([pil_to_float(c) for c in result.candidates]).mean(0), target)
            codes = torch.as_tensor(np.asarray(result.codes["draft"])).reshape(1, -1).long()
            logits = score_answer(engine.model, engine.vocab, context, codes)[0][0].float()
            kept = codes[0] == query_codes
            for temperature in temperatures:
                latents = torch.softmax(logits / temperature, -1) @ codebook
                latents[kept] = codebook[query_codes[kept]]
                decoded = float_to_pil(engine.tokenizer.decode_latents(latents[None])[0])
                add(f"soft decode t={temperature:g}", engine.render(codes[0], query, query_codes, None, decoded,
                                                                    engine.luminance_for(pairs)), target)
        report["tasks"][task] = {name: mean_psnr(values) for name, values in rows.items()}
        print(task, {name: round(value, 2) for name, value in report["tasks"][task].items()}, f"{time.time() - start:.0f} s",
              flush=True)
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
