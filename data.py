"""Video-text data for VoP: which frames of a video the model sees, how they become CLIP's input, and the
(video, caption) dataset that yields them.

1. `sample_frame_indices` - split the video into F equal segments; take each segment's middle frame
   (evaluation) or a random frame inside it (training).
2. CLIP's preprocessing - evaluation: bicubic resize of the shorter side to R and a center crop, exactly as
   CLIP's `Resize` + `CenterCrop`; training: one random resized crop and flip for all frames of a video; then
   CLIP's mean/std normalisation.
3. `VideoTextDataset` / `build_dataset` - items `{"video": (F, 3, R, R) float32, "caption": str, ...}`.

Machinery behind small functions, skip on a first reading: decoding video files (video_io.py), the benchmarks'
annotation files (annotations.py).

An epoch is every (video, caption) pair once (180k pairs on MSR-VTT-9k, as in CLIP4Clip and X-Pool);
`one_caption_per_video=True` makes it every video once with one random caption.
"""
from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from annotations import DATASET_NAMES, read_annotations
from video_io import decode_frames

# OpenAI CLIP's preprocessing constants (clip/clip.py `_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def read_frames(path, num_frames: int, mode: str = "uniform", rng=None, strategy: str = "auto") -> np.ndarray:
    """Decode the `num_frames` frames `sample_frame_indices` picks (video_io.py does the decoding).
    Returns (F, H, W, 3) uint8 RGB; raises video_io.VideoReadError naming an unreadable file."""
    return decode_frames(path, lambda num_total: sample_frame_indices(num_total, num_frames, mode, rng), strategy)


# ----------------------------------------------------------------------------------------------------------
# 2. CLIP's preprocessing (torchvision-free, with PIL's bicubic resize as CLIP uses it)

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
# 3. The dataset


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



def build_dataset(name: str, root, split: str, num_frames: int = 12, image_size: int = 224, train=None,
                  skip_missing: bool = False, cache_dir=None, one_caption_per_video: bool = False, seed: int = 0,
                  video_dir=None, augment=None) -> VideoTextDataset:
    """The one entry point: a VideoTextDataset for benchmark `name` (annotations.DATASET_NAMES) read from `root`.

    `train` defaults to split == "train": random frame per segment + random crop/flip; otherwise segment
    middles + center crop. The synthetic world's augmentation is off by default, because a flip would swap
    "left" and "right" in its captions. `len()` needs no decoding.
    """
    annotations = read_annotations(name, root, split, video_dir, skip_missing)
    train = (split == "train") if train is None else train
    if augment is None:
        augment = train and name != "synthetic"
    return VideoTextDataset(name, annotations.video_ids, annotations.video_paths, annotations.captions,
                            annotations.caption_video_index, num_frames=num_frames, image_size=image_size,
                            train=train, augment=augment, cache_dir=cache_dir,
                            one_caption_per_video=one_caption_per_video, seed=seed)
