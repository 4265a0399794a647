"""python -m demo_core.train {tokenizer,tokenizer-f8,backbone,refiner,tensor} [options]

tokenizer: the second-generation local f4 tokenizer (16x16 codes); tokenizer-f8: the first (8x8).
"""
import importlib
import sys

PARTS = {"tokenizer": "tokenizer", "tokenizer-f8": "tokenizer_f8", "backbone": "backbone", "refiner": "refiner", "tensor": "tensor"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in PARTS:
        print(__doc__.strip())
        print("parts: " + ", ".join(PARTS) + "   (each takes --help)")
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    module = importlib.import_module(f"demo_core.train.{PARTS[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main() or 0)
