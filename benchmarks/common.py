"""What the benchmarks share: the machine line, timing, random captions, and one training step of a VoP variant
(the step of train.py: autocast, symmetric InfoNCE, GradScaler, gradient clipping, AdamW)."""
import argparse
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402

import clip_model  # noqa: E402
from train import contrastive_loss  # noqa: E402  (the loss train.py trains with)
from vop import VoP, VoPConfig  # noqa: E402

WORDS = ("a man woman dog cat kid chef car guitar ball kitchen stage park rain beach news song game "
         "plays talks cooks runs sings dances rides throws explains shows red small happy old").split()


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: the first paragraph of its docstring is the description, the rest comes after
    the options, so `--help` says what the script measures (and exits at once)."""
    first, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=" ".join(first.split()), epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


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


def timed_median(run, repeats: int = 3) -> tuple[float, float, float]:
    """Call `run` once to warm up, then `repeats` times; (median, min, max) seconds per call."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds), max(seconds)


def random_captions(n: int, seed: int = 0) -> list[str]:
    """n captions of 10 random words, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (10,), generator=generator)) for _ in range(n)]


def build_variant(variant: str, num_frames: int, grad_checkpointing: bool = False,
                  clip_config: clip_model.CLIPConfig | None = None, fn_layers: int = 8) -> VoP:
    """VoP on a fresh CLIP with random weights (ViT-B/32's shapes unless `clip_config` says otherwise), in
    training mode; `variant` is a comma list of video prompts ("" for plain VoP) or "full" for full
    fine-tuning; `fn_layers` is VoP^F's K (below the CLIP's depth)."""
    clip = clip_model.CLIP(clip_config or clip_model.CLIPConfig())
    config = (VoPConfig(tune="full", num_frames=num_frames) if variant == "full"
              else VoPConfig(variant, num_frames, fn_layers=fn_layers))
    return VoP(clip, config, grad_checkpointing=grad_checkpointing).train()


class Trainer:
    """train.py's step: autocast (fp16 with a GradScaler when `fp16`) + InfoNCE + clipping 1.0 + AdamW."""

    def __init__(self, model: VoP, device: torch.device, fp16: bool):
        self.model, self.device, self.fp16 = model, device, fp16
        self.skipped_steps = 0  # steps GradScaler skipped because the fp16 gradients overflowed
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-3, weight_decay=0.2)
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def step(self, frames: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One training step; returns the loss as a tensor (no host sync here)."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            video, text = self.model(frames, tokens)
        loss = contrastive_loss(video.float(), text.float(), self.model.logit_scale)  # loss in float32
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, max_norm=1.0)
        scale = self.scaler.get_scale() if self.fp16 else 1.0
        self.scaler.step(self.optimizer)  # skipped if any gradient is inf/NaN
        self.scaler.update()  # ... and then the scale is halved
        if self.fp16:
            self.skipped_steps += self.scaler.get_scale() < scale
        return loss.detach()
