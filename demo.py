"""The demo that runs anywhere: `python demo.py --prompts pos,ctx` needs no CLIP weights and no dataset.

No CLIP weights or datasets can be assumed, so the demo makes both, with the project's own code:
1. a synthetic motion world: coloured shapes moving left/right/up/down, written as real video
   files; its test split is made of reversal pairs (a clip and the same clip played backwards, with the
   opposite direction in the caption), on which any order-blind model is at chance;
2. a tiny CLIP pretrained on the world's still images ("a red square at the top left") by train.py itself
   (`--tune full` on 1-frame videos), cached under ~/.cache/vop/demo after the first run;
3. VoP prompt tuning of that frozen tiny CLIP on the moving clips, evaluated before and after.
Settings you pass on the command line (e.g. --epochs, --lr, --out-dir) override the demo's.
"""
import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import clip_model
import data
import evaluate
from machinery import runs
import train
from utils.cli import build_parser, resolve_device, resolve_precision, run_command
from machinery.figures import draw_comparison
from utils.files import atomic_write, read_torch_file, temporary_path
from formats.video_io import write_video
from vop import VoP, VoPConfig, parse_video_prompts


# ----------------------------------------------------------------------------------------------------------
# 1. The synthetic motion world

WORLD_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 220, 40)}  # RGB
WORLD_SHAPES = ("circle", "square", "triangle")
WORLD_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows down
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# A 3 x 3 grid of places for the stills, named as a person would: (row, column) -> words after "a red square".
WORLD_PLACES = {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
                (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
                (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}
WORLD_FORMAT_VERSION = 1


def draw_shape(frame_size: int, shape: str, colour_rgb, centre_xy, radius: float) -> np.ndarray:
    """One frame: a filled shape on black. Returns (frame_size, frame_size, 3) uint8 RGB."""
    frame = np.zeros((frame_size, frame_size, 3), np.uint8)
    # Draw at 8x sub-pixel precision (shift=3) so slow motion still moves the shape smoothly.
    cx, cy, r = (int(round(v * 8)) for v in (centre_xy[0], centre_xy[1], radius))
    colour = tuple(int(c) for c in colour_rgb)
    if shape == "circle":
        cv2.circle(frame, (cx, cy), r, colour, -1, cv2.LINE_AA, 3)
    elif shape == "square":
        side = int(r * 0.85)
        cv2.rectangle(frame, (cx - side, cy - side), (cx + side, cy + side), colour, -1, cv2.LINE_AA, 3)
    elif shape == "triangle":
        points = np.array([[cx, cy - r], [cx - r, cy + int(r * 0.8)], [cx + r, cy + int(r * 0.8)]], np.int32)
        cv2.fillPoly(frame, [points], colour, cv2.LINE_AA, 3)
    else:
        raise ValueError(f"draw_shape: unknown shape {shape!r}; choose one of {WORLD_SHAPES}")
    return frame


def _motion_clip(rng, frame_size: int, clip_frames: int, colour: str, shape: str, direction: str) -> np.ndarray:
    """A shape crossing most of the frame in `direction`. Returns (T, frame_size, frame_size, 3) uint8 RGB."""
    radius = frame_size * 0.17
    low, high = radius + 1, frame_size - 1 - radius  # the centre's range that keeps the shape inside
    jitter = 0.1 * (high - low)
    start, end = low + rng.uniform(0, jitter), high - rng.uniform(0, jitter)  # along the motion axis
    across = rng.uniform(low, high)  # the fixed coordinate across the motion
    dx, dy = WORLD_DIRECTIONS[direction]
    frames = []
    for t in np.linspace(0.0, 1.0, clip_frames):
        along = start + t * (end - start)
        along = along if dx + dy > 0 else frame_size - 1 - along  # left/up run from high to low
        centre = (along, across) if dx else (across, along)
        frames.append(draw_shape(frame_size, shape, WORLD_COLOURS[colour], centre, radius))
    return np.stack(frames)


def _write_csv(path: Path, rows) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)


def make_synthetic_world(root, seed: int = 0, num_videos: int = 512, num_test_pairs: int = 80,
                         num_stills: int = 2000, frame_size: int = 32, clip_frames: int = 16, fps: float = 8.0) -> Path:
    """Write a small, deterministic video-text world under `root` and return `root`.

    - train.csv: `num_videos` clips "a <colour> <shape> moves <direction>" (4 colours x 3 shapes x 4 directions).
    - test.csv: `num_test_pairs` reversal pairs: clip B is clip A's frames in reverse order and its caption
      names the opposite direction, so a model that ignores frame order is at chance on this split.
    - stills.csv: `num_stills` single images "a <colour> <shape> <place>" (3 x 3 places) for pretraining a
      tiny image-text CLIP on the same world.
    Videos are real mp4v files (cv2.VideoWriter), so the whole decoding path is exercised. A manifest
    (world.json, written last) records the settings: a complete world with the same settings is reused.
    """
    root = Path(root)
    settings = {"format": WORLD_FORMAT_VERSION, "seed": seed, "num_videos": num_videos,
                "num_test_pairs": num_test_pairs, "num_stills": num_stills, "frame_size": frame_size,
                "clip_frames": clip_frames, "fps": fps}
    manifest = root / "world.json"
    if manifest.is_file() and all((root / f"{split}.csv").is_file() for split in ("train", "test", "stills")):
        with open(manifest, encoding="utf-8") as handle:
            if json.load(handle) == settings:
                return root
    if frame_size % 2:
        raise ValueError(f"make_synthetic_world: frame_size must be even (mp4v needs it), got {frame_size}")
    for folder in ("train", "test", "stills"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # an interrupted run leaves no manifest, so it is redone next time
    rng = np.random.default_rng(seed)
    colours, directions = list(WORLD_COLOURS), list(WORLD_DIRECTIONS)

    def random_object():
        return colours[rng.integers(len(colours))], WORLD_SHAPES[rng.integers(len(WORLD_SHAPES))]

    train_rows = []
    for number in range(num_videos):
        colour, shape = random_object()
        direction = directions[number % len(directions)]  # balanced directions
        clip = _motion_clip(rng, frame_size, clip_frames, colour, shape, direction)  # (T, s, s, 3)
        name = f"train/{number:05d}.mp4"
        write_video(root / name, clip, fps)
        train_rows.append((name, f"a {colour} {shape} moves {direction}"))

    test_rows = []
    for number in range(num_test_pairs):
        colour, shape = random_object()
        direction = directions[number % len(directions)]
        clip = _motion_clip(rng, frame_size, clip_frames, colour, shape, direction)  # (T, s, s, 3)
        for suffix, frames, words in (("a", clip, direction), ("b", clip[::-1], OPPOSITE[direction])):
            name = f"test/pair{number:04d}_{suffix}.mp4"
            write_video(root / name, frames, fps)
            test_rows.append((name, f"a {colour} {shape} moves {words}"))

    still_rows = []
    cell = frame_size / 3
    for number in range(num_stills):
        colour, shape = random_object()
        row, column = int(rng.integers(3)), int(rng.integers(3))
        centre = ((column + 0.5) * cell + rng.uniform(-1, 1), (row + 0.5) * cell + rng.uniform(-1, 1))
        image = draw_shape(frame_size, shape, WORLD_COLOURS[colour], centre, frame_size * 0.14)  # (s, s, 3)
        name = f"stills/{number:05d}.png"
        cv2.imwrite(str(root / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        still_rows.append((name, f"a {colour} {shape} {WORLD_PLACES[(row, column)]}"))

    _write_csv(root / "train.csv", train_rows)
    _write_csv(root / "test.csv", test_rows)
    _write_csv(root / "stills.csv", still_rows)
    with open(manifest, "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=1)
    return root


# ----------------------------------------------------------------------------------------------------------
# 2. The reversal-pair score: does the model know which way a clip runs?


def reversal_pair_accuracy(text_embeddings: torch.Tensor, video_embeddings: torch.Tensor) -> float:
    """Percent of captions whose own video beats its time-reversed twin (a tie counts 1/2); chance is 50.

    Layout: caption i belongs to video i, and videos 2k, 2k+1 are a clip and its reversal. Order-blind models
    see identical twins and score exactly 50. text_embeddings (T, E), video_embeddings (T, E), T even.
    """
    if text_embeddings.shape != video_embeddings.shape or len(text_embeddings) % 2:
        raise ValueError(f"reversal pairs need one caption per video and an even count, got "
                         f"{tuple(text_embeddings.shape)} captions and {tuple(video_embeddings.shape)} videos")
    twin = torch.arange(len(video_embeddings)) ^ 1  # (T,): 0<->1, 2<->3, ...
    own_score = (text_embeddings * video_embeddings).sum(dim=1)  # (T,)
    twin_score = (text_embeddings * video_embeddings[twin]).sum(dim=1)  # (T,)
    wins = (own_score > twin_score).double() + 0.5 * (own_score == twin_score).double()  # (T,)
    return 100 * float(wins.mean())


def score_reversal_pairs(model: VoP, world: Path, device) -> float:
    """The reversal-pair score of `model` on the world's test split (which is made of reversal pairs)."""
    test = data.build_dataset("synthetic", world, "test", num_frames=model.num_frames,
                              image_size=model.clip.visual.input_resolution)
    text_embeddings, video_embeddings = evaluate.embed(model, test, num_workers=0, device=device)
    score = reversal_pair_accuracy(text_embeddings, video_embeddings)
    print(f"[demo] reversal pairs: {score:.1f}% (chance 50%)")
    return score


# ----------------------------------------------------------------------------------------------------------
# 3. The demo: pretrain a tiny CLIP on the stills, prompt-tune it on the clips

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
    config = train.TrainConfig(clip=str(initial), data_root=str(world), out_dir=str(out_dir), overwrite=True,
                               **{**PRETRAIN, **{k: v for k, v in overrides.items() if k in ("device", "precision")}})
    train.train(config)
    trainable = read_torch_file(out_dir / "last.pt")["trainable"]
    state_dict = {name.removeprefix("clip."): tensor for name, tensor in trainable.items()}
    state_dict["logit_scale"] = torch.tensor(4.6052)  # frozen during training, as it stays for VoP
    with atomic_write(path) as handle:
        torch.save(state_dict, handle)
    return path


def link_tiny_clip(path: Path) -> Path:
    """DEMO_ROOT/tiny_clip.pt, a link to the tiny CLIP the demo uses: a stable name to pass as --clip when
    training the tiny CLIP on one's own videos."""
    link = path.parent / "tiny_clip.pt"
    temporary = temporary_path(link)
    temporary.symlink_to(path.name)
    os.replace(temporary, link)  # atomic: another demo never sees the link missing
    return link


def check_settings(config: train.TrainConfig) -> None:
    """What train.py would refuse in the demo's settings, refused before the world is built or anything is
    trained: the video prompts and the model's settings, the device and precision, a --clip or --resume that
    does not exist (each flag's own check runs as the TrainConfig is made)."""
    train.vop_config(config)
    resolve_precision(config.precision, resolve_device(config.device))
    runs.check_named_files(config.clip, config.resume)


def run(overrides: dict, evaluate_before: bool = True) -> dict:
    """The demo; `overrides` are the TrainConfig fields the user set (`parse_options`)."""
    started = time.time()
    demo_settings = {**dataclasses.asdict(train.TrainConfig()), **TUNE, "out_dir": "runs/demo",
                     "overwrite": not overrides.get("resume")}
    check_settings(train.TrainConfig(**{**demo_settings, "clip": "", **overrides}))
    root = DEMO_ROOT
    root.mkdir(parents=True, exist_ok=True)
    print("[demo] the synthetic demo (see demo.py): it makes its own data and its own tiny CLIP, so it needs no "
          "download.")
    print("[demo] step 1: the synthetic motion world (real mp4 files, 32x32 px, 8 frames per clip).")
    world = make_synthetic_world(root / "world", **WORLD)
    clip_path = pretrained_tiny_clip(world, root, overrides)
    print(f"[demo] to train this tiny CLIP on your own videos: python train.py --clip {link_tiny_clip(clip_path)} "
          f"--data csv --data-root my_data.csv --no-flip (it sees 32 x 32 px frames; --no-flip, since a mirrored "
          f"clip would contradict captions that say left or right)")

    # The demo's runs are disposable: each starts afresh in runs/demo, unless asked to --resume.
    tuned = train.TrainConfig(**{**demo_settings, "clip": str(clip_path), "data_root": str(world), **overrides})
    device = resolve_device(tuned.device)
    if evaluate_before or tuned.tune == "zero-shot":
        print(f"[demo] step 3: the tiny CLIP before any tuning. The test split is {WORLD['num_test_pairs']} "
              "reversal pairs: 'moves left' and 'moves right' are the same frames in opposite order, so a model "
              "that ignores frame order scores 50% on the pairs.")
        before = train.train(dataclasses.replace(tuned, tune="zero-shot", prompts=""))
        zero_shot = VoP(clip_model.load(clip_path, device), VoPConfig(tune="zero-shot", num_frames=tuned.num_frames))
        before["pairs"] = score_reversal_pairs(zero_shot.to(device), world, device)
        if tuned.tune == "zero-shot":
            return before
    what = f"VoP with video prompts {tuned.prompts!r}" if tuned.prompts else "plain VoP (text + visual prompts)"
    print(f"[demo] step 4: {tuned.tune} tuning of {what} on the moving clips; CLIP stays frozen.")
    results = train.train(tuned)
    out_dir = Path(tuned.out_dir or runs.default_out_dir(tuned.data, tuned.tune, parse_video_prompts(tuned.prompts)))
    if (out_dir / "curves.png").is_file():
        print(f"[demo] wrote {out_dir / 'curves.png'}: the training loss and learning rate, and the test recall")
    model, _ = evaluate.load_model_from_checkpoint(out_dir / "last.pt", device)
    results["pairs"] = score_reversal_pairs(model, world, device)
    print(f"[demo] done in {time.time() - started:.0f} s. Every configuration, as in the README's table: "
          "`python demo.py --all`.")
    return results


# The rows of the README's table: the paper's order-blind baselines, then the video prompts.
ALL_ROWS = [("zero-shot", ""), ("prompts", ""), ("prompts", "pos"), ("prompts", "ctx"), ("prompts", "fn"),
            ("prompts", "fn,pos"), ("prompts", "fn,ctx"), ("prompts", "pos,ctx")]


def run_all(overrides: dict, figure: Path = Path("runs/demo-all/comparison.png")) -> str:
    """Train and evaluate every row of ALL_ROWS on the demo; print a markdown table (and return it), and draw
    the rows' t2v R@1 and reversal-pair scores side by side in `figure`."""
    lines = ["| method | trainable | t2v R@1 | t2v R@5 | t2v MnR | v2t R@1 | reversal pairs | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for tune, prompts in ALL_ROWS:
        started = time.time()
        results = run({**overrides, "tune": tune, "prompts": prompts,
                       "out_dir": f"runs/demo-all/{tune}-{prompts or 'vop'}"}, evaluate_before=False)
        name = "zero-shot CLIP" if tune == "zero-shot" else f"VoP {prompts}" if prompts else "VoP"
        t2v, v2t = results["t2v"], results["v2t"]
        lines.append(f"| {name} | {results.get('trainable', 0):,} | {t2v['R@1']:.1f} | {t2v['R@5']:.1f} | "
                     f"{t2v['MnR']:.1f} | {v2t['R@1']:.1f} | {results['pairs']:.1f} | {time.time() - started:.0f} |")
        rows.append({"name": name, "t2v R@1": t2v["R@1"], "reversal pairs": results["pairs"]})
    table = "\n".join(lines)
    print(table)
    figure.parent.mkdir(parents=True, exist_ok=True)
    if draw_comparison(rows, figure, "The synthetic demo: text -> video R@1 and reversal pairs per variant"):
        print(f"[demo] wrote {figure}")
    return table


def parse_options(argv=None) -> tuple[dict, bool]:
    """(the TrainConfig fields set on the command line, whether --all was asked for): the demo keeps its own
    settings for every field not given."""
    help_of = {f.name: f"{f.metadata['help']} (the demo's setting: {TUNE[f.name]})"
               for f in dataclasses.fields(train.TrainConfig) if f.name in TUNE}
    help_of.update(clip="CLIP to prompt-tune; default: the demo's tiny CLIP, pretrained on the world's stills",
                   out_dir="where last.pt, log.jsonl and curves.png go; default runs/demo",
                   overwrite="the demo starts afresh in --out-dir unless --resume is given (default)")
    parser = build_parser(train.TrainConfig, __doc__.split("\n\n")[0], only_given=True, prog="demo.py",
                          leave_out=("data", "data_root"), help_of=help_of)
    parser.epilog = ("Any of train.py's flags above overrides the demo's own setting, e.g. --prompts pos,ctx or "
                     "--epochs 4. The data is the demo's synthetic world (~/.cache/vop/demo/world).")
    parser.add_argument("--all", action="store_true", default=False,
                        help="train and evaluate every row of the README's table (about 10 minutes on 2 cores) and "
                             "draw runs/demo-all/comparison.png")
    options = vars(parser.parse_args(argv))
    return options, options.pop("all")


def main(argv=None):
    """`python demo.py [train.py's flags]`, or `python demo.py --all` for the README's table."""
    overrides, all_rows = parse_options(argv)
    return run_all(overrides) if all_rows else run(overrides)


if __name__ == "__main__":
    run_command(main, sys.argv[1:], "demo.py")
