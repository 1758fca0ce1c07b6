"""The frame store: decode each video once per run, keep what later visits need (skip on a first reading).

Why. Taking 12 frames of a 15 s, 30 fps, 320x240 H.264 clip costs about 80 ms of one core, because every frame
up to the last wanted one is decoded; the paper's MSR-VTT-9k run visits each training video 100 times (20
captions x 5 epochs). A visit to the store costs about 10 ms: 12 JPEG decodes, the crop, the normalisation
(benchmarks/bench_data.py).

What it keeps, per video file (path, size, mtime) and sampling settings (F frames, input side R):
- evaluation: the F segment middles after CLIP's resize + center crop (data.resize_center_crop), R x R, as
  lossless PNG. Evaluation frames from the store are bit-identical to decoding the video.
- training: for each of the F segments (data.segment_edges, the frames training draws from), C candidate frames
  (default 4): the middles of the segment's C sub-segments (`training_candidates`). JPEG, quality 90, full
  chroma resolution (4:4:4); a frame whose shorter side exceeds ceil(sqrt(2) * R) (317 for R = 224) is first
  downscaled to that, so that the smallest crop of the training augmentation (half the area) still has R
  pixels a side. MSR-VTT's 320x240 frames are kept at their size.

How training with the store differs from decoding every visit:
1. A segment's frame is drawn among its C candidates instead of among all its frames (about 37 for F = 12 on
   a 15 s, 30 fps clip). The draw keeps what the random frame is for, a different moment of each segment on
   each visit, at a granularity of 1/C of a segment (0.3 s here; every frame is within 0.16 s of a
   candidate, and frames 1/30 s apart are nearly the same image to CLIP). A video has C^F = 4^12 = 16.8
   million frame combinations, so its 100 visits practically never repeat one (and the crop differs anyway).
2. The candidates went through JPEG once (PSNR 41 dB on testsrc2 clips; mean error under 1 level of 255).
3. Frames larger than sqrt(2) * R on their shorter side are resized once before the random crop.
4. A video shorter than F frames stores its F evenly spread frames as every candidate, so each visit sees the
   same frames (decoding draws, for each segment, any frame it overlaps).
The crop, flip and every random draw are as without the store, from (seed, epoch, item) alone.

On disk: DIR/<kind>-<settings>/<sha1 of "path|size|mtime_ns">.frames, the settings including the version of
the sampling rule (data.SAMPLER_VERSION), so frames picked by another rule are rebuilt, never reused; each file
is the magic line, an 8-byte header length, a JSON header (the key, candidate table, byte offsets, each image's
CRC-32) and the encoded images. Safety: each entry is written to a temporary file in its folder and renamed
(os.replace, atomic), so a reader sees a whole entry or none; two processes building the same entry write the
same bytes and the last rename wins; a crash leaves at most a temporary file, never read and removed by a later
build. An entry that is not what was written (cut short, another file's, an image overwritten in place, an
image that does not decode or has another size than its settings say) is never used: it is rebuilt from the
video, with a warning naming it (a build counts those it finds). A build first checks that the store can be
written and has room for what it will add, before decoding anything; a write that fails midway (a full disk)
stops it with one line, leaving no partial file. Each frame is shrunk as it is decoded, so a 4000x3000 video is
never held whole. A changed video gets a new entry; delete DIR to reclaim the space of old ones.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from typing import Callable, NamedTuple
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.files import WriteError, atomic_write, remove_leftover_temporaries
from utils.progress import Progress
from formats.video_io import READ_ERRORS, VideoReadError, decode_frames, default_num_workers, map_in_processes

FORMAT = 1
MAGIC = b"VOPFRAMES1\n"
TRAINING_SIDE_PER_INPUT_SIDE = math.sqrt(2)  # stored shorter side, at most, in units of R (see above)


class FrameRule(NamedTuple):
    """Which frames a store keeps: data.py's sampling (data.FRAME_RULE). The store follows the rule, never
    picks frames of its own."""
    version: int  # of the sampling rule: entries made under another version are rebuilt, never reused
    evaluation_frames: Callable  # (video path, F, R) -> (F, R, R, 3) uint8: what evaluation decodes
    training_candidates: Callable  # (frames in the video, F, C) -> (F, C) frame indices, C per segment


class FrameStoreError(UserError):
    """A frame store that cannot be used: its path is a file, or it cannot be written (permission, space)."""


class DamagedEntry(Exception):
    """An entry that is not what was written: cut short, overwritten, or holding other images (says which)."""


class FrameStore:
    """A folder of per-video entries; the DataLoader workers of any number of runs may share it.

        store = FrameStore("frames/", data.FRAME_RULE)
        dataset = data.build_dataset(..., frame_store=store)
        store.build(dataset, num_workers=8)   # optional: otherwise each video is stored on its first visit
    """

    def __init__(self, root, rule: FrameRule, candidates: int = 4, jpeg_quality: int = 90):
        if candidates < 1:
            raise ValueError(f"FrameStore: candidates must be >= 1, got {candidates}")
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise FrameStoreError(f"frame store {self.root} is a file, not a folder: pass a folder to --frame-store "
                                  f"(it is made if missing)")
        self.rule, self.candidates = rule, candidates
        self.jpeg_quality = jpeg_quality
        self.damaged = 0  # damaged entries this process found and rebuilt (each also reported in a warning)
        self.unwritable_reported = False

    # -- what a dataset visit asks for --------------------------------------------------------------------

    def training_frames(self, video_path, num_frames: int, image_size: int, rng) -> np.ndarray:
        """One stored candidate per segment, drawn with `rng`: (F, H, W, 3) uint8 RGB (H, W as stored)."""
        choice = rng.integers(self.candidates, size=num_frames)  # (F,) which candidate of each segment

        def pick(header):
            return np.asarray(header["table"])[np.arange(num_frames), choice]  # (F,) image numbers

        return self._frames("train", video_path, num_frames, image_size, pick)

    def evaluation_frames(self, video_path, num_frames: int, image_size: int) -> np.ndarray:
        """The F segment middles after CLIP's resize + center crop: (F, R, R, 3) uint8 RGB, as decoding gives."""
        return self._frames("eval", video_path, num_frames, image_size, lambda header: np.arange(num_frames))

    # -- building ahead of training -----------------------------------------------------------------------

    def build(self, dataset, num_workers: int | None = None, rank: int = 0, world_size: int = 1,
              log=print) -> dict:
        """Store every video of a data.VideoTextDataset that is not stored yet, in parallel, printing progress
        and the store's size. Under torchrun each rank builds its share (videos rank::world_size); wait for
        all ranks (a barrier) before training. Videos that fail to decode are reported, not fatal; damaged
        entries (cut short, not whole) are rebuilt and counted. Before decoding anything, a store that cannot be
        written, or has no room for the entries to build (estimated from those it holds, or from its first ones),
        is a FrameStoreError naming it; a write that fails midway (a full disk) stops the build with one, leaving
        no partial file. Returns {"stored": videos now in the store, "built": built by this call, "failed":
        [(path, error)], "damaged": damaged entries rebuilt, "bytes": the store's size}."""
        if not dataset.train and dataset.augment:
            log("frame store: augmented evaluation frames are not stored; this dataset decodes every visit")
            return {"stored": 0, "built": 0, "failed": [], "damaged": 0, "bytes": self.size_bytes()}
        kind = "train" if dataset.train else "eval"
        folder = self._folder(kind, dataset.num_frames, dataset.image_size)
        remove_leftover_temporaries(folder)
        mine = list(dict.fromkeys(dataset.video_paths[rank::world_size]))  # unique, in order
        states = [self._entry_state(folder, path) for path in mine]  # "stored", "absent" or "damaged"
        todo = [path for path, state in zip(mine, states) if state != "stored"]
        jobs = [(self, kind, str(path), dataset.num_frames, dataset.image_size) for path in todo]
        num_workers = default_num_workers() if num_workers is None else num_workers
        parallel = num_workers > 1 and len(todo) >= 32  # a process pool costs about a second to start
        if todo:
            self._check_writable(folder)  # before decoding anything
            damaged = f" ({states.count('damaged')} of them damaged entries, rebuilt)" if "damaged" in states else ""
            log(f"frame store {folder}: {len(mine) - len(todo)} of {len(mine)} videos stored; decoding "
                f"{len(todo)}{damaged} with {num_workers if parallel else 1} process(es)")
        progress = Progress("frame store", len(jobs), "videos", enabled=bool(jobs) and rank == 0)  # on stderr

        results = []
        try:
            # An empty folder: the first entries, built here, tell how much room the others need.
            while len(results) < min(len(jobs), 8) and _typical_entry_bytes(folder) is None:
                results.append(_build_entry(jobs[len(results)]))
                progress.update(len(results))
            self._check_room(folder, len(jobs) - len(results))
            done, rest = len(results), jobs[len(results):]
            if parallel and len(rest) >= 32:  # a video on which FFmpeg crashes kills its process: reported as failed
                results += map_in_processes(_build_entry, rest, num_workers,
                                            on_result=lambda count, _: progress.update(done + count),
                                            on_crash=lambda job: (job[2], f"{job[2]}: the decoder crashed on it"),
                                            initializer=_init_build_worker)
            else:
                for job in rest:
                    results.append(_build_entry(job))
                    progress.update(len(results))
        except BaseException as error:  # a full disk (or Ctrl-C): stop now, leaving no partial entry behind
            remove_leftover_temporaries(folder)  # those of the workers stopped mid-write
            if not isinstance(error, WriteError):
                raise
            raise FrameStoreError(f"frame store {self.root}: {error}; the {len(jobs) - len(results)} videos still to "
                                  f"store need {_room_note(folder, len(jobs) - len(results))}: make room, or pass "
                                  f"another --frame-store") from None
        progress.finish()
        failed = [(path, error) for path, error in results if error]
        size = self.size_bytes()
        log(f"frame store {self.root}: {len(mine) - len(failed)} videos of this dataset stored; {size / 1e9:.2f} GB "
            f"on disk in all" + (f"; {len(failed)} failed to decode, e.g. {failed[0][1]}" if failed else ""))
        return {"stored": len(mine) - len(failed), "built": len(todo) - len(failed), "failed": failed,
                "damaged": states.count("damaged"), "bytes": size}

    def _check_writable(self, folder: Path) -> None:
        """A FrameStoreError naming the folder if a file cannot be made in it (permission, a read-only disk)."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise FrameStoreError(f"frame store {folder} cannot be written ({error.strerror or error}): fix its "
                                  f"permissions, or pass another --frame-store") from None

    @staticmethod
    def _check_room(folder: Path, count: int) -> None:
        """A FrameStoreError if `count` more entries, as large as those the folder holds, would not fit."""
        typical = _typical_entry_bytes(folder)
        if count and typical is not None and typical * count > shutil.disk_usage(folder).free:
            raise FrameStoreError(f"frame store {folder}: the {count} videos still to store need "
                                  f"{_room_note(folder, count)}: make room, or pass another --frame-store")

    def size_bytes(self) -> int:
        """Bytes on disk under the store's folder (every kind and setting, temporary files included)."""
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except OSError:
                    pass  # renamed or removed by another process meanwhile
        return total

    # -- entries ------------------------------------------------------------------------------------------

    def _folder(self, kind: str, num_frames: int, image_size: int) -> Path:
        if kind == "train":
            side = math.ceil(TRAINING_SIDE_PER_INPUT_SIDE * image_size)
            name = f"train-f{num_frames}-c{self.candidates}-side{side}-q{self.jpeg_quality}"
        else:
            name = f"eval-f{num_frames}-r{image_size}"
        name += f"-s{self.rule.version}-v{FORMAT}"
        return self.root / name

    def _entry_state(self, folder: Path, video_path) -> str:
        """"stored", "absent" (or of another version's layout) or "damaged" (cut short, malformed): the entry's
        header and size only; `_read` checks the images themselves."""
        try:
            entry, key = self._entry(folder, video_path)
            with open(entry, "rb") as handle:
                return "stored" if _parse_header(handle, key) is not None else "absent"
        except DamagedEntry:
            return "damaged"
        except OSError:
            return "absent"  # no entry yet, or a missing video: building it reports the error

    @staticmethod
    def _entry(folder: Path, video_path) -> tuple:
        """(entry file, key): the key names the video file's absolute path, size and modification time."""
        stat = os.stat(video_path)  # FileNotFoundError for a missing video, as decoding would raise
        key = f"{os.path.realpath(video_path)}|{stat.st_size}|{stat.st_mtime_ns}"
        return folder / f"{hashlib.sha1(key.encode()).hexdigest()}.frames", key

    def _frames(self, kind: str, video_path, num_frames: int, image_size: int, pick) -> np.ndarray:
        try:
            entry, key = self._entry(self._folder(kind, num_frames, image_size), video_path)
        except OSError as error:
            raise VideoReadError(f"{video_path}: cannot open video: {error.strerror or error}") from None
        try:
            frames = self._read(entry, key, pick, image_size if kind == "eval" else None)
            if frames is not None:
                return frames
        except DamagedEntry as damage:  # never used: rebuilt below, and reported
            self.damaged += 1
            print(f"warning: frame store entry {entry} of {video_path} {damage}; rebuilding it from the video "
                  f"({self.damaged} damaged entries rebuilt by this process)", file=sys.stderr, flush=True)
        # Not stored yet (or damaged): decode the video once, store it, use it.
        header, blobs = self._make_entry(kind, video_path, num_frames, image_size, key)
        try:
            self._write(entry, header, blobs)
        except WriteError as error:  # a store that cannot be written still serves the frames just decoded
            if not self.unwritable_reported:
                print(f"warning: {error}; the frame store is not filled, videos are decoded on every visit",
                      file=sys.stderr, flush=True)
                self.unwritable_reported = True
        return np.stack([_decode_image(blobs[int(i)]) for i in pick(header)])  # (F, H, W, 3)

    def _make_entry(self, kind: str, video_path, num_frames: int, image_size: int, key: str) -> tuple:
        """Decode the video and encode what its entry keeps. Returns (header, list of encoded images)."""
        if kind == "eval":  # each frame resized as it is decoded: a large video is never held whole
            frames = self.rule.evaluation_frames(video_path, num_frames, image_size)
            blobs = [_encode_image(frame, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]) for frame in frames]
            return {"format": FORMAT, "key": key, "kind": kind}, blobs
        sampled = {}

        def candidates(num_total: int) -> np.ndarray:  # (F * C,); decode_frames may call it again
            sampled["indices"] = self.rule.training_candidates(num_total, num_frames, self.candidates).reshape(-1)
            return sampled["indices"]

        side = math.ceil(TRAINING_SIDE_PER_INPUT_SIDE * image_size)  # each frame shrunk as it is decoded (see eval)
        frames = decode_frames(video_path, candidates, transform=lambda frame: _shrink(frame[None], side)[0])
        # Neighbouring candidates fall on the same frame in short videos: keep each frame once.
        unique, first, inverse = np.unique(sampled["indices"], return_index=True, return_inverse=True)
        frames = frames[first]  # (distinct, h, w, 3)
        quality = [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality,
                   cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        blobs = [_encode_image(frame, ".jpg", quality) for frame in frames]
        header = {"format": FORMAT, "key": key, "kind": kind, "frame_indices": unique.tolist(),
                  "table": inverse.reshape(num_frames, self.candidates).tolist()}  # (F, candidates) image numbers
        return header, blobs

    @staticmethod
    def _write(entry: Path, header: dict, blobs: list) -> None:
        """Write atomically: a temporary file in the same folder, renamed over the entry. The header keeps each
        image's offset and CRC-32, so that a reader knows an image overwritten in place."""
        offsets = np.concatenate([[0], np.cumsum([len(blob) for blob in blobs])]).tolist()
        checksums = [zlib.crc32(blob) for blob in blobs]
        header_bytes = json.dumps({**header, "offsets": offsets, "crc32": checksums}).encode()
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WriteError(f"could not write {entry.parent}: {error.strerror or error}") from None
        with atomic_write(entry) as handle:
            handle.write(MAGIC + len(header_bytes).to_bytes(8, "little") + header_bytes)
            for blob in blobs:
                handle.write(blob)

    @staticmethod
    def _read(entry: Path, key: str, pick, side: int | None = None):
        """The images `pick(header)` of the entry as (F, H, W, 3) uint8 RGB, or None if there is none (or one
        of another version's layout). DamagedEntry if the entry is not whole, or an image is not the one written
        (its CRC-32), does not decode, or is not `side` x `side` (evaluation entries)."""
        try:
            with open(entry, "rb") as handle:
                parsed = _parse_header(handle, key)
                if parsed is None:
                    return None
                header, data_start = parsed
                try:
                    numbers = [int(number) for number in pick(header)]
                except (IndexError, TypeError, ValueError):
                    raise DamagedEntry("has a malformed candidate table") from None
                frames = []
                for number in numbers:
                    if not 0 <= number < len(header["crc32"]):
                        raise DamagedEntry(f"has no image {number}")
                    begin, end = header["offsets"][number], header["offsets"][number + 1]
                    handle.seek(data_start + begin)
                    blob = handle.read(end - begin)
                    if zlib.crc32(blob) != header["crc32"][number]:
                        raise DamagedEntry(f"holds another image {number} than the one written (overwritten?)")
                    frame = _decode_image(blob)
                    if frame is None:
                        raise DamagedEntry(f"holds an image {number} that does not decode")
                    frames.append(frame)
        except OSError:
            return None  # gone meanwhile, or unreadable: decode the video
        shapes = {frame.shape for frame in frames}
        if len(shapes) > 1 or (side is not None and shapes != {(side, side, 3)}):
            raise DamagedEntry(f"holds images of {' and '.join(f'{h}x{w}' for h, w, _ in sorted(shapes))} pixels"
                               + (f", not {side}x{side}" if side is not None else ""))
        return np.stack(frames)  # (F, H, W, 3)


def _parse_header(handle, key: str):
    """(header, data offset) of the open entry of `key`; None for an entry of another version's layout;
    DamagedEntry for one that is cut short, grown, malformed or another video's."""
    if handle.read(len(MAGIC)) != MAGIC:
        raise DamagedEntry("is not a frame store entry (overwritten?)")
    size = os.fstat(handle.fileno()).st_size
    length = int.from_bytes(handle.read(8), "little")
    if len(MAGIC) + 8 + length > size:
        raise DamagedEntry("is cut short")
    try:
        header = json.loads(handle.read(length))
    except (ValueError, RecursionError):
        raise DamagedEntry("has a header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise DamagedEntry("has a header that is not a JSON object")
    if header.get("format") != FORMAT or "crc32" not in header:
        return None  # written by another version of this code: rebuilt, not damaged
    if header.get("key") != key:
        raise DamagedEntry(f"belongs to another video ({str(header.get('key'))[:200]})")
    offsets, checksums = header.get("offsets"), header.get("crc32")
    if not (isinstance(offsets, list) and isinstance(checksums, list) and len(offsets) == len(checksums) + 1
            and all(isinstance(n, int) for n in offsets + checksums) and offsets[0] == 0
            and all(a <= b for a, b in zip(offsets, offsets[1:]))):
        raise DamagedEntry("has a malformed header")
    data_start = len(MAGIC) + 8 + length
    if size != data_start + offsets[-1]:
        raise DamagedEntry("is cut short" if size < data_start + offsets[-1] else "is longer than written")
    return header, data_start


def _typical_entry_bytes(folder: Path) -> float | None:
    """The mean size of (up to 50 of) the folder's entries; None without any."""
    sizes = []
    for entry in itertools.islice(folder.glob("*.frames"), 50):
        try:
            sizes.append(entry.stat().st_size)
        except OSError:
            pass  # replaced meanwhile
    return sum(sizes) / len(sizes) if sizes else None


def _room_note(folder: Path, count: int) -> str:
    """'about 1.20 GB (0.50 GB are free there)' for `count` more entries like the folder's, where known."""
    typical = _typical_entry_bytes(folder)
    try:
        free = f" ({shutil.disk_usage(folder).free / 1e9:.2f} GB are free there)"
    except OSError:
        free = ""
    return (f"about {typical * count / 1e9:.2f} GB" if typical is not None else "more room") + free


def _encode_image(frame_rgb: np.ndarray, suffix: str, params: list) -> bytes:
    ok, encoded = cv2.imencode(suffix, cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {frame_rgb.shape} frame as {suffix}")
    return encoded.tobytes()


def _decode_image(blob: bytes) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB, or None if `blob` is not an image OpenCV decodes."""
    image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _shrink(frames: np.ndarray, max_short_side: int) -> np.ndarray:
    """Downscale (distinct, H, W, 3) uint8 frames so that the shorter side is at most `max_short_side` (antialiased
    bicubic, as the training crop resizes); smaller frames are returned as they are."""
    height, width = frames.shape[1:3]
    if min(height, width) <= max_short_side:
        return frames
    scale = max_short_side / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (distinct, 3, H, W) uint8
    return F.interpolate(video, size=size, mode="bicubic", antialias=True).permute(0, 2, 3, 1).contiguous().numpy()


def _init_build_worker() -> None:
    cv2.setNumThreads(1)  # one decode per process; the pool gives the parallelism
    torch.set_num_threads(1)


def _build_entry(job) -> tuple:
    """(video path, "" or the error naming it): store one video (a process pool runs this)."""
    store, kind, video_path, num_frames, image_size = job
    try:
        folder = store._folder(kind, num_frames, image_size)
        if store._entry_state(folder, video_path) != "stored":  # another process may have stored it meanwhile
            entry, key = store._entry(folder, video_path)
            header, blobs = store._make_entry(kind, video_path, num_frames, image_size, key)
            store._write(entry, header, blobs)
        return video_path, ""
    except READ_ERRORS as error:
        message = str(error)
        return video_path, message if video_path in message else f"{video_path}: {message}"
