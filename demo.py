"""The demo that runs anywhere: `python train.py --prompts pos,ctx` with no --clip and no --data.

No CLIP weights or datasets can be assumed, so the demo makes both, with the project's own code:
1. the synthetic motion world of data.py: coloured shapes moving left/right/up/down, written as real video
   files; its test split is made of reversal pairs (a clip and the same clip played backwards, with the
   opposite direction in the caption), on which any order-blind model is at chance;
2. a tiny CLIP pretrained on the world's still images ("a red square at the top left") by train.py itself
   (`--tune full` on 1-frame videos), cached under ~/.cache/vop/demo after the first run;
3. VoP prompt tuning of that frozen tiny CLIP on the moving clips, evaluated before and after.
Settings you pass on the command line (e.g. --epochs, --lr, --out-dir) override the demo's.
"""
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

import clip_model
import data
import train

DEMO_ROOT = Path("~/.cache/vop/demo").expanduser()
WORLD = dict(seed=0, num_videos=512, num_test_pairs=80, num_stills=2000, frame_size=32, clip_frames=8)
TINY_CLIP = clip_model.CLIPConfig(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=128,
                                  vision_patch_size=8, context_length=77, vocab_size=49408,
                                  transformer_width=128, transformer_heads=2, transformer_layers=4)
# Pretraining the tiny CLIP on stills: from scratch, so a much larger learning rate than fine-tuning's.
PRETRAIN = dict(data="synthetic", train_split="stills", test_split="stills", tune="full", num_frames=1,
                batch_size=64, epochs=10, lr=1e-3, weight_decay=0.1, num_workers=0, log_every=31,
                eval_each_epoch=False)
# Prompt tuning on the moving clips: the world's clips have 8 frames, all of which are used.
TUNE = dict(data="synthetic", num_frames=8, batch_size=32, epochs=8, lr=1e-2, fn_layers=2, num_workers=0,
            log_every=16, eval_each_epoch=False)


def pretrained_tiny_clip(world: Path, root: Path, overrides: dict) -> Path:
    """Path of the tiny CLIP pretrained on the world's stills; trained once, then reused."""
    settings = {"clip": dataclasses.asdict(TINY_CLIP), "pretrain": PRETRAIN, "world": WORLD}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"tiny_clip_{key}.pt"
    if path.is_file():
        print(f"[demo] using the tiny CLIP pretrained earlier: {path}")
        return path
    print("[demo] step 2: pretraining a tiny CLIP (image 32 px, 4+4 layers, width 128) on the world's still "
          "images, with train.py itself (--tune full on 1-frame videos); done once, then cached.")
    torch.manual_seed(0)
    initial = root / "tiny_clip_init.pt"
    torch.save(clip_model.CLIP(TINY_CLIP).state_dict(), initial)
    out_dir = root / f"pretrain_{key}"
    config = train.TrainConfig(clip=str(initial), data_root=str(world), out_dir=str(out_dir),
                               **{**PRETRAIN, **{k: v for k, v in overrides.items() if k in ("device", "precision")}})
    train.train(config)
    trainable = torch.load(out_dir / "last.pt", weights_only=True)["trainable"]
    state_dict = {name.removeprefix("clip."): tensor for name, tensor in trainable.items()}
    state_dict["logit_scale"] = torch.tensor(4.6052)  # frozen during training, as it stays for VoP
    partial = path.with_suffix(".tmp")
    torch.save(state_dict, partial)
    partial.replace(path)
    return path


def run(overrides: dict, evaluate_before: bool = True) -> dict:
    """The demo; `overrides` are the TrainConfig fields the user set (train.given_options)."""
    started = time.time()
    root = DEMO_ROOT
    root.mkdir(parents=True, exist_ok=True)
    print("[demo] no --clip and no --data: running the synthetic demo (see demo.py). It makes its own data and "
          "its own tiny CLIP, so it needs no download.")
    print("[demo] step 1: the synthetic motion world (real mp4 files, 32x32 px, 8 frames per clip).")
    world = data.make_synthetic_world(root / "world", **WORLD)
    clip_path = pretrained_tiny_clip(world, root, overrides)

    tuned = train.TrainConfig(**{**dataclasses.asdict(train.TrainConfig()), **TUNE,
                                 "clip": str(clip_path), "data_root": str(world), "out_dir": "runs/demo",
                                 **overrides})
    if evaluate_before or tuned.tune == "zero-shot":
        print(f"[demo] step 3: the tiny CLIP before any tuning. The test split is {WORLD['num_test_pairs']} "
              "reversal pairs: 'moves left' and 'moves right' are the same frames in opposite order, so a model "
              "that ignores frame order scores 50% on the pairs.")
        before = train.train(dataclasses.replace(tuned, tune="zero-shot", prompts=""))
        if tuned.tune == "zero-shot":
            return before
    what = f"VoP with video prompts {tuned.prompts!r}" if tuned.prompts else "plain VoP (text + visual prompts)"
    print(f"[demo] step 4: {tuned.tune} tuning of {what} on the moving clips; CLIP stays frozen.")
    results = train.train(tuned)
    print(f"[demo] done in {time.time() - started:.0f} s. Every configuration, as in the README's table: "
          "`python demo.py --all`.")
    return results


# The rows of the README's table: the paper's order-blind baselines, then the video prompts.
ALL_ROWS = [("zero-shot", ""), ("prompts", ""), ("prompts", "pos"), ("prompts", "ctx"), ("prompts", "fn"),
            ("prompts", "fn,pos"), ("prompts", "fn,ctx"), ("prompts", "pos,ctx")]


def run_all(argv=None) -> str:
    """Train and evaluate every row of ALL_ROWS on the demo; return (and print) a markdown table."""
    lines = ["| method | trainable | t2v R@1 | t2v R@5 | t2v MnR | v2t R@1 | reversal pairs | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for tune, prompts in ALL_ROWS:
        overrides = {**train.given_options(argv), "tune": tune, "prompts": prompts,
                     "out_dir": f"runs/demo-all/{tune}-{prompts or 'vop'}"}
        started = time.time()
        results = run(overrides, evaluate_before=False)
        name = "zero-shot CLIP" if tune == "zero-shot" else f"VoP {prompts}" if prompts else "VoP"
        t2v, v2t = results["t2v"], results["v2t"]
        lines.append(f"| {name} | {results.get('trainable', 0):,} | {t2v['R@1']:.1f} | {t2v['R@5']:.1f} | "
                     f"{t2v['MnR']:.1f} | {v2t['R@1']:.1f} | {results['pairs']:.1f} | {time.time() - started:.0f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    import sys

    if "--all" in sys.argv:
        run_all([arg for arg in sys.argv[1:] if arg != "--all"])
    else:
        run(train.given_options(sys.argv[1:]))
