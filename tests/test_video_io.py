"""Tests for formats/video_io.py: decoding real (generated) files, the two reading strategies and the rule
between them, probing many videos. Every video here is written by the test itself with cv2.VideoWriter (no ffmpeg)."""
import json
import os
import shutil
import struct
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import data
from formats import video_io
from helpers import decoded_indices, index_video_frames

NUM_FRAMES_IN_FILE = 40
CODECS = [("mp4", "mp4v"), ("avi", "MJPG"), ("mkv", "FFV1")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """One 40-frame, 64x48 index video per container/codec."""
    folder = tmp_path_factory.mktemp("videos")
    return {suffix: video_io.write_video(folder / f"index.{suffix}", index_video_frames(NUM_FRAMES_IN_FILE), 30,
                                         fourcc)
            for suffix, fourcc in CODECS}


# --- decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [suffix for suffix, _ in CODECS])
def test_read_frames_decodes_the_sampled_frames_in_rgb(videos, suffix):
    frames = data.read_frames(videos[suffix], 8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(decoded_indices(frames), data.sample_frame_indices(NUM_FRAMES_IN_FILE, 8))
    red_patch = frames[:, 8:-8, 2:12].mean(axis=(0, 1, 2))  # (3,) RGB
    assert red_patch[0] > 200 and red_patch[2] < 50


@pytest.mark.parametrize("suffix", [suffix for suffix, _ in CODECS])
def test_seek_and_sequential_strategies_return_identical_frames(videos, suffix):
    for mode in ("uniform", "rand"):
        sequential = data.read_frames(videos[suffix], 12, mode, np.random.default_rng(3), strategy="sequential")
        seeking = data.read_frames(videos[suffix], 12, mode, np.random.default_rng(3), strategy="seek")
        automatic = data.read_frames(videos[suffix], 12, mode, np.random.default_rng(3), strategy="auto")
        np.testing.assert_array_equal(sequential, seeking)
        np.testing.assert_array_equal(sequential, automatic)


@pytest.mark.parametrize("header_frames", [100, 20])
def test_a_header_frame_count_that_lies_is_not_trusted(videos, tmp_path, header_frames):
    """The header over-reports (100) or under-reports (20) the 40 frames the file holds: the segments must span
    the 40 frames that exist, neither clamped at the end of the file nor covering only its first half."""
    # AVI keeps the frame count in the main header (avih.dwTotalFrames) and the stream header (strh.dwLength).
    content = bytearray(videos["avi"].read_bytes())
    strh = content.find(b"strh")
    content[48:52] = struct.pack("<I", header_frames)
    content[strh + 40:strh + 44] = struct.pack("<I", header_frames)
    lying = tmp_path / "lying.avi"
    lying.write_bytes(bytes(content))
    assert int(cv2.VideoCapture(str(lying)).get(cv2.CAP_PROP_FRAME_COUNT)) == header_frames  # the lie is in place
    for strategy in ("sequential", "seek", "auto"):
        frames = data.read_frames(lying, 8, strategy=strategy)
        np.testing.assert_array_equal(decoded_indices(frames), data.sample_frame_indices(NUM_FRAMES_IN_FILE, 8))


def test_truncated_file_gives_the_frames_it_still_has(videos, tmp_path):
    content = videos["avi"].read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(content[: len(content) * 6 // 10])
    frames = data.read_frames(truncated, 8)
    indices = decoded_indices(frames)
    assert frames.shape[0] == 8 and indices.max() < 30 and len(np.unique(indices)) == 8


def test_unreadable_files_raise_an_error_naming_the_file(videos, tmp_path):
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video\n" * 20)
    content = videos["mp4"].read_bytes()
    cut_before_index = tmp_path / "cut.mp4"  # mp4v from OpenCV writes its index (moov) at the end
    cut_before_index.write_bytes(content[: len(content) // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (not_a_video, cut_before_index, empty, tmp_path / "absent.mp4"):
        with pytest.raises(video_io.VideoReadError, match=path.name):
            data.read_frames(path, 4)


def test_image_is_read_as_a_repeated_one_frame_video(tmp_path):
    image = index_video_frames(1)[0]
    cv2.imwrite(str(tmp_path / "still.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    frames = data.read_frames(tmp_path / "still.png", 5)
    assert frames.shape == (5, 48, 64, 3)
    np.testing.assert_array_equal(frames, np.repeat(image[None], 5, axis=0))


# --- which strategy ---------------------------------------------------------------------------------------


def layout(keyframes, fourcc="h264"):
    return video_io.VideoLayout(450, 450, np.asarray(keyframes, np.int64), fourcc)


def test_auto_seeks_on_short_keyframe_intervals_and_passes_once_on_long_ones():
    twelve_of_450 = data.sample_frame_indices(450, 12)
    assert video_io.choose_strategy(twelve_of_450, layout([0, 250])) == "sequential"  # x264's default GOP
    assert video_io.choose_strategy(twelve_of_450, layout(np.arange(0, 450, 12))) == "seek"  # mp4v's GOP 12
    assert video_io.choose_strategy(twelve_of_450, layout(np.arange(450))) == "seek"  # intra-only
    # Many wanted frames: one pass decodes fewer frames than even short seeks.
    assert video_io.choose_strategy(data.sample_frame_indices(450, 48), layout(np.arange(0, 450, 12))) == "sequential"
    # A frame near the start is cheaper to reach by decoding forward than by seeking.
    assert video_io.choose_strategy(np.array([3]), layout(np.arange(450))) == "sequential"


def test_auto_follows_the_cost_of_each_strategy_in_decoded_frames():
    """The rule is the comparison of two counts, written out: a seek decodes from the keyframe at or before
    (target - 16) to the target, plus an overhead; the pass decodes up to the last wanted frame."""
    keyframes = np.arange(0, 450, 30)
    for wanted in (np.array([100, 200, 300]), np.array([440]), np.arange(0, 450, 50)):
        starts = np.array([keyframes[keyframes <= max(t - 16, 0)].max() for t in wanted])
        seek = np.sum(wanted - starts + 1 + video_io.SEEK_OVERHEAD_FRAMES)
        expected = "seek" if seek < wanted.max() + 1 else "sequential"
        assert video_io.choose_strategy(wanted, layout(keyframes)) == expected


def test_unknown_keyframes_assume_a_long_interval_unless_the_codec_is_intra_only():
    wanted = data.sample_frame_indices(450, 12)
    assert video_io.choose_strategy(wanted, layout([], "h264")) == "sequential"
    assert video_io.choose_strategy(wanted, layout([], "MJPG")) == "seek"


def test_scan_video_reads_keyframes_without_decoding(videos, monkeypatch):
    if not hasattr(cv2, "CAP_PROP_LRF_HAS_KEY_FRAME"):
        pytest.skip("this OpenCV has no raw-stream mode")
    ffv1 = video_io.scan_video(videos["mkv"])  # OpenCV writes FFV1 with a keyframe every 12 frames
    assert ffv1.packets == NUM_FRAMES_IN_FILE and ffv1.header_frames == NUM_FRAMES_IN_FILE
    np.testing.assert_array_equal(ffv1.keyframes, [0, 12, 24, 36])
    mjpeg = video_io.scan_video(videos["avi"])
    np.testing.assert_array_equal(mjpeg.keyframes, np.arange(NUM_FRAMES_IN_FILE))
    assert mjpeg.fourcc == "MJPG"


# --- probing ----------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_videos(videos, tmp_path):
    """Two readable videos and four unreadable ones: text, empty, cut before its index, absent."""
    good = [Path(shutil.copy(videos[suffix], tmp_path / f"good.{suffix}")) for suffix in ("avi", "mp4")]
    (tmp_path / "text.mp4").write_text("not a video\n" * 10)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "cut.mp4").write_bytes(videos["mp4"].read_bytes()[:2000])
    bad = [tmp_path / name for name in ("text.mp4", "empty.mp4", "cut.mp4", "absent.mp4")]
    return good, bad


def test_probe_reports_frames_of_readable_videos_and_names_unreadable_ones(mixed_videos):
    good, bad = mixed_videos
    results = video_io.probe_videos(good + bad, num_workers=1)
    assert list(results) == good + bad  # keys as given, in order
    for path in good:
        assert results[path].ok and results[path].frames == NUM_FRAMES_IN_FILE
    for path in bad:
        assert not results[path].ok and path.name in results[path].error and results[path].frames == 0


def test_probe_cache_skips_unchanged_files_and_probes_changed_ones(mixed_videos, tmp_path, monkeypatch):
    good, bad = mixed_videos
    cache = tmp_path / "probe.json"
    first = video_io.probe_videos(good + bad, num_workers=1, cache_file=cache)
    assert set(json.loads(cache.read_text())["videos"]) >= {str(path) for path in good}
    probed = []
    original = video_io.probe_video
    monkeypatch.setattr(video_io, "probe_video", lambda path: probed.append(path) or original(path))
    assert video_io.probe_videos(good + bad, num_workers=1, cache_file=cache) == first
    assert probed == []  # nothing probed again (the absent file needs no probe)
    stat = os.stat(good[0])
    os.utime(good[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "changed": probed again
    video_io.probe_videos(good + bad, num_workers=1, cache_file=cache)
    assert probed == [good[0]]


def test_probe_runs_in_a_process_pool(videos, tmp_path):
    paths = [shutil.copy(videos["avi"], tmp_path / f"copy{k}.avi") for k in range(63)]
    (tmp_path / "broken.avi").write_bytes(b"RIFF" + bytes(100))
    paths.append(str(tmp_path / "broken.avi"))
    results = video_io.probe_videos(paths, num_workers=2)
    assert [result.ok for result in results.values()] == [True] * 63 + [False]
    assert all(result.frames == NUM_FRAMES_IN_FILE for result in list(results.values())[:63])


def _dies_on_five(item: int) -> int:
    if item == 5:
        os._exit(3)  # what FFmpeg crashing on a broken file, or the out-of-memory killer, does to a worker
    return 2 * item


def test_a_dying_worker_costs_only_its_item_and_never_hangs():
    results = video_io.map_in_processes(_dies_on_five, list(range(40)), 2, on_crash=lambda item: -item)
    assert results == [2 * i if i != 5 else -5 for i in range(40)]


def _fails_on_zero_else_sleeps(item: int) -> int:
    if item == 0:
        raise ValueError("item 0 is bad")
    time.sleep(item)
    return item


def test_an_error_in_one_item_ends_the_pool_at_once():
    """The error is raised as soon as it comes (after the pool's start), not after the 3 minutes that the other
    queued items would take."""
    start = time.time()
    with pytest.raises(ValueError, match="item 0 is bad"):
        video_io.map_in_processes(_fails_on_zero_else_sleeps, [0] + [60] * 6, 2, on_crash=print)
    assert time.time() - start < 60


@pytest.mark.parametrize("damage", [{"frames": "many"}, "a string", {"error": None}, {"frames": True},
                                    {"frames": 0, "error": ""}, {"frames": 12, "error": "broken"}],
                         ids=["frames a word", "an entry that is a string", "error null", "frames true",
                              "no frames and no error", "frames and an error"])
def test_a_probe_cache_entry_that_does_not_validate_is_probed_again(mixed_videos, tmp_path, monkeypatch, damage):
    good, bad = mixed_videos
    cache = tmp_path / "probe.json"
    first = video_io.probe_videos(good + bad, num_workers=1, cache_file=cache)
    content = json.loads(cache.read_text())
    entry = content["videos"][str(good[0])]
    content["videos"][str(good[0])] = {**entry, **damage} if isinstance(damage, dict) else damage
    cache.write_text(json.dumps(content))
    probed = []
    original = video_io.probe_video
    monkeypatch.setattr(video_io, "probe_video", lambda path: probed.append(path) or original(path))
    assert video_io.probe_videos(good + bad, num_workers=1, cache_file=cache) == first
    assert probed == [good[0]]
    assert json.loads(cache.read_text())["videos"][str(good[0])] == entry  # and the cache is mended
