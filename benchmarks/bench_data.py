"""Benchmark data.py's video reading (not a test): videos/s for 12 frames from 15 s, 30 fps clips.

Compares seeking to each frame with CAP_PROP_POS_FRAMES (X-Pool / ModelScope VoP) with one sequential
grab()/retrieve() pass (data.py's default), then times the whole torch.utils.data pipeline (decode +
resize + crop + normalise to 224) with 0 and 2 workers, and measures the seek-vs-sequential break-even that
sets data.SEEK_BREAK_EVEN_FRAMES_PER_WANTED. Clips are made here with cv2.VideoWriter in MPEG-4 ("mp4v";
OpenCV's wheels cannot encode H.264, whose long GOPs make seeking costlier still).

    python benchmarks/bench_data.py [--clips 4] [--out /tmp/vop_bench]
"""
import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def make_clip(path: Path, width: int, height: int, seconds: float, fps: int = 30, seed: int = 0) -> Path:
    """A clip with texture and motion (a noise background panning, a moving disc), so the encoder does real
    work; a flat clip would make decoding unrealistically cheap."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    background = cv2.resize(rng.integers(0, 256, (height // 8 + 1, width // 4 + 1, 3), dtype=np.uint8),
                            (width * 2, height), interpolation=cv2.INTER_LINEAR)  # (H, 2W, 3)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    num = int(seconds * fps)
    for t in range(num):
        shift = int(t / num * width)
        frame = np.ascontiguousarray(background[:, shift:shift + width])  # (H, W, 3)
        centre = (int(width * (0.1 + 0.8 * t / num)), height // 2)
        cv2.circle(frame, centre, height // 6, (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def videos_per_second(paths, strategy: str, repeats: int = 2) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            data.read_frames(path, 12, "uniform", strategy=strategy)
    return repeats * len(paths) / (time.perf_counter() - start)


def pipeline_videos_per_second(csv_path: Path, workers: int, epochs: int = 2) -> float:
    dataset = data.build_dataset("csv", csv_path, "train", num_frames=12, image_size=224)
    loader = data.make_loader(dataset, batch_size=2, num_workers=workers, timeout=300 if workers else 0)
    start = time.perf_counter()
    count = 0
    for _ in range(epochs):
        for batch in loader:
            count += batch["video"].shape[0]
    return count / (time.perf_counter() - start)


def break_even(path: Path, num_frames_total: int) -> float:
    """Frames per wanted frame at which one seek costs as much as decoding that many frames in sequence."""
    wanted = np.linspace(0, num_frames_total - 1, 12).astype(np.int64)
    start = time.perf_counter()
    data._read_sequential(path, np.array([num_frames_total - 1]))  # decode everything once
    per_frame = (time.perf_counter() - start) / num_frames_total
    start = time.perf_counter()
    data._read_seeking(path, wanted)
    per_seek = (time.perf_counter() - start) / len(wanted)
    return per_seek / per_frame


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4, help="clips per resolution")
    parser.add_argument("--out", default="/tmp/vop_bench", help="where the generated clips go")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"OpenCV {cv2.__version__}, default cv2 threads {cv2.getNumThreads()}")
    print("clips: 15 s, 30 fps (450 frames), mp4v; 12 frames per video, uniform sampling")
    for width, height in ((320, 240), (1280, 720)):
        paths = [make_clip(out / f"clip_{width}x{height}_{k}.mp4", width, height, 15, seed=k)
                 for k in range(args.clips)]
        seek = videos_per_second(paths, "seek")
        sequential = videos_per_second(paths, "sequential")
        auto = videos_per_second(paths, "auto")
        print(f"{width}x{height}: seek-per-frame {seek:6.2f} videos/s | sequential pass {sequential:6.2f} videos/s "
              f"({sequential / seek:.2f}x) | auto (default) {auto:6.2f} videos/s")
        csv_path = out / f"clips_{width}x{height}.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["video", "caption"])
            writer.writerows((path.name, f"clip {k}") for k, path in enumerate(paths))
        for workers in (0, 2):
            rate = pipeline_videos_per_second(csv_path, workers)
            print(f"{width}x{height}: DataLoader pipeline (decode + train transform to 224), {workers} workers: "
                  f"{rate:6.2f} videos/s")
    long_clip = make_clip(out / "long_320x240_120s.mp4", 320, 240, 120)
    ratio = break_even(long_clip, 120 * 30)
    print(f"break-even (320x240, 120 s clip): one seek costs as much as decoding {ratio:.0f} frames in sequence; "
          f"data.py seeks when a pass would decode > {data.SEEK_BREAK_EVEN_FRAMES_PER_WANTED} frames per wanted frame")


if __name__ == "__main__":
    main()
