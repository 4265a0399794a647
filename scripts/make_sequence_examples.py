"""Write the studio's one-click sequence examples: assets/examples/sequence-<kind>/{frame1,…,frameN,next}.png.

Each is one `demo_core.sequences.SequenceSampler` sequence from the held-out validation photos of the
builtin pool (no downloaded data needed), with a fixed seed per kind: N frames, oldest first, and the
true next frame the model should write (next.png, the studio's optional "true next frame").

    python -m scripts.make_sequence_examples [--frames 4] [--out assets/examples]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from demo_core.images import float_to_pil
from demo_core.sequences import SequenceSampler

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64                               # the embedded default model's image size; keeps every file a few KB
# kind -> sampler seed, chosen once so each sequence's motion (or brightness step) is easy to see
SEEDS = {"pan": 5, "cutout": 1, "brightness": 4}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4, help="context frames per example (the model writes one more)")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "examples")
    args = parser.parse_args(argv)
    total = 0
    for kind, seed in SEEDS.items():
        sequence = SequenceSampler("val", SIZE, seed=seed, pool="builtin").sample(kind, frames=args.frames)
        folder = args.out / f"sequence-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):
            stale.unlink()
        images = {f"frame{number}": frame for number, frame in enumerate(sequence.frames, 1)}
        images["next"] = sequence.next_frame
        for name, array in images.items():
            path = folder / f"{name}.png"
            float_to_pil(array).save(path, optimize=True)
            total += path.stat().st_size
        print(f"sequence-{kind:10s} {len(sequence.frames)} frames + next, {json.dumps(sequence.params, default=float)}, {folder}")
    print(f"{total / 1024:.0f} KB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
