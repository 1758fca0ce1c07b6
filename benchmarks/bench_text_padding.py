"""Before/after of one optimisation: VoP's text tower stops at the batch's last [EOT] instead of running all
77 - P positions. Under the causal mask nothing after a caption's [EOT] reaches its read-out, so the
embeddings are the same (checked here) and MSR-VTT-like captions (~10 tokens) cost a fraction of the time.

    python benchmarks/bench_text_padding.py   # ViT-B/32-shaped text tower, random weights, CPU, float32
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import argument_parser  # noqa: E402  (common puts the repository on the path)

import torch  # noqa: E402

import clip_model  # noqa: E402
from vop import VoP, VoPConfig  # noqa: E402

CAPTIONS = ["a man is playing a guitar on a stage", "a woman cooks pasta in a small kitchen",
            "two dogs run across a park", "news anchor talks about the weather"] * 8  # 32 captions


def seconds_per_batch(model, tokens, repeats=5):
    with torch.inference_mode():
        model.encode_text(tokens)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            embeddings = model.encode_text(tokens)
    return (time.perf_counter() - start) / repeats, embeddings


def main():
    argument_parser(__doc__).parse_args()
    torch.manual_seed(0)
    model = VoP(clip_model.CLIP(clip_model.CLIPConfig()).eval(), VoPConfig()).eval()
    tokens = model.tokenize(CAPTIONS)  # (32, 69)
    after, cut = seconds_per_batch(model, tokens)
    model._cut_padding = lambda tokens: tokens  # before: every one of the 69 positions
    before, full = seconds_per_batch(model, tokens)
    print(f"encode_text, 32 captions (longest {int(tokens.argmax(-1).max()) + 1} tokens), {torch.get_num_threads()} "
          f"threads: all {tokens.shape[1]} positions {before * 1000:.0f} ms -> up to the last [EOT] "
          f"{after * 1000:.0f} ms ({before / after:.1f}x); max |difference| {(cut - full).abs().max():.1e}")


if __name__ == "__main__":
    main()
