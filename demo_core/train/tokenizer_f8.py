"""Train the first-generation VQ tokenizer (`diffusers.VQModel`, 64x64 -> 8x8 codes; today's default bundle).

Recipe (the usual VQ remedies, each for a measured failure of a naive run):
1. a short autoencoder warm-up without quantization, so the encoder's outputs mean something;
2. codebook initialised by k-means on those encoder outputs (every code starts in use);
3. EMA codebook updates (van den Oord et al. 2017, App. A.1) + commitment loss beta=0.25;
4. dead-code restarts: codes whose EMA usage falls below a threshold jump to random encoder outputs.
Loss: L1 + MSE on pixels. Data: photos, procedural images and every task's x and y, so edge maps,
flat colours and grey images are all represented.

    nohup nice -n 5 python -m demo_core.train tokenizer-f8 > runs/tokenizer.out 2>&1 &

Resumes from runs/tokenizer/checkpoint.pt; exports to <bundle>/tokenizer/ at the end (and on --export-only).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..tasks import TASKS
from ..data import ImageSampler
from ..metrics import psnr_batch
from ..tokenizer import TokenizerConfig, VQTokenizer, build_vqmodel, tokenizer_config_dict
from .distributed import (accelerator_for, any_process, gather_rows, mean_across, per_process_batch, process_logger,
                          refuse_fsdp, rows, share_ema)
from .vq import EMAQuantizer, VQForward, forward, kmeans, optimise, pixel_losses  # noqa: F401
from .common import DEFAULT_BUNDLE, RUNS, Timer, cosine_lr, load_checkpoint, save_checkpoint, set_lr, setup_logging, write_json  # noqa: F401

KINDS = ("photo",) + tuple(f"{name}:{side}" for name in TASKS for side in ("x", "y") if not (side == "x" and TASKS[name].photo_input))


def make_view(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A photo, or one side of a task pair made from it."""
    if kind == "photo":
        return image
    name, side = kind.split(":")
    x, y = TASKS[name].transform(image, rng)
    return x if side == "x" else y


class ViewSampler:
    """Training images for the tokenizer: half plain images, half a random task side."""

    def __init__(self, split: str, size: int, seed: int):
        self.images = ImageSampler(split, size, seed)
        self.rng = np.random.default_rng(seed + 11)

    def batch(self, count: int) -> np.ndarray:
        views = []
        for _ in range(count):
            kind = "photo" if self.rng.random() < 0.4 else KINDS[1 + int(self.rng.integers(0, len(KINDS) - 1))]
            views.append(make_view(self.images.sample(), kind, self.rng))
        return np.stack(views).astype(np.float32)


def to_pixels(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2) * 2.0 - 1.0


@torch.no_grad()
def validate(tokenizer: VQTokenizer, per_kind: int = 32, seed: int = 0) -> dict:
    """Reconstruction PSNR/SSIM per kind of image on the validation split, and codebook usage."""
    from skimage.metrics import structural_similarity

    results, used = {}, set()
    for kind in KINDS:
        sampler = ImageSampler("val", tokenizer.image_size, seed)
        rng = np.random.default_rng(seed + 5)
        images = np.stack([make_view(sampler.sample(), kind, rng) for _ in range(per_kind)]).astype(np.float32)
        codes = tokenizer.encode(images)
        used.update(codes.flatten().tolist())
        recon = tokenizer.decode(codes)
        ssim = [structural_similarity(a, b, channel_axis=-1, data_range=1.0) for a, b in zip(images, recon)]
        results[kind] = {"psnr": float(psnr_batch(images, recon).mean()), "ssim": float(np.mean(ssim))}
    results["overall"] = {key: float(np.mean([results[k][key] for k in KINDS])) for key in ("psnr", "ssim")}
    results["codes_used_val"] = len(used) / tokenizer.codebook_size
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo_core.train tokenizer-f8", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1600, help="total optimisation steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-ae", type=int, default=250, help="autoencoder steps before quantization")
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--channels", default="32,64,128,128")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=RUNS / "tokenizer")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle folder to export tokenizer/ into")
    parser.add_argument("--checkpoint-minutes", type=float, default=4.0)
    parser.add_argument("--export-only", action="store_true", help="export the latest checkpoint and validate, no training")
    args = parser.parse_args(argv)

    accelerator = accelerator_for("cpu")        # a CPU trainer (gloo between processes)
    refuse_fsdp(accelerator, "tokenizer-f8")
    processes, main_process = accelerator.num_processes, accelerator.is_main_process
    per_process_batch(accelerator, args.batch)
    torch.manual_seed(args.seed)
    logger = process_logger(accelerator, args.run_dir, "tokenizer")
    config = TokenizerConfig(block_out_channels=tuple(int(c) for c in args.channels.split(",")),
                             latent_channels=args.latent, num_vq_embeddings=args.codes)
    vq = build_vqmodel(config)
    vq.quantize.embedding.weight.requires_grad_(False)       # EMA-updated, not by gradient
    params = [p for p in vq.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    ema = None
    generator = torch.Generator().manual_seed(args.seed)
    sampler = ViewSampler("train", config.image_size, args.seed)
    step, timer_prev = 0, 0.0
    checkpoint_path = args.run_dir / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path)
    if state is not None:
        vq.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["ema"] is not None:
            ema = EMAQuantizer(vq.quantize.embedding)
            ema.load_state_dict(state["ema"])
        step, timer_prev = state["step"], state["elapsed"]
        sampler = ViewSampler("train", config.image_size, args.seed + step)  # fresh data stream after resume
        logger.info(f"resumed at step {step} ({timer_prev / 60:.1f} min trained)")
    ema = share_ema(accelerator, ema)
    model, optimizer = accelerator.prepare(VQForward(vq), optimizer)   # one process: as is; several: DDP
    timer = Timer(timer_prev)
    n_params = sum(p.numel() for p in vq.parameters())
    logger.info(f"tokenizer {n_params / 1e6:.2f}M params, config {tokenizer_config_dict(config)}, args {vars(args)}")

    def checkpoint():
        if main_process:
            save_checkpoint(checkpoint_path, {"model": vq.state_dict(), "optimizer": optimizer.state_dict(),
                                              "ema": ema.state_dict() if ema else None, "step": step,
                                              "elapsed": timer.elapsed, "config": tokenizer_config_dict(config)})
        accelerator.wait_for_everyone()

    last_save = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="tokenizer", dynamic_ncols=True, disable=args.export_only or not main_process)
    vq.train()
    while step < args.steps and not args.export_only:
        if ema is None and step >= args.warmup_ae:
            with torch.no_grad():  # k-means init on ~40k encoder outputs
                vq.eval()
                flats = [vq.encode(to_pixels(sampler.batch(64))).latents.permute(0, 2, 3, 1).reshape(-1, config.latent_channels)
                         for _ in range(10)]
                vq.train()
            centres = kmeans(torch.cat(flats), config.num_vq_embeddings, 20, generator)
            ema = share_ema(accelerator, EMAQuantizer(vq.quantize.embedding))
            ema.reset(centres)
            logger.info(f"step {step}: codebook initialised by k-means on {sum(len(f) for f in flats)} encoder outputs")
        set_lr(optimizer, cosine_lr(step, args.steps, args.lr, warmup=100))
        crops = sampler.batch(args.batch)                  # the global batch, on every process
        pixels = to_pixels(crops if processes == 1 else crops[rows(accelerator, args.batch)])
        reconstruction, commit, indices, flat = model(pixels, ema, True)
        l1, mse, psnr = pixel_losses(reconstruction, pixels)
        loss = l1 + mse + 0.25 * commit
        optimise(loss, params, optimizer, accelerator=accelerator)
        step += 1
        if processes > 1:   # restarts draw from every process's latents (the same picks everywhere); logs: global means
            if ema is not None and step % 50 == 0:
                flat = gather_rows(accelerator, flat.detach())
            loss, l1, commit, mse = (mean_across(accelerator, v) for v in (loss, l1, commit, mse))
            psnr = 10 * np.log10(4.0 / max(mse.item(), 1e-10))
        restarted = ema.restart_dead(flat, threshold=0.03, generator=generator) if ema is not None and step % 50 == 0 else 0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}")
        if step % 50 == 0:
            used = int((ema.cluster_size > 0.03).sum()) if ema is not None else 0
            logger.info(f"step {step} loss {loss.item():.4f} l1 {l1.item():.4f} psnr {psnr:.2f} commit {commit.item():.4f} "
                        f"codes_alive {used} restarted {restarted} lr {optimizer.param_groups[0]['lr']:.2e} "
                        f"elapsed {timer.elapsed / 60:.1f}m")
        if any_process(accelerator, time.time() - last_save > args.checkpoint_minutes * 60):
            checkpoint()
            last_save = time.time()
    bar.close()
    if not args.export_only:
        checkpoint()
    if main_process:
        export(vq, config, args, step, timer.elapsed, logger)
    accelerator.wait_for_everyone()


def export(vq, config: TokenizerConfig, args, step: int, elapsed: float, logger) -> None:
    vq.eval()
    out = args.bundle / "tokenizer"
    vq.save_pretrained(out, safe_serialization=True)
    report = validate(VQTokenizer(vq))
    summary = {"step": step, "elapsed_minutes": round(elapsed / 60, 1), "command": "python -m demo_core.train tokenizer-f8",
               "args": {k: str(v) for k, v in vars(args).items()}, "validation": report}
    write_json(out / "training.json", summary)
    logger.info(f"exported to {out}; validation {report}")


if __name__ == "__main__":
    main()
