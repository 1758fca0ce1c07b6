"""The machinery around train.py's loop: a run's folder, its data checks, checkpoints, resuming and logs.

Skip on a first reading: train.py's `train` builds the model, the optimizer and the loader and runs the loop;
this module makes a real run safe, through one `Run` per call of `train`:
- `Run(config, video_prompts, rank, world_size)` checks the flags and reads the annotations first (`check_flags`,
  `check_data`), then, as a context manager, locks the output folder (checkpoints.RunFolder), refusing one that
  holds another run unless --resume or --overwrite, and releases it however the run ends;
- `check_videos` probes every listed video once (cached in out_dir/video_probe.json): unreadable training
  videos are left out and listed in out_dir/skipped_videos.txt, an unreadable test video stops the run
  (out_dir/unreadable_test_videos.txt);
- `resume` continues a checkpoint, refusing another run's (naming each difference); `save` writes one
  atomically; `fill_frame_store` decodes each video once for --frame-store;
- `log_step`, `count_replaced`, `draw_curves` and `finish` print progress and results, append them to
  out_dir/log.jsonl and draw out_dir/curves.png.
"""
import dataclasses
import json
import signal
import warnings
from pathlib import Path

import torch

from machinery import checkpoints
from utils import distributed
from formats import video_io
from formats.annotations import read_annotations
from formats.clip_weights import OPENAI_MODELS
from utils.cli import ConfigError
from utils.errors import Stopped, TrainingDiverged
from machinery.figures import draw_curves, read_log
from utils.files import WriteError, atomic_write, remove_leftover_temporaries
from utils.progress import Progress, format_duration


class Run:
    """One training run's folder, data checks, checkpoint and log (rank 0 writes; every process reads)."""

    def __init__(self, config, video_prompts: tuple = (), rank: int = 0, world_size: int = 1):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.out_dir = Path(config.out_dir or default_out_dir(config.data, config.tune, video_prompts))
        check_flags(config, world_size)  # before any folder is made or anything downloaded
        check_data(config, self.trains)  # before an earlier run's files are deleted (--overwrite)
        self.checkpoint_path = self.out_dir / "last.pt"
        self.num_workers = config.num_workers if config.num_workers is not None else video_io.default_num_workers(
            distributed.processes_per_machine())
        self.folder, self.identity, self.replaced_videos, self.replaced_this_epoch = None, {}, 0, []
        self.start_step, self.saved_step, self.wrote = 0, None, False
        self.evaluated_on = f"{config.data} {config.test_split}"  # what the results describe (check_videos)
        self.clock = Progress("training", total=0, unit="samples", enabled=False)  # rate and ETA of log_step

    @property
    def trains(self) -> bool:
        """Whether this run trains (not zero-shot CLIP, not --epochs 0, which only evaluate)."""
        return self.config.tune != "zero-shot" and self.config.epochs > 0

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # -- the folder -----------------------------------------------------------------------------------------

    def __enter__(self):
        """Lock out_dir (rank 0), and refuse to start over an earlier run that was not asked to continue. Every
        process learns rank 0's answer, so a refusal stops them all instead of leaving them waiting."""
        problem, failure = None, None
        if self.rank == 0:
            try:
                self.folder = checkpoints.RunFolder(self.out_dir).__enter__()
                remove_leftover_temporaries(self.out_dir)  # of a save that a kill interrupted
                problem = self.folder.settle_earlier_run(self.config.resume, self.config.overwrite, self.trains,
                                                         self.log)
            except Exception as error:  # whatever it is, the other processes must not wait for rank 0 for ever
                problem, failure = str(error) or type(error).__name__, error
        problem = distributed.from_first_process(problem)
        if problem:
            self.__exit__()
            raise failure or checkpoints.RunFolderError(problem)
        return self

    def __exit__(self, *exc_info):
        if self.folder is not None:
            self.folder.__exit__(*exc_info)
            self.folder = None
        return False

    # -- data -----------------------------------------------------------------------------------------------

    def check_videos(self, test_set, train_set):
        """The training set without its unreadable videos (None stays None), after one probe of every listed
        video (`check_videos` below); a training set smaller than one batch is refused."""
        config = self.config
        self.evaluated_on = evaluated_on(config, test_set)
        if getattr(test_set, "unsplit", False):
            self.log(f"note: {config.data_root} has no 'split' column, so every row is a training row, and "
                     f"evaluation runs on the training rows: the results describe training rows, not held-out ones "
                     f"(a column split, train/val/test, holds rows out)")
        elif config.test_split == config.train_split:
            self.log(f"note: evaluating on the training split {config.train_split!r}: the results describe "
                     f"training rows, not held-out ones")
        train_set = check_videos(test_set, train_set, self.out_dir, self.num_workers, self.rank, self.log)
        if train_set is not None and len(train_set) < config.batch_size:
            raise ConfigError(f"{config.data} {config.train_split} has {len(train_set)} items, fewer than one batch "
                              f"of --batch-size {config.batch_size}")
        return train_set

    def fill_frame_store(self, store, *datasets) -> None:
        """--frame-store: decode every video not stored yet, once, before the first step (each process its
        share of the videos)."""
        if store is not None:
            for dataset in datasets:
                if dataset is not None:
                    store.build(dataset, self.num_workers, self.rank, self.world_size, log=self.log)
            distributed.barrier()

    # -- checkpoints and resuming ---------------------------------------------------------------------------

    def resume(self, model, optimizer, scaler, identity: dict) -> tuple[int, list]:
        """(step, history): (0, []) for a new run; with --resume, the checkpoint's, after loading its tensors and
        optimizer state into `model`, `optimizer` and `scaler`, if it belongs to this run (`identity`, which
        every checkpoint of the run records)."""
        self.identity = identity
        path = self.config.resume
        if path == "auto":
            path = str(self.checkpoint_path) if self.checkpoint_path.is_file() else None
        if not path:
            return 0, []
        checkpoint = checkpoints.load_checkpoint(path, type(model.config))
        problems = checkpoints.resume_problems(checkpoint["run"], self.identity)
        if problems:
            raise checkpoints.CheckpointError(
                f"cannot resume from {path}: it belongs to another run. It differs in:\n  " + "\n  ".join(problems)
                + "\nResume with the flags it was made with, or start afresh (--overwrite, or another --out-dir)")
        model.load_trainable_state_dict(checkpoint["trainable"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when saved without fp16's loss scaling (fp32, bf16, a CPU run)
            scaler.load_state_dict(checkpoint["scaler"])
        self.replaced_videos = checkpoint["replaced_videos"]
        self.start_step = checkpoint["step"]
        if Path(path).resolve() == self.checkpoint_path.resolve():  # else nothing is saved in out_dir yet
            self.saved_step = self.start_step
        if self.rank == 0:  # the steps logged after the checkpoint will be trained, and logged, again
            forget_log_after(self.out_dir / "log.jsonl", self.start_step)
        total_steps = self.identity["steps_per_epoch"] * self.config.epochs
        if self.start_step >= total_steps:
            self.log(f"{path} is a finished run (step {self.start_step}/{total_steps}): nothing to train")
        else:
            self.log(f"resumed from {path} at step {self.start_step}/{total_steps}")
        return checkpoint["step"], checkpoint["history"]

    def save(self, model, optimizer, scaler, step: int, history: list) -> None:
        """Write out_dir/last.pt (rank 0, atomically): the trainable tensors, the optimizer and scaler state,
        the step and the evaluations so far, with what identifies the run."""
        if self.rank == 0:
            checkpoints.save_checkpoint({
                "config": dataclasses.asdict(self.config), "vop_config": model.config.as_dict(),
                "run": self.identity, "trainable": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "history": history,
                "replaced_videos": self.replaced_videos}, self.checkpoint_path)
        self.saved_step, self.wrote = step, True
        distributed.barrier()

    def stopped(self, stop: BaseException, step: int, total_steps: int) -> BaseException:
        """The one-line error that ends a run stopped at `step` by Ctrl-C or SIGTERM (KeyboardInterrupt), a
        failed write (WriteError, a full disk) or a loss that is not finite (TrainingDiverged): what it
        leaves saved, and how to go on."""
        if isinstance(stop, TrainingDiverged):  # `step` steps went well; the next one did not
            return TrainingDiverged(f"{stop} at step {step + 1}: stopping. {self.diverged_note(total_steps)}")
        if isinstance(stop, WriteError):
            return WriteError(f"{stop}. {self.saved_note(total_steps)}")
        return Stopped(f"Stopped at step {step}/{total_steps}. {self.saved_note(total_steps)}",
                       getattr(stop, "signal", signal.SIGINT))

    def saved_note(self, total_steps: int) -> str:
        """What a run that stops now leaves, and how to continue it."""
        if self.saved_step is None:
            return "Nothing was saved yet."
        return (f"The last checkpoint, {self.checkpoint_path} (step {self.saved_step}/{total_steps}), is intact: run "
                f"the same command with --resume auto to continue from it.")

    def diverged_note(self, total_steps: int) -> str:
        """How to go on after a loss that is not finite (the same command would meet it again)."""
        if self.saved_step is None:
            return "Nothing was saved yet: start again with a lower --lr, or --precision bf16 / fp32."
        return (f"The last checkpoint, {self.checkpoint_path} (step {self.saved_step}/{total_steps}), is intact: "
                f"continue from it with --resume auto --precision bf16 (or fp32), or start again with a lower --lr "
                f"and --overwrite.")

    # -- logs -----------------------------------------------------------------------------------------------

    def draw_curves(self) -> None:
        """out_dir/curves.png: the loss and learning rate, and the recall on the evaluated split, so far
        (figures.py). A picture that cannot be drawn is noted, never allowed to stop the run."""
        try:
            if self.rank == 0:
                draw_curves(self.out_dir / "log.jsonl", self.out_dir / "curves.png", self.evaluated_on)
        except Exception as error:  # noqa: BLE001  (a by-product: the checkpoint and the log hold the numbers)
            self.log(f"note: {self.out_dir / 'curves.png'} was not drawn: {type(error).__name__}: {error}")

    def write_log(self, record: dict) -> None:
        if self.rank == 0:
            path = self.out_dir / "log.jsonl"
            try:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as error:  # no space, no permission: one line, not a traceback
                raise WriteError(f"could not write {path}: {error.strerror or error}") from None

    def log_step(self, epoch: int, step: int, total_steps: int, loss: torch.Tensor, lr: float,
                 grad_norm: torch.Tensor, replaced_videos=()) -> None:
        """Every --log-every steps: a progress line and a log.jsonl record (samples/s from the first step's end).
        `loss` and `grad_norm` are 0-dim tensors, read (a device sync) only on the steps that are logged.
        `replaced_videos`: the batch's items whose video failed to decode ("" for the others), counted at the
        end of the epoch (`count_replaced`)."""
        self.replaced_this_epoch += [path for path in replaced_videos if path]
        self.clock.total = total_steps * self.config.batch_size
        rate, left = self.clock.measure(step * self.config.batch_size)
        if step % self.config.log_every and step != total_steps:
            return
        loss, grad_norm = loss.item(), grad_norm.item()
        speed = f"  {rate:.1f} samples/s  ETA {format_duration(left)}" if rate else ""
        self.log(f"epoch {epoch + 1}/{self.config.epochs}  step {step}/{total_steps}  loss {loss:.4f}  "
                 f"lr {lr:.2e}{speed}")
        self.write_log({"epoch": epoch + 1, "step": step, "total_steps": total_steps, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "samples_per_second": rate})

    def count_replaced(self, epoch: int, step: int) -> None:
        """Videos that failed to decode this epoch, each replaced by another item: counted over all processes."""
        replaced, self.replaced_this_epoch = self.replaced_this_epoch, []
        count = distributed.sum_over_processes(len(replaced))
        if count:
            self.replaced_videos += count
            self.log(f"warning: {count} training item(s) of epoch {epoch + 1} could not be decoded and were replaced "
                     f"by others (e.g. {replaced[0] if replaced else 'on another process'})")
            self.write_log({"epoch": epoch + 1, "step": step, "replaced_videos": count,
                            "examples": sorted(set(replaced))[:20]})

    def finish(self, step: int, history: list, trainable: int) -> dict:
        """The run's last results, and one line on what it saved (nothing, for a finished run resumed)."""
        if self.wrote:
            size = self.checkpoint_path.stat().st_size / 1e6 if self.checkpoint_path.is_file() else 0
            self.log(f"saved {self.checkpoint_path} ({size:.1f} MB); {self.replaced_videos} training item(s) were "
                     f"replaced because their video failed to decode")
        results = {key: value for key, value in history[-1].items() if key not in ("epoch", "step")}
        return {**results, "trainable": trainable, "replaced_videos": self.replaced_videos}


def check_flags(config, world_size: int) -> None:
    """What the flags alone can tell is wrong: a --data-root, --clip or --resume that does not exist, a batch that
    does not split."""
    if not Path(config.data_root).expanduser().exists():
        what = "the CSV file itself" if config.data == "csv" else f"the folder that holds {config.data}"
        raise ConfigError(f"--data-root {config.data_root} does not exist: pass {what} (docs/data.md shows each "
                          f"layout); to try VoP with no weights and no data, run the demo: python demo.py --prompts "
                          f"pos,ctx")
    check_named_files(config.clip, config.resume)
    if config.batch_size % world_size:
        raise ConfigError(f"--batch-size {config.batch_size} must divide evenly over {world_size} processes")


def check_named_files(clip, resume) -> None:
    """A --clip (not an OpenAI model name) or --resume (not auto) that does not exist; None or "" names none."""
    if clip and str(clip) not in OPENAI_MODELS and not Path(clip).expanduser().exists():
        raise FileNotFoundError(f"--clip {clip} does not exist: pass a model name ({', '.join(OPENAI_MODELS)}), "
                                f"or a weights file or folder")
    if resume and resume != "auto" and not Path(resume).expanduser().is_file():
        raise FileNotFoundError(f"--resume {resume} does not exist: pass a checkpoint file (a run's last.pt), or "
                                f"--resume auto for out_dir/last.pt")


def check_data(config, trains: bool) -> None:
    """Read the annotations of the splits the run uses (every file, column and listed video checked; nothing is
    decoded), so that a wrong --data-root (a folder for --data csv, a file for a benchmark), a missing file or
    video, or a training split smaller than one batch is refused before anything slow or destructive."""
    splits = [config.test_split] + ([config.train_split] if trains else [])
    for split in dict.fromkeys(splits):
        with warnings.catch_warnings():  # --skip-missing's warning: said once, when the dataset is built
            warnings.simplefilter("ignore")
            annotations = read_annotations(config.data, config.data_root, split, skip_missing=config.skip_missing)
        items = len(annotations.video_ids) if config.one_caption_per_video else len(annotations.captions)
        if trains and split == config.train_split and items < config.batch_size:
            raise ConfigError(f"{config.data} {split} has {items} items, fewer than one batch of --batch-size "
                              f"{config.batch_size}")


def evaluated_on(config, test_set) -> str:
    """'msrvtt-9k test', or 'csv test (training rows)' when the evaluated rows are the training rows (the test
    split is the training split, or the CSV has no split column)."""
    training_rows = config.test_split == config.train_split or getattr(test_set, "unsplit", False)
    return f"{config.data} {config.test_split}{' (training rows)' if training_rows else ''}"


def results_title(config, when: str, test_set) -> str:
    """'epoch 3 (msrvtt-9k test, 1000 captions)': what a results table shows, saying "training rows" when the
    evaluated rows are the training rows."""
    return f"{when} ({evaluated_on(config, test_set)}, {len(test_set.captions)} captions)"


def run_identity(config, clip, train_set, steps_per_epoch: int, base_lr: float, model_config) -> dict:
    """What makes this run this run (resume refuses a checkpoint whose identity differs). The backbone is
    recorded as loaded (an absolute path, or an OpenAI name), so evaluate.py finds it from any folder."""
    source = getattr(clip, "source", {}) or {}
    return {"backbone": source.get("clip", config.clip), "backbone_sha256": source.get("sha256"),
            "activation": source.get("activation"), "backbone_format": source.get("format"), "data": config.data,
            "data_root": str(Path(config.data_root).expanduser().resolve()), "train_split": config.train_split,
            "test_split": config.test_split, "train_items": len(train_set), "batch_size": config.batch_size,
            "num_frames": config.num_frames, "epochs": config.epochs, "steps_per_epoch": steps_per_epoch,
            "lr": base_lr, "weight_decay": config.weight_decay, "warmup": config.warmup, "grad_clip": config.grad_clip,
            "seed": config.seed, "one_caption_per_video": config.one_caption_per_video,
            "horizontal_flip": config.flip, "frame_store": config.frame_store is not None,
            "vop": model_config.as_dict()}


def forget_log_after(path: Path, step: int) -> None:
    """Keep only the records of log.jsonl up to `step` (a resumed run trains, and logs, the later ones again),
    and no line that is not a record of the run: one cut short by a crash (the next record would be appended to
    it), bytes that are not UTF-8, a value that is not a JSON object, a step that is not a number."""
    if not path.is_file():
        return
    lines, records = path.read_bytes().splitlines(keepends=True), read_log(path)

    def up_to_step(record: dict) -> bool:  # a step that is not a number ({"step": null}) is not the run's
        at = record.get("step", 0)
        return isinstance(at, (int, float)) and not isinstance(at, bool) and at <= step
    kept = [record for record in records if up_to_step(record)]
    if len(kept) < len(lines) or (lines and not lines[-1].endswith(b"\n")):
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)


# ----------------------------------------------------------------------------------------------------------
# The videos of a run, each opened once before it starts


def check_videos(test_set, train_set, out_dir: Path, num_workers: int, rank: int = 0, log=print):
    """Probe every listed video once (rank 0, in parallel, cached in out_dir/video_probe.json; the others read
    its cache). An unreadable test video stops the run (listed in out_dir/unreadable_test_videos.txt): results
    on a partial test set would not be comparable. Unreadable training videos are left out with one warning
    (listed in out_dir/skipped_videos.txt). Returns the training set without them (None stays None)."""
    datasets = [test_set] + ([train_set] if train_set is not None else [])
    paths = sorted({str(path) for dataset in datasets for path in dataset.video_paths})
    cache = out_dir / "video_probe.json"
    if rank == 0:
        results = video_io.probe_videos(paths, num_workers=num_workers, cache_file=cache, show_progress=True)
    distributed.barrier()
    if rank != 0:
        results = video_io.probe_videos(paths, num_workers=num_workers, cache_file=cache)
    unreadable = {path: result.error for path, result in results.items() if not result.ok}
    if rank == 0:  # lists from an earlier start would now be wrong (an evaluation-only run keeps the training list)
        for name in ("unreadable_test_videos.txt",) + (("skipped_videos.txt",) if train_set is not None else ()):
            (out_dir / name).unlink(missing_ok=True)

    def listing(name: str, bad: list) -> Path:
        if rank == 0:
            (out_dir / name).write_text("".join(f"{path}\t{unreadable[str(path)]}\n" for path in bad))
        return out_dir / name

    bad_test = [path for path in test_set.video_paths if str(path) in unreadable]
    if bad_test:
        raise video_io.VideoReadError(
            f"{len(bad_test)} test video(s) cannot be read (first: {unreadable[str(bad_test[0])]}); the whole list "
            f"is in {listing('unreadable_test_videos.txt', bad_test)}. Fix or re-encode them, or remove them from "
            f"the annotations: results on a partial test set would not be comparable")
    if train_set is None:
        return None
    bad_train = [index for index, path in enumerate(train_set.video_paths) if str(path) in unreadable]
    if not bad_train:
        return train_set
    where = listing("skipped_videos.txt", [train_set.video_paths[i] for i in bad_train])
    log(f"warning: leaving out {len(bad_train)} of {len(train_set.video_ids)} training videos that cannot be read; "
        f"they are listed in {where}")
    return train_set.without_videos(bad_train)


def default_out_dir(data: str, tune: str, video_prompts: tuple) -> str:
    """runs/<data>/<method>, e.g. runs/msrvtt-9k/vop-pos-fn, so the rows of docs/training.md do not overwrite
    each other; `video_prompts` in their canonical order (VoPConfig's), so `fn,pos` and `pos,fn` name the same
    run."""
    method = tune if tune != "prompts" else "-".join(["vop", *video_prompts])
    return str(Path("runs") / data / method)
