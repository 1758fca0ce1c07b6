"""Benchmark the data path (not a test): one training visit with and without the frame store, per core.

On MSR-VTT-like clips made with ffmpeg (320x240, 30 fps, 15 s, from `testsrc2`): H.264 with x264's default
keyframe interval (250 frames), and MPEG-4 part 2 ("mp4v", a keyframe every 12 frames). Per core = this one
process with one OpenCV and one torch thread, as a DataLoader worker runs. Reports:
1. reading strategies: seek per frame, one sequential pass, `auto` (keyframe scan included, cold), and whether
   they return identical frames; the fit of the seek-cost model that `auto` uses;
2. a training visit (decode 12 random frames + random resized crop + flip + normalise) and an evaluation visit,
   decoding every visit vs reading the frame store; building the store; its bytes per video, and for MSR-VTT;
3. probing videos (formats/video_io.py's probe_videos) and the DataLoader on all cores, with the store.

    apt-get install ffmpeg     # a benchmark dependency only; without it, OpenCV's mp4v clips are used
    python benchmarks/bench_data.py [--clips 8] [--out /tmp/vop_bench]
"""
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, cpu_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from machinery import frame_store  # noqa: E402
from formats import video_io  # noqa: E402

MSRVTT_TRAIN_VIDEOS, MSRVTT_TEST_VIDEOS = 9000, 1000  # the 9k split and the 1k-A test


def make_clips(out: Path, count: int) -> dict:
    """{kind: [paths]}: MSR-VTT-like clips, each a different hue of testsrc2 so the files differ."""
    kinds = {"H.264 (GOP 250)": ("mp4", ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
             "mp4v (GOP 12)": ("mp4", ["-c:v", "mpeg4", "-q:v", "5", "-g", "12"])}
    if shutil.which("ffmpeg") is None:
        print("ffmpeg not found: OpenCV's mp4v clips only (apt-get install ffmpeg for the H.264 rows)")
        return {"mp4v (OpenCV)": [make_opencv_clip(out / f"opencv_{k}.mp4", k) for k in range(count)]}
    clips = {}
    for kind, (suffix, codec) in kinds.items():
        clips[kind] = []
        for k in range(count):
            path = out / f"{kind.split()[0].replace('.', '')}_{k}.{suffix}"
            if not path.is_file():
                subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                                "testsrc2=size=320x240:rate=30:duration=15", "-vf", f"hue=h={37 * k}", *codec,
                                str(path)], check=True)
            clips[kind].append(path)
    return clips


def make_opencv_clip(path: Path, seed: int) -> Path:
    if not path.is_file():
        rng = np.random.default_rng(seed)
        background = cv2.resize(rng.integers(0, 256, (31, 81, 3), dtype=np.uint8), (640, 240))
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (320, 240))
        for t in range(450):
            frame = np.ascontiguousarray(background[:, t * 320 // 450:t * 320 // 450 + 320])
            cv2.circle(frame, (int(32 + 256 * t / 450), 120), 40, (0, 0, 255), -1)
            writer.write(frame)
        writer.release()
    return path


def rate(work, items, rounds: int = 3) -> float:
    """Items per CPU-second of `work(item)`: the median of `rounds` passes over all items. CPU time, not wall
    time: with one thread per process it is the cost per core, and other processes on the machine (a
    shared 2-core box) do not inflate it."""
    rates = []
    for _ in range(rounds):
        start = time.process_time()
        for item in items:
            work(item)
        rates.append(len(items) / (time.process_time() - start))
    return statistics.median(rates)


def cold_auto(path):
    video_io._LAYOUTS.clear()  # as a worker's first visit: the keyframe scan is paid every time here
    return data.read_frames(path, 12, "uniform", strategy="auto")


def strategies(kind: str, paths: list) -> None:
    seek = rate(lambda p: data.read_frames(p, 12, "uniform", strategy="seek"), paths)
    sequential = rate(lambda p: data.read_frames(p, 12, "uniform", strategy="sequential"), paths)
    auto = rate(cold_auto, paths)
    same = all(np.array_equal(data.read_frames(p, 12, mode, np.random.default_rng(0), "seek"),
                              data.read_frames(p, 12, mode, np.random.default_rng(0), "sequential"))
               for p in paths[:3] for mode in ("uniform", "rand"))
    chosen = video_io.choose_strategy(data.sample_frame_indices(450, 12), video_io.scan_video(paths[0]))
    print(f"| {kind} | {seek:.1f} | {sequential:.1f} | {auto:.1f} ({chosen}) | "
          f"{auto / max(seek, sequential):.2f}x | {'yes' if same else 'NO'} |")


def seek_model_fit(kind: str, path: Path) -> None:
    """Measured cost of one seek, in sequentially decoded frames, against the model of video_io.choose_strategy."""
    layout = video_io.scan_video(path)
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    start = time.process_time()
    count = 0
    while capture.grab():
        count += 1
    per_frame = (time.process_time() - start) / count
    targets = np.arange(20, count - 1, 37)
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    capture.read()
    start = time.process_time()
    for target in targets:
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(target))
        capture.grab()
    per_seek = (time.process_time() - start) / len(targets) / per_frame
    keyframes, lookback = layout.keyframes, np.maximum(targets - video_io.OPENCV_SEEK_LOOKBACK_FRAMES, 0)
    starts = keyframes[np.searchsorted(keyframes, lookback, side="right") - 1]
    model = np.mean(targets - starts + 1) + video_io.SEEK_OVERHEAD_FRAMES
    print(f"| {kind} | {len(keyframes)} keyframes in {count} frames | {per_seek:.0f} | {model:.0f} |")


def visits(kind: str, paths: list, out: Path) -> dict:
    """Per-core rates of training and evaluation visits, with and without the store; building it; its bytes."""
    store_root = out / f"store_{kind.split()[0].replace('.', '')}"
    shutil.rmtree(store_root, ignore_errors=True)
    store = frame_store.FrameStore(store_root, data.FRAME_RULE)

    def dataset(train: bool, with_store: bool):
        return data.VideoTextDataset("bench", [p.stem for p in paths], paths, [f"clip {p.stem}" for p in paths],
                                     list(range(len(paths))), num_frames=12, image_size=224, train=train,
                                     frame_store=store if with_store else None)

    train_decode, train_store = dataset(True, False), dataset(True, True)
    eval_decode, eval_store = dataset(False, False), dataset(False, True)
    items = list(range(len(paths)))
    figures = {}
    start = time.process_time()  # built in this process (num_workers=0), so its CPU time is the cost
    store.build(train_store, num_workers=0, log=lambda message: None)
    figures["build_train"] = len(paths) / (time.process_time() - start)
    start = time.process_time()
    store.build(eval_store, num_workers=0, log=lambda message: None)
    figures["build_eval"] = len(paths) / (time.process_time() - start)
    train_entries = sorted(store_root.glob("train-*/*.frames"))
    eval_entries = sorted(store_root.glob("eval-*/*.frames"))
    figures["train_bytes"] = np.mean([p.stat().st_size for p in train_entries])
    figures["eval_bytes"] = np.mean([p.stat().st_size for p in eval_entries])
    for epoch, (name, dataset_) in enumerate([("train_decode", train_decode), ("train_store", train_store),
                                              ("eval_decode", eval_decode), ("eval_store", eval_store)]):
        figures[name] = rate(lambda item: dataset_[(epoch, item)], items)
    exact = all(torch.equal(eval_decode[j]["video"], eval_store[j]["video"]) for j in items[:3])
    print(f"| {kind} | {figures['train_decode']:.1f} | {figures['train_store']:.1f} | "
          f"**{figures['train_store'] / figures['train_decode']:.1f}x** | {figures['eval_decode']:.1f} | "
          f"{figures['eval_store']:.1f} ({'bit-identical' if exact else 'DIFFERENT'}) | "
          f"{figures['build_train']:.1f} + {figures['build_eval']:.1f} | "
          f"{figures['train_bytes'] / 1e6:.2f} + {figures['eval_bytes'] / 1e6:.2f} |")
    figures["dataset"] = train_store
    return figures


def probing(paths: list, out: Path, copies: int) -> None:
    folder = out / "probe"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    many = []
    for k in range(copies):
        link = folder / f"v{k}{paths[k % len(paths)].suffix}"
        os.link(paths[k % len(paths)], link)  # the same bytes under many names: no disk space used
        many.append(link)
    per_core = rate(video_io.probe_video, many[:200], rounds=1)
    workers = data.default_num_workers()
    start = time.perf_counter()
    results = video_io.probe_videos(many, num_workers=workers, cache_file=folder / "probe.json")
    first = time.perf_counter() - start
    start = time.perf_counter()
    video_io.probe_videos(many, num_workers=workers, cache_file=folder / "probe.json")
    cached = time.perf_counter() - start
    assert all(result.ok for result in results.values())
    print(f"probe_videos: {per_core:.0f} videos per CPU-second; {copies} videos with {workers} processes in "
          f"{first:.1f} s ({copies / first:.0f}/s, pool start included); again from the cache file: {cached:.2f} s")


def loader_rate(dataset, workers: int, epochs: int = 3, visits_per_video: int = 8) -> float:
    """Videos/s (wall) through one DataLoader with persistent workers, batches of 4, over `epochs` epochs in
    which each video is visited `visits_per_video` times; the best epoch after the first (which starts them)."""
    keys = []  # (epoch, item) keys, refilled in place each epoch: the persistent workers follow them
    loader = data.make_loader(dataset, 4, workers, sampler=keys, timeout=300)
    rates = []
    for epoch in range(epochs):
        visits = np.random.default_rng(epoch).permutation(len(dataset) * visits_per_video) % len(dataset)
        keys[:] = [(epoch, int(item)) for item in visits]
        start = time.perf_counter()
        count = sum(batch["video"].shape[0] for batch in loader)
        rates.append(count / (time.perf_counter() - start))
    return max(rates[1:])


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--clips", type=int, default=8, help="clips per kind")
    parser.add_argument("--probe-copies", type=int, default=2000, help="names to probe")
    parser.add_argument("--out", default="/tmp/vop_bench", help="where the generated clips go")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs; torch {torch.__version__}, "
          f"OpenCV {cv2.__version__}")
    print("per core: this process, 1 OpenCV thread, 1 torch thread; 12 frames of 15 s, 30 fps, 320x240 clips\n")
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    clips = make_clips(out, args.clips)

    print("| clip (videos per CPU-second) | seek | sequential | auto | auto / faster | identical |")
    print("|---|---:|---:|---:|---:|---|")
    for kind, paths in clips.items():
        strategies(kind, paths)
    print("\n| clip | keyframes | one seek, measured (frames) | model (frames) |\n|---|---|---:|---:|")
    for kind, paths in clips.items():
        seek_model_fit(kind, paths[0])

    print("\nvideos per CPU-second; a visit = one dataset item (12 frames, crop/flip or center crop, normalised); "
          "build = storing a video (training + evaluation entries); MB = one entry of each")
    print("| clip | training visit, decoding | training visit, store | speed-up | evaluation visit, decoding | "
          "evaluation visit, store | build | MB per video |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    figures = {kind: visits(kind, paths, out) for kind, paths in clips.items()}
    first = next(iter(figures.values()))
    total = (MSRVTT_TRAIN_VIDEOS * first["train_bytes"] + MSRVTT_TEST_VIDEOS * first["eval_bytes"]) / 1e9
    print(f"\nMSR-VTT (9,000 training videos with training entries, 1,000 test videos with evaluation entries) at "
          f"these clips' sizes: {total:.1f} GB")

    probing(next(iter(clips.values())), out, args.probe_copies)
    workers = data.default_num_workers()
    print(f"load average before the DataLoader runs (other processes share these CPUs): {os.getloadavg()[0]:.1f}")
    with_store = loader_rate(first["dataset"], workers)
    first["dataset"].frame_store = None
    decoding = loader_rate(first["dataset"], workers)
    print(f"DataLoader, {workers} workers (default_num_workers) on this machine, {next(iter(clips))}: "
          f"{decoding:.1f} videos/s decoding, {with_store:.1f} videos/s with the store")


if __name__ == "__main__":
    main()
