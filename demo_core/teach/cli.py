"""`python -m demo_core teach PAIRS... --out ADAPTER`: teach the backbone a task from pair files (printing only)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    from .trainer import DEFAULT_STEPS, TeachConfig

    parser = argparse.ArgumentParser(prog="python -m demo_core teach",
                                     description="Teach the backbone a new task from a few of your own pairs: trains a "
                                                 "small LoRA adapter (the backbone stays as it is).")
    parser.add_argument("pairs", nargs="+", help="image files named NAME_input.EXT and NAME_answer.EXT, or zips of them "
                                                 "(2 to 50 pairs)")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write (adapter.safetensors + config.json)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimiser steps (default {DEFAULT_STEPS}: about "
                                                                         f"two minutes for 20 pairs on two CPU cores)")
    parser.add_argument("--rank", type=int, default=TeachConfig.rank, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=TeachConfig.alpha, help="LoRA alpha")
    parser.add_argument("--lr", type=float, default=TeachConfig.learning_rate)
    parser.add_argument("--batch", type=int, default=TeachConfig.batch_size)
    parser.add_argument("--no-flips", action="store_true", help="do not also teach every example mirrored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", default=None, help="bundle folder or Hub id (default: the embedded retouch-tiny)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.rank < 1:
        return _fail("--steps, --batch and --rank must be at least 1")
    from ..bundle import BundleError
    from ..engine import EngineInputError, load_engine
    from .adapter import AdapterError
    from .pairs import PairFilesError, read_pair_files
    from .trainer import pairs_loss, teach

    try:
        pairs = read_pair_files(args.pairs)
        engine = load_engine(args.bundle, device=args.device)
        if engine.format.name != "scan":
            return _fail("teaching needs a SCAN-form backbone (the embedded default or a bundle like it), not an LVM one")
        config = TeachConfig(steps=args.steps, batch_size=args.batch, learning_rate=args.lr, rank=args.rank,
                             alpha=args.alpha, flips=not args.no_flips, seed=args.seed)
        print(f"{len(pairs)} pairs ({', '.join(p.name for p in pairs[:6])}{', ...' if len(pairs) > 6 else ''}); "
              f"{args.steps} steps, LoRA rank {args.rank}", flush=True)
        every = max(1, args.steps // 10)

        def progress(record):
            if record.step % every == 0 or record.step == record.steps:
                print(f"step {record.step}/{record.steps} loss {record.loss:.4f} (generation {record.generation_loss:.4f}, "
                      f"quality {record.quality_loss:.4f}) {record.seconds:.1f} s", flush=True)

        import os

        accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:        # under `accelerate launch`: one process per device
            from ..train.distributed import accelerator_for

            accelerator = accelerator_for(args.device)
        main_process = accelerator is None or accelerator.is_main_process
        if accelerator is not None and main_process:
            print(f"{accelerator.num_processes} processes: global batch {args.batch}, "
                  f"{args.batch // accelerator.num_processes} per process", flush=True)
        if not main_process:
            progress = None                                      # noqa: F811  one process prints
        loss_before = pairs_loss(engine, None, [(p.input, p.answer) for p in pairs])
        adapter = teach(engine, [(p.input, p.answer) for p in pairs], config, progress=progress if main_process else None,
                        accelerator=accelerator)
        loss_after = pairs_loss(engine, adapter, [(p.input, p.answer) for p in pairs])
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if not main_process:
            return 0
        adapter.save(args.out)
    except (PairFilesError, AdapterError, BundleError, EngineInputError) as error:
        return _fail(str(error))
    except OSError as error:
        return _fail(f"cannot write {args.out}: {error.strerror or error}")
    print(f"generation loss on the pairs {loss_before:.4f} -> {loss_after:.4f}; wrote {args.out} "
          f"({(args.out / 'adapter.safetensors').stat().st_size / 2**20:.2f} MB); use it with "
          f"`python -m demo_core generate ... --adapter {args.out}`")
    return 0
