"""GPU check of the whole project: train.py, evaluate.py and search.py on CUDA as a user runs them, the torchrun
path, and the speed of the training step, in one command that needs only a CUDA machine and this repository.

Run it whenever a GPU is available: it downloads nothing and takes under 8 minutes on one H100/H200. Every part
runs in its own try (the commands in their own processes, with a time limit), so one failure is reported and
the rest still run; the table at the end, also written as JSON (--json), says for each part whether it passed.

1. End to end, as a user runs it. Synthetic MSR-VTT-like clips (320x240, 30 fps, 15 s, H.264 from ffmpeg's
   `testsrc2`, as the benchmarks make them; OpenCV's mp4v when ffmpeg is missing) in the MSR-VTT layout
   (MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv, videos/), and a ViT-B/32-shaped CLIP with
   random weights saved as a state dict with OpenAI's names (fp16, as OpenAI's release), passed as --clip FILE.
   - `train`: train.py --prompts pos,ctx --frame-store --precision fp16 (autocast + GradScaler), 2 short
     epochs (the run's identity fixes --epochs), evaluated after each; SIGTERM at the first step of epoch 2,
     as a scheduler stops a job: it must exit 143 with epoch 1's checkpoint intact;
   - `resume`: the same command with --resume auto trains epoch 2 from that checkpoint and evaluates;
   - `evaluate`: evaluate.py --checkpoint last.pt (with the frame store);
   - `search index` + `search query`: search.py indexes every clip with the checkpoint, then answers a test
     caption (--json, top 5).
   Each row: exit status, wall time, a rate (train.py's own samples/s from its log.jsonl for training; videos
   over the whole process's wall time for evaluate and index), the peak GPU memory (torch's
   max_memory_allocated in the command's process, read at its exit by a sitecustomize hook put on its
   PYTHONPATH: the scripts log none), and whether every logged loss is finite.
2. `torchrun`: the same training (1 epoch) under `torchrun --nproc_per_node 1` (python -m torch.distributed.run
   --standalone), so the process group is "cpu:gloo,cuda:nccl" and every collective the code calls (the loss's
   all_gather, the gradients' all_reduce, barriers, object broadcasts) runs through NCCL on CUDA tensors; the
   backend and world size are read from the process at its exit.
3. Speed, in one child process (rows kept as each part ends): train.py's step (common.Trainer: autocast,
   InfoNCE, GradScaler, clipping, AdamW) per variant ("", fn,pos, fn,ctx, pos,ctx, full fine-tuning) at the
   paper's batch, 32 videos x 12 frames x 224 px, 2 warm-up + 3 timed steps, with max_memory_allocated, its
   FLOPs per video (torch.utils.flop_counter.FlopCounterMode on one step: forward + backward matmuls and
   attention) and the model FLOPs utilisation against the device's peak dense fp16 tensor FLOP/s (PEAK_FLOPS;
   an unknown device gets none); `encode_image` at batch 256; `eval`: a 1k x 1k test set, 1,000 videos of 12
   random frames and 1,000 random captions embedded by the model (real encodes) and scored by evaluate's
   metric functions (both directions); `compile`: the plain VoP step under torch.compile (inductor): the first
   step (compiling), then videos/s against eager.

    python benchmarks/gpu_check.py              # on a CUDA machine: /tmp/vop_gpu_check/, gpu_check.json in it
    python benchmarks/gpu_check.py --out DIR --json table.json
    python benchmarks/gpu_check.py --cpu-smoke  # every part at toy size on the CPU (the tests run this)

--cpu-smoke tests the script, not the speed: a tiny CLIP (32 px, 2 + 2 layers), 12 tiny clips (64x48, 2 s),
4 frames, batch 4, fp32, no DataLoader workers, one torch thread per process, gloo instead of NCCL,
torch.compile with the aot_eager backend (inductor compiles for minutes on a small CPU), a 16 x 16 test set.
tests/test_gpu_check.py runs it.
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
GIB = 1024 ** 3
VARIANTS = ["", "fn,pos", "fn,ctx", "pos,ctx", "full"]
PARTS = ["setup", "train", "resume", "evaluate", "search index", "search query", "torchrun",
         *[f"step {'full' if v == 'full' else f'VoP[{v}]' if v else 'VoP'}" for v in VARIANTS],
         "encode_image", "eval", "compile"]  # the table's rows, in order
SPEED_PARTS = PARTS[PARTS.index("torchrun") + 1:]

# Peak dense (no sparsity) fp16/bf16 tensor-core FLOP/s by a part of torch.cuda.get_device_name(), from NVIDIA's
# data sheets; the first match wins. None: a device whose peak is not assumed here (MFU is not computed).
PEAK_FLOPS = (("H100 PCIe", 756e12, "H100 PCIe"), ("H100 NVL", None, ""), ("H200 NVL", None, ""),
              ("H100", 989e12, "H100 SXM"), ("H200", 989e12, "H200 SXM"), ("A100", 312e12, "A100"))
WORDS = ("a man woman dog cat kid chef car guitar ball kitchen stage park rain beach news song game plays talks "
         "cooks runs sings dances rides throws explains shows red small happy old").split()

# Written beside the commands' PYTHONPATH: at exit, train.py / evaluate.py / search.py record their peak CUDA
# memory (torch's own count, which no log of theirs holds), peak RSS and process group; any sitecustomize the
# interpreter had is still run.
MEMORY_HOOK = '''"""gpu_check.py's hook: record a command's peak memory and process group at its exit."""
import atexit
import importlib.machinery
import importlib.util
import json
import os
import sys


def _record():
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script not in ("train.py", "evaluate.py", "search.py"):
        return
    record = {"script": script, "pid": os.getpid(), "cuda_max_allocated": None, "backend": None, "world_size": None}
    torch = sys.modules.get("torch")
    try:
        import resource
        record["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if torch is not None and torch.cuda.is_initialized():
            record["cuda_max_allocated"] = max(torch.cuda.max_memory_allocated(d)
                                               for d in range(torch.cuda.device_count()))
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            record["backend"] = str(torch.distributed.get_backend())
            record["world_size"] = torch.distributed.get_world_size()
        record.update(_group)  # a group left before this ran (utils/distributed.py leaves it at exit)
    except Exception as error:  # noqa: BLE001 -- a measurement must never change how the command ends
        record["error"] = repr(error)
    folder = os.environ.get("GPU_CHECK_MEMORY_DIR")
    if folder:
        with open(os.path.join(folder, f"{script}-{os.getpid()}.json"), "w") as handle:
            json.dump(record, handle)


_group = {}


def _remember_the_group():
    """The project leaves its process group at exit, before `_record` runs: note its backend then."""
    import torch.distributed as dist
    leave = dist.destroy_process_group

    def remembered(*args, **kwargs):
        if dist.is_initialized():
            _group.update(backend=str(dist.get_backend()), world_size=dist.get_world_size())
        return leave(*args, **kwargs)
    dist.destroy_process_group = remembered


atexit.register(_record)
if sys.argv and os.path.basename(sys.argv[0]) in ("train.py", "evaluate.py", "search.py"):
    try:
        _remember_the_group()
    except Exception:  # noqa: BLE001 -- a measurement must never change how the command runs
        pass
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
'''


@dataclass
class Settings:
    smoke: bool
    device: str  # train.py's --device
    precision: str  # train.py's --precision: fp16 = autocast + GradScaler
    clip: dict  # clip_model.CLIPConfig's fields; {} = ViT-B/32
    fn_layers: int  # VoP^F's K for the step variants (below the CLIP's depth)
    num_frames: int
    batch_size: int
    train_videos: int
    test_videos: int
    captions_per_video: int
    clip_size: tuple  # (width, height, frames per second, seconds) of the synthetic clips
    num_workers: int | None  # DataLoader workers; None = the scripts' default (this machine's cores)
    step_videos: int
    warmup_steps: int
    timed_steps: int
    image_batch: int
    image_repeats: int
    eval_size: int  # videos and captions of the eval part's test set
    eval_batch: int
    compile_backend: str
    command_timeout: int  # seconds, per command
    speed_timeout: int  # seconds, for all the speed parts together


GPU = Settings(smoke=False, device="cuda", precision="fp16", clip={}, fn_layers=8, num_frames=12, batch_size=32,
               train_videos=128, test_videos=32, captions_per_video=2, clip_size=(320, 240, 30, 15),
               num_workers=None, step_videos=32, warmup_steps=2, timed_steps=3, image_batch=256, image_repeats=3,
               eval_size=1000, eval_batch=50, compile_backend="inductor", command_timeout=240, speed_timeout=420)
SMOKE = Settings(smoke=True, device="cpu", precision="fp32",
                 clip=dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                           context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                           transformer_layers=2),
                 fn_layers=1, num_frames=4, batch_size=4, train_videos=8, test_videos=4, captions_per_video=2,
                 clip_size=(64, 48, 10, 2), num_workers=0, step_videos=2, warmup_steps=0, timed_steps=1,
                 image_batch=4, image_repeats=1, eval_size=16, eval_batch=8, compile_backend="aot_eager",
                 command_timeout=120, speed_timeout=180)


def log(*parts) -> None:
    print(*parts, flush=True)


def failed_row(part: str, error: str, **fields) -> dict:
    return {"part": part, "ok": False, "note": error, **fields}


def guarded(part: str, check) -> dict:
    """Run one part; an exception becomes a failed row (its traceback printed) instead of stopping the script."""
    started = time.perf_counter()
    try:
        row = check()
    except Exception as error:  # noqa: BLE001 -- a GPU check must report every part, whatever breaks
        traceback.print_exc(file=sys.stdout)
        row = failed_row(part, f"{type(error).__name__}: {error}"[:300])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row = {"part": part, **row}
    row.setdefault("seconds", round(time.perf_counter() - started, 2))
    return row


# -- the table ------------------------------------------------------------------------------------------------

class Table:
    """The rows so far; the JSON file is rewritten after every row, so a crash keeps what was measured."""

    def __init__(self, path: Path, environment: dict, settings: Settings):
        self.path, self.rows = path, []
        self.head = {"environment": environment, "settings": asdict(settings), "notes": NOTES}
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.path.write_text(json.dumps({**self.head, "rows": self.rows}, indent=1, default=str) + "\n")
        status = "ok  " if row.get("ok") else "FAIL"
        log(f"[{status}] {row['part']}: {format_cell(row, 'seconds')} s | {format_cell(row, 'rate')} | "
            f"{row.get('note', '')}")

    def markdown(self) -> str:
        lines = ["| part | ok | exit | wall s | rate | peak GPU GiB | loss finite | MFU | note |",
                 "|---|---|---:|---:|---:|---:|---|---:|---|"]
        for row in self.rows:
            lines.append("| " + " | ".join([row["part"], "ok" if row.get("ok") else "**FAIL**"]
                                           + [format_cell(row, key) for key in
                                              ("exit", "seconds", "rate", "peak_gpu_gib", "loss_finite", "mfu")]
                                           + [str(row.get("note", "")).replace("|", "/")]) + " |")
        return "\n".join(lines)


NOTES = {"rate": "train, resume, torchrun: train.py's own samples/s (log.jsonl's last step record, counted from "
                 "the end of the process's first step); evaluate, search index: videos / wall time of the whole "
                 "process (start-up included); step, compile: videos / step time; eval: videos / (encoding + "
                 "scoring) time",
         "peak_gpu_gib": "commands: torch.cuda.max_memory_allocated in the command's process at its exit "
                         "(sitecustomize hook; the scripts log none); speed parts: max_memory_allocated around "
                         "the part; CUDA context and allocator cache not included",
         "mfu": "FLOPs of one step counted by FlopCounterMode (matmuls, convolutions, attention) / step time / "
                "the device's peak dense fp16 FLOP/s (PEAK_FLOPS)"}


def format_cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "rate":
        return f"{value:,.1f} {row.get('unit', '')}".strip()
    if key == "loss_finite":
        return "yes" if value else "**NO**"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if key == "peak_gpu_gib":
        return f"{value:.2f}"
    if key == "seconds":
        return f"{value:.1f}"
    return str(value)


# -- the environment ------------------------------------------------------------------------------------------

def environment(settings: Settings) -> dict:
    def git_commit():
        try:
            return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        import cv2
        opencv = cv2.__version__
    except ImportError:
        opencv = None
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "opencv": opencv,
            "ffmpeg": shutil.which("ffmpeg") is not None, "cpus": os.cpu_count(), "platform": platform.platform()}
    if settings.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_memory_gib=round(props.total_memory / GIB, 1),
                    compute_capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    devices=torch.cuda.device_count())
        info["peak_flops"], info["peak_flops_source"] = peak_flops(info["device"])
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()})", peak_flops=None,
                    peak_flops_source="none: CPU smoke test")
    return info


def peak_flops(name: str) -> tuple[float | None, str]:
    for part, flops, label in PEAK_FLOPS:
        if part in name:
            if flops is None:
                return None, f"{name}: no peak assumed here, MFU not computed"
            return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s dense fp16 assumed ({label}'s data sheet)"
    return None, f"{name}: unknown device, MFU not computed"


# -- 1. the data and the CLIP, as a user has them ---------------------------------------------------------------

def captions(count: int, seed: int) -> list[str]:
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(8)) for _ in range(count)]


def make_clip(path: Path, k: int, settings: Settings) -> str:
    """One MSR-VTT-like clip; returns its codec. ffmpeg's testsrc2 in H.264 (x264's defaults: a keyframe every 250
    frames, like the benchmarks' downloads), each clip another hue; without ffmpeg, OpenCV's mp4v of a moving
    disc on a random background."""
    width, height, fps, seconds = settings.clip_size
    if shutil.which("ffmpeg"):
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}", "-vf", f"hue=h={37 * k}",
                        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-threads", "1", str(path)], check=True,
                       timeout=120)
        return "H.264 (ffmpeg, GOP 250)"
    import cv2
    import numpy as np
    rng = np.random.default_rng(k)
    background = cv2.resize(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8), (2 * width, height))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frames = int(fps * seconds)
    for t in range(frames):
        frame = np.ascontiguousarray(background[:, t * width // frames:t * width // frames + width])
        cv2.circle(frame, (int(width * (0.1 + 0.8 * t / frames)), height // 2), max(2, height // 6),
                   (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"OpenCV could not write {path}")
    return "mp4v (OpenCV; ffmpeg not found)"


def setup(settings: Settings, work: Path) -> dict:
    """The synthetic MSR-VTT folder and the CLIP weights file; what the commands need to find them."""
    started = time.perf_counter()
    root = work / "msrvtt"
    (root / "videos").mkdir(parents=True)
    total = settings.train_videos + settings.test_videos
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        codecs = list(pool.map(lambda k: make_clip(root / "videos" / f"video{k}.mp4", k, settings), range(total)))
    train_ids = [f"video{k}" for k in range(settings.train_videos)]
    test_ids = [f"video{k}" for k in range(settings.train_videos, total)]
    per_video = settings.captions_per_video
    texts = captions(total * per_video, seed=0)
    sentences = [{"video_id": f"video{k}", "caption": texts[k * per_video + c], "sen_id": k * per_video + c}
                 for k in range(total) for c in range(per_video)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in train_ids))
    test_captions = [texts[k * per_video] for k in range(settings.train_videos, total)]
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + "".join(
        f"ret{i},msr{i},{video},{caption}\n" for i, (video, caption) in enumerate(zip(test_ids, test_captions))))

    sys.path.insert(0, str(REPO))
    import clip_model  # the one project module the script itself needs here: CLIP's shapes and names
    torch.manual_seed(0)
    clip = clip_model.CLIP(clip_model.CLIPConfig(**settings.clip))
    clip_path = work / ("clip_vit_b32_random.pt" if not settings.clip else "clip_tiny_random.pt")
    torch.save({name: tensor.half() for name, tensor in clip.state_dict().items()}, clip_path)
    size = sum(p.stat().st_size for p in (root / "videos").iterdir()) / 1e6
    note = (f"{len(train_ids)} train videos x {per_video} captions, {len(test_ids)} test videos; "
            f"{settings.clip_size[0]}x{settings.clip_size[1]}, {settings.clip_size[3]} s, {codecs[0]}, {size:.0f} MB; "
            f"CLIP {'ViT-B/32-shaped' if not settings.clip else 'tiny'} random weights "
            f"({clip_path.stat().st_size / 1e6:.0f} MB, fp16 state dict)")
    return {"row": {"ok": True, "seconds": round(time.perf_counter() - started, 2), "note": note},
            "root": root, "clip": clip_path, "store": work / "frame_store", "test_captions": test_captions,
            "videos": total}


# -- running a command ------------------------------------------------------------------------------------------

@dataclass
class Finished:
    rc: int | None  # None: killed at the time limit
    seconds: float
    output: str  # stdout and stderr, interleaved
    log: Path
    memory: list  # the hook's records of the command's processes
    signalled: bool  # stop_when matched and SIGTERM was sent


class Commands:
    """Runs the project's commands as a user does (python train.py ... from the repository's root), each in
    its own process group with a time limit, its output in work/logs/<name>.log."""

    def __init__(self, settings: Settings, work: Path):
        self.settings, self.logs, self.memory = settings, work / "logs", work / "memory"
        hook = work / "hook"
        for folder in (self.logs, self.memory, hook):
            folder.mkdir(parents=True, exist_ok=True)
        (hook / "sitecustomize.py").write_text(MEMORY_HOOK)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", GPU_CHECK_MEMORY_DIR=str(self.memory),
                        PYTHONPATH=os.pathsep.join([str(hook)] + ([os.environ["PYTHONPATH"]]
                                                                  if os.environ.get("PYTHONPATH") else [])))
        if settings.smoke:  # one torch thread per process: on a small shared CPU, more threads only contend
            self.env["OMP_NUM_THREADS"] = "1"

    def run(self, name: str, argv: list, stop_when=None, timeout: int | None = None) -> Finished:
        for stale in self.memory.glob("*.json"):
            stale.unlink()
        log_path = self.logs / f"{name.replace(' ', '_')}.log"
        log(f"  $ {' '.join(str(a) for a in argv)}")
        started = time.perf_counter()
        process = subprocess.Popen([str(a) for a in argv], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        lines, signalled = [], threading.Event()

        def read():
            with open(log_path, "w", encoding="utf-8") as handle:
                for line in process.stdout:
                    handle.write(line)
                    lines.append(line)
                    if stop_when is not None and not signalled.is_set() and stop_when(line):
                        signalled.set()
                        process.send_signal(signal.SIGTERM)  # the main process only, as a scheduler stops a job

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc = process.wait(timeout=timeout or self.settings.command_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the command's own process group: it and its workers
            process.wait()
            rc = None
        seconds = time.perf_counter() - started
        reader.join(timeout=10)  # the rest of the output (a helper process may hold the pipe a moment longer)
        memory = []
        for path in sorted(self.memory.glob("*.json")):
            try:
                memory.append(json.loads(path.read_text()))
            except ValueError:
                pass
        output = "".join(lines)
        if rc != 0 and not signalled.is_set():
            tail = "".join(lines[-15:])
            log(f"  {name}: exit status {rc if rc is not None else 'none (killed at the time limit)'}; the end of "
                f"{log_path}:\n{tail}")
        return Finished(rc, seconds, output, log_path, memory, signalled.is_set())


def command_fields(done: Finished) -> dict:
    """The fields every command's row has: exit status, wall time, peak GPU memory (from the hook)."""
    peaks = [record["cuda_max_allocated"] for record in done.memory if record.get("cuda_max_allocated") is not None]
    rss = [record["max_rss_kib"] for record in done.memory if record.get("max_rss_kib")]
    return {"exit": done.rc if done.rc is not None else "timeout", "seconds": round(done.seconds, 2),
            "peak_gpu_gib": round(max(peaks) / GIB, 3) if peaks else None,
            "peak_rss_mib": round(max(rss) / 1024, 1) if rss else None, "log": str(done.log)}


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def step_records(records: list, after: int = 0) -> list:
    return [r for r in records if "loss" in r and r.get("step", 0) > after]


def losses_finite(steps: list) -> bool | None:
    return all(math.isfinite(r["loss"]) for r in steps) if steps else None


def logged_rate(steps: list) -> float | None:
    rates = [r["samples_per_second"] for r in steps if r.get("samples_per_second")]
    return round(rates[-1], 1) if rates else None


class EndToEnd:
    """Parts 1 and 2: the commands a user runs, in order, on the synthetic MSR-VTT folder."""

    def __init__(self, settings: Settings, work: Path, data: dict, commands: Commands):
        self.settings, self.work, self.data, self.commands = settings, work, data, commands
        self.run_dir = work / "runs" / "vop-pos-ctx"
        self.index = work / "search" / "videos.index"
        self.steps_per_epoch = settings.train_videos * settings.captions_per_video // settings.batch_size
        self.stopped = False  # the train part left epoch 1's checkpoint, stopped in epoch 2

    def device_flags(self) -> list:
        flags = ["--device", self.settings.device, "--precision", self.settings.precision]
        return flags + (["--num-workers", self.settings.num_workers] if self.settings.num_workers is not None else [])

    def train_flags(self, out_dir: Path, epochs: int) -> list:
        s = self.settings
        return ["--clip", self.data["clip"], "--data", "msrvtt-9k", "--data-root", self.data["root"],
                "--frame-store", self.data["store"], "--prompts", "pos,ctx", "--num-frames", s.num_frames,
                "--batch-size", s.batch_size, "--epochs", epochs, "--log-every", 1, "--out-dir", out_dir,
                *self.device_flags()]

    def train(self) -> dict:
        steps = self.steps_per_epoch
        trigger = f"epoch 2/2  step {steps + 1}/"
        done = self.commands.run("train", [sys.executable, "train.py", *self.train_flags(self.run_dir, 2)],
                                 stop_when=lambda line: trigger in line)
        records = read_log(self.run_dir / "log.jsonl")
        epoch_1 = [r for r in step_records(records) if r["step"] <= steps]
        evaluated = any(r.get("epoch") == 1 and "eval" in r for r in records)
        kept = re.search(rf"\(step {steps}/{2 * steps}\),? is intact", done.output) is not None
        self.stopped = done.signalled and done.rc == 143 and kept and (self.run_dir / "last.pt").is_file()
        ok = self.stopped and evaluated and losses_finite(epoch_1) is True and len(epoch_1) == steps
        if ok:
            note = (f"epoch 1: {steps} steps of {self.settings.batch_size}, evaluated; SIGTERM at step {steps + 1}: "
                    f"exit 143, checkpoint of step {steps} intact")
        elif not done.signalled:
            note = "ended before epoch 2's first step (no SIGTERM sent): see the log"
        elif done.rc == 0:
            note = "finished before the SIGTERM reached it: the stop and --resume are not exercised"
        else:
            note = (f"after SIGTERM: exit {done.rc} (expected 143), checkpoint of step {steps} "
                    f"{'said intact' if kept else 'NOT said intact'}; evaluated after epoch 1: {evaluated}")
        return {"ok": ok, **command_fields(done), "rate": logged_rate(epoch_1), "unit": "samples/s",
                "loss_finite": losses_finite(epoch_1), "note": note}

    def resume(self) -> dict:
        if not self.stopped:
            return failed_row("resume", "not run: the train part did not leave a stopped run to resume")
        steps = self.steps_per_epoch
        done = self.commands.run("resume", [sys.executable, "train.py", *self.train_flags(self.run_dir, 2),
                                            "--resume", "auto"])
        records = read_log(self.run_dir / "log.jsonl")
        epoch_2 = step_records(records, after=steps)
        resumed = f"at step {steps}/{2 * steps}" in done.output
        evaluated = any(r.get("epoch") == 2 and "eval" in r for r in records)
        ok = done.rc == 0 and resumed and evaluated and len(epoch_2) == steps and losses_finite(epoch_2) is True
        note = (f"resumed at step {steps}/{2 * steps}, trained epoch 2 ({len(epoch_2)} steps), evaluated" if ok else
                f"resumed at step {steps}: {resumed}; epoch 2 steps logged: {len(epoch_2)}/{steps}; "
                f"evaluated: {evaluated}")
        return {"ok": ok, **command_fields(done), "rate": logged_rate(epoch_2), "unit": "samples/s",
                "loss_finite": losses_finite(epoch_2), "note": note}

    def checkpoint(self) -> Path | None:
        path = self.run_dir / "last.pt"
        return path if path.is_file() else None

    def evaluate(self) -> dict:
        if self.checkpoint() is None:
            return failed_row("evaluate", f"not run: no checkpoint {self.run_dir / 'last.pt'}")
        done = self.commands.run("evaluate", [sys.executable, "evaluate.py", "--checkpoint", self.checkpoint(),
                                              "--frame-store", self.data["store"], *self.device_flags()])
        found = re.search(r"^text -> video\s+([\d.]+)", done.output, re.MULTILINE)
        ok = done.rc == 0 and found is not None
        videos = self.settings.test_videos
        note = (f"{videos} test videos, 1 caption each; text -> video R@1 {found.group(1)} (random CLIP)" if ok
                else "no results table printed")
        return {"ok": ok, **command_fields(done), "rate": round(videos / done.seconds, 1) if ok else None,
                "unit": "videos/s", "note": note}

    def search_index(self) -> dict:
        if self.checkpoint() is None:
            return failed_row("search index", f"not run: no checkpoint {self.run_dir / 'last.pt'}")
        self.index.parent.mkdir(parents=True, exist_ok=True)
        videos = self.data["videos"]
        done = self.commands.run("search index", [sys.executable, "search.py", "index", self.data["root"] / "videos",
                                                  "--checkpoint", self.checkpoint(), "--index", self.index,
                                                  *self.device_flags()])
        ok = done.rc == 0 and f"{videos} videos; {videos} new" in done.output
        return {"ok": ok, **command_fields(done), "rate": round(videos / done.seconds, 1) if ok else None,
                "unit": "videos/s", "note": f"{videos} videos indexed" if ok else f"expected '{videos} videos; "
                                                                                  f"{videos} new' in the output"}

    def search_query(self) -> dict:
        if not self.index.is_file():
            return failed_row("search query", f"not run: no index {self.index}")
        text = self.data["test_captions"][0]
        flags = ["--device", self.settings.device, "--precision", self.settings.precision]
        done = self.commands.run("search query", [sys.executable, "search.py", "query", text, "--index", self.index,
                                                  "-k", 5, "--json", *flags])
        hits, problem = [], None
        start = done.output.find("[\n")
        try:
            hits, _ = json.JSONDecoder().raw_decode(done.output[start:]) if start >= 0 else ([], 0)
        except ValueError as error:
            problem = f"no JSON list of hits: {error}"
        expected = min(5, self.data["videos"])
        good = (len(hits) == expected and all(Path(hit["video"]).is_file() and math.isfinite(hit["score"])
                                              for hit in hits))
        ok = done.rc == 0 and problem is None and good
        note = (f"'{text[:30]}...': top hit {Path(hits[0]['video']).name} ({hits[0]['score']:.3f})" if ok
                else problem or f"expected {expected} hits with existing videos and finite scores, got {len(hits)}")
        return {"ok": ok, **command_fields(done), "note": note}

    def torchrun(self) -> dict:
        out_dir = self.work / "runs" / "torchrun"
        done = self.commands.run("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", 1, "train.py", *self.train_flags(out_dir, 1)])
        steps = step_records(read_log(out_dir / "log.jsonl"))
        backends = {(r.get("backend"), r.get("world_size")) for r in done.memory if r.get("script") == "train.py"}
        expected = "nccl" if self.settings.device == "cuda" else "gloo"
        backend_ok = bool(backends) and all(b and expected in b and w == 1 for b, w in backends)
        ok = done.rc == 0 and len(steps) == self.steps_per_epoch and losses_finite(steps) is True and backend_ok
        seen = ", ".join(f"{b} (world size {w})" for b, w in backends) or "not recorded"
        note = f"process group {seen}; 1 epoch, {len(steps)} steps"
        return {"ok": ok, **command_fields(done), "rate": logged_rate(steps), "unit": "samples/s",
                "loss_finite": losses_finite(steps), "note": note}



def speed_in_child(commands: Commands, settings: Settings, out: Path) -> list[dict]:
    """Part 3 in a child process (python benchmarks/gpu_check.py --speed-parts): a CUDA error or a crash there
    cannot end this one, and the rows it finished are kept."""
    rows_path = out / "rows.json"
    argv = [sys.executable, Path(__file__).resolve(), "--speed-parts", "--out", out]
    done = commands.run("speed", argv + (["--cpu-smoke"] if settings.smoke else []), timeout=settings.speed_timeout)
    rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
    finished = {row["part"] for row in rows}
    ended = "killed at the time limit" if done.rc is None else f"exit status {done.rc}"
    return rows + [failed_row(part, f"not reached: the speed process ended ({ended}); see {done.log}")
                   for part in SPEED_PARTS if part not in finished]


# -- 3. speed, in the child process -------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


class Speed:
    def __init__(self, settings: Settings):
        sys.path.insert(0, str(BENCHMARKS))
        import common  # the step train.py takes (autocast, InfoNCE, GradScaler, clipping, AdamW)
        import clip_model
        self.common, self.clip_model, self.settings = common, clip_model, settings
        self.device = torch.device(settings.device)
        self.fp16 = settings.precision == "fp16"
        self.peak = peak_flops(torch.cuda.get_device_name(self.device))[0] if self.device.type == "cuda" else None
        self.eager = {}  # variant -> (videos/s, FLOPs per step) of the eager step

    def clip_config(self):
        return self.clip_model.CLIPConfig(**self.settings.clip)

    def inputs(self, model):
        s = self.settings
        generator = torch.Generator().manual_seed(0)
        side = model.clip.visual.input_resolution
        frames = torch.randn(s.step_videos, s.num_frames, 3, side, side, generator=generator)  # (B, F, 3, R, R)
        return frames.to(self.device), model.tokenize(self.common.random_captions(s.step_videos)).to(self.device)

    def mfu(self, flops: float | None, seconds: float) -> float | None:
        if not (self.peak and flops and self.fp16):
            return None
        return round(flops / seconds / self.peak, 4)

    def timed_steps(self, trainer, frames, tokens) -> tuple[list, float]:
        """(losses, seconds per timed step) after the warm-up steps."""
        losses = [trainer.step(frames, tokens) for _ in range(self.settings.warmup_steps)]
        synchronize(self.device)
        start = time.perf_counter()
        losses += [trainer.step(frames, tokens) for _ in range(self.settings.timed_steps)]
        synchronize(self.device)
        return [loss.item() for loss in losses], (time.perf_counter() - start) / self.settings.timed_steps

    def step(self, variant: str) -> dict:
        from torch.utils.flop_counter import FlopCounterMode
        s, device = self.settings, self.device
        reset_memory(device)
        torch.manual_seed(0)
        model = self.common.build_variant(variant, s.num_frames, clip_config=self.clip_config(),
                                          fn_layers=s.fn_layers).to(device)
        trainer = self.common.Trainer(model, device, self.fp16)
        frames, tokens = self.inputs(model)
        before = [p.detach().clone() for p in trainer.parameters]
        losses, seconds = self.timed_steps(trainer, frames, tokens)
        changed = sum(not torch.equal(old, new.detach()) for old, new in zip(before, trainer.parameters))
        with FlopCounterMode(display=False) as counter:  # one more step, counted
            trainer.step(frames, tokens)
        flops = counter.get_total_flops()
        self.eager[variant] = (s.step_videos / seconds, flops)
        finite = all(math.isfinite(loss) for loss in losses)
        trainable = sum(p.numel() for p in trainer.parameters)
        return {"ok": finite and changed == len(trainer.parameters), "rate": round(s.step_videos / seconds, 1),
                "unit": "videos/s", "peak_gpu_gib": peak_memory(device), "loss_finite": finite,
                "mfu": self.mfu(flops, seconds), "gflop_per_video": round(flops / s.step_videos / 1e9, 4),
                "note": f"{trainable:,} trainable; {flops / s.step_videos / 1e9:.3g} GFLOP/video; changed "
                        f"{changed}/{len(trainer.parameters)} tensors; {trainer.skipped_steps} step(s) skipped by "
                        f"GradScaler; losses {' '.join(f'{loss:.3f}' for loss in losses)}"}

    def encode_image(self) -> dict:
        s, device = self.settings, self.device
        reset_memory(device)
        torch.manual_seed(0)
        model = self.clip_model.CLIP(self.clip_config()).to(device).eval()
        side = model.visual.input_resolution
        images = torch.randn(s.image_batch, 3, side, side, device=device)

        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=self.fp16):
                return model.encode_image(images)

        features = run()  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(s.image_repeats):
            features = run()
        synchronize(device)
        seconds = (time.perf_counter() - start) / s.image_repeats
        finite = bool(torch.isfinite(features).all())
        return {"ok": finite, "rate": round(s.image_batch / seconds, 1), "unit": "images/s",
                "peak_gpu_gib": peak_memory(device),
                "note": f"batch {s.image_batch}, {'fp16 autocast' if self.fp16 else 'fp32'}, inference_mode; "
                        f"output {tuple(features.shape)} {'finite' if finite else 'NOT FINITE'}"}

    def evaluation(self) -> dict:
        """A test set of eval_size videos and as many captions, embedded by plain VoP (random frames, random
        captions: real encodes) and scored by evaluate.metrics_from_embeddings, both directions."""
        import evaluate
        from vop import VoP, VoPConfig
        s, device = self.settings, self.device
        reset_memory(device)
        torch.manual_seed(0)
        model = VoP(self.clip_model.CLIP(self.clip_config()), VoPConfig("", s.num_frames)).to(device).eval()
        side = model.clip.visual.input_resolution
        tokens = model.tokenize(self.common.random_captions(s.eval_size, seed=1)).to(device)
        generator = torch.Generator(device=device).manual_seed(0)
        synchronize(device)
        start = time.perf_counter()
        videos, texts = [], []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=self.fp16):
            for first in range(0, s.eval_size, s.eval_batch):
                rows = min(s.eval_batch, s.eval_size - first)
                frames = torch.randn(rows, s.num_frames, 3, side, side, device=device, generator=generator)
                videos.append(model.encode_video(frames).float())
                texts.append(model.encode_text(tokens[first:first + rows]).float())
        video_embeddings, text_embeddings = torch.cat(videos), torch.cat(texts)  # (V, E), (T, E)
        synchronize(device)
        encoded = time.perf_counter()
        results = evaluate.metrics_from_embeddings(text_embeddings, video_embeddings,
                                                   torch.arange(s.eval_size), score_device=device)
        scored = time.perf_counter()
        values = [value for direction in ("t2v", "v2t") for value in results[direction].values()]
        finite = all(math.isfinite(v) for v in values)
        return {"ok": finite and len(values) >= 10, "rate": round(s.eval_size / (scored - start), 1),
                "unit": "videos/s", "peak_gpu_gib": peak_memory(device),
                "note": f"{s.eval_size} videos x {s.eval_size} captions, real encodes ({s.num_frames} random "
                        f"frames per video, random captions; plain VoP): encoding {encoded - start:.2f} s, "
                        f"metrics (both directions) {scored - encoded:.3f} s; t2v R@1 {results['t2v']['R@1']:.1f}"}

    def compile(self, variant: str = "") -> dict:
        s, device = self.settings, self.device
        reset_memory(device)
        torch.manual_seed(0)
        model = self.common.build_variant(variant, s.num_frames, clip_config=self.clip_config(),
                                          fn_layers=s.fn_layers).to(device)
        torch._dynamo.reset()
        trainer = self.common.Trainer(torch.compile(model, backend=s.compile_backend), device, self.fp16)
        frames, tokens = self.inputs(model)
        synchronize(device)
        start = time.perf_counter()
        first = trainer.step(frames, tokens).item()  # compiles
        compile_seconds = time.perf_counter() - start
        losses, seconds = self.timed_steps(trainer, frames, tokens)
        losses.insert(0, first)
        finite = all(math.isfinite(loss) for loss in losses)
        rate = s.step_videos / seconds
        eager_rate, flops = self.eager.get(variant, (None, None))
        try:
            from torch._dynamo.utils import counters
            breaks = f"; {sum(counters['graph_break'].values())} graph break(s)"
        except (ImportError, AttributeError, KeyError):
            breaks = ""
        versus = f"eager {eager_rate:.1f} -> {rate:.1f} videos/s ({rate / eager_rate:.2f}x)" if eager_rate else \
            "eager not measured"
        return {"ok": finite, "rate": round(rate, 1), "unit": "videos/s", "peak_gpu_gib": peak_memory(device),
                "loss_finite": finite, "mfu": self.mfu(flops, seconds), "compile_seconds": round(compile_seconds, 1),
                "eager_rate": round(eager_rate, 1) if eager_rate else None,
                "note": f"VoP[{variant or '-'}], backend {s.compile_backend}: first step (compiling) "
                        f"{compile_seconds:.1f} s; {versus}{breaks}"}


def speed_parts(settings: Settings, out: Path) -> None:
    """Part 3 (the child process): each part in its own try; the rows so far are rewritten after each."""
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.json"
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        rows_path.write_text(json.dumps(rows, indent=1, default=str))
        log(f"{row['part']}: {'ok' if row.get('ok') else 'FAIL'} | {row.get('note', '')}")

    try:
        speed = Speed(settings)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc(file=sys.stdout)
        for part in SPEED_PARTS:
            record(failed_row(part, f"not run: {type(error).__name__}: {error}"[:300]))
        return
    for variant, part in zip(VARIANTS, SPEED_PARTS):
        record(guarded(part, lambda: speed.step(variant)))
    record(guarded("encode_image", speed.encode_image))
    record(guarded("eval", speed.evaluation))
    record(guarded("compile", speed.compile))


# -- the driver -----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    first, _, rest = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(description=" ".join(first.split()), epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at toy size on the CPU, to test the "
                                                                 "script itself")
    parser.add_argument("--out", default="/tmp/vop_gpu_check", help="where the clips, runs, logs and the JSON go "
                                                                     "(its work/ folder is made afresh)")
    parser.add_argument("--json", help="the table as JSON; default OUT/gpu_check.json")
    parser.add_argument("--speed-parts", action="store_true", help=argparse.SUPPRESS)  # the child of part 3
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = SMOKE if args.cpu_smoke else GPU
    out = Path(args.out).resolve()
    if args.speed_parts:
        speed_parts(settings, out)
        return 0
    if not settings.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu-smoke to test the script on the CPU")
    started = time.perf_counter()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info = environment(settings)
    log(" | ".join(f"{key} {value}" for key, value in info.items()))
    table = Table(Path(args.json).resolve() if args.json else out / "gpu_check.json", info, settings)

    commands = Commands(settings, work)
    data = {}

    def run_setup():
        data.update(setup(settings, work))
        return data.pop("row")

    table.add(guarded("setup", run_setup))
    steps = EndToEnd(settings, work, data, commands)
    for part, check in (("train", steps.train), ("resume", steps.resume), ("evaluate", steps.evaluate),
                        ("search index", steps.search_index), ("search query", steps.search_query),
                        ("torchrun", steps.torchrun)):
        table.add(guarded(part, check) if data else failed_row(part, "not run: setup failed"))
    try:
        rows = speed_in_child(commands, settings, work / "speed")
    except Exception as error:  # noqa: BLE001
        traceback.print_exc(file=sys.stdout)
        rows = [failed_row(part, f"not run: {type(error).__name__}: {error}"[:300]) for part in SPEED_PARTS]
    for row in rows:
        table.add(row)

    failed = [row["part"] for row in table.rows if not row.get("ok")]
    total = time.perf_counter() - started
    table.head["total_seconds"] = round(total, 1)
    table.path.write_text(json.dumps({**table.head, "rows": table.rows}, indent=1, default=str) + "\n")
    log(f"\n{info['device']} | torch {info['torch']} | CUDA {info['cuda_runtime']} | {info['date']} | "
        f"commit {info['commit']}\n")
    log(table.markdown())
    log("\n" + "\n".join(f"- {key}: {note}" for key, note in NOTES.items()))
    log(f"- peak FLOP/s: {info.get('peak_flops_source')}")
    log(f"\ntotal {total:.0f} s | JSON: {table.path} | logs: {work / 'logs'} | "
        + ("ALL OK" if not failed else f"FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
