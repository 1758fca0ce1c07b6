"""Files written whole or not at all, and torch files read without running code. Skip on a first reading.

- `atomic_write(path)`: write to a temporary file beside `path`, then rename it over `path` (atomic on POSIX):
  a crash, a full disk or a kill never leaves half a file, and the previous version stays whole until the new
  one is. The temporary is named `<name>.<host>.<pid>.<random>.tmp` (`temporary_path`), so
  `remove_leftover_temporaries` can tell the ones a dead process of this machine left behind (a SIGKILL
  mid-write) from those a live writer, here or on another machine sharing the folder, is still writing; it
  removes nothing else (a user's own notes.tmp stays).
- `read_torch_file(path)`: `torch.load(weights_only=True)` and nothing else, so a crafted pickle is refused,
  never executed; every failure is one error naming the file.
"""
import contextlib
import errno
import os
import pickle
import hashlib
import re
import secrets
import socket
import time
from pathlib import Path

from utils.errors import UserError

HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]  # which machine wrote a temporary
TEMPORARY = re.compile(r"\.([0-9a-f]{6})\.(\d+)\.[0-9a-f]{8}\.tmp$")  # <name>.<host>.<pid>.<random>.tmp
STALE_TEMPORARY_SECONDS = 3600  # a temporary of ours this old is left over, whoever wrote it (another machine)


class WriteError(UserError):
    """A file that could not be written (no space, no permission); the previous version, if any, is intact."""


# What a failed write looks like: no space, over quota, a file too large (ulimit -f), no permission, read-only.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """`with atomic_write(path) as handle: ...` writes `path` whole or not at all (see the module docstring).
    A failed write (no space, no permission) raises WriteError naming `path` and saying whether its previous
    version is intact; no temporary is left behind, whatever fails."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(f"could not write {path}: {error.strerror}{_previous(path)}") from None
    except RuntimeError as error:  # torch.save reports a failed write (a full disk) as a RuntimeError
        if not any(sign in str(error) for sign in ("write", "unexpected pos")):
            raise
        raise WriteError(f"could not write {path}: the disk is full or refused the write{_previous(path)}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def printable(text: str) -> str:
    """`text` (a file name, or a message naming one) as text every output can hold: the bytes of a name that are
    not UTF-8, which os.fsdecode keeps as lone surrogates, become \\xNN escapes (b"caf\\xe9.mp4" prints as
    caf\\xe9.mp4); any other text is returned as it is."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate os.fsdecode never makes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _previous(path: Path) -> str:
    return "; its previous version is intact" if path.exists() else ""


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes `path` before renaming it: `<name>.<host>.<pid>.<random>.tmp` beside it."""
    return path.with_name(f"{path.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_leftover_temporaries(folder) -> int:
    """Remove the temporaries of `atomic_write` in `folder` that a process of this machine which no longer runs
    left behind, or that are over an hour old (written elsewhere); returns how many. A live writer's temporary
    stays, and so does every other file."""
    removed = 0
    for temporary in Path(folder).glob("*.tmp") if Path(folder).is_dir() else ():
        match = TEMPORARY.search(temporary.name)
        if match is None:
            continue  # not ours
        try:
            dead = match.group(1) == HOST and not process_exists(int(match.group(2)))
            if dead or time.time() - temporary.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                temporary.unlink()
                removed += 1
        except OSError:
            pass  # renamed or removed by its writer meanwhile
    return removed


def process_exists(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` runs: it exists and is not a zombie (a process that ended and that its parent has
    not reaped yet), and, given `started` (its `process_start` when it was seen), it is that process, not a
    later one that reuses the PID."""
    fields = _process_stat(pid)
    if fields is not None:
        if fields[0] in ("Z", "X"):  # ended; only the exit status waits for its parent
            return False
    else:  # no /proc entry we may read: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, under another user
            pass
    return started is None or started == process_start(pid)


def process_start(pid: int) -> str:
    """When process `pid` started, as the kernel counts it (clock ticks since boot, with this boot's id), or
    "-" where /proc does not tell: a reused PID, or one after a reboot, gives another value."""
    fields = _process_stat(pid)
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return f"{handle.read().strip()}/{fields[19]}"  # field 22 of the stat line: starttime
    except (OSError, IndexError, TypeError):
        return "-"


def _process_stat(pid: int) -> list | None:
    """The fields of /proc/<pid>/stat after the command name (the state first), or None where there are none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def read_torch_file(path, error=UserError, what: str = "file"):
    """`torch.load(path, weights_only=True)` on the CPU: tensors and plain Python values only, so loading cannot
    run code from the file. Every failure is one `error` naming the file."""
    import torch  # here, so that the video workers that import this module do not pay for torch

    path = Path(path).expanduser()
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise error(f"{what} {path} is empty (0 bytes): an interrupted copy or download?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as failure:
        found = re.search(r"GLOBAL (\S+)", str(failure)) or re.search(r"(Unsupported operand \d+)", str(failure))
        if found or "weights only" in str(failure).lower():
            asked = f" (it asks for {found.group(1)})" if found else ""
            raise error(f"{what} {path} holds objects other than tensors and plain values{asked}; it is refused, "
                        f"because loading it would run code from the file") from None
        raise error(f"{what} {path} is not a file torch.save wrote ({failure})") from None
    except Exception as failure:  # truncated zip, text file, another format: all mean "not readable"
        reason = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        raise error(f"{what} {path} cannot be read ({type(failure).__name__}: {reason}); is it cut short, or "
                    f"another kind of file?") from None
