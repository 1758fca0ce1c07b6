"""Video-text data for VoP: which frames of a video the model sees, how they become CLIP's input, and the
(video, caption) dataset that yields them.

1. `sample_frame_indices` - split the video into F segments (the published code's integer cut); take each
   segment's middle frame (evaluation) or a random frame inside it (training).
2. CLIP's preprocessing - evaluation: bicubic resize of the shorter side to R and a center crop, with the
   exact arithmetic of CLIP's torchvision `Resize` + `CenterCrop`; training: one random resized crop and flip
   for all frames of a video; then CLIP's mean/std normalisation.
3. `VideoTextDataset` / `build_dataset` - items `{"video": (F, 3, R, R) float32, "caption": str, ...}`;
   `VideoFiles` - the videos of a folder, for search.py.
4. `make_loader` - DataLoader workers that decode in parallel and stay alive for the whole run.

Machinery behind small functions, skip on a first reading: decoding video files (formats/video_io.py),
decoding each video once and keeping what later visits need (machinery/frame_store.py), the benchmarks'
annotation files (formats/annotations.py).

An epoch is every (video, caption) pair once (180k pairs on MSR-VTT-9k, as in CLIP4Clip and X-Pool);
`one_caption_per_video=True` makes it every video once with one random caption.
"""
from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from formats.annotations import read_annotations
from formats.clip_weights import CLIP_MEAN, CLIP_STD
from formats.video_io import (READ_ERRORS, VideoReadError, decode_frames, default_num_workers,
                              exit_when_process_ends, opened_a_video, start_resource_tracker_apart)
from machinery.frame_store import FrameRule


# ----------------------------------------------------------------------------------------------------------
# 1. Which frames

SAMPLER_VERSION = 2  # which frames sample_frame_indices picks; stored frames of another version are not reused


def segment_edges(num_total: int, num_frames: int) -> np.ndarray:
    """(F + 1,) int64: the F segments of a video of `num_total` >= F frames, segment k being frames
    edges[k] .. edges[k + 1] - 1. The published code's integer cut (X-Pool's `load_frames_from_video`, kept by
    the authors' release): np.linspace(0, num_total, F + 1).astype(int)."""
    return np.linspace(0, num_total, num_frames + 1).astype(np.int64)


def sample_frame_indices(num_total: int, num_frames: int, mode: str = "uniform", rng=None) -> np.ndarray:
    """Indices of `num_frames` frames out of `num_total`, one per segment (`segment_edges`).

    "uniform" (evaluation, deterministic) takes segment k's middle frame as the published code does:
    (edges[k] + edges[k + 1] - 1) // 2. "rand" (training) takes any frame of segment k, uniformly at random:
    edges[k] .. edges[k + 1] - 1. (The published code draws with random.choice(range(edges[k], edges[k + 1] - 1)),
    which also leaves out each segment's last frame and fails on one-frame segments; we draw from the whole
    segment, which is what "a random frame of each segment" means.)

    A video with fewer frames than F cannot give one frame per segment. The published code then reads every
    frame and repeats the last one to fill F, which would show order-aware prompts many copies of one frame;
    here the F segments are spread evenly over the video's real length (segment k covers the time
    [k * num_total / F, (k + 1) * num_total / F)) and each takes the frame under its midpoint, or, in training,
    a random frame it overlaps: frames repeat, in order, and the output keeps its length.
    Returns (num_frames,) int64, non-decreasing, each in [0, num_total).
    """
    if num_total < 1:
        raise ValueError(f"sample_frame_indices: the video has {num_total} frames; need at least 1")
    if num_frames < 1:
        raise ValueError(f"sample_frame_indices: num_frames must be >= 1, got {num_frames}")
    if mode not in ("uniform", "rand"):
        raise ValueError(f"sample_frame_indices: mode must be 'uniform' or 'rand', got {mode!r}")
    rng = np.random.default_rng() if rng is None and mode == "rand" else rng
    if num_total >= num_frames:
        edges = segment_edges(num_total, num_frames)  # (F + 1,)
        if mode == "uniform":
            return (edges[:-1] + edges[1:] - 1) // 2
        return rng.integers(edges[:-1], edges[1:])  # (F,) high exclusive: up to edges[k + 1] - 1
    edges = np.linspace(0.0, num_total, num_frames + 1)  # (F + 1,) real-valued: the video is shorter than F
    if mode == "uniform":
        indices = np.floor((edges[:-1] + edges[1:]) / 2).astype(np.int64)
    else:
        first = np.floor(edges[:-1]).astype(np.int64)  # (F,) first frame overlapping each segment
        stop = np.maximum(np.ceil(edges[1:]).astype(np.int64), first + 1)  # (F,) one past the last
        indices = rng.integers(first, stop)
    return np.clip(indices, 0, num_total - 1)


def read_frames(path, num_frames: int, mode: str = "uniform", rng=None, strategy: str = "auto",
                transform=None) -> np.ndarray:
    """Decode the `num_frames` frames `sample_frame_indices` picks (formats/video_io.py decodes; `transform`
    maps each frame as it is decoded). Returns (F, H, W, 3) uint8 RGB; raises video_io.VideoReadError naming
    an unreadable file."""
    return decode_frames(path, lambda num_total: sample_frame_indices(num_total, num_frames, mode, rng), strategy,
                         transform)


def training_candidates(num_total: int, num_frames: int, candidates: int) -> np.ndarray:
    """(F, C) frame indices, the frames a frame store keeps for training (skip on a first reading): for each of
    the F segments training draws from (`segment_edges`), the middles of its C sub-segments, cut as the
    segments are cut. With fewer frames than F, each row repeats the frame `sample_frame_indices` takes for
    that segment."""
    if num_total < num_frames:
        return np.repeat(sample_frame_indices(num_total, num_frames)[:, None], candidates, axis=1)
    edges = segment_edges(num_total, num_frames)  # (F + 1,)
    lengths = edges[1:] - edges[:-1]  # (F,) >= 1
    sub_edges = edges[:-1, None] + (np.linspace(0, 1, candidates + 1)[None, :] * lengths[:, None]).astype(np.int64)
    starts, stops = sub_edges[:, :-1], sub_edges[:, 1:]  # (F, C) each; a sub-segment may be empty in a short one
    return (starts + np.maximum(stops - 1, starts)) // 2


# ----------------------------------------------------------------------------------------------------------
# 2. CLIP's preprocessing

def clip_resize_size(height: int, width: int, image_size: int) -> tuple:
    """(new_height, new_width) of CLIP's `Resize(image_size)`: the shorter side becomes `image_size`, the longer
    side `int(image_size * long / short)`, truncated as torchvision truncates (a 320x240 frame -> 298x224)."""
    short, long = min(height, width), max(height, width)
    new_long = int(image_size * long / short)
    return (new_long, image_size) if height > width else (image_size, new_long)


def resize_center_crop(frames: np.ndarray, image_size: int) -> np.ndarray:
    """Evaluation geometry, exactly CLIP's `Resize(R, BICUBIC)` + `CenterCrop(R)` on PIL images: PIL's
    antialiased bicubic resize (skipped when the size already matches, as torchvision skips it), then the
    central square with torchvision's rounding of the offsets. (F, H, W, 3) uint8 -> (F, R, R, 3) uint8."""
    height, width = frames.shape[1:3]
    new_h, new_w = clip_resize_size(height, width, image_size)
    if (new_h, new_w) != (height, width):
        frames = np.stack([np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))
                           for frame in frames])  # (F, new_h, new_w, 3)
    top = int(round((new_h - image_size) / 2.0))
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


def normalize(frames) -> torch.Tensor:
    """(F, R, R, 3) uint8 array or (F, 3, R, R) uint8 tensor -> (F, 3, R, R) float32: CLIP's `ToTensor`
    (x / 255) then `Normalize` ((x - mean) / std), the same float32 operations in the same order, so the result
    is bit-identical to CLIP's preprocessing."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (F, 3, R, R) uint8
    video = frames.contiguous().float().div_(255.0)  # (F, 3, R, R)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return video.sub_(mean).div_(std)


def video_transform(frames: np.ndarray, augment: bool, image_size: int = 224, rng=None, *,
                    hflip: bool = True, scale=(0.5, 1.0)) -> torch.Tensor:
    """(F, H, W, 3) uint8 RGB -> (F, 3, R, R) float32, CLIP-normalised.

    Without `augment` (evaluation): `resize_center_crop`. With it (training): one random resized crop (area `scale`,
    torchvision's box rules) resized to R x R with antialiased bicubic interpolation (torch's, on all frames at
    once: 6x faster than PIL frame by frame, within 1-2 levels of it), and with probability 1/2 a horizontal flip;
    the same crop and flip for every frame of the video, so the motion stays intact. (A flip turns "moves left" into
    "moves right": pass hflip=False for such captions.)
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video_transform expects (F, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if not augment:
        return normalize(resize_center_crop(frames, image_size))
    rng = np.random.default_rng() if rng is None else rng
    left, top, right, bottom = random_resized_crop_box(*frames.shape[1:3], rng, scale)
    crop = torch.from_numpy(frames[:, top:bottom, left:right]).permute(0, 3, 1, 2)  # (F, 3, h, w) uint8 view
    video = F.interpolate(crop, size=(image_size, image_size), mode="bicubic", antialias=True)  # (F, 3, R, R)
    if hflip and rng.random() < 0.5:
        video = video.flip(-1)
    return normalize(video)


def evaluation_frames(path, num_frames: int, image_size: int) -> np.ndarray:
    """(F, R, R, 3) uint8 RGB: the evaluation frames after CLIP's resize + center crop, each resized as it is
    decoded, so a large video is never held whole."""
    return read_frames(path, num_frames, "uniform",
                       transform=lambda frame: resize_center_crop(frame[None], image_size)[0])


# What a frame store (machinery/frame_store.py) keeps follows these rules.
FRAME_RULE = FrameRule(SAMPLER_VERSION, evaluation_frames, training_candidates)


# ----------------------------------------------------------------------------------------------------------
# 3. The dataset

class VideoTextDataset(Dataset):
    """(video, caption) items over a fixed list of videos.

    `captions[i]` and `caption_video_index[i]` describe item i; `video_ids[j]` / `video_paths[j]` describe
    video j, in evaluation order. Training draws a random frame per segment (and, if `augment`, a random crop
    and flip); evaluation takes segment middles and the center crop. With `one_caption_per_video`, item j is
    video j with one of its captions drawn at random in training (its first caption otherwise), so an epoch
    visits every video once instead of every pair. With a `frame_store` (machinery/frame_store.py), videos are
    decoded once and later visits read what the store kept: evaluation frames bit-identical, training frames
    drawn among a few stored candidates per segment (machinery/frame_store.py says exactly how that differs).

    Items: {"video": (F, 3, R, R) float32, "caption": str, "video_id": str, "video_index": int,
    "replaced_video": str}. A training video that fails to decode is replaced by another item of the epoch,
    and "replaced_video" names the file that failed ("" otherwise); in evaluation it raises VideoReadError.
    """

    def __init__(self, name, video_ids, video_paths, captions, caption_video_index, *, num_frames=12,
                 image_size=224, train=False, augment=None, hflip=True, one_caption_per_video=False, seed=0,
                 frame_store=None, unsplit=False):
        self.name = name
        self.unsplit = unsplit  # read from a CSV without a split column: its rows are the training rows
        self.video_ids = list(video_ids)  # (V,) unique, in evaluation order
        self.video_paths = [Path(p) for p in video_paths]  # (V,)
        self.num_frames = num_frames
        self.image_size = image_size
        self.train = train
        self.augment = train if augment is None else augment
        self.hflip = hflip
        self.seed = seed
        self.frame_store = frame_store
        self.one_caption_per_video = one_caption_per_video
        self._pairs = (list(captions), list(caption_video_index))  # as given: `without_videos` starts here
        self.captions_per_video = [[] for _ in self.video_ids]  # (V,) lists of str
        for caption, video_index in zip(captions, caption_video_index):
            self.captions_per_video[video_index].append(caption)
        if one_caption_per_video:
            self.captions = [options[0] for options in self.captions_per_video]  # (V,)
            self.caption_video_index = list(range(len(self.video_ids)))
        else:
            self.captions = list(captions)  # (T,)
            self.caption_video_index = list(caption_video_index)  # (T,) index into video_ids

    def __len__(self):
        return len(self.captions)

    def item_rng(self, item: int, epoch: int) -> np.random.Generator:
        """Every training draw of an item (frames, crop, flip, caption) comes from (seed, epoch, item) alone,
        not from which worker loads it or what came before: a resumed run sees exactly the same batches."""
        return np.random.default_rng([self.seed, epoch, item])

    def load_video(self, video_index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Video j as (F, 3, R, R) float32; `rng` draws the training frames and augmentation."""
        path, store = self.video_paths[video_index], self.frame_store
        rng = np.random.default_rng() if rng is None else rng
        if self.train:
            frames = (store.training_frames(path, self.num_frames, self.image_size, rng) if store is not None
                      else read_frames(path, self.num_frames, "rand", rng))  # (F, H, W, 3)
            return video_transform(frames, self.augment, self.image_size, rng, hflip=self.hflip)
        if store is not None and not self.augment:
            return normalize(store.evaluation_frames(path, self.num_frames, self.image_size))  # (F, 3, R, R)
        return video_transform(read_frames(path, self.num_frames, "uniform"), self.augment, self.image_size, rng)

    def __getitem__(self, key) -> dict:
        """`key` is an (epoch, item) pair (see `EpochSampler`), or an item index (epoch 0)."""
        epoch, item = key if isinstance(key, tuple) else (0, key)
        try:
            return self._load_item(epoch, item)
        except VideoReadError as error:
            if not self.train:
                raise
            return self._replacement_item(epoch, item, error)

    def _load_item(self, epoch: int, item: int) -> dict:
        video_index = self.caption_video_index[item]
        caption = self.captions[item]
        rng = self.item_rng(item, epoch)
        if self.one_caption_per_video and self.train:
            options = self.captions_per_video[video_index]
            caption = options[int(rng.integers(len(options)))]
        return {"video": self.load_video(video_index, rng), "caption": caption,
                "video_id": self.video_ids[video_index], "video_index": video_index, "replaced_video": ""}

    def _replacement_item(self, epoch: int, item: int, error: VideoReadError) -> dict:
        """Skip on a first reading. A training video that passed the start-up probe but fails now: another
        item of the epoch instead, chosen from (seed, epoch, item) alone so that a resumed run replaces it the
        same way; the item says which file failed, for the training loop to count and log."""
        failed = str(self.video_paths[self.caption_video_index[item]])
        rng = np.random.default_rng([self.seed, epoch, item, 1])  # not item_rng: a stream of its own
        for _ in range(10):
            other = int(rng.integers(len(self)))
            if self.caption_video_index[other] == self.caption_video_index[item]:
                continue
            try:
                return {**self._load_item(epoch, other), "replaced_video": failed}
            except VideoReadError:
                continue
        raise VideoReadError(f"{failed} fails to decode, and so did 10 items drawn to replace it: are the videos "
                             f"of {self.name!r} readable? ({error})")

    def videos(self) -> "VideoOnlyDataset":
        """The unique videos, once each, in `video_ids` order (for embedding every video once)."""
        return VideoOnlyDataset(self)

    def without_videos(self, video_indices) -> "VideoTextDataset":
        """The same dataset without videos `video_indices` (indices into video_ids) and their captions; the
        remaining videos keep their order and `caption_video_index` is renumbered. (For leaving out videos the
        start-up probe found unreadable: video_io.probe_videos.)"""
        dropped = set(int(j) for j in video_indices)
        kept = [j for j in range(len(self.video_ids)) if j not in dropped]  # (V',) old index of each new video
        new_index = {old: new for new, old in enumerate(kept)}
        captions, caption_video_index = self._pairs
        pairs = [(caption, new_index[j]) for caption, j in zip(captions, caption_video_index) if j in new_index]
        subset = VideoTextDataset(self.name, [self.video_ids[j] for j in kept], [self.video_paths[j] for j in kept],
                                  [c for c, _ in pairs], [j for _, j in pairs], num_frames=self.num_frames,
                                  image_size=self.image_size, train=self.train, augment=self.augment,
                                  hflip=self.hflip, one_caption_per_video=self.one_caption_per_video, seed=self.seed,
                                  frame_store=self.frame_store, unsplit=self.unsplit)
        return subset


class VideoOnlyDataset(Dataset):
    """Items `{"video": (F, 3, R, R), "video_id": str, "video_index": int}`, one per unique video of a
    VideoTextDataset (evaluation: a video that fails to decode raises VideoReadError naming it)."""

    def __init__(self, parent: VideoTextDataset):
        self.parent = parent

    def __len__(self):
        return len(self.parent.video_ids)

    def __getitem__(self, video_index: int) -> dict:
        return {"video": self.parent.load_video(video_index), "video_id": self.parent.video_ids[video_index],
                "video_index": video_index}


class VideoFiles(Dataset):
    """Items `{"video": (F, 3, R, R), "index": int, "error": str}` for a list of video files (a user's own
    collection, search.py), in the evaluation protocol's frames: segment middles, CLIP's resize and center crop.

    A file that cannot be read (corrupt, an unknown codec, no permission, gone) gives a video of zeros and
    "error" saying why in one line naming it, instead of failing its whole batch in a DataLoader worker: the
    caller leaves it out and reports it. "" when the video was read."""

    def __init__(self, paths, num_frames: int = 12, image_size: int = 224):
        self.paths = [Path(path) for path in paths]
        self.num_frames = num_frames
        self.image_size = image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            video = video_transform(read_frames(path, self.num_frames, "uniform"), False, self.image_size)
            error = ""
        except READ_ERRORS as failure:
            video = torch.zeros(self.num_frames, 3, self.image_size, self.image_size)
            error = str(failure).splitlines()[0] if str(failure).strip() else type(failure).__name__
            error = error if str(path) in error else f"{path}: {error}"
        return {"video": video, "index": index, "error": error}


def build_dataset(name: str, root, split: str, num_frames: int = 12, image_size: int = 224, train=None,
                  skip_missing: bool = False, one_caption_per_video: bool = False, seed: int = 0,
                  video_dir=None, augment=None, hflip: bool = True, frame_store=None) -> VideoTextDataset:
    """The one entry point: a VideoTextDataset for benchmark `name` (annotations.DATASET_NAMES) read from `root`.

    `train` defaults to split == "train": random frame per segment + random crop/flip; otherwise segment
    middles + center crop. The synthetic world's augmentation is off by default, because a flip would swap
    "left" and "right" in its captions; `hflip=False` keeps the other augmentation and leaves out the flip
    (train.py --no-flip) for other captions that name directions. `frame_store`: a
    machinery.frame_store.FrameStore, or None to decode every visit. `len()` needs no decoding.
    """
    annotations = read_annotations(name, root, split, video_dir, skip_missing)
    train = (split == "train") if train is None else train
    if augment is None:
        augment = train and name != "synthetic"
    return VideoTextDataset(name, annotations.video_ids, annotations.video_paths, annotations.captions,
                            annotations.caption_video_index, num_frames=num_frames, image_size=image_size,
                            train=train, augment=augment, hflip=hflip, one_caption_per_video=one_caption_per_video,
                            seed=seed, frame_store=frame_store, unsplit=annotations.unsplit)


# ----------------------------------------------------------------------------------------------------------
# 4. Loading in parallel (skip on a first reading)

def worker_init_fn(worker_id: int, main_process: int | None = None) -> None:
    """DataLoader worker setup: one OpenCV thread per worker, so that workers do not fight over the cores
    (video_io also gives FFmpeg's decoder that many threads), and an exit of its own when the main process is
    killed (when a fork server is the workers' parent, they would not notice). No random seeding: every draw
    comes from VideoTextDataset.item_rng, a function of (seed, epoch, item) alone."""
    cv2.setNumThreads(1)
    if main_process is not None:
        exit_when_process_ends(main_process)


class EpochSampler(Sampler):
    """This process's items of each epoch as (epoch, item) keys: a shuffle that depends on (seed, epoch) alone,
    split between the processes (DistributedSampler's order), cut to whole batches of `batch_size`.

    Persistent workers keep their own copy of the dataset, so the epoch travels in each key; one DataLoader
    then serves the whole run, and a resumed run starts the epoch at the batch where it stopped:
        order = data.EpochSampler(len(train_set), batch_size)
        loader = data.make_loader(train_set, batch_size, sampler=order, drop_last=True)
        for epoch in ...: order.set_epoch(epoch); for batch in loader: ...
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.shuffle = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.num_batches = len(self.shuffle) // batch_size  # the last incomplete batch is dropped
        self.set_epoch(0)  # so that a loop without set_epoch still sees epoch 0, not nothing

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.shuffle.set_epoch(epoch)
        items = list(self.shuffle)[first_batch * self.batch_size: self.num_batches * self.batch_size]
        self.keys = [(epoch, int(item)) for item in items]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def make_loader(dataset, batch_size: int, num_workers: int | None = None, **kwargs) -> DataLoader:
    """A DataLoader set up for video: `num_workers` defaults to `default_num_workers()`; the workers stay alive
    from one epoch to the next (persistent) and each keeps 2 batches ready (prefetch); one OpenCV thread per
    worker; started as `worker_start_method` says. Stop its workers with `stop_workers` when done with it (or
    when stopped: they outlive an exception)."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    if num_workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": 2, **kwargs}
        start_method = worker_start_method()
        if start_method is not None:
            kwargs.setdefault("multiprocessing_context", start_method)
        start_resource_tracker_apart()
    return _VideoLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        worker_init_fn=functools.partial(worker_init_fn, main_process=os.getpid()), **kwargs)


def worker_start_method() -> str | None:
    """How worker processes start. Forked (on Linux) while this process has not opened a video: a forked
    worker does not import the program's main file again, as a fork server or spawn does, so a user's script
    without an `if __name__ == "__main__":` guard runs once. Once this process has opened a video, or under
    torchrun, from a fork server: FFmpeg's thread pools and a process group's threads do not survive fork() (2
    forked workers can hang once the parent has read 720p clips). None: the platform's default (spawn)."""
    methods = multiprocessing.get_all_start_methods()
    in_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if sys.platform.startswith("linux") and "fork" in methods and not opened_a_video() and not in_process_group:
        return "fork"
    return "forkserver" if "forkserver" in methods else None


class _VideoLoader(DataLoader):
    """A DataLoader whose workers start even where the main module has no file to import again (below)."""

    def _get_iterator(self):
        with _unimportable_main_hidden():
            return super()._get_iterator()


@contextlib.contextmanager
def _unimportable_main_hidden():
    """A program piped into Python (`python - < script.py`) has the main module '<stdin>', which a fork server or
    a spawned worker tries to import again as a file, and fails (FileNotFoundError). The workers need nothing
    from it (they run this module's code), so while they start, such a name is hidden from multiprocessing."""
    main = sys.modules.get("__main__")
    name = getattr(main, "__file__", None)
    if name is None or getattr(main, "__spec__", None) is not None or os.path.isfile(name):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = name


def stop_workers(loader: DataLoader) -> None:
    """End a loader's worker processes now. Persistent workers otherwise live as long as the loader object,
    which an exception's traceback keeps alive."""
    iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent workers' iterator here
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
