"""Tests for frame_store.py: what the store serves equals a direct read (evaluation bit-identical; training
draws among the stored candidates, deterministic per (seed, epoch, item)); it survives a crash mid-build and
two processes building it at once. Clips are written with video_io.write_video (no ffmpeg)."""
import os
import time

import numpy as np
import pytest
import torch

import data
import frame_store
import video_io
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
    stored = dataset_at(tmp_path, train=False, image_size=56, frame_store=frame_store.FrameStore(tmp_path / "store"))
    first_visit = [stored.videos()[j]["video"] for j in range(2)]  # decodes and stores
    forbid_decoding(monkeypatch)
    later_visit = [stored.videos()[j]["video"] for j in range(2)]  # reads the store only
    for want, first, later in zip(expected, first_visit, later_visit):
        assert torch.equal(want, first) and torch.equal(want, later)
    assert len(entries(tmp_path / "store")) == 2  # one entry per video file


def test_training_frames_are_drawn_among_the_stored_candidates(tmp_path, index_clip):
    store = frame_store.FrameStore(tmp_path / "store", candidates=3)
    num_frames = 4
    candidates = frame_store.training_candidates(NUM_FRAMES_IN_FILE, num_frames, 3)  # (F, C)
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
    dataset = dataset_at(tmp_path, frame_store=frame_store.FrameStore(tmp_path / "store"), seed=5)
    by_epoch = {epoch: [dataset[(epoch, item)]["video"] for item in range(3)] for epoch in range(3)}
    forbid_decoding(monkeypatch)  # everything was stored on the first visits
    again = dataset_at(tmp_path, frame_store=frame_store.FrameStore(tmp_path / "store"), seed=5)
    for epoch in (2, 0, 1):  # another dataset object, another order: the same draws
        for item in (2, 1, 0):
            assert torch.equal(again[(epoch, item)]["video"], by_epoch[epoch][item])
    assert not all(torch.equal(by_epoch[0][0], by_epoch[epoch][0]) for epoch in (1, 2))  # epochs draw anew


def quiet(message):
    pass


def test_the_store_is_keyed_by_file_and_settings_and_reports_its_size(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 2)
    store = frame_store.FrameStore(tmp_path / "store")
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
    dataset = dataset_at(tmp_path, train=False, frame_store=frame_store.FrameStore(tmp_path / "store"))
    expected = dataset[0]["video"]
    entry = entries(tmp_path / "store")[0]
    entry.write_bytes(entry.read_bytes()[:-100])  # cut short, as by a full disk
    assert torch.equal(dataset[0]["video"], expected)
    entry.write_bytes(b"something else entirely")
    assert torch.equal(dataset[0]["video"], expected)


def test_a_parallel_build_stores_every_video_and_reports_failures(tmp_path, index_clip):
    make_videos(tmp_path, index_clip, 9)
    (tmp_path / "videos" / "video1.avi").write_bytes(b"")
    store = frame_store.FrameStore(tmp_path / "store")
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
import data, frame_store
renames = []
def crash_on_third(source, target):
    renames.append(target)
    if len(renames) == 3:
        os._exit(17)
    os.rename(source, target)
frame_store.os.replace = crash_on_third
dataset = data.build_dataset("csv", {str(tmp_path / "d.csv")!r}, "train", train=False, num_frames=4, image_size=32)
frame_store.FrameStore({str(tmp_path / "store")!r}).build(dataset, num_workers=0)
""", cwd=tmp_path)
    out, err = crash.communicate(timeout=120)
    assert crash.returncode == 17, err
    assert len(entries(tmp_path / "store")) == 2
    leftovers = list((tmp_path / "store").glob("*/*.tmp"))
    assert len(leftovers) == 1  # the half-done entry, never renamed into place

    store = frame_store.FrameStore(tmp_path / "store")
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
import data, frame_store
while not os.path.exists({str(tmp_path / "go")!r}):
    time.sleep(0.01)
store = frame_store.FrameStore({str(tmp_path / "store")!r})
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

    store = frame_store.FrameStore(tmp_path / "store")
    expected = [dataset_at(tmp_path / "test", train=False).videos()[j]["video"] for j in range(6)]
    evaluation = dataset_at(tmp_path / "test", train=False, frame_store=store)
    training = dataset_at(tmp_path / "train", frame_store=store)
    candidates = set(frame_store.training_candidates(NUM_FRAMES_IN_FILE, 4, 4).reshape(-1).tolist())
    forbid_decoding(monkeypatch)  # every entry is whole: nothing needs decoding again
    for j in range(6):
        assert torch.equal(evaluation.videos()[j]["video"], expected[j])
        frames = store.training_frames(training.video_paths[j], 4, 32, np.random.default_rng(j))
        assert set(decoded_indices(frames).tolist()) <= candidates


@pytest.mark.parametrize("num_frames, candidates", [(12, 4), (8, 4), (12, 3)])
def test_training_candidates_lie_in_the_segments_training_draws_from(num_frames, candidates):
    for num_total in [*range(num_frames, 300), 450, 1000, 7919]:
        table = frame_store.training_candidates(num_total, num_frames, candidates)  # (F, C)
        edges = data.segment_edges(num_total, num_frames)
        assert table.shape == (num_frames, candidates)
        assert (table >= edges[:-1, None]).all() and (table < edges[1:, None]).all(), num_total
        assert (np.diff(table, axis=1) >= 0).all()
        lengths = edges[1:] - edges[:-1]
        distinct = np.array([len(np.unique(row)) for row in table])
        assert (distinct == np.minimum(lengths, candidates)).all(), num_total  # as spread as the segment allows
    short = frame_store.training_candidates(5, 12, 4)  # fewer frames than segments: the sampler's frame, repeated
    np.testing.assert_array_equal(short, np.repeat(data.sample_frame_indices(5, 12)[:, None], 4, axis=1))


def test_entries_made_by_another_sampling_rule_are_rebuilt_once_not_reused(tmp_path, index_clip, monkeypatch):
    make_videos(tmp_path, index_clip, 2)
    old_rule = frame_store.FrameStore(tmp_path / "store")
    monkeypatch.setattr(data, "SAMPLER_VERSION", data.SAMPLER_VERSION - 1)
    assert old_rule.build(dataset_at(tmp_path, train=False, frame_store=old_rule), num_workers=0,
                          log=quiet)["built"] == 2
    monkeypatch.undo()
    store = frame_store.FrameStore(tmp_path / "store")
    dataset = dataset_at(tmp_path, train=False, frame_store=store)
    assert store.build(dataset, num_workers=0, log=quiet)["built"] == 2  # the old entries are not used
    assert store.build(dataset, num_workers=0, log=quiet)["built"] == 0  # and the new ones are, from then on
