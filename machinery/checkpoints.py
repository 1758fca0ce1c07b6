"""What a training run writes and reads back: its checkpoint, its folder, and whether it can be resumed.

Skip on a first reading: train.py saves the checkpoint that `save_checkpoint` writes and `load_checkpoint` reads
back; the rest keeps real runs safe.

- A checkpoint is a dict with a format version (`FORMAT`) and the fields of `FIELDS`, each checked on load: a
  checkpoint of another version, or with a missing or malformed field, is refused in one line naming the file,
  never half-used and never filled in with defaults.
- No file runs code: checkpoints are read with `torch.load(weights_only=True)` only (files.read_torch_file).
- Writes are atomic (files.atomic_write): a crash, a kill or a full disk never leaves half a checkpoint, and the
  previous one stays whole.
- A run owns its folder: `RunFolder` holds a lock file naming its process, refuses a second process, clears a
  lock whose process is gone, and refuses to start over a folder that holds a run unless told to resume it
  or overwrite it.
- `resume_problems` names every difference between the saved run and the one asked for that would change
  the run's meaning (backbone, data, batch, frames, schedule, model).
"""
import dataclasses
import os
import socket
import sys
from pathlib import Path

import torch

from utils.errors import UserError
from utils.files import atomic_write, process_exists, process_start, read_torch_file

FORMAT = 2  # the checkpoint layout below; another number is refused
RUN_EVIDENCE = ("last.pt", "log.jsonl")  # a folder holding either holds a run that trained
RUN_FILES = (*RUN_EVIDENCE, "skipped_videos.txt", "unreadable_test_videos.txt", "curves.png")  # a run's own files


class CheckpointError(UserError):
    """A checkpoint file that cannot be read safely, is not one of ours, or does not fit the run asked for."""


class RunFolderError(UserError):
    """An output folder that is in use by another process, or holds a run that was not asked to continue."""


# -- checkpoints ------------------------------------------------------------------------------------------

def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


# Every field of a checkpoint and what it must be.
FIELDS = {
    "format": ("the format version", lambda value: value == FORMAT),
    "config": ("train.py's settings (a dict)", lambda value: isinstance(value, dict)),
    "vop_config": ("the model's VoPConfig (a dict of its fields)", lambda value: isinstance(value, dict)),
    "run": ("what identifies the run (a dict)", lambda value: isinstance(value, dict)),
    "trainable": ("the trainable tensors (names -> tensors)", _is_tensor_dict),
    "optimizer": ("the optimizer's state (a dict)", lambda value: isinstance(value, dict)),
    "scaler": ("the GradScaler's state (a dict)", lambda value: isinstance(value, dict)),
    "step": ("the steps done (an integer >= 0)", _is_count),
    "history": ("the evaluations (a list of dicts)", lambda value: isinstance(value, list)
                and all(isinstance(entry, dict) for entry in value)),
    "replaced_videos": ("the count of replaced items (an integer >= 0)", _is_count),
}


def save_checkpoint(checkpoint: dict, path) -> None:
    """Write `checkpoint` (the FIELDS but `format`) atomically; a failed write raises files.WriteError, which
    says that the previous checkpoint is intact."""
    with atomic_write(path) as handle:
        torch.save({"format": FORMAT, **checkpoint}, handle)


def load_checkpoint(path, config_class) -> dict:
    """A checkpoint written by train.py, every field checked, its vop_config against `config_class` (vop.VoPConfig);
    a CheckpointError naming the file otherwise."""
    checkpoint = read_tensor_file(path)
    if not isinstance(checkpoint, dict) or not ({"trainable", "vop_config"} & set(checkpoint)):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (found {found})")
    if checkpoint.get("format") != FORMAT:
        written = f"format {checkpoint['format']!r}" if "format" in checkpoint else "an older format (no version)"
        raise CheckpointError(f"{path} is a checkpoint of {written}; this code reads format {FORMAT}: evaluate it "
                              f"with the version of this code that wrote it, or train again")
    for name, (what, valid) in FIELDS.items():
        if name not in checkpoint:
            raise CheckpointError(f"{path} lacks {name!r} ({what}): the file is damaged or not train.py's")
        if not valid(checkpoint[name]):
            raise CheckpointError(f"{path}: {name!r} must be {what}, got {_short(checkpoint[name])}")
    check_model_config(checkpoint, config_class, path)
    return checkpoint


def read_tensor_file(path) -> object:
    return read_torch_file(path, CheckpointError, "checkpoint")


def check_model_config(checkpoint: dict, config_class, path="the checkpoint") -> None:
    """The model's configuration as saved must fit `config_class` (vop.VoPConfig): every field present, no other,
    each valid."""
    saved = checkpoint["vop_config"]
    fields = {field.name for field in dataclasses.fields(config_class)}
    if set(saved) != fields:
        missing, unknown = sorted(fields - set(saved)), sorted(set(saved) - fields)
        differences = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has {', '.join(unknown)}, which this code's model config does not know"] if unknown else [])
        raise CheckpointError(f"{path}: its vop_config {' and '.join(differences)}: it was written by another "
                              f"version of this code")
    try:
        config_class(**saved)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its vop_config is not valid: {error}") from None


def _short(value) -> str:
    text = repr(value) if not torch.is_tensor(value) else f"a tensor of shape {tuple(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


# -- resuming ---------------------------------------------------------------------------------------------

# A run's identity (runs.run_identity) records these too, but they may change: the same weights (the same
# SHA-256) moved elsewhere or saved in another format are the same backbone. Everything outside the identity
# (device, workers, precision, logging, evaluation batch) may change between a stopped run and its continuation.
RECORDED_ONLY = ("backbone", "backbone_format")


def resume_problems(saved: dict, current: dict) -> list[str]:
    """Each difference between the saved run's identity and the current one, as 'name: saved X, now Y'."""
    keys = [*current, *(key for key in saved if key not in current)]
    return [f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}"
            for key in keys if key not in RECORDED_ONLY and saved.get(key) != current.get(key)]


# -- the run's folder -------------------------------------------------------------------------------------

class RunFolder:
    """An output folder held by one process: `out_dir/run.lock` names the process that holds it (its PID, host,
    and when it started, so that a PID reused after a reboot is not mistaken for the holder).

    A second process is refused; a lock whose process no longer runs (a crash, a killed job, a reboot) is
    cleared with a note. Use as a context manager; only one process of a torchrun job (rank 0) takes the lock.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.lock = self.out_dir / "run.lock"
        self.held = False
        self.created = False  # by this process: a run that fails before writing anything leaves no empty folder

    def __enter__(self):
        self.created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._clear_stale_lock()
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{os.getpid()} {socket.gethostname()} {process_start(os.getpid())}\n")
            self.held = True
            return self
        raise RunFolderError(f"could not take the lock {self.lock}; another process keeps taking it")

    def __exit__(self, exc_type=None, *exc_info):
        if self.held:
            self.lock.unlink(missing_ok=True)
            self.held = False
            left = {path.name for path in self.out_dir.iterdir()}
            if exc_type is not None and self.created and left <= {"video_probe.json"}:
                for name in left:  # nothing but a cache this failed start made: remove the folder it made
                    (self.out_dir / name).unlink(missing_ok=True)
                self.out_dir.rmdir()
        return False

    def _clear_stale_lock(self) -> None:
        try:
            pid_text, host, *started = self.lock.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            pid, host, started = None, None, []  # unreadable or half-written: treat as stale
        if pid is not None:
            if host != socket.gethostname():
                raise RunFolderError(f"{self.out_dir} is in use by process {pid} on {host} (lock {self.lock}); if "
                                     f"that run is over, delete {self.lock}, or choose another --out-dir")
            same_process = process_exists(pid, started[0] if started else None)
            if same_process:
                raise RunFolderError(f"{self.out_dir} is in use by another run (process {pid}); wait for it to "
                                     f"finish, or choose another --out-dir. If no run is using it, delete "
                                     f"{self.lock}")
        print(f"note: removing the lock {self.lock} left by process {pid}, which is no longer running",
              file=sys.stderr)
        self.lock.unlink(missing_ok=True)

    def settle_earlier_run(self, resume: str | None, overwrite: bool, trains: bool, log=print) -> str | None:
        """An earlier run that trained in this folder is continued (--resume), cleared (--overwrite, or --resume
        auto over a run that never saved), or the reason to refuse the folder is returned (None: go ahead)."""
        earlier, checkpoint = self.existing_run(), self.out_dir / "last.pt"
        resuming_here = resume == "auto" or (resume and Path(resume).resolve() == checkpoint.resolve())
        if earlier and overwrite:
            log(f"--overwrite: deleting the earlier run's {', '.join(self.run_files())} in {self.out_dir}")
            self.clear()
        elif earlier and resume == "auto" and not checkpoint.is_file():
            log(f"--resume auto: {self.out_dir} holds no checkpoint (the earlier run stopped before its first "
                f"save): starting afresh, deleting its {', '.join(self.run_files())}")
            self.clear()
        elif earlier and not resuming_here and trains:
            return (f"{self.out_dir} holds an earlier run ({', '.join(earlier)}): pass --resume auto to continue it, "
                    f"--overwrite to start again from scratch, or another --out-dir")
        return None

    def existing_run(self) -> list[str]:
        """The files of an earlier run that trained in this folder (a run that stopped before training, e.g. on
        an unreadable test video, leaves only lists, which do not count)."""
        return [name for name in RUN_EVIDENCE if (self.out_dir / name).exists()]

    def run_files(self) -> list[str]:
        """The files of a run in this folder, all that `clear` deletes."""
        return [name for name in RUN_FILES if (self.out_dir / name).exists()]

    def clear(self) -> None:
        """--overwrite: remove an earlier run's files (not the probe or frame caches, which stay valid)."""
        for name in RUN_FILES:
            (self.out_dir / name).unlink(missing_ok=True)

