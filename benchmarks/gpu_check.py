"""GPU check of VoP training: does a paper-sized step run, how fast, and in how much memory?

What it does, on one CUDA device (an H100/H200 finishes in well under 5 minutes), with no download and no
dataset: a ViT-B/32-shaped CLIP with random weights (`clip_model.CLIP(CLIPConfig())`) is built on the GPU,
and for VoP with video prompts "", "fn,pos", "fn,ctx", "pos,ctx" and for full fine-tuning (`tune="full"`)
it trains at the paper's batch, 32 videos x 12 frames of 224 x 224 (random pixels) with 32 random-word
captions tokenized by `model.tokenize`, the way a real run does:

    fp16 autocast -> symmetric InfoNCE -> GradScaler.scale(loss).backward() -> unscale -> clip grad norm 1.0
    -> AdamW (lr 1e-3, weight decay 0.2) step through the scaler

2 warm-up steps, then 3 timed steps between `torch.cuda.synchronize()` calls. Per variant it prints
videos/s, `torch.cuda.max_memory_allocated`, and two checks: every loss is finite, and every trainable
parameter tensor has changed. Then it measures `encode_image` throughput at batch 256 under fp16 autocast
and `torch.inference_mode`. Each part runs in its own try/except, so one failure is printed and the rest
still run; the exit status is 1 if anything failed.

    python benchmarks/gpu_check.py              # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke  # here: batch 2 x 2 frames, 1 step each, to test the script
"""
import argparse
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Trainer, argument_parser, build_variant, random_captions  # noqa: E402

import torch  # noqa: E402

import clip_model  # noqa: E402

VARIANTS = ["", "fn,pos", "fn,ctx", "pos,ctx", "full"]
GIB = 1024 ** 3


@dataclass
class Settings:
    device: torch.device
    videos: int = 32  # the paper's batch
    frames: int = 12
    warmup_steps: int = 2
    timed_steps: int = 3
    image_batch: int = 256  # for the encode_image throughput
    image_repeats: int = 3
    # fp16 autocast on the GPU; the CPU smoke test runs float32, since fp16 (and bf16, on CPUs without native
    # kernels) is emulated there and ~100x slower than float32. GradScaler, clipping and AdamW run either way.
    fp16: bool = True


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.cpu_smoke:
        return Settings(torch.device("cpu"), videos=2, frames=2, warmup_steps=0, timed_steps=1,
                        image_batch=2, image_repeats=1, fp16=False)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu-smoke to test the script on CPU")
    return Settings(torch.device("cuda"))


def log(*parts) -> None:
    print(*parts, flush=True)


def precision(settings: Settings) -> str:
    return "fp16 autocast" if settings.fp16 else "float32 (no autocast: CPU smoke test)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_environment(device: torch.device) -> None:
    log(f"python {platform.python_version()} | torch {torch.__version__} | CUDA runtime {torch.version.cuda} | "
        f"cuDNN {torch.backends.cudnn.version()}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        log(f"device: {torch.cuda.get_device_name(device)} | {props.total_memory / GIB:.1f} GiB | "
            f"compute capability {props.major}.{props.minor} | {props.multi_processor_count} SMs")
    else:
        log(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores) -- smoke test only")


# -- one training step ---------------------------------------------------------------------------------------

def count_changed(before: list[torch.Tensor], parameters: list[torch.Tensor]) -> int:
    return sum(not torch.equal(old, new.detach()) for old, new in zip(before, parameters))


def check_variant(variant: str, settings: Settings) -> bool:
    """Train one variant for warm-up + timed steps; print speed, memory and the two checks. True if all OK."""
    device = settings.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_variant(variant, settings.frames).to(device)
    trainer = Trainer(model, device, settings.fp16)
    generator = torch.Generator().manual_seed(0)
    resolution = model.clip.visual.input_resolution
    frames = torch.randn(settings.videos, settings.frames, 3, resolution, resolution, generator=generator)
    frames = frames.to(device)
    tokens = model.tokenize(random_captions(settings.videos)).to(device)
    before = [p.detach().clone() for p in trainer.parameters]

    losses = [trainer.step(frames, tokens) for _ in range(settings.warmup_steps)]
    synchronize(device)
    start = time.perf_counter()
    losses += [trainer.step(frames, tokens) for _ in range(settings.timed_steps)]
    synchronize(device)
    seconds = (time.perf_counter() - start) / settings.timed_steps

    losses = [loss.item() for loss in losses]
    finite = all(math.isfinite(loss) for loss in losses)
    changed = count_changed(before, trainer.parameters)
    ok = finite and changed == len(trainer.parameters)
    memory = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    name = "full fine-tuning" if variant == "full" else f"VoP[{variant or '-'}]"
    log(f"{name:<18} trainable {sum(p.numel() for p in trainer.parameters):>11,} | "
        f"{settings.videos / seconds:8.1f} videos/s ({seconds:.3f} s/step) | max allocated {memory:6.2f} GiB | "
        f"loss {' '.join(f'{loss:.4f}' for loss in losses)} ({'finite' if finite else 'NOT FINITE'}) | "
        f"changed {changed}/{len(trainer.parameters)} tensors | grad scale {trainer.scaler.get_scale():g}, "
        f"{trainer.skipped_steps} step(s) skipped | "
        f"{'OK' if ok else 'FAIL'}")
    return ok


# -- inference throughput -------------------------------------------------------------------------------------

def check_encode_image(settings: Settings) -> bool:
    """images/s of CLIP.encode_image at a large batch, fp16 autocast, inference mode; True if finite."""
    device = settings.device
    torch.manual_seed(0)
    model = clip_model.CLIP(clip_model.CLIPConfig()).to(device).eval()
    images = torch.randn(settings.image_batch, 3, 224, 224, device=device)

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=settings.fp16):
            return model.encode_image(images)

    features = run()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(settings.image_repeats):
        features = run()
    synchronize(device)
    seconds = (time.perf_counter() - start) / settings.image_repeats
    finite = bool(torch.isfinite(features).all())
    log(f"encode_image batch {settings.image_batch}, {precision(settings)}, inference_mode: "
        f"{settings.image_batch / seconds:,.0f} images/s ({seconds * 1000:.1f} ms per batch, mean of "
        f"{settings.image_repeats}) | output {'finite' if finite else 'NOT FINITE'} {tuple(features.shape)}")
    return finite


# -- driver ---------------------------------------------------------------------------------------------------

def guarded(name: str, check) -> bool:
    """Run one check; print any exception and report failure instead of stopping the script."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001 -- a GPU check must report every part, whatever breaks
        log(f"{name}: ERROR {type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run that tests the script itself")
    settings = settings_from_args(parser.parse_args())
    describe_environment(settings.device)
    log(f"training: {settings.videos} videos x {settings.frames} frames x 224 px + {settings.videos} captions, "
        f"{precision(settings)} + GradScaler + clip 1.0 + AdamW(lr 1e-3, wd 0.2); {settings.warmup_steps} warm-up + "
        f"{settings.timed_steps} timed steps")
    started = time.perf_counter()
    results = {}
    for variant in VARIANTS:
        results[variant or "VoP"] = guarded(f"variant {variant or 'VoP'!r}", lambda: check_variant(variant, settings))
    results["encode_image"] = guarded("encode_image", lambda: check_encode_image(settings))
    failed = [name for name, ok in results.items() if not ok]
    log(f"total {time.perf_counter() - started:.0f} s | "
        + ("ALL OK" if not failed else f"FAILED: {', '.join(failed)}"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
