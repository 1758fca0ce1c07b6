"""What several test files use: small videos and CSV files the tests write, and a small CLIP to train."""
import csv
import json
import re
import shutil
import socket
import subprocess
import os
import sys
from pathlib import Path

import numpy as np
import torch

from machinery import figures
import train
from formats import video_io
from clip_model import CLIPConfig


def write_tiny_video(folder):
    """A 20-frame 64x48 mp4v clip in which a white bar moves right."""
    frames = np.zeros((20, 48, 64, 3), np.uint8)
    for i in range(20):
        frames[i, :, 3 * i:3 * i + 6] = 255
    return video_io.write_video(folder / "clip.mp4", frames, 30)


def place_videos(tiny_video, folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(tiny_video, folder / name)


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def msrvtt_root(tmp_path, tiny_video):
    """5 videos x 3 captions; 9k split = video0-3, 7k split = video0-1, 1k-A test = video4 (2 rows here)."""
    root = tmp_path / "msrvtt"
    root.mkdir()
    sentences = [{"video_id": f"video{v}", "caption": f"caption {c} of video {v}", "sen_id": 3 * v + c}
                 for v in range(5) for c in range(3)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [[f"video{v}"] for v in range(4)])
    write_csv(root / "MSRVTT_train.7k.csv", ["video_id"], [[f"video{v}"] for v in range(2)])
    write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
              [["ret0", "msr9994", "video4", "a man sings"], ["ret1", "msr9993", "video3", "a dog runs"]])
    place_videos(tiny_video, root / "videos", [f"video{v}.mp4" for v in range(5)])
    return root


LEVEL_STEP = 6  # frame i of an index video is grey level 6 * i on its right part


def index_video_frames(num_frames=40, height=48, width=64) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB in which each frame tells its own index: the right part is grey 6 * i, the left
    16 columns pure red (to check channel order)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, :, 16:] = LEVEL_STEP * i
        frames[i, :, :16] = (255, 0, 0)
    return frames


def decoded_indices(frames: np.ndarray) -> np.ndarray:
    """Each decoded frame's index, read back from its grey level. (F, H, W, 3) -> (F,)"""
    return np.round(frames[:, 8:-8, 24:-8, 1].mean(axis=(1, 2)) / LEVEL_STEP).astype(int)


def python_env() -> dict:
    """The environment of a fresh Python process that imports the project's modules from any folder."""
    repository = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))}


def start_python(code: str, cwd):
    """Start `code` in a fresh Python process with the repository importable; returns the running Popen
    (read its result with .communicate())."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# A CLIP small enough to train in seconds, with the real BPE vocabulary so captions tokenize for real, and a
# small synthetic world to train it on (the `small_setup` fixture of conftest.py makes both).
SMALL_CLIP = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                        transformer_layers=2)
SMALL_WORLD = dict(num_videos=32, num_test_pairs=4, num_stills=8, frame_size=32, clip_frames=4)


def small_config(small_setup, out_dir, **overrides):
    """A TrainConfig for the small CLIP on the small world: 2 epochs of 4 steps, evaluated at the end."""
    clip_path, world = small_setup
    settings = dict(clip=str(clip_path), data="synthetic", data_root=str(world), prompts="pos", num_frames=4,
                    batch_size=8, epochs=2, lr=5e-3, fn_layers=1, num_workers=0, out_dir=str(out_dir),
                    log_every=1, eval_each_epoch=False)
    return train.TrainConfig(**{**settings, **overrides})


def free_port() -> int:
    """A TCP port of this machine that nothing listens on, for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(out_dir):
    """The records of out_dir/log.jsonl."""
    return figures.read_log(out_dir / "log.jsonl")


SOT, EOT = 998, 999  # the tiny fixture CLIP's vocabulary of 1,000


def fake_tokenize(self, captions):
    """VoP.tokenize for the tiny fixture CLIP, whose vocabulary is not CLIP's BPE: each word becomes a stable id
    in 1..997 (monkeypatch it onto VoP)."""
    tokens = torch.zeros(len(captions), self.text_context_length, dtype=torch.long)  # (B, 77 - P)
    for row, caption in enumerate(captions):
        ids = [SOT] + [1 + sum(map(ord, word)) % 997 for word in caption.split()] + [EOT]
        tokens[row, :len(ids)] = torch.tensor(ids)
    return tokens


PROGRESS_LINE = re.compile(r"^[\w ]+: \d+/\d+ ")  # progress.Progress's lines, which go to stderr too


def message_lines(stderr: str) -> list[str]:
    """The lines of a program's stderr that are messages, not progress lines."""
    return [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
