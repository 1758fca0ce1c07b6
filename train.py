"""Train VoP (or one of the paper's baselines) for text-video retrieval, evaluate it, save it.

    python train.py --clip ViT-B/32 --data msrvtt-9k --data-root data/msrvtt --prompts fn,ctx
    torchrun --nproc_per_node 4 train.py --clip ViT-B/32 --data msrvtt-9k --data-root data/msrvtt
    python train.py --prompts pos,ctx          # no --clip, no --data: the synthetic demo (see demo.py)

A flat loop: symmetric InfoNCE over the global batch, AdamW on the trainable tensors only, cosine decay
after a linear warm-up, gradient clipping, fp16 autocast + GradScaler on CUDA (bf16 autocast on request).
The checkpoint (out_dir/last.pt) holds the trainable tensors, the config, the optimizer and scaler state and
the step; it is written atomically, so a crash never leaves half a file, and `--resume` continues from it.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import clip_model
import data
from evaluate import build_parser, evaluate, format_results, option, resolve_precision
from vop import TUNE_MODES, VoP, describe_parameters

# The paper searched the learning rate per method in [1e-6, 1e-2] without giving the values; these are ours.
DEFAULT_LR = {"prompts": 1e-3, "full": 1e-6, "partial": 1e-5, "bias": 1e-4, "proj": 1e-4, "zero-shot": 0.0}


@dataclass
class TrainConfig:
    """Everything train.py's command line can set; each field is the flag --field-name."""
    clip: str | None = option(None, "OpenAI CLIP name (ViT-B/32, ...) or checkpoint file; with no --data: the demo")
    data: str | None = option(None, "msrvtt-9k, msrvtt-7k, didemo, activitynet, lsmdc, msvd, csv or synthetic")
    data_root: str | None = option(None, "the dataset's folder (the CSV file for --data csv)")
    train_split: str = option("train", "split to train on")
    test_split: str = option("test", "split evaluated after each epoch")
    prompts: str = option("", "video prompts: a comma list of pos, ctx, fn; empty = plain VoP")
    tune: str = option("prompts", "what learns: prompts, full, partial, bias, proj, or zero-shot (nothing)")
    num_frames: int = option(12, "frames sampled per video")
    batch_size: int = option(32, "global batch (split over the processes under torchrun)")
    epochs: int = option(5, "passes over every (video, caption) pair")
    lr: float | None = option(None, "peak learning rate; default: DEFAULT_LR for the --tune mode")
    weight_decay: float = option(0.2, "AdamW weight decay (matrices only)")
    warmup: float = option(0.1, "fraction of the steps spent warming up linearly")
    grad_clip: float = option(1.0, "clip the gradient norm to this")
    fn_layers: int = option(8, "K of VoP^F: layers run per frame before the video-wide ones")
    num_text_prompts: int = option(8, "text prompt tokens per layer")
    num_visual_prompts: int = option(8, "visual prompt tokens per layer")
    video_prompt_length: int = option(4, "of the visual tokens, how many the video prompts make")
    precision: str = option("auto", "autocast: auto (fp16 + GradScaler on CUDA, fp32 on CPU), fp32, fp16, bf16")
    grad_checkpointing: bool = option(False, "recompute the frozen blocks' activations in backward")
    one_caption_per_video: bool = option(False, "an epoch visits every video once, with a random caption")
    num_workers: int = option(4, "DataLoader workers decoding videos")
    device: str = option("auto", "cuda, cpu, ...; auto picks cuda when available")
    out_dir: str = option("runs/vop", "where last.pt and log.jsonl go")
    resume: str | None = option(None, "a checkpoint to continue from, or auto for out_dir/last.pt if present")
    log_every: int = option(20, "steps between progress lines")
    save_every: int = option(0, "also save every N steps (0: at the end of each epoch only)")
    eval_each_epoch: bool = option(True, "evaluate after every epoch (always after the last)")
    eval_batch_size: int = option(32, "batch size of evaluation")
    eval_cache_dir: str | None = option(None, "cache the decoded evaluation frames here")
    skip_missing: bool = option(False, "skip listed videos that are missing (with one warning)")
    seed: int = option(0, "seed of the prompts' initialisation and of every data draw")


def parse_config(argv=None) -> "TrainConfig":
    return TrainConfig(**vars(build_parser(TrainConfig, __doc__.split("\n\n")[0]).parse_args(argv)))


def given_options(argv=None) -> dict:
    """Only the TrainConfig fields set on the command line (the demo keeps its own settings for the rest)."""
    return vars(build_parser(TrainConfig, only_given=True).parse_args(argv))


# -- distributed helpers (active only under torchrun, when RANK is set) -------------------------------------

def setup_distributed(device: str) -> tuple[int, int]:
    if "RANK" not in os.environ:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows (W*B, E); gradients flow back through this process's own rows only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def sum_gradients_across_processes(parameters):
    """Each process has the gradient of the global loss through its own rows; their sum is the full one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)


# -- the pieces of the loop -----------------------------------------------------------------------------

def contrastive_loss(video_embeddings, text_embeddings, logit_scale):
    """Symmetric InfoNCE: text i belongs to video i. Embeddings (B, E), L2-normalised."""
    logits = logit_scale.exp() * text_embeddings @ video_embeddings.t()  # (B texts, B videos)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def get_lr(step: int, total_steps: int, base_lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to zero."""
    warmup_steps = int(warmup * total_steps)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def save_atomically(obj, path: Path):
    """Write to a temporary file, then rename: the old checkpoint stays whole until the new one is."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def build_vop(config: TrainConfig, device) -> VoP:
    clip = clip_model.load(config.clip or "ViT-B/32", device)
    model = VoP(clip, config.prompts, num_frames=config.num_frames, tune=config.tune,
                num_text_prompts=config.num_text_prompts, num_visual_prompts=config.num_visual_prompts,
                video_prompt_length=config.video_prompt_length, fn_layers=config.fn_layers,
                grad_checkpointing=config.grad_checkpointing)
    return model.to(device)


def build_split(config: TrainConfig, split: str, train: bool, image_size: int):
    if config.data_root is None:
        raise SystemExit(f"--data {config.data} needs --data-root (the dataset's folder; see README)")
    return data.build_dataset(config.data, config.data_root, split, num_frames=config.num_frames,
                              image_size=image_size, train=train, skip_missing=config.skip_missing,
                              cache_dir=None if train else config.eval_cache_dir,
                              one_caption_per_video=config.one_caption_per_video and train, seed=config.seed)


def log(message: str, rank: int = 0):
    if rank == 0:
        print(message, flush=True)


# -- the loop -------------------------------------------------------------------------------------------

def train(config: TrainConfig) -> dict:
    """Train, evaluating after each epoch; return the last evaluation (and write out_dir/last.pt)."""
    if config.tune not in TUNE_MODES:
        raise SystemExit(f"--tune must be one of {', '.join(TUNE_MODES)}, got {config.tune!r}")
    device_name = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = setup_distributed(device_name)
    if device_name == "cuda" and world_size > 1:
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device_name)
    device = torch.device(device_name)
    if config.batch_size % world_size:
        raise SystemExit(f"--batch-size {config.batch_size} must divide evenly over {world_size} processes")
    torch.manual_seed(config.seed)

    model = build_vop(config, device)
    image_size = model.clip.visual.input_resolution
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"model: VoP prompts={list(model.video_prompts) or 'none'} tune={config.tune} on {config.clip}; "
        f"{describe_parameters(model)}", rank)

    test_set = build_split(config, config.test_split, train=False, image_size=image_size)
    amp_dtype = resolve_precision(config.precision, device)

    def run_evaluation(tag: str) -> dict:
        results = evaluate(model, test_set, batch_size=config.eval_batch_size, num_workers=config.num_workers,
                           device=device, autocast_dtype=amp_dtype)
        log(format_results(results, f"{tag} ({config.data} {config.test_split}, {len(test_set)} captions)"), rank)
        return results

    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if config.tune == "zero-shot" or config.epochs == 0:
        if rank != 0:
            return {}
        return {**run_evaluation("zero-shot" if config.tune == "zero-shot" else "untrained"), "trainable": 0}

    train_set = build_split(config, config.train_split, train=True, image_size=image_size)
    local_batch = config.batch_size // world_size
    if len(train_set) < config.batch_size:
        raise SystemExit(f"{config.data} {config.train_split} has {len(train_set)} items, fewer than one batch "
                         f"of {config.batch_size}")
    steps_per_epoch = len(train_set) // config.batch_size  # the last incomplete batch is dropped
    total_steps = steps_per_epoch * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    base_lr = config.lr if config.lr is not None else DEFAULT_LR[config.tune]
    # Weight decay on matrices only; norms, biases and nothing else of the kind (as in CLIP / open_clip).
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=base_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, history = 0, []
    checkpoint_path = out_dir / "last.pt"
    resume = config.resume
    if resume == "auto":
        resume = str(checkpoint_path) if checkpoint_path.is_file() else None
    if resume:
        checkpoint = torch.load(resume, map_location=device, weights_only=True)
        model.load_trainable_state_dict(checkpoint["trainable"], checkpoint["vop_settings"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, history = checkpoint["step"], checkpoint.get("history", [])
        log(f"resumed from {resume} at step {step}/{total_steps}", rank)

    def save(epoch: int):
        if rank == 0:
            save_atomically({"config": dataclasses.asdict(config), "vop_settings": model.settings,
                             "trainable": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "history": history},
                            checkpoint_path)

    log_file = open(out_dir / "log.jsonl", "a", encoding="utf-8") if rank == 0 else None
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    results = {}
    start_time, start_step = time.time(), step
    for epoch in range(step // steps_per_epoch, config.epochs):
        # Data order and every random draw depend only on (seed, epoch, item): a resumed run, which skips the
        # batches it has already seen, continues with exactly the batches the uninterrupted run would see.
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        skip = (step - epoch * steps_per_epoch) * local_batch
        indices = list(sampler)[skip: steps_per_epoch * local_batch]
        loader = data.make_loader(train_set, local_batch, config.num_workers, sampler=indices,
                                  pin_memory=device.type == "cuda", drop_last=True)
        model.train()
        for batch in loader:
            lr = get_lr(step, total_steps, base_lr, config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            frames = batch["video"].to(device, non_blocking=True)  # (B, F, 3, H, W)
            tokens = model.tokenize(batch["caption"]).to(device)  # (B, 77 - P)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                video_embeddings, text_embeddings = model(frames, tokens)
            loss = contrastive_loss(gather_with_grad(video_embeddings.float()),
                                    gather_with_grad(text_embeddings.float()), model.logit_scale)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step} (epoch {epoch + 1}): stopping. The last good checkpoint "
                    f"{checkpoint_path} is intact. Try a lower --lr, or --precision bf16 / fp32.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            sum_gradients_across_processes(trainable)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1

            if step % config.log_every == 0 or step == total_steps:
                elapsed = time.time() - start_time
                samples_per_second = (step - start_step) * config.batch_size / max(elapsed, 1e-9)
                eta = (total_steps - step) * config.batch_size / max(samples_per_second, 1e-9)
                record = {"epoch": epoch + 1, "step": step, "total_steps": total_steps, "loss": loss.item(),
                          "lr": lr, "grad_norm": grad_norm.item(), "samples_per_second": samples_per_second}
                log(f"epoch {epoch + 1}/{config.epochs}  step {step}/{total_steps}  loss {loss.item():.4f}  "
                    f"lr {lr:.2e}  {samples_per_second:.1f} samples/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                    rank)
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            if config.save_every and step % config.save_every == 0:
                save(epoch)

        if config.eval_each_epoch or epoch == config.epochs - 1:
            if rank == 0:
                results = run_evaluation(f"epoch {epoch + 1}")
                history.append({"epoch": epoch + 1, "step": step, **results})
                if log_file:
                    log_file.write(json.dumps({"epoch": epoch + 1, "step": step, "eval": results}) + "\n")
            if world_size > 1:
                dist.barrier()
        save(epoch + 1)
    if log_file:
        log_file.close()
    if rank == 0:
        log(f"saved {checkpoint_path} ({checkpoint_path.stat().st_size / 1e6:.1f} MB)")
    return {**results, "trainable": trainable_count}


def main(argv=None):
    config = parse_config(argv)
    if config.data is None:
        raise SystemExit("train.py: --data is required (see the README for the datasets); to try VoP with no "
                         "weights and no data, run the demo: python demo.py --prompts pos,ctx")
    return train(config)


if __name__ == "__main__":
    main(sys.argv[1:])
