"""Tests for machinery/frame_store.py: what the store serves equals a direct read (evaluation bit-identical;
training draws among the stored candidates, deterministic per (seed, epoch, item)); it survives a crash mid-build
and two processes building it at once. Clips are written with video_io.write_video (no ffmpeg)."""
import os
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
from machinery import frame_store
from formats import video_io
from helpers import decoded_indices, index_video_frames, place_videos, start_python, write_csv

NUM_FRAMES_IN_FILE = 40


@pytest.fixture(scope="module")
def index_clip(tmp_path_factory):
    """A 40-frame 64x48 MJPEG clip whose frames tell their own index."""
    folder = tmp_path_factory.mktemp("index")
    return video_io.write_video(folder / "index.avi", index_video_frames(NUM_FRAMES_IN_FILE), 30, "MJPG")


def make_videos(folder, clip, num_videos):
    """`num_videos` copies of `clip` under folder/videos and folder/d.csv listing them (one caption each)."""
    names = [f"video{k}{clip.suffix}" for k in range(num_videos)]
    place_videos(clip, folder / "videos", names)
    rows = [[f"videos/{name}", f"caption {k}"] for k, name in enumerate(names)]
    write_csv(folder / "d.csv", ["video", "caption"], rows)


def dataset_at(folder, **kwargs):
    """The csv dataset of `make_videos` (which must not run again: a copy changes a video's mtime)."""
    return data.build_dataset("csv", folder / "d.csv", "train", **{"num_frames": 4, "image_size": 32, **kwargs})


def entries(store_root):
    return sorted(store_root.glob("*/*.frames"))


def forbid_decoding(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the store holds the frames")

    monkeypatch.setattr(frame_store, "decode_frames", no_decoding)
    monkeypatch.setattr(data, "decode_frames", no_decoding)


@pytest.mark.parametrize("width,height,fourcc", [(64, 48, "MJPG"), (176, 144, "MJPG"), (48, 80, "mp4v")])
def test_evaluation_frames_from_the_store_are_bit_identical(tmp_path, monkeypatch, width, height, fourcc):
    frames = np.random.default_rng(0).integers(0, 256, (12, height, width, 3), dtype=np.uint8)
    clip = video_io.write_video(tmp_path / ("clip.avi" if fourcc == "MJPG" else "clip.mp4"), frames, 30, fourcc)
    make_videos(tmp_path, clip, 2)
    expected = [dataset_at(tmp_path, train=False, image_size=56).videos()[j]["video"] for j in range(2)]
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    stored = dataset_at(tmp_path, train=False, image_size=56, frame_store=store)
    first_visit = [stored.videos()[j]["video"] for j in range(2)]  # decodes and stores
    forbid_decoding(monkeypatch)
    later_visit = [stored.videos()[j]["video"] for j in range(2)]  # reads the store only
    for want, first, later in zip(expected, first_visit, later_visit):
        assert torch.equal(want, first) and torch.equal(want, later)
    assert len(entries(tmp_path / "store")) == 2  # one entry per video file


def test_training_frames_are_drawn_among_the_stored_candidates(tmp_path, index_clip):
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE, candidates=3)
    num_frames = 4
    candidates = data.training_candidates(NUM_FRAMES_IN_FILE, num_frames, 3)  # (F, C)
    rng = np.random.default_rng(0)
    drawn = np.stack([decoded_indices(store.training_frames(index_clip, num_frames, 32, rng)) for _ in range(60)])
    for segment in range(num_frames):  # (60,) draws of this segment: only its candidates, and each of them
        assert set(drawn[:, segment].tolist()) == set(candidates[segment].tolist())
    assert len(entries(tmp_path / "store")) == 1
    # Stored with the shorter side at most ceil(sqrt(2) * R): 48x64 frames for R = 32 are kept at 46x61.
    assert store.training_frames(index_clip, num_frames, 32, rng).shape == (num_frames, 46, 61, 3)
    assert store.training_frames(index_clip, num_frames, 224, rng).shape == (num_frames, 48, 64, 3)


def test_training_with_the_store_is_deterministic_per_seed_epoch_and_item(tmp_path, index_clip, monkeypatch):
    make_videos(tmp_path, index_clip, 3)
    dataset = dataset_at(tmp_path, frame_store=frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE), seed=5)
    by_epoch = {epoch: [dataset[(epoch, item)]["video"] for item in range(3)] for epoch in range(3)}
    forbid_decoding(monkeypatch)  # everything was stored on the first visits
    again = dataset_at(tmp_path, frame_store=frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE), seed=5)
    for epoch in (2, 0, 1):  # another dataset object, another order: the same draws
        for item in (2, 1, 0):
            assert torch.equal(again[(epoch, item)]["video"], by_epoch[epoch][item])
    assert not all(torch.equal(by_epoch[0][0], by_epoch[epoch][0]) for epoch in (1, 2))  # epochs draw anew


def quiet(message):
    pass


def test_the_store_is_keyed_by_file_and_settings_and_reports_its_size(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 2)
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, frame_store=store)
    summary = store.build(dataset, num_workers=0, log=quiet)
    assert summary["built"] == 2 and summary["failed"] == [] and len(entries(tmp_path / "store")) == 2
    assert summary["bytes"] == store.size_bytes() == sum(path.stat().st_size for path in entries(tmp_path / "store"))
    assert store.build(dataset, num_workers=0, log=quiet)["built"] == 0  # nothing left to do
    video = dataset.video_paths[0]
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))  # the file "changed"
    assert store.build(dataset, num_workers=0, log=quiet)["built"] == 1
    dataset_at(tmp_path, frame_store=store, num_frames=3)[0]  # other settings: another folder
    assert len(list((tmp_path / "store").iterdir())) == 2 and len(entries(tmp_path / "store")) == 4


def test_a_damaged_entry_is_rebuilt(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 1)
    dataset = dataset_at(tmp_path, train=False, frame_store=frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE))
    expected = dataset[0]["video"]
    entry = entries(tmp_path / "store")[0]
    entry.write_bytes(entry.read_bytes()[:-100])  # cut short, as by a full disk
    assert torch.equal(dataset[0]["video"], expected)
    entry.write_bytes(b"something else entirely")
    assert torch.equal(dataset[0]["video"], expected)


def test_a_parallel_build_stores_every_video_and_reports_failures(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 9)
    (tmp_path / "videos" / "video1.avi").write_bytes(b"")
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, frame_store=store)
    summary = store.build(dataset, num_workers=2, log=quiet)  # a process pool of 2
    broken = str(tmp_path / "videos" / "video1.avi")
    assert summary["stored"] == 8 and [path for path, _ in summary["failed"]] == [broken]
    assert "video1.avi" in summary["failed"][0][1]  # the error names the file
    assert len(entries(tmp_path / "store")) == 8


def test_a_build_killed_midway_leaves_a_store_the_next_build_completes(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 5)
    # A separate process builds the store and dies (os._exit: no cleanup at all) while writing its 3rd entry:
    # after the temporary file is written, before it is renamed into place.
    crash = start_python(f"""
import os
import data
from machinery import frame_store
renames = []
def crash_on_third(source, target):
    renames.append(target)
    if len(renames) == 3:
        os._exit(17)
    os.rename(source, target)
frame_store.os.replace = crash_on_third
dataset = data.build_dataset("csv", {str(tmp_path / "d.csv")!r}, "train", train=False, num_frames=4, image_size=32)
frame_store.FrameStore({str(tmp_path / "store")!r}, data.FRAME_RULE).build(dataset, num_workers=0)
""", cwd=tmp_path)
    out, err = crash.communicate(timeout=120)
    assert crash.returncode == 17, err
    assert len(entries(tmp_path / "store")) == 2
    leftovers = list((tmp_path / "store").glob("*/*.tmp"))
    assert len(leftovers) == 1  # the half-done entry, never renamed into place

    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, train=False, frame_store=store)
    summary = store.build(dataset, num_workers=0, log=quiet)
    assert summary["built"] == 3 and summary["stored"] == 5
    assert not leftovers[0].exists()  # a crashed build's temporary file is cleaned up
    direct = dataset_at(tmp_path, train=False)
    for j in range(5):
        assert torch.equal(dataset.videos()[j]["video"], direct.videos()[j]["video"])


def test_two_processes_building_the_same_store_at_once_do_not_corrupt_it(tmp_path, index_clip, monkeypatch):
    for kind in ("train", "test"):
        make_videos(tmp_path / kind, index_clip, 6)
    # Both processes wait for the same moment, then build the same 6 training and 6 evaluation entries.
    code = f"""
import os, time
import data
from machinery import frame_store
while not os.path.exists({str(tmp_path / "go")!r}):
    time.sleep(0.01)
store = frame_store.FrameStore({str(tmp_path / "store")!r}, data.FRAME_RULE)
for kind in ("train", "test"):
    dataset = data.build_dataset("csv", {str(tmp_path)!r} + f"/{{kind}}/d.csv", "train", train=kind == "train",
                                 num_frames=4, image_size=32)
    store.build(dataset, num_workers=0)
"""
    builders = [start_python(code, tmp_path) for _ in range(2)]
    time.sleep(0.5)
    (tmp_path / "go").touch()
    for builder in builders:
        out, err = builder.communicate(timeout=120)
        assert builder.returncode == 0, err
    assert len(entries(tmp_path / "store")) == 12 and not list((tmp_path / "store").glob("*/*.tmp"))

    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    expected = [dataset_at(tmp_path / "test", train=False).videos()[j]["video"] for j in range(6)]
    evaluation = dataset_at(tmp_path / "test", train=False, frame_store=store)
    training = dataset_at(tmp_path / "train", frame_store=store)
    candidates = set(data.training_candidates(NUM_FRAMES_IN_FILE, 4, 4).reshape(-1).tolist())
    forbid_decoding(monkeypatch)  # every entry is whole: nothing needs decoding again
    for j in range(6):
        assert torch.equal(evaluation.videos()[j]["video"], expected[j])
        frames = store.training_frames(training.video_paths[j], 4, 32, np.random.default_rng(j))
        assert set(decoded_indices(frames).tolist()) <= candidates


@pytest.mark.parametrize("num_frames, candidates", [(12, 4), (8, 4), (12, 3)])
def test_training_candidates_lie_in_the_segments_training_draws_from(num_frames, candidates):
    for num_total in [*range(num_frames, 300), 450, 1000, 7919]:
        table = data.training_candidates(num_total, num_frames, candidates)  # (F, C)
        edges = data.segment_edges(num_total, num_frames)
        assert table.shape == (num_frames, candidates)
        assert (table >= edges[:-1, None]).all() and (table < edges[1:, None]).all(), num_total
        assert (np.diff(table, axis=1) >= 0).all()
        lengths = edges[1:] - edges[:-1]
        distinct = np.array([len(np.unique(row)) for row in table])
        assert (distinct == np.minimum(lengths, candidates)).all(), num_total  # as spread as the segment allows
    short = data.training_candidates(5, 12, 4)  # fewer frames than segments: the sampler's frame, repeated
    np.testing.assert_array_equal(short, np.repeat(data.sample_frame_indices(5, 12)[:, None], 4, axis=1))


def test_entries_made_by_another_sampling_rule_are_rebuilt_once_not_reused(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 2)
    old_rule = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE._replace(version=data.SAMPLER_VERSION - 1))
    assert old_rule.build(dataset_at(tmp_path, train=False, frame_store=old_rule), num_workers=0,
                          log=quiet)["built"] == 2
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, train=False, frame_store=store)
    assert store.build(dataset, num_workers=0, log=quiet)["built"] == 2  # the old entries are not used
    assert store.build(dataset, num_workers=0, log=quiet)["built"] == 0  # and the new ones are, from then on


# -- damaged entries, stores that cannot be written, large videos ------------------------------------------

def overwrite_in_place(entry, position_from_end: int, length: int = 64) -> None:
    """Overwrite `length` bytes of the file in place (its size stays): what a bad disk or a stray write does."""
    content = bytearray(entry.read_bytes())
    content[-position_from_end:-position_from_end + length] = bytes(range(length))
    entry.write_bytes(bytes(content))


@pytest.mark.parametrize("train", [False, True], ids=["evaluation", "training"])
def test_an_entry_overwritten_in_place_is_never_used_but_rebuilt_and_reported(tmp_path, index_clip, capfd, train):
    make_videos(tmp_path, index_clip, 1)
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, train=train, frame_store=store)
    store.build(dataset, num_workers=0, log=quiet)
    capfd.readouterr()  # the build's progress line
    entry, = entries(tmp_path / "store")
    whole = entry.read_bytes()
    overwrite_in_place(entry, 300)  # inside the last image
    rng = np.random.default_rng(0)
    if train:  # every candidate of every segment, so that the damaged image is among them
        visits = [store.training_frames(dataset.video_paths[0], 4, 32, rng) for _ in range(40)]
        candidates = set(data.training_candidates(NUM_FRAMES_IN_FILE, 4, 4).reshape(-1).tolist())
        assert all(set(decoded_indices(frames).tolist()) <= candidates for frames in visits)
    else:
        assert torch.equal(dataset[0]["video"], dataset_at(tmp_path, train=False)[0]["video"])
    warning = capfd.readouterr().err
    assert str(entry) in warning and "video0.avi" in warning and "overwritten" in warning
    assert warning.count("\n") == 1  # reported once: the entry was rebuilt
    assert entry.read_bytes() == whole


def test_the_build_shows_its_progress_on_stderr(tmp_path, index_clip, capsys):
    make_videos(tmp_path, index_clip, 2)
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    store.build(dataset_at(tmp_path, train=False), num_workers=0, log=quiet)
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1].startswith("frame store: 2/2 videos")  # stdout stays for results


def test_an_entry_whose_images_have_another_size_is_rebuilt(tmp_path, index_clip, capfd):
    """A whole, well-formed entry of the right video whose images are not the size its settings say."""
    make_videos(tmp_path, index_clip, 1)
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, train=False, frame_store=store)
    expected = dataset[0]["video"]
    entry, = entries(tmp_path / "store")
    _, key = store._entry(entry.parent, dataset.video_paths[0])
    small = [frame_store._encode_image(np.zeros((16, 16, 3), np.uint8), ".png", []) for _ in range(4)]
    store._write(entry, {"format": frame_store.FORMAT, "key": key, "kind": "eval"}, small)
    assert torch.equal(dataset[0]["video"], expected)
    assert "16x16" in capfd.readouterr().err


def test_a_build_counts_the_damaged_entries_it_rebuilds(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 3)
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, train=False, frame_store=store)
    store.build(dataset, num_workers=0, log=quiet)
    first, second, _ = entries(tmp_path / "store")
    first.write_bytes(first.read_bytes()[:-10])  # cut short
    second.write_bytes(b"VOPFRAMES1\n" + bytes(8) + b"[]")  # a header of length 0: not JSON
    lines = []
    summary = store.build(dataset, num_workers=0, log=lines.append)
    assert summary["damaged"] == 2 and summary["built"] == 2 and "2 of them damaged" in lines[0]
    assert store.build(dataset, num_workers=0, log=quiet)["damaged"] == 0


def test_a_frame_store_that_is_a_file_or_cannot_be_written_is_refused_before_any_decoding(tmp_path, index_clip,
                                                                                           monkeypatch):
    make_videos(tmp_path, index_clip, 2)
    a_file = tmp_path / "frames.txt"
    a_file.write_text("not a folder")
    with pytest.raises(frame_store.FrameStoreError, match="frames.txt is a file"):
        frame_store.FrameStore(a_file, data.FRAME_RULE)
    forbid_decoding(monkeypatch)
    store = frame_store.FrameStore(a_file / "store", data.FRAME_RULE)  # a folder that cannot be made
    with pytest.raises(frame_store.FrameStoreError, match=r"frames.txt/store/eval.*cannot be written"):
        store.build(dataset_at(tmp_path, train=False, frame_store=store), num_workers=0, log=quiet)


def test_a_store_without_room_for_the_build_is_refused_before_decoding(tmp_path, index_clip, monkeypatch):
    make_videos(tmp_path, index_clip, 4)
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    dataset = dataset_at(tmp_path, train=False, frame_store=store)
    store.build(dataset_at(tmp_path, train=False).without_videos([1, 2, 3]), num_workers=0, log=quiet)
    entry_size = entries(tmp_path / "store")[0].stat().st_size
    forbid_decoding(monkeypatch)
    monkeypatch.setattr(frame_store.shutil, "disk_usage", lambda path: SimpleNamespace(free=2 * entry_size))
    with pytest.raises(frame_store.FrameStoreError, match=r"3 videos still to store need about .* GB") as refused:
        store.build(dataset, num_workers=0, log=quiet)
    assert str(tmp_path / "store") in str(refused.value) and len(entries(tmp_path / "store")) == 1


def test_a_full_disk_stops_the_build_in_one_line_leaving_no_partial_file(tmp_path, index_clip):
    """RLIMIT_FSIZE (ulimit -f) fails every write past its size as a full disk does."""
    make_videos(tmp_path, index_clip, 5)
    building = start_python(f"""
import resource
import data
from machinery import frame_store
decoded = []
real = frame_store.decode_frames
frame_store.decode_frames = lambda *args, **kwargs: decoded.append(args[0]) or real(*args, **kwargs)
dataset = data.build_dataset("csv", {str(tmp_path / "d.csv")!r}, "train", train=True, num_frames=4, image_size=32)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
try:
    frame_store.FrameStore({str(tmp_path / "store")!r}, data.FRAME_RULE).build(dataset, num_workers=0,
                                                                              log=lambda line: None)
except frame_store.FrameStoreError as error:
    print(error)
print(len(decoded))
""", cwd=tmp_path)
    out, err = building.communicate(timeout=120)
    assert building.returncode == 0, err
    message, decoded = out.splitlines()
    assert "store" in message and "File too large" in message and "failed to decode" not in message
    assert decoded == "1"  # stopped at the first failed write, not after decoding every video
    assert [path.name for path in (tmp_path / "store").rglob("*") if path.is_file()] == []


def test_building_from_a_large_video_holds_one_full_size_frame_at_a_time(tmp_path):
    height, width = 1200, 1600
    frames = np.zeros((16, height, width, 3), np.uint8)
    for i in range(16):
        frames[i, :, 100 * i:100 * i + 200] = (255, 128, 0)
    video = video_io.write_video(tmp_path / "large.avi", frames, 30, "MJPG")
    del frames
    write_csv(tmp_path / "d.csv", ["video", "caption"], [["large.avi", "an orange bar moves right"]])
    store = frame_store.FrameStore(tmp_path / "store", data.FRAME_RULE)
    for train in (True, False):
        dataset = dataset_at(tmp_path, train=train, frame_store=store, num_frames=8)
        tracemalloc.start()
        store.build(dataset, num_workers=0, log=quiet)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * height * width * 3  # not the 16 frames (train: 8 x 4 candidates) at full size
    assert video.is_file() and len(entries(tmp_path / "store")) == 2
