"""Retouch command line.

    python -m demo_core reconstruct IMAGE --out OUT.png       (installed: retouch reconstruct ...)
    python -m demo_core generate --pair X Y [--pair X Y ...] --query Q --refine scan,vsr --seed 0 --out OUT.png
    python -m demo_core teach a_input.png a_answer.png b_input.png b_answer.png ... --out ADAPTER [--steps N]
    python -m demo_core train {tokenizer,backbone,refiner,tensor} [...]
    python -m demo_core eval [...]       python -m demo_core bench [...]
    python -m demo_core export --out DIR python -m demo_core space --out DIR
    python -m demo_core data fetch       # training photos from Debian packages, into ~/.cache/retouch/photos

Every user-facing failure is one `error:` line and exit code 1.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> module with main(argv); imported only when used, so --help is instant
SUBCOMMANDS = {
    "reconstruct": ("demo_core.cli", "reconstruct_main", "encode and decode an image through the tokenizer; prints PSNR/SSIM"),
    "generate": ("demo_core.cli", "generate_main", "answer a query from demonstration pairs, then refine"),
    "teach": ("demo_core.teach.cli", "main", "teach the backbone a new task from your pair files (a small LoRA adapter)"),
    "train": ("demo_core.train.__main__", "main", "train a part: tokenizer, backbone, refiner, tensor"),
    "eval": ("demo_core.eval", "main", "quality table per task and stage on the validation split"),
    "eval-vsr": ("demo_core.eval.vsr", "main", "VSR's g_phi variants side by side in pixels, on the same drafts"),
    "eval-tokenizer": ("demo_core.eval_tokenizer", "main", "tokenizer round trips, code stability, identity and ceiling"),
    "tune-sampling": ("demo_core.eval.sampling", "main", "choose a bundle's default sampling by measurement on validation"),
    "bench": ("demo_core.bench", "main", "speed breakdown per stage on this machine"),
    "data": ("demo_core.photos", "main", "fetch the training photos from Debian packages into a cache (idempotent)"),
    "export": ("demo_core.export", "main", "write a push_to_hub-ready copy of a bundle with a model card"),
    "space": ("demo_core.space", "main", "assemble a deployable Hugging Face Space folder"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, (_, _, help_text) in SUBCOMMANDS.items():
            print(f"  {name:12s} {help_text}")
        return 0
    command = argv[0]
    if command not in SUBCOMMANDS:
        print(f"error: unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name, function, _ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        print(f"error: the {command} command is not available in this checkout ({error})", file=sys.stderr)
        return 1
    return int(getattr(module, function)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
