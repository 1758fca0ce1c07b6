"""Benchmark end-to-end training (not a test): train.py's samples/s with a tiny CLIP, decoding every visit vs the
frame store.

What it runs: `train.train` itself (data="csv", plain VoP, 12 frames, batch 8, evaluation after the last epoch
only) on MSR-VTT-like clips (bench_data.make_clips: 320x240, 30 fps, 15 s, H.264 with x264's default 250-frame
keyframe interval, from `testsrc2`), listed in a CSV with a split column (7/8 of the clips train, 1/8 test, one
random caption each). The CLIP is tiny (TINY_CLIP: 1 + 1 layers of width 64) but keeps the 224 x 224 input, so
the data path is the real one and the model's share of the time is small: the benchmark first measures the model
alone (train.py's step on random frames) to show it. Runs:
1. decoding every visit, default_num_workers() DataLoader workers (all cores);
2. --frame-store in a fresh folder, same workers (the store is built before the first step, then read);
3. and 4. the same with --num-workers 0 and one OpenCV and one torch thread: the whole run on one core.

What it measures, by wrapping train.training_step and Run.fill_frame_store (machinery/runs.py; train.train calls both
by name):
- samples/s over the epochs after the first: the samples of those epochs divided by the time from the end of the
  first epoch's last step to the end of the last step. Start-up (probing, loading CLIP, starting the workers,
  building the store) and the final evaluation are outside it; the checkpoint written between epochs and the
  loader's refill at each epoch's start are inside it, as in any real epoch;
- the share of that time the main process waits for a batch (between one step's end and the next one's start);
  with 0 workers that is the data path's own cost, and the main process's CPU-seconds in it give its rate per
  core (videos per CPU-second, as in bench_data.py);
- the store's build (fill_frame_store: training and test videos), the time to the first step, the whole run;
- train.py's own samples/s (the last line of out_dir/log.jsonl), for comparison: it counts from the end of the
  run's first step, so it leaves out the start-up and the store's build, but not the first epoch.

    apt-get install ffmpeg     # a benchmark dependency only; without it, OpenCV's mp4v clips are used
    python benchmarks/bench_train.py [--clips 64] [--epochs 5] [--out /tmp/vop_bench_train]
"""
import contextlib
import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import make_clips  # noqa: E402
from common import Trainer, argument_parser, machine_line, random_captions, timed_median  # noqa: E402

import torch  # noqa: E402  (after common, which puts the repository on the path)

import clip_model  # noqa: E402
import data  # noqa: E402
from machinery import runs  # noqa: E402
import train  # noqa: E402
from vop import VoP, VoPConfig  # noqa: E402

# Small enough that the step costs little next to decoding; image_resolution 224 keeps the data path real.
TINY_CLIP = clip_model.CLIPConfig(embed_dim=32, image_resolution=224, vision_layers=1, vision_width=64,
                                  vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=64,
                                  transformer_heads=1, transformer_layers=1)
NUM_FRAMES, BATCH_SIZE = 12, 8


def write_dataset(out: Path, clips: list, test_share: int = 8) -> Path:
    """A CSV (video,caption,split) over `clips`: every `test_share`-th clip from the end is a test video."""
    num_test = max(1, len(clips) // test_share)
    csv_path = out / "dataset.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption", "split"])
        for k, (path, caption) in enumerate(zip(clips, random_captions(len(clips)))):
            split = "test" if k >= len(clips) - num_test else "train"
            writer.writerow([os.path.relpath(path, out), caption, split])
    return csv_path


def model_only_rate(clip_path: Path) -> float:
    """Videos/s of train.py's step (forward, InfoNCE, backward, AdamW) on random frames: the model alone."""
    model = VoP(clip_model.load(clip_path), VoPConfig("", num_frames=NUM_FRAMES)).train()
    trainer = Trainer(model, torch.device("cpu"), fp16=False)
    frames = torch.randn(BATCH_SIZE, NUM_FRAMES, 3, 224, 224)  # (B, F, 3, R, R)
    captions = random_captions(BATCH_SIZE)
    median, _, _ = timed_median(lambda: trainer.step(frames, model.tokenize(captions)), repeats=10)
    return BATCH_SIZE / median


@contextlib.contextmanager
def one_thread():
    """One OpenCV (hence FFmpeg) thread and one torch thread in this process, as in a DataLoader worker: with
    0 workers the whole run then uses one core."""
    cv2_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(cv2_threads)
        torch.set_num_threads(torch_threads)


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores the machine's other processes keep busy (this one sleeps meanwhile), from /proc/stat."""
    def sample():
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all jiffies, idle + iowait jiffies
    try:
        total, idle = sample()
        time.sleep(seconds)
        total2, idle2 = sample()
    except OSError:
        return None
    return (1 - (idle2 - idle) / max(total2 - total, 1)) * (os.cpu_count() or 1)


@contextlib.contextmanager
def timed_training():
    """Record every training step as (epoch, start, end, batch size, main process CPU-seconds at start and at
    end), and the frame store's fill time."""
    marks = {"steps": [], "fill_seconds": 0.0, "epoch": 0}
    step, fill, set_epoch = train.training_step, runs.Run.fill_frame_store, data.EpochSampler.set_epoch

    def timed_step(model, optimizer, scaler, batch, *args):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = step(model, optimizer, scaler, batch, *args)
        marks["steps"].append((marks["epoch"], start, time.perf_counter(), len(batch["caption"]), start_cpu,
                               time.process_time()))
        return result

    def timed_fill(run, *datasets):
        start = time.perf_counter()
        fill(run, *datasets)
        marks["fill_seconds"] = time.perf_counter() - start

    def noted_epoch(order, epoch, *args, **kwargs):
        marks["epoch"] = epoch
        set_epoch(order, epoch, *args, **kwargs)

    train.training_step, runs.Run.fill_frame_store, data.EpochSampler.set_epoch = timed_step, timed_fill, noted_epoch
    try:
        yield marks
    finally:
        train.training_step, runs.Run.fill_frame_store, data.EpochSampler.set_epoch = step, fill, set_epoch


def train_run(name: str, out: Path, clip_path: Path, csv_path: Path, epochs: int, workers: int,
              store: bool) -> dict:
    """One train.train run; its figures (see the module docstring)."""
    busy = busy_cores()
    if busy is not None and busy > 0.2:
        print(f"  warning: other processes keep {busy:.1f} cores busy before run {name}: its figures are low")
    run_dir = out / name
    store_dir = out / f"{name}_store"
    shutil.rmtree(store_dir, ignore_errors=True)  # a fresh store: its build is measured
    config = train.TrainConfig(clip=str(clip_path), data="csv", data_root=str(csv_path), prompts="",
                               num_frames=NUM_FRAMES, batch_size=BATCH_SIZE, epochs=epochs, num_workers=workers,
                               frame_store=str(store_dir) if store else None, eval_each_epoch=False,
                               out_dir=str(run_dir), overwrite=True, log_every=1, device="cpu")
    printed = io.StringIO()
    threads = one_thread() if workers == 0 else contextlib.nullcontext()
    try:
        with threads, timed_training() as marks, contextlib.redirect_stdout(printed):
            start = time.perf_counter()
            train.train(config)
            whole = time.perf_counter() - start
    except BaseException:
        print(printed.getvalue())  # what train.py said before it failed
        raise
    (run_dir / "stdout.txt").write_text(printed.getvalue())
    for line in printed.getvalue().splitlines():  # anything unusual in train.py's output is shown
        if "warning" in line.lower():
            print(f"  [{name}] {line}")

    steps = marks["steps"]
    first_epoch = [step for step in steps if step[0] == 0]
    later = [step for step in steps if step[0] > 0]  # (epoch, start, end, size, start_cpu, end_cpu)
    previous = first_epoch[-1:] + later[:-1]  # the step before each measured one
    waiting = sum(step[1] - before[2] for step, before in zip(later, previous))
    waiting_cpu = sum(step[4] - before[5] for step, before in zip(later, previous))  # main process only
    period = later[-1][2] - first_epoch[-1][2]
    samples = sum(step[3] for step in later)
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    logged_rate = [record for record in logged if "samples_per_second" in record][-1]["samples_per_second"]
    return {"name": name, "workers": workers, "store": store, "rate": samples / period,
            "waiting": waiting / period, "data_rate": samples / waiting_cpu, "fill": marks["fill_seconds"],
            "to_first_step": steps[0][1] - start, "whole": whole, "logged_rate": logged_rate,
            "stored_videos": len(list(store_dir.rglob("*.frames"))),
            "store_mb": sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file()) / 1e6}


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--clips", type=int, default=64, help="clips made (7/8 train, 1/8 test)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (the paper's 5); the first is "
                        "not measured")
    parser.add_argument("--out", default="/tmp/vop_bench_train", help="where the clips, dataset and runs go")
    args = parser.parse_args()
    if args.clips < 16 or args.epochs < 2:
        parser.error("--clips must be >= 16 (at least one batch of training videos) and --epochs >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = data.default_num_workers()
    print(f"{machine_line()} | OpenCV {cv2.__version__}")

    (out / "clips").mkdir(exist_ok=True)
    clips = make_clips(out / "clips", args.clips)
    kind, paths = next(iter(clips.items()))  # H.264 (GOP 250) when ffmpeg is installed
    csv_path = write_dataset(out, paths)
    torch.manual_seed(0)
    clip_path = out / "tiny_clip.pt"
    torch.save(clip_model.CLIP(TINY_CLIP).state_dict(), clip_path)
    num_test = max(1, len(paths) // 8)
    print(f"data: {len(paths) - num_test} training + {num_test} test clips, {kind}, 320x240, 30 fps, 15 s; "
          f"{NUM_FRAMES} frames x 224 px, batch {BATCH_SIZE}, {args.epochs} epochs, plain VoP on a tiny CLIP "
          f"(1 + 1 layers, width 64)")
    model_rate = model_only_rate(clip_path)
    with one_thread():
        model_rate_one_thread = model_only_rate(clip_path)
    print(f"model alone (train.py's step on random frames): {model_rate:.0f} videos/s with "
          f"{torch.get_num_threads()} threads, {model_rate_one_thread:.0f} with 1\n")

    # The runs with workers go first: the fork server that starts their workers lives on for the whole process.
    runs = [train_run(name, out, clip_path, csv_path, args.epochs, num_workers, store)
            for name, num_workers, store in [("decode", workers, False), ("store", workers, True),
                                             ("decode_one_core", 0, False), ("store_one_core", 0, True)]]
    print(f"\ntrain.py, {kind} clips, tiny CLIP; samples/s = training samples of epochs 2-{args.epochs} / their "
          f"wall time (start-up, store build and final evaluation excluded)")
    print("| data | DataLoader workers | samples/s | main process waiting for data | store build | to first step | "
          "whole run | train.py's own samples/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        build = f"{run['fill']:.1f} s ({run['stored_videos'] / run['fill']:.1f} videos/s, {run['store_mb']:.0f} MB)" \
            if run["store"] else "-"
        workers_text = f"{run['workers']} (all cores)" if run["workers"] else "0, 1 thread (one core)"
        print(f"| {'frame store' if run['store'] else 'decoding every visit'} | {workers_text} | "
              f"**{run['rate']:.1f}** | {100 * run['waiting']:.0f}% | {build} | {run['to_first_step']:.1f} s | "
              f"{run['whole']:.1f} s | {run['logged_rate']:.1f} |")
    decode, store, decode_one, store_one = runs
    print(f"\nmodel alone: {model_rate:.0f} videos/s ({torch.get_num_threads()} threads), {model_rate_one_thread:.0f} "
          f"(1 thread). With the store: {store['rate'] / decode['rate']:.1f}x on all cores, "
          f"{store_one['rate'] / decode_one['rate']:.1f}x on one core. The data path alone on one core (the main "
          f"process's CPU-seconds while it waits for a batch: read, transform, collate): "
          f"{decode_one['data_rate']:.1f} videos/s decoding, {store_one['data_rate']:.1f} from the store "
          f"({store_one['data_rate'] / decode_one['data_rate']:.1f}x). train.py's own samples/s counts from the "
          f"end of its first step (the first epoch included).")


if __name__ == "__main__":
    main()
