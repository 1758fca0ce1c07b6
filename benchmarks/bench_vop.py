"""Training cost of VoP's variants against full fine-tuning: seconds per step and peak memory, on CPU.

What it measures, for a ViT-B/32-shaped CLIP with random weights (`clip_model.CLIP(CLIPConfig())`):
one training step (`common.Trainer`, the step of train.py in float32: forward of a batch of videos, default 4
videos x 12 frames of 224 x 224, see DEFAULT_BATCH for why not 8, and of as many captions, the symmetric InfoNCE
loss, backward, gradient clipping and an AdamW step over the trainable parameters, so gradients and optimiser
state count in memory). Variants: VoP with video prompts "" (text + visual prompts only), "pos", "ctx", "fn", "fn,pos",
"fn,ctx", "pos,ctx", "fn,pos,ctx", full fine-tuning (`VoPConfig(tune="full")`), and VoP and full fine-tuning
again with gradient checkpointing (`grad_checkpointing=True`).

How: each variant runs in its own subprocess (`python benchmarks/bench_vop.py --variant X`), so that
`resource.getrusage(RUSAGE_SELF).ru_maxrss` is the peak of that variant alone. The child builds the model,
reads its resident set size (RSS) from /proc/self/statm, runs 1 warm-up step and `--steps` timed steps
(default 2) and reports the median step time, the peak RSS and the training overhead = peak RSS - RSS right
after building the model (activations, gradients, optimiser state, allocator slack). The parent runs the
variants one after another and prints a markdown table. The machine may be shared: step times are noisy.

Run from the repo root: python benchmarks/bench_vop.py [--batch 4] [--frames 12] [--steps 2]
One variant only:       python benchmarks/bench_vop.py --variant fn,pos [--grad-checkpointing]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Trainer, argument_parser, build_variant, machine_line, random_captions  # noqa: E402

import torch  # noqa: E402

FULL = "full"
# (video prompts or "full", gradient checkpointing), in the order of the table.
RUNS = [("", False), ("pos", False), ("ctx", False), ("fn", False), ("fn,pos", False), ("fn,ctx", False),
        ("pos,ctx", False), ("fn,pos,ctx", False), (FULL, False), ("", True), (FULL, True)]
RESULT_PREFIX = "RESULT "  # the child's one machine-readable output line
GB = 1024 ** 3
# 8 videos x 12 frames took ~35 CPU-s (~80 s wall on a busy machine) per VoP step on a 2-core AVX2 CPU, which
# puts the 11 runs far past 10 minutes; the default is therefore 4 videos. `--batch 8` gives the full shape.
DEFAULT_BATCH = 4

# ---------------------------------------------------------------------------------------------------------
# Child: one variant
# ---------------------------------------------------------------------------------------------------------

def current_rss_bytes() -> int:
    """Resident set size now (not the peak), from /proc/self/statm on Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best available stand-in
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process; ru_maxrss is in KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_variant(variant: str, batch: int, num_frames: int, steps: int, grad_checkpointing: bool) -> dict:
    """Build one variant, train it for 1 + `steps` steps, and measure time and memory."""
    torch.manual_seed(0)
    model = build_variant(variant, num_frames, grad_checkpointing)
    rss_after_build = current_rss_bytes()
    trainer = Trainer(model, torch.device("cpu"), fp16=False)  # float32: fp16/bf16 are emulated on most CPUs
    resolution = model.clip.visual.input_resolution
    frames = torch.randn(batch, num_frames, 3, resolution, resolution)
    tokens = model.tokenize(random_captions(batch))

    trainer.step(frames, tokens)  # warm-up: allocates gradients and AdamW state
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(trainer.step(frames, tokens).item())
        seconds.append(time.perf_counter() - start)
    return dict(variant=variant, grad_checkpointing=grad_checkpointing,
                trainable_params=sum(p.numel() for p in trainer.parameters),
                step_seconds=seconds, median_step_seconds=statistics.median(seconds), losses=losses,
                rss_after_build=rss_after_build, peak_rss=peak_rss_bytes())


# ---------------------------------------------------------------------------------------------------------
# Parent: every variant in its own process, then the table
# ---------------------------------------------------------------------------------------------------------

def label(variant: str, grad_checkpointing: bool) -> str:
    name = "full fine-tuning" if variant == FULL else ("VoP" if not variant else f"VoP + {variant}")
    return name + (" + grad checkpointing" if grad_checkpointing else "")


def run_in_subprocess(variant: str, grad_checkpointing: bool, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh Python process and parse its RESULT line; an error becomes a dict too."""
    command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--batch", str(args.batch),
               "--frames", str(args.frames), "--steps", str(args.steps)]
    if grad_checkpointing:
        command.append("--grad-checkpointing")
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(variant=variant, grad_checkpointing=grad_checkpointing, error=f"timed out after {args.timeout} s")
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return dict(variant=variant, grad_checkpointing=grad_checkpointing, error=error)


def table_row(result: dict) -> str:
    name = label(result["variant"], result["grad_checkpointing"])
    if "error" in result:
        return f"| {name} | - | failed: {result['error']} | - | - |"
    overhead = result["peak_rss"] - result["rss_after_build"]
    return (f"| {name} | {result['trainable_params']:,} | {result['median_step_seconds']:.2f} | "
            f"{result['peak_rss'] / GB:.2f} | {overhead / GB:.2f} |")


TABLE_HEADER = ("| variant | trainable params | s/step | peak RSS (GB) | training overhead (GB) |\n"
                "|---|---:|---:|---:|---:|")


def print_details(results: list[dict]) -> None:
    print()
    print("step times (s), each timed step; losses:")
    for result in results:
        if "error" not in result:
            times = ", ".join(f"{s:.2f}" for s in result["step_seconds"])
            losses = ", ".join(f"{loss:.4f}" for loss in result["losses"])
            print(f"  {label(result['variant'], result['grad_checkpointing'])}: {times}; loss {losses}")


def main_parent(args: argparse.Namespace) -> None:
    print(machine_line(), flush=True)
    if args.batch != 8:
        print(f"NOTE: batch {args.batch}, not the 8 videos of the brief: at 8, one step takes ~35 CPU-s on a "
              f"2-core CPU and the whole run would exceed ~10 minutes (pass --batch 8 for it)", flush=True)
    print(f"ViT-B/32-shaped CLIP, random weights; batch {args.batch} videos x {args.frames} frames x 224 px + "
          f"{args.batch} captions; symmetric InfoNCE + AdamW; 1 warm-up + {args.steps} timed steps per variant, "
          f"s/step = median; each variant in its own process; GB = 2^30 bytes; shared machine, timings noisy",
          flush=True)
    print()
    print(TABLE_HEADER, flush=True)
    results = []
    for variant, grad_checkpointing in RUNS:  # one row as each variant finishes
        result = run_in_subprocess(variant, grad_checkpointing, args)
        results.append(result)
        print(table_row(result), flush=True)
    print_details(results)


def main_child(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(True)
    result = run_variant(args.variant, args.batch, args.frames, args.steps, args.grad_checkpointing)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--variant", default=None,
                        help='run one variant in this process: video prompts ("", "fn,pos", ...) or "full"')
    parser.add_argument("--grad-checkpointing", action="store_true", help="with --variant: checkpoint blocks")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="videos (and captions) per step")
    parser.add_argument("--frames", type=int, default=12, help="frames per video")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after 1 warm-up step")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per variant's process")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.variant is None:
        main_parent(arguments)
    else:
        main_child(arguments)
