"""Small files the tests write: a tiny clip copied under the names a dataset needs, CSV files."""
import csv
import json
import shutil

import numpy as np

import video_io


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
