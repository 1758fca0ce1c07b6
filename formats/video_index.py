"""A search index on disk: the embeddings of a collection of videos, which video each belongs to, and which model
made them. Skip on a first reading: search.py says what an index is for; this module only keeps one safely.

The files of an index named `my_videos.index`:

    my_videos.index               the commit point, replaced whole at every commit (files.atomic_write): a NumPy
                                  .npz (np.load(allow_pickle=False) reads it; nothing in it runs code) with
        header                    JSON as UTF-8 bytes: the format, the model's fingerprint and how to load it,
                                  the embedding size E, the embeddings file's name, the unreadable videos
        path_bytes, path_ends     the N videos' paths, file-system encoded and concatenated; (N,) int64 ends
        sizes, mtimes_ns          (N,) int64 each; a size of -1 marks a dead row (its video changed or gone)
        norms                     (N,) float32: each row's length as stored (1 +- 1e-4 after float16
                                  rounding); scores divide by it, so they are cosines. A length that is not
                                  finite marks a row with a NaN or inf: never ranked, embedded again by the
                                  next update
    my_videos.index.<token>.f16   the embeddings: (rows, E) float16, row-major, no header, memory-mapped on
                                  open; row i is the video of table row i; rows past N are not committed
    my_videos.index.skipped.txt   the videos that could not be read, one per line with why (the bytes of a
                                  name that are not UTF-8 as \\xNN escapes)
    my_videos.index.lock          held (flock) by the one process that updates the index

Row i of the embeddings is video i of the table; a video that changes gets a new row and its old one dies; dead
rows are removed at the end of every update that completes. A kill at any moment leaves the last commit whole:
new rows are appended to the embeddings file and made durable (fsync) before the commit that counts them, and
the rows an interrupted update appended after its last commit are cut off by the next one. Removing dead rows
writes a new embeddings file under a new token, commits it, and only then deletes the old file.
"""
import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import stat
import time
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError
from utils.files import WRITE_ERRNOS, WriteError, atomic_write, printable, remove_leftover_temporaries

FORMAT = 1
COMMIT_COST = 0.05  # commit when the time since the last commit is 1 / COMMIT_COST times what that commit took


class IndexFileError(UserError):
    """A file that is not a search index, a damaged one, or one of another format."""


class IndexModelError(UserError):
    """An index made by another model than the one asked to use it: two embedding spaces never mix."""


class IndexBusyError(UserError):
    """An index another process is updating."""


def skipped_list(path) -> Path:
    return Path(f"{path}.skipped.txt")


def _read(path: Path) -> tuple[dict, dict]:
    """(header, the table's arrays) of the index at `path`, every part checked: an IndexFileError otherwise."""
    if path.is_dir():
        raise IndexFileError(f"{path} is a folder, not an index file: pass a file name, e.g. my_videos.index")
    if not path.is_file():
        raise IndexFileError(f"no index at {path}: make one with `python search.py index FOLDER --index {path}`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ("header", "path_bytes", "path_ends", "sizes", "mtimes_ns", "norms")}
        header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
    except Exception:  # not a zip, a foreign .npz, bad JSON: all mean "not an index" (numpy's reason would mislead)
        raise IndexFileError(f"{path} is not a search index (the file `search.py index` writes): pass the index "
                             f"you made, or a new --index name to make one") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise IndexFileError(f"{path} is an index of format {found!r}; this code reads format {FORMAT}: index "
                             f"the videos again into a new --index")
    rows = len(arrays["sizes"])
    if not (len(arrays["path_ends"]) == len(arrays["mtimes_ns"]) == len(arrays["norms"]) == rows
            and (rows == 0 or arrays["path_ends"][-1] == len(arrays["path_bytes"]))
            and isinstance(header.get("embedding_size"), int) and isinstance(header.get("embeddings_file"), str)):
        raise IndexFileError(f"{path}: its table is damaged (lengths do not agree); index again into a new --index")
    if not embeddings_file_pattern(path).fullmatch(header["embeddings_file"]):
        # Only a file of this index, beside it, is ever read, cut short or deleted: never one a header names elsewhere
        raise IndexFileError(f"{path}: its header names the embeddings file {header['embeddings_file']!r}, which is "
                             f"not one of this index's own files ({path.name}.<8 hex digits>.f16 beside it): the "
                             f"index is damaged or was renamed without its files; index again into a new --index")
    return header, arrays


def embeddings_file_pattern(path: Path) -> re.Pattern:
    """The names of the embeddings files of the index at `path`: `<index name>.<8 hex digits>.f16`."""
    return re.compile(re.escape(Path(path).name) + r"\.[0-9a-f]{8}\.f16")


def _map_embeddings(path: Path, rows: int, size: int) -> np.ndarray:
    """The first `rows` rows of the embeddings file, (rows, E) float16, memory-mapped copy-on-write: pages are
    read when used, and the array is writable (for torch.from_numpy) without ever writing the file."""
    if rows == 0:
        return np.zeros((0, size), np.float16)
    if not path.is_file() or path.stat().st_size < rows * size * 2:
        raise IndexFileError(f"{path} is missing or shorter than the {rows} rows its index counts: the index is "
                             f"damaged; index the videos again into a new --index")
    return np.memmap(path, np.float16, mode="c", shape=(rows, size))


class VideoIndex:
    """An index opened for searching. `embeddings` (N, E) float16 memory-mapped; per row, its video's path
    (`video_path(row)`), its length (`norms` (N,)), whether it is live (`live` (N,) bool) and whether its
    embedding is damaged (`damaged` (N,) bool: live, but its length is not finite). `header` holds the rest."""

    def __init__(self, path):
        self.path = Path(path).expanduser().absolute()
        for attempt in range(3):  # an update that removed dead rows may delete the file we just read of
            self.header, table = _read(self.path)
            self.path_bytes, self.path_ends = table["path_bytes"], table["path_ends"]
            self.sizes, self.mtimes_ns, self.norms = table["sizes"], table["mtimes_ns"], table["norms"]
            try:
                self.embeddings = _map_embeddings(self.path.parent / self.header["embeddings_file"],
                                                  len(self.sizes), self.header["embedding_size"])
                break
            except IndexFileError:
                if attempt == 2:
                    raise
                time.sleep(0.1)
        self.live = self.sizes >= 0  # (N,)
        # (N,) live rows that cannot be ranked: a NaN or inf in the row makes its length NaN or inf (0: all zeros)
        self.damaged = self.live & ~(np.isfinite(self.norms) & (self.norms > 0))

    def __len__(self) -> int:
        """The videos in the index (live rows)."""
        return int(self.live.sum())

    def video_path(self, row: int) -> str:
        start = int(self.path_ends[row - 1]) if row else 0
        return os.fsdecode(self.path_bytes[start:int(self.path_ends[row])].tobytes())

    def encoded_paths(self) -> list[bytes]:
        """Every row's path as the bytes the file system gave (os.fsencode), in row order."""
        ends = self.path_ends.tolist()
        return [self.path_bytes[start:end].tobytes() for start, end in zip([0] + ends[:-1], ends)]

    def check_model(self, fingerprint: str, fix: str) -> None:
        """Refuse a model whose fingerprint is not the one that made this index, in one line ending in `fix`."""
        if self.header["fingerprint"] != fingerprint:
            made_by = self.header["model"].get("description", "another model")
            raise IndexModelError(f"{self.path} was made by another model ({made_by}), and two models' embeddings "
                                  f"never mix: {fix}")


@contextlib.contextmanager
def _locked(path: Path):
    """Hold `<index>.lock` (flock: released by the kernel when the process ends, however it ends, so a killed
    update never leaves a stale lock); another process is refused at once."""
    lock_path = Path(f"{path}.lock")
    handle = open(lock_path, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(f"{path} is being updated by another process (it holds {lock_path}); wait for it "
                                 f"to finish") from None
        yield
    finally:
        handle.close()


class IndexWriter:
    """The one process that updates an index (rank 0 under torchrun): `plan` what to embed, `add` each batch,
    `skip` unreadable videos, `commit_if_due`, and `finish`. Use as a context manager (it holds the lock).

    `model` is what the header keeps about the model: {"fingerprint": ..., "description": ..., "source": how to
    load it or None, "num_frames", "image_size"}; an existing index made with another fingerprint is refused."""

    def __init__(self, path, model: dict, embedding_size: int, precision: str = "fp32"):
        self.path = Path(path).expanduser().absolute()
        self.model, self.embedding_size, self.precision = model, embedding_size, precision
        self._lock, self.handle = None, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _locked(self.path)
        self._lock.__enter__()
        try:
            self._open()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info):
        try:
            if self.handle is not None:
                self.handle.close()  # flushes rows added since the last commit, which a full disk refuses
        except OSError as error:
            if exc_info[0] is None:  # rows no commit counts are cut off by the next update: nothing is lost
                self._write_failed(self.embeddings_file, error)
            # else the error that ended the update (a WriteError saying what is kept) is the one to report
        finally:
            self.handle = None
            self._lock.__exit__(*exc_info)
        return False

    def _open(self) -> None:
        remove_leftover_temporaries(self.path.parent)  # of commits a killed update was writing
        self.paths, self.encoded, self.sizes, self.mtimes_ns, self.norms = [], [], [], [], []  # the table, by row
        self.unreadable = {}  # path -> (size, mtime_ns, why), the videos that could not be read
        self.notes = []
        if self.path.exists():
            index = VideoIndex(self.path)
            index.check_model(self.model["fingerprint"], "pass a new --index to index with this model")
            if index.header["embedding_size"] != self.embedding_size:
                raise IndexFileError(f"{self.path} holds {index.header['embedding_size']}-d embeddings, not this "
                                     f"model's {self.embedding_size}: pass a new --index")
            if index.header.get("precision", self.precision) != self.precision:
                self.notes.append(f"note: {self.path} was embedded with --precision {index.header['precision']}, "
                                  f"these videos with {self.precision} (embeddings differ by about 1e-3)")
            self.embeddings_file = self.path.parent / index.header["embeddings_file"]
            if self.embeddings_file.is_symlink():  # it is cut short and appended to: never a file elsewhere
                raise IndexFileError(f"{self.embeddings_file} is a symbolic link, not the index's own file: the "
                                     f"index is damaged; index again into a new --index")
            self.encoded = index.encoded_paths()
            self.paths = [os.fsdecode(encoded) for encoded in self.encoded]
            self.sizes, self.mtimes_ns = index.sizes.tolist(), index.mtimes_ns.tolist()
            self.norms = index.norms.tolist()
            self.unreadable = {path: tuple(entry) for path, *entry in index.header.get("unreadable", [])}
            with open(self.embeddings_file, "r+b") as handle:  # cut off the rows appended after the last commit
                handle.truncate(len(self.paths) * self._row_bytes)
        else:
            self.embeddings_file = self._new_embeddings_file()
            self.commit()  # from now on the index opens, whatever happens
        self._remove_other_embeddings_files()
        self.handle = open(self.embeddings_file, "r+b")
        self.handle.seek(0, os.SEEK_END)
        self.last_commit, self.commit_seconds = time.monotonic(), 0.0

    @property
    def _row_bytes(self) -> int:
        return self.embedding_size * 2  # float16

    def _new_embeddings_file(self) -> Path:
        path = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.f16")
        path.touch()
        return path

    def _remove_other_embeddings_files(self) -> None:
        """Embeddings files no commit names: left by a kill while dead rows were being removed."""
        ours = embeddings_file_pattern(self.path)
        for other in self.path.parent.iterdir():  # not glob: an index named v[1].index is not a pattern
            if other != self.embeddings_file and ours.fullmatch(other.name):
                other.unlink(missing_ok=True)

    # -- what to embed ------------------------------------------------------------------------------------

    def plan(self, found: dict) -> tuple[list, dict]:
        """(the videos to embed, as [(path, (size, mtime_ns))], counts) for the videos `found` now ({path: (size,
        mtime_ns)}, from the folders asked for). Every video already in the index is checked too, under
        whatever folder it was found: a changed one is embedded again, and so is one whose embedding is damaged
        (its length is not finite), a gone one is dropped (its row dies)."""
        counts = dict.fromkeys(("new", "changed", "gone", "unchanged", "unreadable"), 0)
        todo, indexed = [], set()
        for row, path in enumerate(self.paths):
            if self.sizes[row] < 0:
                continue
            stat = found[path] if path in found else _stat(path)
            if stat is None:
                counts["gone"] += 1
                self.sizes[row] = -1
            elif stat != (self.sizes[row], self.mtimes_ns[row]) or not 0 < self.norms[row] < math.inf:
                # changed, or its embedding is damaged (a NaN or inf in it: never ranked): embedded again
                counts["changed"] += 1
                self.sizes[row] = -1
                todo.append((path, stat))
            else:
                counts["unchanged"] += 1
            indexed.add(path)
        for path, stat in found.items():
            if path in indexed:
                continue
            known = self.unreadable.get(path)
            if known is not None and tuple(known[:2]) == stat:
                counts["unreadable"] += 1  # failed before and has not changed since: not read again
                continue
            self.unreadable.pop(path, None)
            counts["new"] += 1
            todo.append((path, stat))
        for path in [path for path in self.unreadable if path not in found and _stat(path) is None]:
            del self.unreadable[path]
        return todo, counts

    # -- writing ------------------------------------------------------------------------------------------

    def add(self, paths: list, stats: list, embeddings: torch.Tensor) -> None:
        """Append videos and their embeddings (B, E) (float32, L2-normalised); they count from the next commit."""
        rows = embeddings.to(torch.float16)  # (B, E)
        try:
            self.handle.write(rows.numpy().tobytes())
        except OSError as error:
            self._write_failed(self.embeddings_file, error)
        norms = rows.float().norm(dim=1).tolist()
        encoded = [os.fsencode(path) for path in paths]
        self.norms += norms  # the table's columns grow one after the other: `commit` keeps the rows all have
        self.paths += paths
        self.encoded += encoded
        self.sizes += [size for size, _ in stats]
        self.mtimes_ns += [mtime_ns for _, mtime_ns in stats]

    def skip(self, path: str, stat: tuple, why: str) -> None:
        self.unreadable[path] = (*stat, why)

    def commit_if_due(self) -> None:
        """Commit when the time since the last commit is long against what a commit costs (COMMIT_COST)."""
        if time.monotonic() - self.last_commit >= self.commit_seconds / COMMIT_COST:
            self.commit()

    def commit(self) -> None:
        """Make everything added so far durable and count it: the embeddings first, then the table naming them."""
        started = time.monotonic()
        rows = min(map(len, (self.norms, self.paths, self.encoded, self.sizes, self.mtimes_ns)))
        for column in (self.norms, self.paths, self.encoded, self.sizes, self.mtimes_ns):
            del column[rows:]  # a stop in the middle of `add` leaves some columns a batch longer: not counted
        if self.handle is not None:
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            except OSError as error:
                self._write_failed(self.embeddings_file, error)
        header = {"format": FORMAT, "written_by": "search.py", "fingerprint": self.model["fingerprint"],
                  "model": self.model, "embedding_size": self.embedding_size, "precision": self.precision,
                  "embeddings_file": self.embeddings_file.name,
                  "unreadable": [[path, *entry] for path, entry in sorted(self.unreadable.items())]}
        with atomic_write(self.path) as handle:
            np.savez(handle, header=np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8),
                     path_bytes=np.frombuffer(b"".join(self.encoded), np.uint8),
                     path_ends=np.cumsum([len(encoded) for encoded in self.encoded], dtype=np.int64),
                     sizes=np.array(self.sizes, np.int64), mtimes_ns=np.array(self.mtimes_ns, np.int64),
                     norms=np.array(self.norms, np.float32))
        self._write_skipped_list()
        self.last_commit, self.commit_seconds = time.monotonic(), time.monotonic() - started

    def _write_skipped_list(self) -> None:
        listing = skipped_list(self.path)
        if not self.unreadable:
            listing.unlink(missing_ok=True)
            return
        with atomic_write(listing, "w", encoding="utf-8") as handle:
            handle.write(printable(f"# videos search.py could not read for {self.path.name}; fixed or re-encoded, "
                                   f"the next `search.py index` reads them again\n"))
            for path, (_, _, why) in sorted(self.unreadable.items()):
                handle.write(printable(f"{path}\t{why}\n"))  # a name that is not UTF-8 with \xNN escapes

    def finish(self) -> None:
        """The end of a complete update: commit, then remove the dead rows (a new embeddings file, committed)."""
        self.commit()
        if any(size < 0 for size in self.sizes):
            self._remove_dead_rows()

    def _remove_dead_rows(self) -> None:
        """Copy the live rows into a new embeddings file, commit the table that names it, delete the old file.
        Interrupted anywhere, the last commit stays whole (an uncommitted new file is removed next time)."""
        keep = np.flatnonzero(np.array(self.sizes, np.int64) >= 0)  # (kept,)
        old_file = self.embeddings_file
        old = np.memmap(old_file, np.float16, mode="r", shape=(len(self.sizes), self.embedding_size))
        new_file = self._new_embeddings_file()
        try:
            with open(new_file, "r+b") as handle:
                for start in range(0, len(keep), 65536):
                    handle.write(np.ascontiguousarray(old[keep[start:start + 65536]]).tobytes())
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            new_file.unlink(missing_ok=True)
            self._write_failed(new_file, error)
        del old
        self.paths, self.encoded = [self.paths[row] for row in keep], [self.encoded[row] for row in keep]
        self.sizes, self.mtimes_ns = [self.sizes[row] for row in keep], [self.mtimes_ns[row] for row in keep]
        self.norms = [self.norms[row] for row in keep]
        self.handle.close()
        self.embeddings_file = new_file
        self.handle = None  # the commit below names the new file; nothing is appended after it
        self.commit()
        old_file.unlink(missing_ok=True)
        self.handle = open(self.embeddings_file, "r+b")
        self.handle.seek(0, os.SEEK_END)

    def _write_failed(self, path: Path, error: OSError):
        if error.errno not in WRITE_ERRNOS:
            raise error
        raise WriteError(f"could not write {path}: {error.strerror}; {self.path} keeps what its last commit "
                         f"holds: free some space (or fix the permission) and run the same command again") from None


def _stat(path: str) -> tuple | None:
    """(size, mtime_ns) of a file, or None if it is gone (or is now a folder)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return None if stat.S_ISDIR(status.st_mode) else (status.st_size, status.st_mtime_ns)
