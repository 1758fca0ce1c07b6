"""Throughput of tokenizer.tokenize on 10,000 synthetic MSR-VTT-like captions (~10 words each).

Run from the repo root: python benchmarks/bench_tokenizer.py
"""
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer  # noqa: E402

SUBJECTS = ["a man", "a woman", "two kids", "a dog", "the chef", "a girl", "people", "a cartoon cat", "someone"]
VERBS = ["is playing", "talks about", "is cooking", "runs across", "sings", "explains how to fix", "dances with"]
OBJECTS = ["a guitar", "the weather", "soup in a pot", "the park", "a bicycle tire", "a red car", "the news"]
PLACES = ["on a stage", "in the kitchen", "at a wedding", "in the rain", "near the beach", "during a game show"]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
            + rng.choice(["", ".", f" {rng.randint(1, 2020)}", " while laughing"]) for _ in range(n)]


def main(n: int = 10_000) -> None:
    captions = synthetic_captions(n)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    tokenizer.default_tokenizer.cache_clear()
    start = time.perf_counter()
    tokenizer.default_tokenizer()
    tokenizer._pre_split_pattern()
    print(f"load vocabulary + build pattern: {time.perf_counter() - start:.2f} s (once per process)")
    for label in ("cold BPE cache", "warm BPE cache"):
        start = time.perf_counter()
        ids = tokenizer.tokenize(captions)
        seconds = time.perf_counter() - start
        print(f"{label}: {n} captions in {seconds:.3f} s = {n / seconds:,.0f} captions/s  {tuple(ids.shape)}")


if __name__ == "__main__":
    main()
