"""What a training run writes and reads back: its checkpoint, its folder, and whether it can be resumed.

Skip on a first reading: train.py saves `{"config", "vop_config", "trainable", "optimizer", "scaler", "step",
"history", "run"}` with `save_checkpoint` and reads it with `load_checkpoint`; the rest keeps real runs safe.

- No file runs code: checkpoints are read with `torch.load(weights_only=True)` and nothing else, so a crafted
  pickle is refused, never executed. Every failure names the file.
- Writes are atomic (a temporary file, then a rename): a crash never leaves half a checkpoint.
- A run owns its folder: `RunFolder` holds a lock file naming its process, refuses a second process, clears a
  lock whose process is gone, and refuses to start over a folder that holds a run unless told to resume it
  or overwrite it.
- `resume_problems` names every difference between the saved run and the one asked for that would change
  the run's meaning (backbone, data, batch, frames, schedule, model).
"""
import os
import pickle
import socket
import sys
from pathlib import Path

import torch

from vop import VoPConfig

CHECKPOINT_KEYS = ("config", "vop_config", "trainable")
RUN_EVIDENCE = ("last.pt", "log.jsonl")  # a folder holding either holds a run that trained
RUN_FILES = (*RUN_EVIDENCE, "skipped_videos.txt", "unreadable_test_videos.txt")  # what a run leaves in its folder


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely, is not one of ours, or does not fit the run asked for."""


class RunFolderError(RuntimeError):
    """An output folder that is in use by another process, or holds a run that was not asked to continue."""


# -- checkpoints ------------------------------------------------------------------------------------------

def save_checkpoint(checkpoint: dict, path) -> None:
    """Write to a temporary file beside `path`, then rename: the old file stays whole until the new one is."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_tensor_file(path, what: str = "checkpoint"):
    """torch.load(weights_only=True) of `path`, with every failure turned into one CheckpointError naming the
    file: tensors and plain Python values only, so loading cannot run code from the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file (train.py writes <out_dir>/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist (train.py writes <out_dir>/last.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): a copy that did not finish?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"{what} {path} holds objects other than tensors and plain values; it is refused, because "
                f"loading it would run code from the file") from None
        raise CheckpointError(f"{what} {path} is not a file torch.save wrote ({error})") from None
    except Exception as error:  # truncated zip, text file, another format: all mean "not readable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{what} {path} cannot be read ({type(error).__name__}: {reason}); is it cut "
                              f"short, or another kind of file?") from None


def load_checkpoint(path) -> dict:
    """A checkpoint written by train.py, as a dict; a CheckpointError naming the file for anything else."""
    checkpoint = read_tensor_file(path)
    if isinstance(checkpoint, dict) and "vop_settings" in checkpoint and "vop_config" not in checkpoint:
        checkpoint["vop_config"] = checkpoint.pop("vop_settings")  # written before VoPConfig existed
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a checkpoint written by train.py: it lacks {missing} (found {found})")
    return checkpoint


def vop_config_of(checkpoint: dict) -> VoPConfig:
    return VoPConfig(**checkpoint["vop_config"])


# -- resuming ---------------------------------------------------------------------------------------------

# What identifies a run; resume refuses a difference in any of them. Everything else (device, workers,
# precision, logging, evaluation batch) may change between the interrupted run and its continuation.
RUN_IDENTITY = ("backbone_sha256", "activation", "data", "data_root", "train_split", "test_split", "train_items",
                "batch_size", "num_frames", "epochs", "steps_per_epoch", "lr", "weight_decay", "warmup",
                "grad_clip", "seed", "one_caption_per_video", "frame_store", "vop")


def resume_problems(saved: dict, current: dict) -> list[str]:
    """Each difference between the saved run's identity and the current one, as 'name: saved X, now Y'."""
    problems = []
    for key in RUN_IDENTITY:
        if saved.get(key) != current.get(key):
            problems.append(f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}")
    return problems


# -- the run's folder -------------------------------------------------------------------------------------

class RunFolder:
    """An output folder held by one process: `out_dir/run.lock` names the process that holds it.

    A second process is refused; a lock whose process no longer runs (a crash, a killed job) is cleared with
    a note. Use as a context manager; only one process of a torchrun job (rank 0) takes the lock.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.lock = self.out_dir / "run.lock"
        self.held = False

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._clear_stale_lock()
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return self
        raise RunFolderError(f"could not take the lock {self.lock}; another process keeps taking it")

    def __exit__(self, *exc_info):
        if self.held:
            self.lock.unlink(missing_ok=True)
            self.held = False
        return False

    def _clear_stale_lock(self) -> None:
        try:
            pid_text, host = self.lock.read_text().split()[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            pid, host = None, None  # unreadable or half-written: treat as stale
        if pid is not None:
            if host != socket.gethostname():
                raise RunFolderError(f"{self.out_dir} is in use by process {pid} on {host} (lock {self.lock}); if "
                                     f"that run is over, delete the lock file, or choose another --out-dir")
            if _process_exists(pid):
                raise RunFolderError(f"{self.out_dir} is in use by another run (process {pid}); wait for it to "
                                     f"finish, or choose another --out-dir")
        print(f"note: removing the lock {self.lock} left by process {pid}, which is no longer running",
              file=sys.stderr)
        self.lock.unlink(missing_ok=True)

    def existing_run(self) -> list[str]:
        """The files of an earlier run that trained in this folder (a run that stopped before training, e.g. on
        an unreadable test video, leaves only lists, which do not count)."""
        return [name for name in RUN_EVIDENCE if (self.out_dir / name).exists()]

    def clear(self) -> None:
        """--overwrite: remove an earlier run's files (not the probe or frame caches, which stay valid)."""
        for name in RUN_FILES:
            (self.out_dir / name).unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
