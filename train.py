"""Train VoP (or one of the paper's baselines) for text-video retrieval, evaluate it, save it.

    python train.py --data msrvtt-9k --data-root data/msrvtt --prompts fn,ctx      # CLIP ViT-B/32 by default
    torchrun --nproc_per_node 4 train.py --data msrvtt-9k --data-root data/msrvtt --prompts fn,ctx
    python demo.py --prompts pos,ctx       # no weights, no data: the synthetic demo (demo.py)

Read first: `contrastive_loss`, `get_lr` and the loop in `train`. A flat loop: symmetric InfoNCE over the
global batch, AdamW on the trainable tensors only, cosine decay after a linear warm-up, gradient clipping, fp16
autocast + GradScaler on CUDA (bf16 autocast on request). After each epoch the checkpoint (out_dir/last.pt:
the trainable tensors, config, optimizer and scaler state, step, results) is written, atomically, *before*
evaluating, so a failed evaluation never costs the epoch; `--resume auto` continues exactly where it stopped.

What runs before the first step (skip on a first reading, section "Getting a run ready"): every flag is
checked; the output folder is locked; the annotation files are read and every listed video is probed once
(unreadable training videos are left out and listed in out_dir/skipped_videos.txt; an unreadable test video
stops the run); then CLIP is loaded (downloaded if needed) and a resumed run is checked against its checkpoint.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import checkpoints
import clip_model
import data
import video_io
from annotations import DATASET_NAMES
from cli import ConfigError, at_least, between, check_config, flag_error, greater_than, option, parse_config
from cli import resolve_precision, run_command, PRECISIONS
from evaluate import evaluate, format_results
from frame_store import FrameStore
from vop import TUNE_MODES, VoP, VoPConfig, config_as_dict, describe_parameters

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
    data: str | None = option(None, "dataset", choices=DATASET_NAMES)
    data_root: str | None = option(None, "the dataset's folder (the CSV file for --data csv)")
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


def training_step(run: "Run", batch: dict, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
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
    run = Run.prepare(config)  # checks, data, CLIP, VoP, optimizer, resume: see "Getting a run ready"
    with run:  # holds the output folder until the run ends, however it ends
        for epoch in run.remaining_epochs():
            run.model.train()
            replaced = []  # training videos that failed to decode this epoch (each replaced by another item)
            for batch in run.batches(epoch):
                lr = get_lr(run.step, run.total_steps, run.base_lr, config.warmup)
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


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). One process per GPU under torchrun; else (0, 1, device)."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError as error:
        raise ConfigError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device_name}: no CUDA device is available here; use --device cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        # A generous timeout: rank 0 may probe videos or build the frame store while the others wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def barrier():
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# Getting a run ready, saving it, logging it (skip on a first reading)


@dataclass
class Run:
    """The state of one training run, and the machinery around the loop: folders, data, logs, checkpoints."""
    config: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    out_dir: Path
    model: VoP = None
    train_set: data.VideoTextDataset = None
    test_set: data.VideoTextDataset = None
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None
    amp_dtype: torch.dtype | None = None
    base_lr: float = 0.0
    steps_per_epoch: int = 1
    total_steps: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    replaced_videos: int = 0
    identity: dict = field(default_factory=dict)
    folder: checkpoints.RunFolder | None = None
    num_workers: int = 0
    store: FrameStore | None = None
    loader: torch.utils.data.DataLoader | None = None
    epoch_items: data.EpochSampler | None = None
    started: float = field(default_factory=time.time)
    start_step: int = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def remaining_epochs(self) -> range:
        """The epochs still to train: all of them, those after a resumed step, none for zero-shot."""
        if self.train_set is None:
            return range(0)
        return range(self.step // self.steps_per_epoch, self.config.epochs)

    @property
    def finished(self) -> bool:
        return self.total_steps > 0 and self.step >= self.total_steps and bool(self.history) \
            and self.history[-1].get("epoch") == self.config.epochs

    @classmethod
    def prepare(cls, config: TrainConfig) -> "Run":
        check_config(config)
        if config.data is None or config.data_root is None:
            raise ConfigError("--data and --data-root are required (see the README for the datasets); to try VoP "
                              "with no weights and no data, run the demo: python demo.py --prompts pos,ctx")
        try:
            vop_config = VoPConfig(config.prompts, num_frames=config.num_frames, tune=config.tune,
                                   num_text_prompts=config.num_text_prompts,
                                   num_visual_prompts=config.num_visual_prompts,
                                   video_prompt_length=config.video_prompt_length, fn_layers=config.fn_layers)
        except ValueError as error:
            raise flag_error(error, {"video_prompts": "prompts"}) from None
        rank, world_size, device = setup_distributed(config.device)
        if config.batch_size % world_size:
            raise ConfigError(f"--batch-size {config.batch_size} must divide evenly over {world_size} processes")
        out_dir = Path(config.out_dir or default_out_dir(config))
        run = cls(config, rank, world_size, device, out_dir)
        run.take_folder()
        with run.released_on_error():
            run.read_data()  # before any download: a wrong data root is found in a second
            run.build_model(vop_config)
            run.make_optimizer()
            run.resume_or_start()
            run.fill_frame_store()
        return run

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release_folder()
        return False

    @contextlib.contextmanager
    def released_on_error(self):
        try:
            yield
        except BaseException:
            self.release_folder()
            raise

    # -- the folder -----------------------------------------------------------------------------------------

    def take_folder(self):
        """Lock out_dir (rank 0), and refuse to start over an earlier run that was not asked to continue."""
        config = self.config
        if self.rank == 0:
            self.folder = checkpoints.RunFolder(self.out_dir).__enter__()
            earlier = self.folder.existing_run()
            resuming_here = config.resume == "auto" or (
                config.resume and Path(config.resume).resolve() == self.checkpoint_path.resolve())
            if earlier and config.overwrite:
                log(f"--overwrite: deleting the earlier run's {', '.join(earlier)} in {self.out_dir}")
                self.folder.clear()
            elif earlier and not resuming_here and config.tune != "zero-shot" and config.epochs > 0:
                self.release_folder()
                raise checkpoints.RunFolderError(
                    f"{self.out_dir} holds an earlier run ({', '.join(earlier)}): pass --resume auto to continue it, "
                    f"--overwrite to start again from scratch, or another --out-dir")
        barrier()

    def release_folder(self):
        if self.folder is not None:
            self.folder.__exit__(None, None, None)
            self.folder = None

    # -- data -----------------------------------------------------------------------------------------------

    def read_data(self):
        """The annotations of both splits, then one probe of every listed video."""
        config, image_size = self.config, None
        num_workers = config.num_workers if config.num_workers is not None else data.default_num_workers(
            processes_per_machine=int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)))
        self.num_workers = num_workers

        self.store = FrameStore(config.frame_store) if config.frame_store else None

        def build(split: str, train: bool):
            return data.build_dataset(config.data, config.data_root, split, num_frames=config.num_frames,
                                      train=train, skip_missing=config.skip_missing, seed=config.seed,
                                      one_caption_per_video=config.one_caption_per_video and train,
                                      frame_store=self.store)

        self.test_set = build(config.test_split, train=False)
        if config.test_split == config.train_split:
            log(f"note: evaluating on the training split {config.train_split!r}: the results describe training "
                f"rows, not held-out ones", self.rank)
        evaluates_only = config.tune == "zero-shot" or config.epochs == 0
        self.train_set = None if evaluates_only else build(config.train_split, train=True)
        self.probe_videos(num_workers)

    def probe_videos(self, num_workers: int):
        """Open every listed video once (cached in out_dir/video_probe.json): leave out unreadable training
        videos, stop on unreadable test videos."""
        sets = [self.test_set] + ([self.train_set] if self.train_set is not None else [])
        paths = sorted({str(path) for dataset in sets for path in dataset.video_paths})
        cache = self.out_dir / "video_probe.json"
        if self.rank == 0:  # one process probes (in parallel); the others read its cache
            results = video_io.probe_videos(paths, num_workers=num_workers, cache_file=cache)
        barrier()
        if self.rank != 0:
            results = video_io.probe_videos(paths, num_workers=num_workers, cache_file=cache)
        unreadable = {path: result.error for path, result in results.items() if not result.ok}
        bad_test = [path for path in map(str, self.test_set.video_paths) if path in unreadable]
        if bad_test:
            listing = self.out_dir / "unreadable_test_videos.txt"
            if self.rank == 0:
                listing.write_text("".join(f"{path}\t{unreadable[path]}\n" for path in bad_test))
            raise video_io.VideoReadError(
                f"{len(bad_test)} test video(s) cannot be read (first: {bad_test[0]}: {unreadable[bad_test[0]]}); "
                f"the whole list is in {listing}. Fix or re-encode them, or remove them from the annotations: "
                f"results on a partial test set would not be comparable")
        if self.train_set is not None:
            bad_train = [index for index, path in enumerate(self.train_set.video_paths) if str(path) in unreadable]
            if bad_train:
                listing = self.out_dir / "skipped_videos.txt"
                if self.rank == 0:
                    listing.write_text("".join(f"{self.train_set.video_paths[i]}\t"
                                               f"{unreadable[str(self.train_set.video_paths[i])]}\n" for i in bad_train))
                log(f"warning: leaving out {len(bad_train)} of {len(self.train_set.video_ids)} training videos that "
                    f"cannot be read; they are listed in {listing}", self.rank)
                self.train_set = self.train_set.without_videos(bad_train)

    # -- model, optimiser, resuming -------------------------------------------------------------------------

    def build_model(self, vop_config: VoPConfig):
        config = self.config
        torch.manual_seed(config.seed)  # the prompts' initialisation
        clip = clip_model.load(config.clip, self.device, activation=config.clip_activation)
        try:
            self.model = VoP(clip, vop_config, grad_checkpointing=config.grad_checkpointing).to(self.device)
        except ValueError as error:
            raise flag_error(error, {"video_prompts": "prompts"}) from None
        self.amp_dtype = resolve_precision(config.precision, self.device)
        for dataset in (self.train_set, self.test_set):  # read before the backbone, which sets the frame size
            if dataset is not None:
                dataset.image_size = clip.visual.input_resolution
        log(f"model: VoP {self.model.describe()} on {config.clip}; {describe_parameters(self.model)}", self.rank)

    def make_optimizer(self):
        config = self.config
        self.base_lr = config.lr if config.lr is not None else DEFAULT_LR[config.tune]
        # Weight decay on matrices only; norms, biases and nothing else of the kind (as in CLIP / open_clip).
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=self.base_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if self.train_set is not None:
            if len(self.train_set) < config.batch_size:
                raise ConfigError(f"{config.data} {config.train_split} has {len(self.train_set)} items, fewer than "
                                  f"one batch of --batch-size {config.batch_size}")
            self.steps_per_epoch = len(self.train_set) // config.batch_size  # the last incomplete batch is dropped
            self.total_steps = self.steps_per_epoch * config.epochs
        self.identity = self.describe_identity()

    def describe_identity(self) -> dict:
        """What makes this run this run: resume refuses a checkpoint whose identity differs."""
        config, source = self.config, getattr(self.model.clip, "source", {}) or {}
        return {"backbone": config.clip, "backbone_sha256": source.get("sha256"),
                "activation": source.get("activation"), "backbone_format": source.get("format"),
                "data": config.data, "data_root": str(Path(config.data_root).expanduser().resolve()),
                "train_split": config.train_split, "test_split": config.test_split,
                "train_items": len(self.train_set) if self.train_set is not None else 0,
                "batch_size": config.batch_size, "num_frames": config.num_frames, "epochs": config.epochs,
                "steps_per_epoch": self.steps_per_epoch, "lr": self.base_lr, "weight_decay": config.weight_decay,
                "warmup": config.warmup, "grad_clip": config.grad_clip, "seed": config.seed,
                "one_caption_per_video": config.one_caption_per_video, "frame_store": config.frame_store is not None,
                "vop": config_as_dict(self.model.config)}

    def resume_or_start(self):
        config = self.config
        resume = config.resume
        if resume == "auto":
            resume = str(self.checkpoint_path) if self.checkpoint_path.is_file() else None
        if not resume or config.tune == "zero-shot":
            return
        checkpoint = checkpoints.load_checkpoint(resume)
        saved = checkpoint.get("run")
        if saved is None:
            raise checkpoints.CheckpointError(f"{resume} does not record what run wrote it (an older format): "
                                              f"start afresh with --overwrite")
        problems = checkpoints.resume_problems(saved, self.identity)
        if problems:
            raise checkpoints.CheckpointError(
                f"cannot resume from {resume}: it belongs to another run; " + "; ".join(problems) +
                ". Resume with the flags it was made with, or start afresh (--overwrite, or another --out-dir)")
        self.model.load_trainable_state_dict(checkpoint["trainable"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step, self.history = checkpoint["step"], checkpoint.get("history", [])
        self.replaced_videos = checkpoint.get("replaced_videos", 0)
        self.start_step = self.step
        if self.finished:
            log(f"{resume} is a finished run (epoch {config.epochs}/{config.epochs}, step {self.step}/"
                f"{self.total_steps}); its last results:", self.rank)
        else:
            log(f"resumed from {resume} at step {self.step}/{self.total_steps}", self.rank)

    def fill_frame_store(self):
        """--frame-store: decode every video not stored yet, once, before the first step (each process its
        share of the videos)."""
        if self.store is None:
            return
        for dataset in (self.train_set, self.test_set):
            if dataset is not None:
                self.store.build(dataset, self.num_workers, self.rank, self.world_size,
                                 log=lambda message: log(message, self.rank))
        barrier()

    # -- the loop's machinery -------------------------------------------------------------------------------

    def batches(self, epoch: int):
        """This process's batches of the epoch, from where a resumed run stopped. Data order and every random
        draw depend only on (seed, epoch, item), so a resumed run sees exactly the batches it would have. One
        loader serves every epoch, so its workers start once; each key it hands them carries its epoch."""
        local_batch = self.config.batch_size // self.world_size
        sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.config.seed, drop_last=True)
        sampler.set_epoch(epoch)
        skip = (self.step - epoch * self.steps_per_epoch) * local_batch
        indices = list(sampler)[skip: self.steps_per_epoch * local_batch]
        if self.loader is None:
            self.epoch_items = data.EpochSampler()
            self.loader = data.make_loader(self.train_set, local_batch, self.num_workers, sampler=self.epoch_items,
                                           pin_memory=self.device.type == "cuda", drop_last=True)
        self.epoch_items.set_epoch(epoch, indices)
        return self.loader

    def log_progress(self, epoch: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor):
        elapsed = time.time() - self.started
        samples_per_second = (self.step - self.start_step) * self.config.batch_size / max(elapsed, 1e-9)
        eta = (self.total_steps - self.step) * self.config.batch_size / max(samples_per_second, 1e-9)
        record = {"epoch": epoch + 1, "step": self.step, "total_steps": self.total_steps, "loss": loss.item(),
                  "lr": lr, "grad_norm": grad_norm.item(), "samples_per_second": samples_per_second}
        log(f"epoch {epoch + 1}/{self.config.epochs}  step {self.step}/{self.total_steps}  loss {loss.item():.4f}  "
            f"lr {lr:.2e}  {samples_per_second:.1f} samples/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
            self.rank)
        self.write_log(record)

    def count_replaced(self, epoch: int, replaced: list):
        """Training videos that passed the probe but failed to decode: each was replaced by another item of the
        epoch. Their count (over all processes) goes into the log and the final summary."""
        count = torch.tensor(len(replaced))
        if is_distributed():
            dist.all_reduce(count)
        if count:
            self.replaced_videos += int(count)
            log(f"warning: {int(count)} training item(s) of epoch {epoch + 1} could not be decoded and were replaced "
                f"by others (e.g. {replaced[0] if replaced else 'on another process'})", self.rank)
            self.write_log({"epoch": epoch + 1, "step": self.step, "replaced_videos": int(count),
                            "examples": sorted(set(replaced))[:20]})

    def write_log(self, record: dict):
        if self.rank == 0:
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def save(self):
        if self.rank == 0:
            checkpoints.save_checkpoint({
                "config": dataclasses.asdict(self.config), "vop_config": config_as_dict(self.model.config),
                "run": self.identity, "trainable": self.model.trainable_state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "history": self.history, "replaced_videos": self.replaced_videos}, self.checkpoint_path)
        barrier()

    def run_evaluation(self, tag: str) -> dict:
        results = evaluate(self.model, self.test_set, batch_size=self.config.eval_batch_size,
                           num_workers=self.num_workers, device=self.device, autocast_dtype=self.amp_dtype)
        split = self.config.test_split
        label = " (training rows)" if split == self.config.train_split else ""
        log(format_results(results, f"{tag} ({self.config.data} {split}{label}, {len(self.test_set)} captions)"),
            self.rank)
        return results

    def evaluate_epoch(self, epoch: int):
        """Evaluate (every process embeds its share of the test set); a failure leaves the epoch's checkpoint
        and says how to evaluate it again."""
        try:
            results = self.run_evaluation(f"epoch {epoch + 1}")
        except Exception:
            log(f"evaluation after epoch {epoch + 1} failed; the epoch's checkpoint {self.checkpoint_path} is saved. "
                f"Evaluate it again with: python evaluate.py --checkpoint {self.checkpoint_path}", self.rank)
            raise
        self.write_log({"epoch": epoch + 1, "step": self.step, "eval": results})
        self.history.append({"epoch": epoch + 1, "step": self.step, **results})

    def finish(self) -> dict:
        """Zero-shot / --epochs 0: evaluate once. Otherwise the summary of the run."""
        if self.train_set is None:  # nothing to train
            return {**self.run_evaluation("zero-shot" if self.config.tune == "zero-shot" else "untrained"),
                    "trainable": 0}
        if self.step >= self.total_steps and not self.finished:  # trained, but its last evaluation failed
            self.evaluate_epoch(self.config.epochs - 1)
            self.save()
        results = {key: value for key, value in (self.history[-1] if self.history else {}).items()
                   if key not in ("epoch", "step")}
        if self.rank == 0:
            if self.start_step == self.step:  # a finished run, resumed: show what it ended with
                log(format_results(results, f"epoch {self.config.epochs} ({self.config.data} {self.config.test_split})"))
            size = self.checkpoint_path.stat().st_size / 1e6 if self.checkpoint_path.is_file() else 0
            log(f"saved {self.checkpoint_path} ({size:.1f} MB); {self.replaced_videos} training item(s) were "
                f"replaced because their video failed to decode")
        trainable = sum(p.numel() for p in self.trainable)
        return {**results, "trainable": trainable, "replaced_videos": self.replaced_videos}


def default_out_dir(config: TrainConfig) -> str:
    """runs/<data>/<method>, e.g. runs/msrvtt-9k/vop-fn-pos, so the README's rows do not overwrite each other."""
    prompts = "-".join(name.strip() for name in config.prompts.split(",") if name.strip())
    method = config.tune if config.tune != "prompts" else "vop" + (f"-{prompts}" if prompts else "")
    return str(Path("runs") / config.data / method)


def log(message: str, rank: int = 0):
    if rank == 0:
        print(message, flush=True)


def parse_train_config(argv=None) -> TrainConfig:
    return parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])


def given_options(argv=None) -> dict:
    """Only the TrainConfig fields set on the command line (the demo keeps its own settings for the rest)."""
    from cli import build_parser
    return vars(build_parser(TrainConfig, __doc__.split("\n\n")[0], only_given=True).parse_args(argv))


def main(argv=None):
    return train(parse_train_config(argv))


if __name__ == "__main__":
    run_command(main, sys.argv[1:], "train.py")
