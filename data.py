"""Video-text data for VoP: turn the benchmarks' files into `(frames, caption)` items.

One job: given a dataset's annotation files and videos on disk, yield `{"video": (F, 3, S, S) float32,
"caption": str, "video_id": str}` items, sampled and normalised the way CLIP4Clip / X-Pool / VoP do it
(METHOD.md section 3). Four layers, each usable on its own:

1. `sample_frame_indices` - which frames: split the video into F equal segments, take each segment's middle
   frame (evaluation) or a random frame inside it (training).
2. `read_frames` - decode exactly those frames with OpenCV, surviving the lies real files tell (wrong frame
   count in the header, fps 0, truncated files, frames that fail to decode).
3. `video_transform` - resize / crop / flip / CLIP normalisation without torchvision.
4. `build_dataset` - the annotation layouts the community distributes (MSR-VTT, DiDeMo, ActivityNet, LSMDC,
   MSVD, a generic CSV) and a small synthetic "motion world" whose test set cannot be solved without frame
   order (`make_synthetic_world`).

Shapes: F frames, H x W decoded size, S the square model input size (224 for CLIP ViT-B).
An epoch is every (video, caption) pair once (180k pairs on MSR-VTT-9k, as in CLIP4Clip and X-Pool);
`one_caption_per_video=True` makes it every video once with one random caption.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

# OpenAI CLIP's preprocessing constants (clip/clip.py `_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv")

# Seeking with CAP_PROP_POS_FRAMES makes FFmpeg jump to the previous keyframe and decode forward from there,
# so each seek costs roughly a GOP of decoding plus a decoder flush. One sequential pass costs one decode per
# frame up to the last wanted one. So which wins depends on the keyframe interval, which OpenCV does not
# report. benchmarks/bench_data.py measures the cost of one seek in sequentially decoded frames: about a GOP.
# H.264 files (the benchmarks' MSR-VTT, DiDeMo, ... downloads) use x264's 250-frame GOP, where a seek costs
# ~100+ frames and the sequential pass was 3.4-6.3x faster for 12 frames of 15 s clips; OpenCV's own mp4v
# output has a 12-frame GOP, where seeking wins (README). We default to the long-GOP rule: seek only when
# the pass would decode more than this many frames per wanted frame; pass strategy="seek" for short-GOP files.
SEEK_BREAK_EVEN_FRAMES_PER_WANTED = 150


class VideoReadError(RuntimeError):
    """A video file that OpenCV cannot open or from which no frame decodes."""


class AnnotationError(ValueError):
    """An annotation file that does not match its documented layout."""


# ----------------------------------------------------------------------------------------------------------
# 1. Which frames


def sample_frame_indices(num_total: int, num_frames: int, mode: str = "uniform", rng=None) -> np.ndarray:
    """Indices of `num_frames` frames out of `num_total`, one per equal segment.

    Segment k covers the time span [k * num_total / num_frames, (k + 1) * num_total / num_frames); frame i
    covers [i, i + 1). "uniform" takes the frame under the segment's midpoint (deterministic, evaluation);
    "rand" takes a frame that overlaps the segment, uniformly at random (training). With fewer frames than
    segments, neighbouring segments fall on the same frame, so frames repeat and the output keeps its length.
    Returns (num_frames,) int64, non-decreasing, each in [0, num_total).
    """
    if num_total < 1:
        raise ValueError(f"sample_frame_indices: the video has {num_total} frames; need at least 1")
    if num_frames < 1:
        raise ValueError(f"sample_frame_indices: num_frames must be >= 1, got {num_frames}")
    edges = np.linspace(0.0, num_total, num_frames + 1)  # (F + 1,) segment boundaries in frame units
    if mode == "uniform":
        middles = (edges[:-1] + edges[1:]) / 2  # (F,)
        indices = np.floor(middles).astype(np.int64)
    elif mode == "rand":
        rng = np.random.default_rng() if rng is None else rng
        first = np.floor(edges[:-1]).astype(np.int64)  # (F,) first frame overlapping each segment
        stop = np.maximum(np.ceil(edges[1:]).astype(np.int64), first + 1)  # (F,) one past the last
        indices = rng.integers(first, stop)  # (F,)
    else:
        raise ValueError(f"sample_frame_indices: mode must be 'uniform' or 'rand', got {mode!r}")
    return np.clip(indices, 0, num_total - 1)


# ----------------------------------------------------------------------------------------------------------
# 2. Decoding


def _bgr_to_rgb(frame_bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)  # (H, W, 3) uint8


def _read_image_as_video(path: Path, num_frames: int) -> np.ndarray:
    """A still image is a one-frame video: repeat it `num_frames` times. Returns (F, H, W, 3) uint8 RGB."""
    image_bgr = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR) if path.is_file() else None
    if image_bgr is None:
        raise VideoReadError(f"{path}: cannot read this image (missing or corrupt); check the file")
    return np.repeat(_bgr_to_rgb(image_bgr)[None], num_frames, axis=0)


def _open_capture(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        reason = "the file does not exist" if not path.exists() else (
            "it is not a video OpenCV's FFmpeg can open (corrupt, truncated before its index, or an unknown codec)")
        raise VideoReadError(f"{path}: cannot open video: {reason}. Check it with `ffprobe {path}`.")
    return capture


def _count_decodable_frames(path: Path) -> int:
    """Frame count by decoding, for files whose header gives none."""
    capture = _open_capture(path)
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


def _nearest_decoded(wanted: np.ndarray, decoded: dict) -> np.ndarray:
    """Stack, for each wanted index, the decoded frame whose index is nearest. Returns (F, H, W, 3) uint8."""
    available = np.array(sorted(decoded))  # (K,)
    frames = []
    for index in wanted:
        nearest = available[np.argmin(np.abs(available - index))]
        frames.append(decoded[int(nearest)])
    return np.stack(frames)


def _read_sequential(path: Path, wanted: np.ndarray):
    """One pass: grab() every frame up to the last wanted one, retrieve() only the wanted ones.

    Returns (frames (F, H, W, 3) uint8 RGB or None, number of frames grabbed, whether the stream ended early).
    A wanted frame that fails to retrieve is replaced by the next one that does (or the nearest earlier one).
    """
    capture = _open_capture(path)
    wanted_set = set(int(i) for i in wanted)
    last_wanted = int(wanted.max())
    decoded = {}  # frame index -> (H, W, 3) uint8 RGB
    need_replacement = False  # a wanted frame failed: keep retrieving until one succeeds
    index = 0
    ended_early = False
    while index <= last_wanted or need_replacement:
        if not capture.grab():
            ended_early = index <= last_wanted
            break
        if index in wanted_set or need_replacement:
            ok, frame_bgr = capture.retrieve()
            if ok and frame_bgr is not None:
                decoded[index] = _bgr_to_rgb(frame_bgr)
                need_replacement = False
            elif index in wanted_set:
                need_replacement = True
        index += 1
    capture.release()
    if ended_early or not decoded:
        return None, index, ended_early
    return _nearest_decoded(wanted, decoded), index, False


def _read_seeking(path: Path, wanted: np.ndarray):
    """Seek to each wanted frame with CAP_PROP_POS_FRAMES (the X-Pool / ModelScope way).

    Returns (F, H, W, 3) uint8 RGB, or None if any seek or read fails (the caller then falls back to the
    sequential pass, which knows how to handle short and broken files).
    """
    capture = _open_capture(path)
    frames = {}
    for index in sorted(set(int(i) for i in wanted)):
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame_bgr = capture.read()
        if not ok or frame_bgr is None:
            capture.release()
            return None
        frames[index] = _bgr_to_rgb(frame_bgr)
    capture.release()
    return np.stack([frames[int(i)] for i in wanted])


def choose_strategy(num_total: int, num_wanted: int) -> str:
    """The measured rule: seek only when a sequential pass would decode many frames per wanted frame."""
    return "seek" if num_total > SEEK_BREAK_EVEN_FRAMES_PER_WANTED * num_wanted else "sequential"


def read_frames(path, num_frames: int, mode: str = "uniform", rng=None, strategy: str = "auto") -> np.ndarray:
    """Decode `num_frames` frames of one video, sampled by segment. Returns (F, H, W, 3) uint8 RGB.

    `strategy`: "sequential" (one grab() pass, retrieve() only wanted frames), "seek" (CAP_PROP_POS_FRAMES per
    frame), or "auto" (`choose_strategy`). Both give identical frames. Images (.png, .jpg, ...) are read as a
    one-frame video. The fps is never used (it can be 0); the header's frame count is a hint only: if the
    stream ends before it, the frames are re-sampled over the frames that really decode.
    Raises VideoReadError naming the file if it cannot be opened or nothing decodes.
    """
    path = Path(path)
    if strategy not in ("auto", "sequential", "seek"):
        raise ValueError(f"read_frames: strategy must be 'auto', 'sequential' or 'seek', got {strategy!r}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image_as_video(path, num_frames)

    capture = _open_capture(path)
    header_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    num_total = header_count if header_count > 0 else _count_decodable_frames(path)
    if num_total < 1:
        raise VideoReadError(f"{path}: no frame decodes; the file is empty or corrupt. Re-encode or remove it.")

    wanted = sample_frame_indices(num_total, num_frames, mode, rng)  # (F,)
    if strategy == "seek" or (strategy == "auto" and choose_strategy(num_total, num_frames) == "seek"):
        frames = _read_seeking(path, wanted)
        if frames is not None:
            return frames
    frames, num_grabbed, ended_early = _read_sequential(path, wanted)
    if frames is None and ended_early and num_grabbed > 0:
        # The header promised more frames than the file holds (truncated file, wrong count): sample again
        # over the frames that do exist, so the segments still span the whole real video.
        wanted = sample_frame_indices(num_grabbed, num_frames, mode, rng)
        frames, _, _ = _read_sequential(path, wanted)
    if frames is None:
        raise VideoReadError(f"{path}: no frame decodes (header says {header_count} frames); the file is corrupt. "
                             "Re-encode it, or remove it from the annotations.")
    return frames


# ----------------------------------------------------------------------------------------------------------
# 3. Transforms (torchvision-free, matching CLIP's PIL bicubic resize)


def _resize_frames(frames: np.ndarray, size_wh: tuple, box=None) -> np.ndarray:
    """Bicubic resize (PIL, antialiased like CLIP's preprocessing), optionally of a crop box (x0, y0, x1, y1).
    (F, H, W, 3) uint8 -> (F, h, w, 3) uint8."""
    return np.stack([np.asarray(Image.fromarray(frame).resize(size_wh, Image.BICUBIC, box=box)) for frame in frames])


def resize_center_crop(frames: np.ndarray, image_size: int) -> np.ndarray:
    """Evaluation geometry: shorter side to `image_size`, then the central square.
    (F, H, W, 3) uint8 -> (F, S, S, 3) uint8."""
    height, width = frames.shape[1:3]
    scale = image_size / min(height, width)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    if (new_w, new_h) != (width, height):
        frames = _resize_frames(frames, (new_w, new_h))
    top = int(round((new_h - image_size) / 2.0))  # torchvision CenterCrop's rounding
    left = int(round((new_w - image_size) / 2.0))
    return frames[:, top:top + image_size, left:left + image_size]


def random_resized_crop_box(height: int, width: int, rng, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """torchvision's RandomResizedCrop box: area fraction in `scale`, log-uniform aspect ratio; after 10
    failed tries, the largest central crop with an allowed ratio. Returns (x0, y0, x1, y1) pixels."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, left + crop_w, top + crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


def normalize(frames: np.ndarray) -> torch.Tensor:
    """(F, S, S, 3) uint8 -> (F, 3, S, S) float32, scaled to [0, 1] then CLIP mean/std."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)  # (F, 3, S, S)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (video - mean) / std


def video_transform(frames: np.ndarray, train: bool, image_size: int = 224, rng=None, *,
                    hflip: bool = True, scale=(0.5, 1.0)) -> torch.Tensor:
    """(F, H, W, 3) uint8 RGB -> (F, 3, S, S) float32, CLIP-normalised.

    Evaluation: bicubic resize of the shorter side to S, center crop. Training: one random resized crop
    (area `scale`) and, with probability 1/2, a horizontal flip, the same for every frame of the video so the
    motion stays intact. (A flip turns "moves left" into "moves right": pass hflip=False for such captions.)
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video_transform expects (F, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if not train:
        return normalize(resize_center_crop(frames, image_size))
    rng = np.random.default_rng() if rng is None else rng
    height, width = frames.shape[1:3]
    box = random_resized_crop_box(height, width, rng, scale)
    cropped = _resize_frames(frames, (image_size, image_size), box=box)  # (F, S, S, 3) uint8
    if hflip and rng.random() < 0.5:
        cropped = cropped[:, :, ::-1]
    return normalize(cropped)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker setup: one OpenCV thread per worker (workers must not fight over the cores), and a
    per-worker numpy seed derived from torch's (which DataLoader already makes distinct per worker and epoch)."""
    cv2.setNumThreads(1)
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(dataset, batch_size: int, num_workers: int = 0, **kwargs) -> DataLoader:
    """A DataLoader set up for video decoding: one OpenCV thread per worker, and workers started by a fork
    server rather than forked from a parent that has already decoded video (FFmpeg's thread pools do not
    survive fork(): we saw 2 workers hang after the parent had read 720p clips)."""
    context = "forkserver" if num_workers > 0 and "forkserver" in multiprocessing.get_all_start_methods() else None
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, worker_init_fn=worker_init_fn,
                      multiprocessing_context=context, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# 4. Datasets


class VideoTextDataset(Dataset):
    """(video, caption) items over a fixed list of videos.

    `captions[i]` and `caption_video_index[i]` describe item i; `video_ids[j]` / `video_paths[j]` describe
    video j, in evaluation order. Training draws random frames per segment (and, if `augment`, a random crop
    and flip); evaluation takes segment middles and the center crop, and can cache those frames on disk.
    With `one_caption_per_video`, item j is video j with one of its captions drawn at random in training
    (its first caption otherwise), so an epoch visits every video once instead of every pair.
    """

    def __init__(self, name, video_ids, video_paths, captions, caption_video_index, *, num_frames=12,
                 image_size=224, train=False, augment=None, cache_dir=None, one_caption_per_video=False, seed=0):
        self.name = name
        self.video_ids = list(video_ids)  # (V,) unique, in evaluation order
        self.video_paths = [Path(p) for p in video_paths]  # (V,)
        self.num_frames = num_frames
        self.image_size = image_size
        self.train = train
        self.augment = train if augment is None else augment
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = seed
        self.one_caption_per_video = one_caption_per_video
        self.captions_per_video = [[] for _ in self.video_ids]  # (V,) lists of str
        for caption, video_index in zip(captions, caption_video_index):
            self.captions_per_video[video_index].append(caption)
        if one_caption_per_video:
            self.captions = [options[0] for options in self.captions_per_video]  # (V,)
            self.caption_video_index = list(range(len(self.video_ids)))
        else:
            self.captions = list(captions)  # (N,)
            self.caption_video_index = list(caption_video_index)  # (N,) index into video_ids
        self.epoch = 0

    def __len__(self):
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        """Training draws (frames, crop, flip, caption) depend only on (seed, epoch, item), not on which
        worker loads an item or what came before it: a resumed run sees exactly the same batches."""
        self.epoch = epoch

    def item_rng(self, item: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, item])

    def _cache_path(self, video_index: int) -> Path:
        path = self.video_paths[video_index]
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.num_frames}|{self.image_size}"
        return self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def load_video(self, video_index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Video j as (F, 3, S, S) float32; `rng` draws the training frames and augmentation."""
        path = self.video_paths[video_index]
        deterministic = not self.train and not self.augment
        if deterministic and self.cache_dir is not None:
            # Cache the uint8 (F, S, S, 3) frames after resize + crop: 4x smaller than floats, and the same
            # bytes every evaluation, so repeated evaluation skips decoding entirely.
            cache_path = self._cache_path(video_index)
            if cache_path.is_file():
                return normalize(np.load(cache_path))
            frames = resize_center_crop(read_frames(path, self.num_frames, "uniform"), self.image_size)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            partial = cache_path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(partial, frames)
            os.replace(partial, cache_path)  # atomic: concurrent workers never see half a file
            return normalize(frames)
        rng = np.random.default_rng() if rng is None else rng
        frames = read_frames(path, self.num_frames, "rand" if self.train else "uniform", rng)  # (F, H, W, 3)
        return video_transform(frames, self.augment, self.image_size, rng)

    def __getitem__(self, item: int) -> dict:
        video_index = self.caption_video_index[item]
        caption = self.captions[item]
        rng = self.item_rng(item)
        if self.one_caption_per_video and self.train:
            options = self.captions_per_video[video_index]
            caption = options[int(rng.integers(len(options)))]
        return {"video": self.load_video(video_index, rng), "caption": caption,
                "video_id": self.video_ids[video_index], "video_index": video_index}

    def videos(self) -> "VideoOnlyDataset":
        """The unique videos, once each, in `video_ids` order (for embedding every video once)."""
        return VideoOnlyDataset(self)


class VideoOnlyDataset(Dataset):
    """Items `{"video": (F, 3, S, S), "video_id": str}`, one per unique video of a VideoTextDataset."""

    def __init__(self, parent: VideoTextDataset):
        self.parent = parent

    def __len__(self):
        return len(self.parent.video_ids)

    def __getitem__(self, video_index: int) -> dict:
        return {"video": self.parent.load_video(video_index), "video_id": self.parent.video_ids[video_index],
                "video_index": video_index}


# --- annotation readers: each returns (entries, locate, video_dir, annotation_file), where entries are
# (video_id, caption, "file:line") in item order and locate(video_id) is the path the video should have.


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found. See the README's dataset folder trees.")
    return path


def _read_csv_rows(path: Path, required_columns, delimiter=","):
    """Yield (line number, row dict) of a headed CSV; a missing column is an AnnotationError naming the file."""
    with open(_require_file(path, "annotation file"), newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [column for column in required_columns if column not in header]
        if missing:
            raise AnnotationError(f"{path}:1: missing column(s) {missing}; the header is {header}. "
                                  f"Expected a header with {list(required_columns)}.")
        for row in reader:
            yield reader.line_num, row


def _video_index(video_dir: Path) -> dict:
    """Map a video's file stem to its path, searching `video_dir` recursively (LSMDC nests per movie,
    DiDeMo mixes extensions)."""
    if not video_dir.is_dir():
        raise FileNotFoundError(f"{video_dir}: video folder not found. Pass video_dir=... or see the README's "
                                "dataset folder trees.")
    found = {}
    for folder, _, files in os.walk(video_dir):
        for file_name in files:
            stem, suffix = os.path.splitext(file_name)
            if suffix.lower() in VIDEO_SUFFIXES:
                found.setdefault(stem, Path(folder) / file_name)
    return found


def _locator(video_dir: Path, default_suffix: str):
    index = _video_index(video_dir)
    return lambda video_id: index.get(video_id, video_dir / f"{video_id}{default_suffix}")


def _check_split(name: str, split: str, allowed) -> None:
    if split not in allowed:
        raise ValueError(f"build_dataset({name!r}): split must be one of {sorted(allowed)}, got {split!r}")


def _msrvtt_entries(root: Path, split: str, train_csv: str, video_dir: Path):
    _check_split("msrvtt", split, {"train", "test"})
    if split == "test":
        # The 1k-A ("JSFusion") test: 1,000 rows, one caption per video; the same for the 9k and 7k splits.
        test_csv = root / "MSRVTT_JSFUSION_test.csv"
        entries = [(row["video_id"].strip(), row["sentence"], f"{test_csv}:{line}")
                   for line, row in _read_csv_rows(test_csv, ["video_id", "sentence"])]
        return entries, _locator(video_dir, ".mp4"), test_csv
    data_json = _require_file(root / "MSRVTT_data.json", "MSR-VTT caption file")
    with open(data_json, encoding="utf-8") as handle:
        sentences = json.load(handle).get("sentences")
    if not isinstance(sentences, list):
        raise AnnotationError(f"{data_json}: expected a top-level 'sentences' list (CLIP4Clip's MSRVTT_data.json)")
    captions_of = {}
    for number, sentence in enumerate(sentences):
        if "video_id" not in sentence or "caption" not in sentence:
            raise AnnotationError(f"{data_json}: sentences[{number}] lacks 'video_id' or 'caption': {sentence}")
        captions_of.setdefault(sentence["video_id"], []).append(
            (sentence["caption"], f"{data_json}: sentences[{number}]"))
    split_csv = root / train_csv
    entries = []
    for line, row in _read_csv_rows(split_csv, ["video_id"]):
        video_id = row["video_id"].strip()
        if video_id not in captions_of:
            raise AnnotationError(f"{split_csv}:{line}: video {video_id!r} has no caption in {data_json}")
        entries.extend((video_id, caption, where) for caption, where in captions_of[video_id])
    return entries, _locator(video_dir, ".mp4"), split_csv


def _didemo_entries(root: Path, split: str, video_dir: Path):
    _check_split("didemo", split, {"train", "val", "test"})
    data_json = _require_file(root / f"{split}_data.json", "DiDeMo annotation file")
    with open(data_json, encoding="utf-8") as handle:
        moments = json.load(handle)
    sentences_of = {}  # video id -> [(sentence, where)], in file order
    for number, moment in enumerate(moments):
        if "video" not in moment or "description" not in moment:
            raise AnnotationError(f"{data_json}: entry [{number}] lacks 'video' or 'description': {moment}")
        video_id = os.path.splitext(moment["video"])[0]
        sentences_of.setdefault(video_id, []).append((moment["description"], f"{data_json}: entry [{number}]"))
    return _paragraphs(sentences_of), _locator(video_dir, ".mp4"), data_json


def _paragraphs(sentences_of: dict) -> list:
    """Paragraph-to-video retrieval: a video's sentences joined, in order, into one query."""
    entries = []
    for video_id, sentences in sentences_of.items():
        for sentence, where in sentences:
            if not str(sentence).strip():
                raise AnnotationError(f"{where}: empty sentence for video {video_id!r}; fix or delete it")
        paragraph = " ".join(str(sentence).strip() for sentence, _ in sentences)
        entries.append((video_id, paragraph, sentences[0][1]))
    return entries


def _activitynet_entries(root: Path, split: str, video_dir: Path):
    _check_split("activitynet", split, {"train", "val", "test"})
    # The paper tests on val_1 (CLIP4Clip's layout has no separate test annotations).
    captions_json = _require_file(root / ("train.json" if split == "train" else "val_1.json"),
                                  "ActivityNet Captions file")
    with open(captions_json, encoding="utf-8") as handle:
        videos = json.load(handle)
    ids_json = root / ("train_ids.json" if split == "train" else "val_ids.json")
    if ids_json.is_file():
        with open(ids_json, encoding="utf-8") as handle:
            video_order = [video_id for video_id in json.load(handle) if video_id in videos]
    else:
        video_order = list(videos)
    sentences_of = {}
    for video_id in video_order:
        record = videos[video_id]
        if "sentences" not in record:
            raise AnnotationError(f"{captions_json}: video {video_id!r} lacks 'sentences'")
        sentences_of[video_id] = [(sentence, f"{captions_json}: {video_id}.sentences[{number}]")
                                  for number, sentence in enumerate(record["sentences"])]
    return _paragraphs(sentences_of), _locator(video_dir, ".mp4"), captions_json


LSMDC_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
               "test": "LSMDC16_challenge_1000_publictect.csv"}


def _lsmdc_entries(root: Path, split: str, video_dir: Path):
    _check_split("lsmdc", split, set(LSMDC_FILES))
    # Tab-separated, no header: clip id, start, end (aligned), start, end (extracted), sentence.
    annotation = _require_file(root / LSMDC_FILES[split], "LSMDC annotation file")
    entries = []
    with open(annotation, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 6:
                raise AnnotationError(f"{annotation}:{line_number}: expected 6 tab-separated fields (clip id, 4 "
                                      f"timestamps, sentence), found {len(fields)}")
            entries.append((fields[0].strip(), fields[5], f"{annotation}:{line_number}"))
    return entries, _locator(video_dir, ".avi"), annotation


def _msvd_entries(root: Path, split: str, video_dir: Path):
    _check_split("msvd", split, {"train", "val", "test"})
    captions_pkl = _require_file(root / "raw-captions.pkl", "MSVD caption file")
    with open(captions_pkl, "rb") as handle:
        tokenized = pickle.load(handle)  # video id -> list of token lists (CLIP4Clip's raw-captions.pkl)
    id_list = _require_file(root / f"{split}_list.txt", "MSVD split list")
    entries = []
    with open(id_list, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            video_id = line.strip()
            if not video_id:
                continue
            if video_id not in tokenized:
                raise AnnotationError(f"{id_list}:{line_number}: video {video_id!r} has no caption in {captions_pkl}")
            for number, tokens in enumerate(tokenized[video_id]):
                caption = " ".join(tokens) if isinstance(tokens, (list, tuple)) else str(tokens)
                entries.append((video_id, caption, f"{id_list}:{line_number} ({captions_pkl}: {video_id}[{number}])"))
    return entries, _locator(video_dir, ".avi"), id_list


def _csv_entries(csv_path: Path):
    """The generic format: a headed CSV with `video,caption` rows, video paths relative to the CSV's folder.
    Rows naming the same video give it several captions."""
    entries = [(row["video"].strip(), row["caption"], f"{csv_path}:{line}")
               for line, row in _read_csv_rows(csv_path, ["video", "caption"])]
    return entries, (lambda video_id: csv_path.parent / video_id), csv_path


def _assemble(name, entries, locate, annotation_file, skip_missing, **dataset_kwargs) -> VideoTextDataset:
    """Check captions and videos, group captions by video, build the dataset (no video is decoded)."""
    video_ids, video_paths, index_of, missing = [], [], {}, {}
    captions, caption_video_index = [], []
    for video_id, caption, where in entries:
        if not video_id:
            raise AnnotationError(f"{where}: empty video name; fix or delete this line")
        if caption is None or not str(caption).strip():
            raise AnnotationError(f"{where}: empty caption for video {video_id!r}; fix or delete this line")
        if video_id in missing:
            continue
        if video_id not in index_of:
            path = Path(locate(video_id))
            if not path.is_file():
                missing[video_id] = (where, path)
                continue
            index_of[video_id] = len(video_ids)
            video_ids.append(video_id)
            video_paths.append(path)
        captions.append(str(caption).strip())
        caption_video_index.append(index_of[video_id])
    if missing:
        first_id, (first_where, first_path) = next(iter(missing.items()))
        summary = (f"{len(missing)} of {len(missing) + len(video_ids)} videos listed in {annotation_file} are "
                   f"missing (first: {first_id!r} at {first_where}, expected at {first_path})")
        if not skip_missing:
            raise FileNotFoundError(f"{summary}. Add the videos, fix the paths, or pass skip_missing=True.")
        warnings.warn(f"{summary}; skipping them (skip_missing=True).", stacklevel=3)
    if not captions:
        raise AnnotationError(f"{annotation_file}: no usable (video, caption) pair")
    return VideoTextDataset(name, video_ids, video_paths, captions, caption_video_index, **dataset_kwargs)


DATASET_NAMES = ("msrvtt-9k", "msrvtt-7k", "didemo", "activitynet", "lsmdc", "msvd", "csv", "synthetic")


def build_dataset(name: str, root, split: str, num_frames: int = 12, image_size: int = 224, train=None,
                  skip_missing: bool = False, cache_dir=None, one_caption_per_video: bool = False, seed: int = 0,
                  video_dir=None, augment=None, **world_kwargs) -> VideoTextDataset:
    """The one entry point: a VideoTextDataset for benchmark `name` (see DATASET_NAMES) read from `root`.

    `train` defaults to split == "train": random frame per segment + random crop/flip; otherwise segment
    middles + center crop. `video_dir` defaults to root/"videos". For "csv", `root` is the CSV file. For
    "synthetic", `root` is the world's folder and split is "train", "test" or "stills": an existing world is
    used as it is, unless `world_kwargs` (make_synthetic_world's settings; `seed` is the world's seed too)
    are given, which (re)generate it if its manifest differs. Its augmentation is off by default because a
    flip would swap "left" and "right" in the captions. `len()` needs no decoding.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"build_dataset: unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    if world_kwargs and name != "synthetic":
        raise TypeError(f"build_dataset({name!r}): unexpected arguments {sorted(world_kwargs)}")
    root = Path(root)
    train = (split == "train") if train is None else train
    video_dir = Path(video_dir) if video_dir is not None else root / "videos"
    if name in ("msrvtt-9k", "msrvtt-7k"):
        train_csv = "MSRVTT_train.9k.csv" if name == "msrvtt-9k" else "MSRVTT_train.7k.csv"
        entries, locate, annotation_file = _msrvtt_entries(root, split, train_csv, video_dir)
    elif name == "didemo":
        entries, locate, annotation_file = _didemo_entries(root, split, video_dir)
    elif name == "activitynet":
        entries, locate, annotation_file = _activitynet_entries(root, split, video_dir)
    elif name == "lsmdc":
        entries, locate, annotation_file = _lsmdc_entries(root, split, video_dir)
    elif name == "msvd":
        entries, locate, annotation_file = _msvd_entries(root, split, video_dir)
    elif name == "csv":
        entries, locate, annotation_file = _csv_entries(root)
    else:
        _check_split("synthetic", split, {"train", "test", "stills"})
        if world_kwargs or not (root / "world.json").is_file():
            world = make_synthetic_world(root, **{"seed": seed, **world_kwargs})
        else:
            world = root  # reuse the world already there, whatever settings made it
        entries, locate, annotation_file = _csv_entries(world / f"{split}.csv")
        augment = False if augment is None else augment
    return _assemble(name, entries, locate, annotation_file, skip_missing, num_frames=num_frames,
                     image_size=image_size, train=train, augment=augment, cache_dir=cache_dir,
                     one_caption_per_video=one_caption_per_video, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# 5. The synthetic motion world

WORLD_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 220, 40)}  # RGB
WORLD_SHAPES = ("circle", "square", "triangle")
WORLD_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows down
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# A 3 x 3 grid of places for the stills, named as a person would: (row, column) -> words after "a red square".
WORLD_PLACES = {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
                (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
                (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}
WORLD_FORMAT_VERSION = 1


def draw_shape(frame_size: int, shape: str, colour_rgb, centre_xy, radius: float) -> np.ndarray:
    """One frame: a filled shape on black. Returns (frame_size, frame_size, 3) uint8 RGB."""
    frame = np.zeros((frame_size, frame_size, 3), np.uint8)
    # Draw at 8x sub-pixel precision (shift=3) so slow motion still moves the shape smoothly.
    cx, cy, r = (int(round(v * 8)) for v in (centre_xy[0], centre_xy[1], radius))
    colour = tuple(int(c) for c in colour_rgb)
    if shape == "circle":
        cv2.circle(frame, (cx, cy), r, colour, -1, cv2.LINE_AA, 3)
    elif shape == "square":
        side = int(r * 0.85)
        cv2.rectangle(frame, (cx - side, cy - side), (cx + side, cy + side), colour, -1, cv2.LINE_AA, 3)
    elif shape == "triangle":
        points = np.array([[cx, cy - r], [cx - r, cy + int(r * 0.8)], [cx + r, cy + int(r * 0.8)]], np.int32)
        cv2.fillPoly(frame, [points], colour, cv2.LINE_AA, 3)
    else:
        raise ValueError(f"draw_shape: unknown shape {shape!r}; choose one of {WORLD_SHAPES}")
    return frame


def _motion_clip(rng, frame_size: int, clip_frames: int, colour: str, shape: str, direction: str) -> np.ndarray:
    """A shape crossing most of the frame in `direction`. Returns (T, frame_size, frame_size, 3) uint8 RGB."""
    radius = frame_size * 0.17
    low, high = radius + 1, frame_size - 1 - radius  # the centre's range that keeps the shape inside
    jitter = 0.1 * (high - low)
    start, end = low + rng.uniform(0, jitter), high - rng.uniform(0, jitter)  # along the motion axis
    across = rng.uniform(low, high)  # the fixed coordinate across the motion
    dx, dy = WORLD_DIRECTIONS[direction]
    frames = []
    for t in np.linspace(0.0, 1.0, clip_frames):
        along = start + t * (end - start)
        along = along if dx + dy > 0 else frame_size - 1 - along  # left/up run from high to low
        centre = (along, across) if dx else (across, along)
        frames.append(draw_shape(frame_size, shape, WORLD_COLOURS[colour], centre, radius))
    return np.stack(frames)


def write_video(path, frames_rgb: np.ndarray, fps: float = 8.0, fourcc: str = "mp4v") -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames with cv2.VideoWriter. Raises if OpenCV cannot encode them."""
    path = Path(path)
    height, width = frames_rgb.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise VideoReadError(f"{path}: OpenCV cannot encode {fourcc!r} into {path.suffix!r}; try 'mp4v' in .mp4 "
                             "or 'MJPG' in .avi")
    for frame in frames_rgb:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _write_csv(path: Path, rows) -> None:
    partial = path.with_suffix(".csv.tmp")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    os.replace(partial, path)


def make_synthetic_world(root, seed: int = 0, num_videos: int = 512, num_test_pairs: int = 80,
                         num_stills: int = 2000, frame_size: int = 32, clip_frames: int = 16, fps: float = 8.0) -> Path:
    """Write a small, deterministic video-text world under `root` and return `root`.

    - train.csv: `num_videos` clips "a <colour> <shape> moves <direction>" (4 colours x 3 shapes x 4 directions).
    - test.csv: `num_test_pairs` reversal pairs: clip B is clip A's frames in reverse order and its caption
      names the opposite direction, so a model that ignores frame order is at chance on this split.
    - stills.csv: `num_stills` single images "a <colour> <shape> <place>" (3 x 3 places) for pretraining a
      tiny image-text CLIP on the same world.
    Videos are real mp4v files (cv2.VideoWriter), so the whole decoding path is exercised. A manifest
    (world.json, written last) records the settings: a complete world with the same settings is reused.
    """
    root = Path(root)
    settings = {"format": WORLD_FORMAT_VERSION, "seed": seed, "num_videos": num_videos,
                "num_test_pairs": num_test_pairs, "num_stills": num_stills, "frame_size": frame_size,
                "clip_frames": clip_frames, "fps": fps}
    manifest = root / "world.json"
    if manifest.is_file() and all((root / f"{split}.csv").is_file() for split in ("train", "test", "stills")):
        with open(manifest, encoding="utf-8") as handle:
            if json.load(handle) == settings:
                return root
    if frame_size % 2:
        raise ValueError(f"make_synthetic_world: frame_size must be even (mp4v needs it), got {frame_size}")
    for folder in ("train", "test", "stills"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # an interrupted run leaves no manifest, so it is redone next time
    rng = np.random.default_rng(seed)
    colours, directions = list(WORLD_COLOURS), list(WORLD_DIRECTIONS)

    def random_object():
        return colours[rng.integers(len(colours))], WORLD_SHAPES[rng.integers(len(WORLD_SHAPES))]

    train_rows = []
    for number in range(num_videos):
        colour, shape = random_object()
        direction = directions[number % len(directions)]  # balanced directions
        clip = _motion_clip(rng, frame_size, clip_frames, colour, shape, direction)  # (T, s, s, 3)
        name = f"train/{number:05d}.mp4"
        write_video(root / name, clip, fps)
        train_rows.append((name, f"a {colour} {shape} moves {direction}"))

    test_rows = []
    for number in range(num_test_pairs):
        colour, shape = random_object()
        direction = directions[number % len(directions)]
        clip = _motion_clip(rng, frame_size, clip_frames, colour, shape, direction)  # (T, s, s, 3)
        for suffix, frames, words in (("a", clip, direction), ("b", clip[::-1], OPPOSITE[direction])):
            name = f"test/pair{number:04d}_{suffix}.mp4"
            write_video(root / name, frames, fps)
            test_rows.append((name, f"a {colour} {shape} moves {words}"))

    still_rows = []
    cell = frame_size / 3
    for number in range(num_stills):
        colour, shape = random_object()
        row, column = int(rng.integers(3)), int(rng.integers(3))
        centre = ((column + 0.5) * cell + rng.uniform(-1, 1), (row + 0.5) * cell + rng.uniform(-1, 1))
        image = draw_shape(frame_size, shape, WORLD_COLOURS[colour], centre, frame_size * 0.14)  # (s, s, 3)
        name = f"stills/{number:05d}.png"
        cv2.imwrite(str(root / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        still_rows.append((name, f"a {colour} {shape} {WORLD_PLACES[(row, column)]}"))

    _write_csv(root / "train.csv", train_rows)
    _write_csv(root / "test.csv", test_rows)
    _write_csv(root / "stills.csv", still_rows)
    with open(manifest, "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=1)
    return root
