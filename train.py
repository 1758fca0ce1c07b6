"""Train VoP (or one of the paper's baselines) for text-video retrieval, evaluate it, save it.

    python train.py --prompts pos,ctx      # the paper's setting: CLIP ViT-B/32 on MSR-VTT-9k in data/msrvtt
    torchrun --nproc_per_node 4 train.py --data msrvtt-7k --data-root /data/msrvtt --prompts fn,ctx
    python demo.py --prompts pos,ctx       # no weights, no data: the synthetic demo (demo.py)

Read first: `contrastive_loss`, `get_lr` and the loop in `train`. A flat loop: symmetric InfoNCE over the
global batch, AdamW on the trainable tensors only, cosine decay after a linear warm-up, gradient clipping, fp16
autocast + GradScaler on CUDA (bf16 autocast on request). After each epoch the checkpoint (out_dir/last.pt:
the trainable tensors, config, optimizer and scaler state, step, results) is written, atomically, *before*
evaluating, so a failed evaluation never costs the epoch; `--resume auto` continues exactly where it stopped.

What runs around the loop (checks, the output folder, data and video probes, checkpoints, logs, resuming)
is runs.py's `Run`: skip it on a first reading.
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from annotations import DATASET_NAMES
from cli import PRECISIONS, at_least, between, build_parser, greater_than, option, parse_config, run_command
from evaluate import is_distributed
from runs import Run
from vop import TUNE_MODES, VoP

# The paper searched the learning rate per method in [1e-6, 1e-2] without giving the values; these are ours.
DEFAULT_LR = {"prompts": 1e-3, "full": 1e-6, "partial": 1e-5, "bias": 1e-4, "proj": 1e-4, "zero-shot": 0.0}


@dataclass
class TrainConfig:
    """Everything train.py's command line can set; each field is the flag --field-name. Defaults: the paper's."""
    clip: str = option("ViT-B/32", "CLIP: an OpenAI name (ViT-B/32, ViT-B/16, ViT-L/14, ...) or a weights file/folder "
                       "(OpenAI release, state dict, Hugging Face transformers folder, open_clip checkpoint)")
    clip_activation: str | None = option(None, "the backbone's MLP activation when its files do not say "
                                         "(state dicts without a config): quick_gelu (OpenAI) or gelu (open_clip's "
                                         "LAION/DataComp weights)", choices=("quick_gelu", "gelu"))
    data: str = option("msrvtt-9k", "dataset", choices=DATASET_NAMES)
    data_root: str = option("data/msrvtt", "the dataset's folder (the CSV file for --data csv)")
    train_split: str = option("train", "split to train on")
    test_split: str = option("test", "split evaluated after each epoch")
    prompts: str = option("", "video prompts: a comma list of pos, ctx, fn; empty = plain VoP")
    tune: str = option("prompts", "what learns: prompts, or a baseline", choices=TUNE_MODES)
    num_frames: int = option(12, "frames sampled per video", at_least(1))
    batch_size: int = option(32, "global batch (split over the processes under torchrun)", at_least(1))
    epochs: int = option(5, "passes over every (video, caption) pair; 0 evaluates only", at_least(0))
    lr: float | None = option(None, "peak learning rate; default: DEFAULT_LR for the --tune mode", greater_than(0))
    weight_decay: float = option(0.2, "AdamW weight decay (matrices only)", at_least(0))
    warmup: float = option(0.1, "fraction of the steps spent warming up linearly", between(0, 1))
    grad_clip: float = option(1.0, "clip the gradient norm to this (inf: no clipping)", greater_than(0))
    fn_layers: int = option(8, "K of VoP^F: layers run per frame before the video-wide ones", at_least(1))
    num_text_prompts: int = option(8, "text prompt tokens per layer", at_least(0))
    num_visual_prompts: int = option(8, "visual prompt tokens per layer", at_least(0))
    video_prompt_length: int = option(4, "of the visual tokens, how many the video prompts make", at_least(0))
    precision: str = option("auto", "autocast: auto (fp16 + GradScaler on CUDA, fp32 on CPU), fp32, fp16, bf16",
                            choices=("auto", *PRECISIONS))
    grad_checkpointing: bool = option(False, "recompute the frozen blocks' activations in backward")
    one_caption_per_video: bool = option(False, "an epoch visits every video once, with a random caption")
    num_workers: int | None = option(None, "DataLoader workers decoding videos; default: this machine's cores",
                                     at_least(0))
    frame_store: str | None = option(None, "decode each video once into this folder and train/evaluate from it")
    device: str = option("auto", "cuda, cpu, ...; auto picks cuda when available")
    out_dir: str | None = option(None, "where last.pt and log.jsonl go; default runs/<data>/<method>")
    resume: str | None = option(None, "a checkpoint to continue from, or auto for out_dir/last.pt if present")
    overwrite: bool = option(False, "start afresh in an out_dir that holds an earlier run (deletes its files)")
    log_every: int = option(20, "steps between progress lines", at_least(1))
    save_every: int = option(0, "also save every N steps (0: at the end of each epoch only)", at_least(0))
    eval_each_epoch: bool = option(True, "evaluate after every epoch (always after the last)")
    eval_batch_size: int = option(32, "batch size of evaluation", at_least(1))
    skip_missing: bool = option(False, "leave out listed videos whose files are missing (with one warning)")
    seed: int = option(0, "seed of the prompts' initialisation and of every data draw")


# ----------------------------------------------------------------------------------------------------------
# The paper's path: the loss, the schedule, one step, the loop


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


def make_optimizer(model: VoP, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on the trainable tensors only; weight decay on matrices, not on norms and biases (CLIP, open_clip)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def training_step(run: Run, batch: dict, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on one batch: (loss, gradient norm before clipping)."""
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    frames = batch["video"].to(run.device, non_blocking=True)  # (B, F, 3, R, R)
    tokens = model.tokenize(batch["caption"]).to(run.device)  # (B, 77 - P)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        video_embeddings, text_embeddings = model(frames, tokens)  # (B, E) each
    # Every process scores its own rows against the whole global batch (see gather_with_grad).
    loss = contrastive_loss(gather_with_grad(video_embeddings.float()), gather_with_grad(text_embeddings.float()),
                            model.logit_scale)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {run.step}: stopping. The last good checkpoint {run.checkpoint_path} is "
            f"intact. Try a lower --lr, or --precision bf16 / fp32.")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    sum_gradients_across_processes(run.trainable)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), grad_norm


def train(config: TrainConfig) -> dict:
    """Train, saving and then evaluating after each epoch; return the last evaluation."""
    base_lr = config.lr if config.lr is not None else DEFAULT_LR[config.tune]
    run = Run.prepare(config, base_lr)  # flags, output folder, data and video checks, CLIP, VoP (runs.py)
    with run:  # holds the output folder until the run ends, however it ends
        optimizer = make_optimizer(run.model, base_lr, config.weight_decay)
        scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)  # fp16 only
        run.resume(optimizer, scaler)  # with --resume: the checkpoint's state, if it belongs to this run
        run.fill_frame_store()  # with --frame-store: decode each video once, now
        for epoch in run.remaining_epochs():
            run.model.train()
            replaced = []  # training videos that failed to decode this epoch (each replaced by another item)
            for batch in run.batches(epoch):
                lr = get_lr(run.step, run.total_steps, base_lr, config.warmup)
                loss, grad_norm = training_step(run, batch, lr)
                run.step += 1
                replaced += [path for path in batch.get("replaced_video", []) if path]
                if run.step % config.log_every == 0 or run.step == run.total_steps:
                    run.log_progress(epoch, loss, lr, grad_norm)
                if config.save_every and run.step % config.save_every == 0:
                    run.save()
            run.count_replaced(epoch, replaced)
            run.save()  # before evaluating: a failed evaluation must not cost the epoch
            if config.eval_each_epoch or epoch == config.epochs - 1:
                run.evaluate_epoch(epoch)
                run.save()  # now with the epoch's results
        return run.finish()


# ----------------------------------------------------------------------------------------------------------
# Distributed training (active only under torchrun, when RANK is set)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows (W*B, E), so the loss contrasts every pair of the global batch. Gradients flow back
    through this process's own rows only; the other rows are constants here."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def sum_gradients_across_processes(parameters):
    """Why a sum: each process computes the same global loss, but its backward pass only reaches the
    embeddings of its own rows, so it holds only their share of the gradient. The shares add up to the full
    gradient; DDP's averaging would give 1/W of it."""
    if is_distributed():
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)


# ----------------------------------------------------------------------------------------------------------
# The command line


def parse_train_config(argv=None) -> TrainConfig:
    return parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])


def given_options(argv=None) -> dict:
    """Only the TrainConfig fields set on the command line (the demo keeps its own settings for the rest)."""
    return vars(build_parser(TrainConfig, __doc__.split("\n\n")[0], only_given=True).parse_args(argv))


def main(argv=None):
    return train(parse_train_config(argv))


if __name__ == "__main__":
    run_command(main, sys.argv[1:], "train.py")
