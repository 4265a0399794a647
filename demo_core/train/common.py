"""What every trainer shares: run folders, logging, atomic resumable checkpoints, lr schedule."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..bundle import DEFAULT_BUNDLE  # noqa: F401  (the trainers' default bundle is the engine's)

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = REPO_ROOT / "runs"


def setup_logging(run_dir: Path, name: str) -> logging.Logger:
    """Log to run_dir/train.log (appending across resumes) and to stderr."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"retouch.train.{name}")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (a killed run never leaves a half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save_checkpoint


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine down to floor*peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


AUTOCAST_CHOICES = ("auto", "bf16", "off")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or
    AMX (where oneDNN's bf16 matmuls beat float32; on other CPUs bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):     # torch's own CPU feature checks
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """--autocast: 'bf16' always, 'off' never, 'auto' where the device has native bf16. None: float32 throughout."""
    if choice not in AUTOCAST_CHOICES:
        raise ValueError(f"--autocast {choice!r}: choose from {', '.join(AUTOCAST_CHOICES)}")
    if choice == "bf16" or (choice == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The training forward's mixed precision: bf16 matmuls with float32 weights, gradients and optimizer state
    (torch.autocast); a no-op context when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Timer:
    """Wall time that survives resumes: `elapsed` adds the previous runs' time."""

    def __init__(self, previous: float = 0.0):
        self.previous = previous
        self.start = time.time()

    @property
    def elapsed(self) -> float:
        return self.previous + time.time() - self.start


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
