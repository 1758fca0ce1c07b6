"""Reading video files with OpenCV: decode the frames a sampler asked for, surviving the lies real files tell.

Skip on a first reading: data.py says *which* frames VoP uses; this module only gets their pixels.

- `decode_frames(path, sample, strategy)`: (F, H, W, 3) uint8 RGB, where `sample(num_total)` says which frames. The header's frame count is a
  hint only (it can be wrong or 0); a file that ends early is re-sampled over the frames that really decode; a
  frame that fails to decode is replaced by the nearest one that does; an unreadable file raises
  `VideoReadError` naming it.
- two strategies that return identical frames: one sequential pass, or a seek per wanted frame.
- `write_video`: encode frames with OpenCV (tests and the synthetic demo make their clips with it).
"""
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

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


def decode_frames(path, sample: Callable[[int], np.ndarray], strategy: str = "auto") -> np.ndarray:
    """Decode the frames `sample(num_total)` picks out of a video of num_total frames: (F, H, W, 3) uint8 RGB.

    `strategy`: "sequential" (one grab() pass, retrieve() only wanted frames), "seek" (CAP_PROP_POS_FRAMES per
    frame), or "auto" (`choose_strategy`). Both give identical frames. Images (.png, .jpg, ...) are read as a
    one-frame video. The fps is never used (it can be 0); the header's frame count is a hint only: if the
    stream ends before it, the frames are re-sampled over the frames that really decode.
    Raises VideoReadError naming the file if it cannot be opened or nothing decodes.
    """
    path = Path(path)
    if strategy not in ("auto", "sequential", "seek"):
        raise ValueError(f"decode_frames: strategy must be 'auto', 'sequential' or 'seek', got {strategy!r}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image_as_video(path, len(sample(1)))

    capture = _open_capture(path)
    header_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    num_total = header_count if header_count > 0 else _count_decodable_frames(path)
    if num_total < 1:
        raise VideoReadError(f"{path}: no frame decodes; the file is empty or corrupt. Re-encode or remove it.")

    wanted = sample(num_total)  # (F,)
    if strategy == "seek" or (strategy == "auto" and choose_strategy(num_total, len(wanted)) == "seek"):
        frames = _read_seeking(path, wanted)
        if frames is not None:
            return frames
    frames, num_grabbed, ended_early = _read_sequential(path, wanted)
    if frames is None and ended_early and num_grabbed > 0:
        # The header promised more frames than the file holds (truncated file, wrong count): sample again
        # over the frames that do exist, so the segments still span the whole real video.
        wanted = sample(num_grabbed)
        frames, _, _ = _read_sequential(path, wanted)
    if frames is None:
        raise VideoReadError(f"{path}: no frame decodes (header says {header_count} frames); the file is corrupt. "
                             "Re-encode it, or remove it from the annotations.")
    return frames


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
