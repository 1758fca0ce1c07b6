"""Train VoP (or one of the paper's baselines) for text-video retrieval, evaluate it, save it.

    python train.py --prompts pos,ctx      # the paper's setting: CLIP ViT-B/32 on MSR-VTT-9k in data/msrvtt
    torchrun --nproc_per_node 4 train.py --data msrvtt-7k --data-root /data/msrvtt --prompts fn,ctx
    python demo.py --prompts pos,ctx       # no weights, no data: the synthetic demo (demo.py)

Read `train` top to bottom: it builds the data, the model (CLIP with VoP's prompts), the optimizer and the
loader, then loops over `training_step`: symmetric InfoNCE over the global batch (`contrastive_loss`), AdamW
on the trainable tensors only (`make_optimizer`), cosine decay after a linear warm-up (`get_lr`), gradient
clipping, fp16 autocast + GradScaler on CUDA (bf16 on request). After each epoch the checkpoint
(out_dir/last.pt: the trainable tensors, optimizer and scaler state, step, results) is written, atomically,
*before* evaluating, so a failed evaluation never costs the epoch; `--resume auto` continues from the last
checkpoint, to the numbers of a run that never stopped. What `train` calls on `run` (machinery/runs.py: the
output folder and its lock, the video checks, checkpoints and the resume checks, logs) is machinery: skip it on
a first reading.
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from utils import distributed
from formats.annotations import DATASET_NAMES
from utils.cli import (PRECISIONS, Options, at_least, between, flag_errors, greater_than, option, parse_config,
                       resolve_device, resolve_precision, run_command)
from clip_model import load as load_clip
from evaluate import evaluate, format_results
from utils.errors import TrainingDiverged
from utils.files import WriteError
from machinery.frame_store import FrameStore
from machinery.runs import Run, results_title, run_identity
from vop import TUNE_MODES, VoP, VoPConfig, describe_parameters

# The paper searched the learning rate per method in [1e-6, 1e-2] without giving the values; these are ours.
DEFAULT_LR = {"prompts": 1e-3, "full": 1e-6, "partial": 1e-5, "bias": 1e-4, "proj": 1e-4, "zero-shot": 0.0}


@dataclass
class TrainConfig(Options):
    """Everything train.py's command line can set; each field is the flag --field-name. Defaults: the paper's."""
    clip: str = option("ViT-B/32", "CLIP: an OpenAI name (ViT-B/32, ViT-B/16, ViT-L/14, ...) or a weights file/folder "
                       "(OpenAI release, state dict, Hugging Face transformers folder, open_clip checkpoint)")
    clip_activation: str | None = option(None, "the backbone's MLP activation when its files do not say "
                                         "(state dicts without a config): quick_gelu (OpenAI) or gelu (open_clip's "
                                         "LAION/DataComp weights)", choices=("quick_gelu", "gelu"))
    data: str = option("msrvtt-9k", "dataset", choices=DATASET_NAMES)
    data_root: str = option("data/msrvtt", "the dataset's folder (the CSV file for --data csv)")
    train_split: str = option("train", "split to train on")
    test_split: str = option("test", "split evaluated after each epoch (of a CSV without a split column: all its "
                                     "rows, which are the training rows)")
    prompts: str = option("", "video prompts: a comma list of pos, ctx, fn; empty = plain VoP")
    tune: str = option(VoPConfig.tune, "what learns: prompts, or a baseline", choices=TUNE_MODES)
    num_frames: int = option(VoPConfig.num_frames, "frames sampled per video", at_least(1))
    batch_size: int = option(32, "global batch (split over the processes under torchrun)", at_least(1))
    epochs: int = option(5, "passes over every (video, caption) pair; 0 evaluates only", at_least(0))
    lr: float | None = option(None, "peak learning rate; default by --tune: " + ", ".join(
        f"{mode} {lr:g}" for mode, lr in DEFAULT_LR.items() if lr), greater_than(0))
    weight_decay: float = option(0.2, "AdamW weight decay (tensors of 2+ dims: matrices and prompts)", at_least(0))
    warmup: float = option(0.1, "fraction of the steps spent warming up linearly", between(0, 1))
    grad_clip: float = option(1.0, "clip the gradient norm to this (inf: no clipping)", greater_than(0))
    # VoP's own hyperparameters: the paper's values are VoPConfig's defaults.
    fn_layers: int = option(VoPConfig.fn_layers, "K of VoP^F: layers run per frame before the video-wide ones",
                            at_least(1))
    num_text_prompts: int = option(VoPConfig.num_text_prompts, "text prompt tokens per layer", at_least(0))
    num_visual_prompts: int = option(VoPConfig.num_visual_prompts, "visual prompt tokens per layer", at_least(0))
    video_prompt_length: int = option(VoPConfig.video_prompt_length, "of the visual tokens, how many the video "
                                      "prompts make", at_least(0))
    flip: bool = option(True, "random horizontal flips in training; --no-flip when captions name directions "
                              "(a flip turns 'moves left' into 'moves right')")
    precision: str = option("auto", "autocast: auto (fp16 + GradScaler on CUDA, fp32 on CPU), fp32, fp16, bf16",
                            choices=("auto", *PRECISIONS))
    grad_checkpointing: bool = option(False, "recompute the frozen blocks' activations in backward")
    one_caption_per_video: bool = option(False, "an epoch visits every video once, with a random caption")
    num_workers: int | None = option(None, "DataLoader workers decoding videos; default: this machine's cores",
                                     at_least(0))
    frame_store: str | None = option(None, "decode each video once into this folder and train/evaluate from it")
    device: str = option("auto", "cuda, cpu, ...; auto picks cuda when available")
    out_dir: str | None = option(None, "where last.pt, log.jsonl and curves.png go; default runs/<data>/<method>")
    resume: str | None = option(None, "a checkpoint to continue from, or auto for out_dir/last.pt if present")
    overwrite: bool = option(False, "start afresh in an out_dir that holds an earlier run (deletes its files)")
    log_every: int = option(20, "steps between progress lines", at_least(1))
    save_every: int = option(0, "also save every N steps (0: at the end of each epoch only)", at_least(0))
    eval_each_epoch: bool = option(True, "evaluate after every epoch (always after the last)")
    eval_batch_size: int = option(32, "batch size of evaluation", at_least(1))
    skip_missing: bool = option(False, "leave out listed videos whose files are missing (with one warning)")
    seed: int = option(0, "seed of the prompts' initialisation and of every data draw")


# ----------------------------------------------------------------------------------------------------------
# The paper's path: the loss, the schedule, the optimiser, one step, the loop


def contrastive_loss(video_embeddings, text_embeddings, logit_scale):
    """Symmetric InfoNCE: text i belongs to video i. Embeddings (B, E), L2-normalised; logit_scale () is CLIP's
    log inverse temperature (frozen: log 100 in the released weights)."""
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
    """AdamW on the trainable tensors only. Weight decay (the paper's 0.2) on every trainable tensor of two or
    more dimensions: weight matrices, the prompt tables and VoP^F's frame position embedding, which decay
    towards zero, their initial scale (VPT and CoOp decay their prompts too). None on the 1-dimensional
    tensors, norms and biases (CLIP's and open_clip's rule; it matters only for the baselines and VoP^C's LSTM)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def training_step(model: VoP, optimizer, scaler, batch: dict, lr: float, grad_clip: float, device: torch.device,
                  amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on this process's share of a global batch: (loss, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    frames = batch["video"].to(device, non_blocking=True)  # (B, F, 3, R, R)
    tokens = model.tokenize(batch["caption"]).to(device)  # (B, 77 - P)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        video_embeddings, text_embeddings = model(frames, tokens)  # (B, E) each
    # Every process scores its own rows against the whole global batch (see gather_with_grad).
    loss = contrastive_loss(gather_with_grad(video_embeddings.float()), gather_with_grad(text_embeddings.float()),
                            model.logit_scale)
    if not torch.isfinite(loss):  # one sync per step, before backward: the weights keep the last good step
        raise TrainingDiverged(f"the loss is {loss.item()}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    sum_gradients_across_processes(trainable)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), grad_norm


def vop_config(config: TrainConfig) -> VoPConfig:
    """What the model computes, from the flags; a bad value is a one-line error naming its flag."""
    with flag_errors(video_prompts="prompts"):
        return VoPConfig(config.prompts, num_frames=config.num_frames, tune=config.tune,
                         num_text_prompts=config.num_text_prompts, num_visual_prompts=config.num_visual_prompts,
                         video_prompt_length=config.video_prompt_length, fn_layers=config.fn_layers)


def train(config: TrainConfig) -> dict:
    """Train, saving and then evaluating after each epoch; return the last evaluation."""
    model_config = vop_config(config)  # each flag's own check ran as `config` was made (utils.cli.Options)
    rank, world_size, device = distributed.setup(resolve_device(config.device))  # (0, 1, device) without torchrun
    amp_dtype = resolve_precision(config.precision, device)  # None: float32
    with Run(config, model_config.video_prompts, rank, world_size) as run:  # holds out_dir until the run ends
        # 1. The model: CLIP, frozen (the baselines tune a part of it), with VoP's prompts around it.
        torch.manual_seed(config.seed)  # the prompts' initialisation
        clip = load_clip(config.clip, device, activation=config.clip_activation)
        with flag_errors(video_prompts="prompts"):  # e.g. --fn-layers beyond this CLIP's depth
            model = VoP(clip, model_config, grad_checkpointing=config.grad_checkpointing)
        model.check_vocabulary()  # before any caption is tokenized
        model = model.to(device)
        run.log(f"model: VoP {model.describe()} on {config.clip}; {describe_parameters(model)}")
        # 2. The data: (video, caption) pairs, frames of CLIP's input size; unreadable videos are left out.
        store = FrameStore(config.frame_store, data.FRAME_RULE) if config.frame_store else None

        def dataset(split: str, train: bool) -> data.VideoTextDataset:
            return data.build_dataset(config.data, config.data_root, split, num_frames=config.num_frames,
                                      image_size=clip.visual.input_resolution, train=train,
                                      skip_missing=config.skip_missing, seed=config.seed,
                                      one_caption_per_video=config.one_caption_per_video and train,
                                      hflip=config.flip, frame_store=store)

        test_set = dataset(config.test_split, train=False)
        train_set = dataset(config.train_split, train=True) if run.trains else None
        train_set = run.check_videos(test_set, train_set)  # every video opened once, before the first step
        if train_set is None:  # --tune zero-shot or --epochs 0: nothing to train
            results = evaluate(model, test_set, config.eval_batch_size, run.num_workers, device, amp_dtype)
            when = "zero-shot" if config.tune == "zero-shot" else "untrained"
            run.log(format_results(results, results_title(config, when, test_set)))
            return {**results, "trainable": 0}
        # 3. The optimiser and the schedule.
        base_lr = config.lr if config.lr is not None else DEFAULT_LR[config.tune]
        optimizer = make_optimizer(model, base_lr, config.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
        steps_per_epoch = len(train_set) // config.batch_size  # the last incomplete batch is dropped
        total_steps = steps_per_epoch * config.epochs
        # 4. Where to start: step 0, or where --resume's checkpoint stopped (it must belong to this run).
        identity = run_identity(config, clip, train_set, steps_per_epoch, base_lr, model_config)  # what resume checks
        step, history = run.resume(model, optimizer, scaler, identity)
        # 5. The batches: each process loads its share of each global batch, decoded by parallel workers.
        run.fill_frame_store(store, train_set, test_set)  # --frame-store: decode each video once, now
        local_batch = config.batch_size // world_size
        order = data.EpochSampler(len(train_set), local_batch, rank, world_size, seed=config.seed)
        loader = data.make_loader(train_set, local_batch, run.num_workers, sampler=order, drop_last=True,
                                  pin_memory=device.type == "cuda")
        try:
            for epoch in range(step // steps_per_epoch, config.epochs):
                model.train()
                order.set_epoch(epoch, first_batch=step - epoch * steps_per_epoch)  # a resumed epoch skips ahead
                for batch in loader:
                    lr = get_lr(step, total_steps, base_lr, config.warmup)
                    loss, grad_norm = training_step(model, optimizer, scaler, batch, lr, config.grad_clip, device,
                                                    amp_dtype)
                    step += 1
                    run.log_step(epoch, step, total_steps, loss, lr, grad_norm, batch["replaced_video"])
                    if config.save_every and step % config.save_every == 0:
                        run.save(model, optimizer, scaler, step, history)
                run.count_replaced(epoch, step)  # videos that failed to decode, each replaced by another item
                run.save(model, optimizer, scaler, step, history)  # before evaluating: never lose the epoch
                if config.eval_each_epoch or epoch == config.epochs - 1:
                    history.append(evaluate_epoch(model, test_set, epoch, step, run, device, amp_dtype))
                    run.save(model, optimizer, scaler, step, history)  # now with the epoch's results
                run.draw_curves()  # out_dir/curves.png: loss, learning rate and recall so far
        except (KeyboardInterrupt, WriteError, TrainingDiverged) as stop:  # Ctrl-C, a full disk, a loss not finite
            raise run.stopped(stop, step, total_steps) from None  # one line: what is saved, how to go on
        finally:
            data.stop_workers(loader)
        if not history or history[-1]["epoch"] < config.epochs:  # resumed after its last evaluation failed
            history.append(evaluate_epoch(model, test_set, config.epochs - 1, step, run, device, amp_dtype))
            run.save(model, optimizer, scaler, step, history)
            run.draw_curves()
        elif step == run.start_step:  # a finished run, resumed: show what it ended with
            run.log(format_results(history[-1], results_title(config, f"epoch {config.epochs}", test_set)))
        return run.finish(step, history, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


def evaluate_epoch(model: VoP, test_set, epoch: int, step: int, run: Run, device, amp_dtype) -> dict:
    """The test split's retrieval metrics after `epoch` (every process embeds its share), printed as the paper's
    table and logged."""
    try:
        results = evaluate(model, test_set, run.config.eval_batch_size, run.num_workers, device, amp_dtype)
    except Exception:  # the epoch is saved already: say so, and how to evaluate it again
        run.log(f"evaluation after epoch {epoch + 1} failed; the epoch's checkpoint {run.checkpoint_path} is saved. "
                f"Evaluate it again with: python evaluate.py --checkpoint {run.checkpoint_path}")
        raise
    run.log(format_results(results, results_title(run.config, f"epoch {epoch + 1}", test_set)))
    run.write_log({"epoch": epoch + 1, "step": step, "eval": results})
    return {"epoch": epoch + 1, "step": step, **results}


# ----------------------------------------------------------------------------------------------------------
# Several processes (active only under torchrun): the loss needs the whole global batch


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x (B, E) -> all processes' rows (W*B, E), so the loss contrasts every pair of the global batch. Gradients
    flow back through this process's own rows only; the other rows are constants here."""
    if not distributed.is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def sum_gradients_across_processes(parameters):
    """Why a sum: each process computes the same global loss, but its backward pass only reaches the
    embeddings of its own rows, so it holds only their share of the gradient. The shares add up to the full
    gradient; DDP's averaging would give 1/W of it."""
    if distributed.is_distributed():
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)


# ----------------------------------------------------------------------------------------------------------
# The command line


def parse_train_config(argv=None) -> TrainConfig:
    return parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])


def main(argv=None):
    return train(parse_train_config(argv))


if __name__ == "__main__":
    run_command(main, sys.argv[1:], "train.py")
