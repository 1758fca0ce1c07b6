"""The machinery around train.py's loop: a run's folder, data checks, model, checkpoints, logs and resuming.

Skip on a first reading: train.py's `train` reads as the method (the loss, the schedule, the loop); this module
makes a real run safe. What `Run.prepare` does before the first step, in this order:
1. checks every flag (cli.py), starts torch.distributed under torchrun;
2. locks the output folder (checkpoints.RunFolder), refusing one that holds another run unless --resume or
   --overwrite;
3. reads both splits' annotation files, then probes every listed video once (cached in
   out_dir/video_probe.json): unreadable training videos are left out and listed in out_dir/skipped_videos.txt,
   an unreadable test video stops the run (out_dir/unreadable_test_videos.txt), before anything is downloaded;
4. loads CLIP (downloading it if needed) and builds the VoP.
Then `resume` continues a checkpoint (refusing another run's, naming each difference), `fill_frame_store`
decodes each video once for --frame-store, and during the loop `save` writes checkpoints atomically, before
`evaluate_epoch`, so a failed evaluation never costs an epoch.
"""
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import checkpoints
import clip_model
import data
import video_io
from cli import ConfigError, check_config, flag_error, resolve_device, resolve_precision
from evaluate import evaluate, format_results, is_distributed
from frame_store import FrameStore
from vop import VoP, VoPConfig, config_as_dict, describe_parameters


# ----------------------------------------------------------------------------------------------------------
# Processes (torch.distributed, active only under torchrun, when RANK is set)


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). One process per GPU under torchrun; else (0, 1, device)."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        # A generous timeout: rank 0 may probe videos or build the frame store while the others wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """The state of one training run, and the machinery around the loop: folders, data, logs, checkpoints."""
    config: object  # train.TrainConfig (train.py imports this module, not the other way round)
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
    trainable: list = field(default_factory=list)  # the parameters that learn, listed once (two uses per step)
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
    def prepare(cls, config, base_lr: float) -> "Run":
        """Everything before the first step but the optimiser; `config` is a train.TrainConfig."""
        check_config(config)
        if not Path(config.data_root).expanduser().exists():
            raise ConfigError(f"--data-root {config.data_root} does not exist: pass the folder of {config.data} (the "
                              f"README shows each dataset's layout); to try VoP with no weights and no data, run the "
                              f"demo: python demo.py --prompts pos,ctx")
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
        run = cls(config, rank, world_size, device, out_dir, base_lr=base_lr)
        run.take_folder()
        with run.released_on_error():
            run.read_data()  # before any download: a wrong data root is found in a second
            run.build_model(vop_config)
            run.count_steps()
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
        """Lock out_dir (rank 0), and refuse to start over an earlier run that was not asked to continue. Every
        process learns rank 0's answer, so a refusal stops them all instead of leaving them waiting."""
        config, problem = self.config, None
        if self.rank == 0:
            try:
                self.folder = checkpoints.RunFolder(self.out_dir).__enter__()
            except checkpoints.RunFolderError as error:
                problem = str(error)
            earlier = self.folder.existing_run() if self.folder else []
            resuming_here = config.resume == "auto" or (
                config.resume and Path(config.resume).resolve() == self.checkpoint_path.resolve())
            if earlier and config.overwrite:
                log(f"--overwrite: deleting the earlier run's {', '.join(earlier)} in {self.out_dir}")
                self.folder.clear()
            elif earlier and config.resume == "auto" and not self.checkpoint_path.is_file():
                log(f"--resume auto: {self.out_dir} holds no checkpoint (the earlier run stopped before its first "
                    f"save): starting afresh")
                self.folder.clear()
            elif earlier and not resuming_here and config.tune != "zero-shot" and config.epochs > 0:
                self.release_folder()
                problem = (f"{self.out_dir} holds an earlier run ({', '.join(earlier)}): pass --resume auto to continue "
                           f"it, --overwrite to start again from scratch, or another --out-dir")
        if is_distributed():
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem:
            raise checkpoints.RunFolderError(problem)

    def release_folder(self):
        if self.folder is not None:
            self.folder.__exit__(None, None, None)
            self.folder = None

    # -- data -----------------------------------------------------------------------------------------------

    def read_data(self):
        """The annotations of both splits, then one probe of every listed video."""
        config = self.config
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
        if self.rank == 0:  # lists from an earlier start would now be wrong
            for name in ("unreadable_test_videos.txt", "skipped_videos.txt"):
                (self.out_dir / name).unlink(missing_ok=True)
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
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.amp_dtype = resolve_precision(config.precision, self.device)
        for dataset in (self.train_set, self.test_set):  # read before the backbone, which sets the frame size
            if dataset is not None:
                dataset.image_size = clip.visual.input_resolution
        log(f"model: VoP {self.model.describe()} on {config.clip}; {describe_parameters(self.model)}", self.rank)

    def count_steps(self):
        config = self.config
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

    def resume(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        """Keep the optimiser and scaler; with --resume, load their state, the prompts and the step from the
        checkpoint, after checking that it belongs to this run. Within the run folder's lock."""
        self.optimizer, self.scaler = optimizer, scaler
        with self.released_on_error():
            self._resume()

    def _resume(self):
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
        with self.released_on_error():
            self._fill_frame_store()

    def _fill_frame_store(self):
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
            self.started, self.start_step = time.time(), self.step  # samples/s count from the first step
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


def default_out_dir(config) -> str:
    """runs/<data>/<method>, e.g. runs/msrvtt-9k/vop-fn-pos, so the README's rows do not overwrite each other."""
    prompts = "-".join(name.strip() for name in config.prompts.split(",") if name.strip())
    method = config.tune if config.tune != "prompts" else "vop" + (f"-{prompts}" if prompts else "")
    return str(Path("runs") / config.data / method)


def log(message: str, rank: int = 0):
    if rank == 0:
        print(message, flush=True)


