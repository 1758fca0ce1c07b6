"""Inference throughput of CLIP's image tower and of the tokenizer, on CPU.

What it measures:
  * images/s of `CLIP.encode_image` for a ViT-B/32-shaped model (random weights, eval mode,
    `torch.inference_mode`) at batch 32 of 224 x 224 images, once in float32 and once under
    `torch.autocast("cpu", dtype=torch.bfloat16)`;
  * captions/s of `tokenizer.tokenize` on 10,000 synthetic MSR-VTT-like captions (~10 words each).

How: every measurement runs once as a warm-up (which also fills the tokenizer's BPE cache, so the
caption figure is the warm-cache rate, as in a training loop), then 3 timed repeats; the median is printed,
with the min-max range, because the machine may be shared. The machine line comes first: platform, CPU model
(from /proc/cpuinfo), cores, torch version, torch's intra-op thread count, and the vector ISA torch uses with
whether the CPU has native bfloat16 kernels: without them (e.g. an AVX2-only CPU) bfloat16 autocast is
emulated and far slower than float32, which is worth knowing before choosing a precision.

Run from the repo root: python benchmarks/bench_clip.py
"""
import os
import platform
import random
import statistics
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import clip_model  # noqa: E402
import tokenizer  # noqa: E402

BATCH = 32
NUM_CAPTIONS = 10_000
REPEATS = 3

SUBJECTS = ["a man", "a woman", "two kids", "a dog", "the chef", "a girl", "people", "a cartoon cat", "someone"]
VERBS = ["is playing", "talks about", "is cooking", "runs across", "sings", "explains how to fix", "dances with"]
OBJECTS = ["a guitar", "the weather", "soup in a pot", "the park", "a bicycle tire", "a red car", "the news"]
PLACES = ["on a stage", "in the kitchen", "at a wedding", "in the rain", "near the beach", "during a game show"]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bfloat16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX512-BF16 or AMX); without them bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_line() -> str:
    return (f"machine: {platform.platform()} | CPU {cpu_model()} | {os.cpu_count()} cores | "
            f"Python {platform.python_version()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"ISA {torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if native_bfloat16() else 'no'}")


def timed_median(run, repeats: int = REPEATS) -> tuple[float, float, float]:
    """Call `run` once to warm up, then `repeats` times; (median, min, max) seconds per call."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds), max(seconds)


def report(label: str, items: int, unit: str, timing: tuple[float, float, float]) -> None:
    median, fastest, slowest = timing
    print(f"{label + ':':<38} {items / median:,.1f} {unit}/s  (median of {REPEATS}: {median:.3f} s per {items} {unit}; "
          f"range {fastest:.3f}-{slowest:.3f} s)", flush=True)


def bench_encode_image(model: clip_model.CLIP, dtype: torch.dtype | None) -> tuple[float, float, float]:
    """Seconds per `encode_image` call on a batch of BATCH random images; bfloat16 autocast when dtype is set."""
    images = torch.randn(BATCH, 3, model.config.image_resolution, model.config.image_resolution)
    precision = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()

    def run():
        with torch.inference_mode(), precision:
            model.encode_image(images)

    return timed_median(run)


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """n MSR-VTT-like captions of about 10 words, reproducible from `seed`."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
            + rng.choice(["", ".", f" {rng.randint(1, 2020)}", " while laughing"]) for _ in range(n)]


def bench_tokenize(captions: list[str]) -> tuple[float, float, float]:
    return timed_median(lambda: tokenizer.tokenize(captions))


def main() -> None:
    print(machine_line(), flush=True)
    torch.manual_seed(0)
    model = clip_model.CLIP(clip_model.CLIPConfig()).eval()  # ViT-B/32 shape, random weights
    print(f"model: ViT-B/32-shaped CLIP, random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; batch {BATCH} x 3 x 224 x 224; warm-up once, then median of {REPEATS}", flush=True)
    report("encode_image float32", BATCH, "images", bench_encode_image(model, None))
    report("encode_image bfloat16 autocast", BATCH, "images", bench_encode_image(model, torch.bfloat16))
    report("tokenizer.tokenize (warm BPE cache)", NUM_CAPTIONS, "captions",
           bench_tokenize(synthetic_captions(NUM_CAPTIONS)))


if __name__ == "__main__":
    main()
