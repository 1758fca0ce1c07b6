"""Inference throughput of CLIP's image tower and of the tokenizer, on CPU.

What it measures:
  * images/s of `CLIP.encode_image` for a ViT-B/32-shaped model (random weights, eval mode,
    `torch.inference_mode`) at batch 32 of 224 x 224 images, once in float32 and once under
    `torch.autocast("cpu", dtype=torch.bfloat16)`;
  * captions/s of `tokenizer.tokenize` on 10,000 synthetic MSR-VTT-like captions (~10 words each), with a
    cold BPE cache (first use in a process) and a warm one (as in a training loop);
  * seconds of `tokenizer.tokenize` on one caption that is a 1 MB word and one of 120 KB of words: only the
    ids that fit the context are computed, so neither costs much more than a sentence.

How: every measurement runs once as a warm-up (which also fills the tokenizer's BPE cache, so the
caption figure is the warm-cache rate, as in a training loop), then 3 timed repeats; the median is printed,
with the min-max range, because the machine may be shared. The machine line comes first: platform, CPU model
(from /proc/cpuinfo), cores, torch version, torch's intra-op thread count, and the vector ISA torch uses with
whether the CPU has native bfloat16 kernels: without them (e.g. an AVX2-only CPU) bfloat16 autocast is
emulated and far slower than float32, which is worth knowing before choosing a precision.

Run from the repo root: python benchmarks/bench_clip.py
"""
import os
import random
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import argument_parser, machine_line, timed_median  # noqa: E402

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

    return timed_median(run, REPEATS)


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """n MSR-VTT-like captions of about 10 words, reproducible from `seed`."""
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
            + rng.choice(["", ".", f" {rng.randint(1, 2020)}", " while laughing"]) for _ in range(n)]


def bench_tokenize(captions: list[str]) -> tuple[float, float, float]:
    tokenizer.default_tokenizer.cache_clear()
    start = time.perf_counter()
    tokenizer.tokenize(captions)
    print(f"{'tokenizer.tokenize (cold BPE cache)':<38} {len(captions) / (time.perf_counter() - start):,.1f} "
          f"captions/s (vocabulary loaded and every word merged once)", flush=True)
    return timed_median(lambda: tokenizer.tokenize(captions), REPEATS)


def bench_long_captions() -> None:
    rng = random.Random(0)
    one_word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000))
    many_words = " ".join(synthetic_captions(3000))[:120_000]
    for label, caption in (("a 1 MB one-word caption", one_word), ("a 120 KB caption", many_words)):
        median, fastest, slowest = timed_median(lambda: tokenizer.tokenize(caption), REPEATS)
        print(f"{'tokenizer.tokenize, ' + label + ':':<38} {median:.3f} s  (median of {REPEATS}; range "
              f"{fastest:.3f}-{slowest:.3f} s)", flush=True)


def main() -> None:
    argument_parser(__doc__).parse_args()
    print(machine_line(), flush=True)
    torch.manual_seed(0)
    model = clip_model.CLIP(clip_model.CLIPConfig()).eval()  # ViT-B/32 shape, random weights
    print(f"model: ViT-B/32-shaped CLIP, random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; batch {BATCH} x 3 x 224 x 224; warm-up once, then median of {REPEATS}", flush=True)
    report("encode_image float32", BATCH, "images", bench_encode_image(model, None))
    report("encode_image bfloat16 autocast", BATCH, "images", bench_encode_image(model, torch.bfloat16))
    report("tokenizer.tokenize (warm BPE cache)", NUM_CAPTIONS, "captions",
           bench_tokenize(synthetic_captions(NUM_CAPTIONS)))
    bench_long_captions()


if __name__ == "__main__":
    main()
