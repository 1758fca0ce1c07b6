"""Tests for data.py: frame sampling, decoding real (generated) files, transforms, the annotation layouts,
and the synthetic motion world. Every video here is written by the test itself with cv2.VideoWriter."""
import struct

import cv2
import numpy as np
import pytest
import torch

import data
import video_io
from helpers import msrvtt_root, place_videos, write_csv, write_tiny_video

NUM_FRAMES_IN_FILE = 40
LEVEL_STEP = 6  # frame i is grey level 6 * i on its right part, so the decoded frame tells its own index


def index_video_frames(num_frames=NUM_FRAMES_IN_FILE, height=48, width=64) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB: the right part is grey 6 * i (the frame's index), the left 16 columns pure red
    (to check channel order)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, :, 16:] = LEVEL_STEP * i
        frames[i, :, :16] = (255, 0, 0)
    return frames


def decoded_indices(frames: np.ndarray) -> np.ndarray:
    """Recover each decoded frame's index from its grey level. (F, H, W, 3) -> (F,)"""
    return np.round(frames[:, 8:-8, 24:-8, 1].mean(axis=(1, 2)) / LEVEL_STEP).astype(int)


CODECS = [("mp4", "mp4v"), ("avi", "MJPG"), ("mkv", "FFV1")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """One 40-frame, 64x48 video per container/codec."""
    folder = tmp_path_factory.mktemp("videos")
    return {suffix: video_io.write_video(folder / f"index.{suffix}", index_video_frames(), 30, fourcc)
            for suffix, fourcc in CODECS}


# --- sampler ----------------------------------------------------------------------------------------------


def test_uniform_takes_each_segments_middle_frame():
    np.testing.assert_array_equal(data.sample_frame_indices(120, 12, "uniform"), np.arange(5, 120, 10))
    np.testing.assert_array_equal(data.sample_frame_indices(12, 12, "uniform"), np.arange(12))


def test_rand_stays_inside_its_segment_and_varies():
    rng = np.random.default_rng(0)
    num_total, num_frames = 100, 12
    edges = np.linspace(0, num_total, num_frames + 1)
    draws = np.stack([data.sample_frame_indices(num_total, num_frames, "rand", rng) for _ in range(300)])
    assert (draws >= np.floor(edges[:-1])).all() and (draws < np.ceil(edges[1:])).all()
    assert all(len(np.unique(draws[:, k])) > 3 for k in range(num_frames))  # really random per segment


def test_short_video_repeats_frames_to_keep_the_length():
    for mode in ("uniform", "rand"):
        indices = data.sample_frame_indices(3, 12, mode, np.random.default_rng(1))
        assert len(indices) == 12 and set(indices.tolist()) == {0, 1, 2}
        assert (np.diff(indices) >= 0).all()
    np.testing.assert_array_equal(data.sample_frame_indices(1, 4), [0, 0, 0, 0])


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        data.sample_frame_indices(10, 4, "middle")
    with pytest.raises(ValueError, match="0 frames"):
        data.sample_frame_indices(0, 4)


# --- decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [suffix for suffix, _ in CODECS])
def test_read_frames_decodes_the_sampled_frames_in_rgb(videos, suffix):
    frames = data.read_frames(videos[suffix], 8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(decoded_indices(frames), data.sample_frame_indices(NUM_FRAMES_IN_FILE, 8))
    red_patch = frames[:, 8:-8, 2:12].mean(axis=(0, 1, 2))  # (3,) RGB
    assert red_patch[0] > 200 and red_patch[2] < 50


@pytest.mark.parametrize("suffix", ["mp4", "avi"])
def test_seek_and_sequential_strategies_return_identical_frames(videos, suffix):
    for mode in ("uniform", "rand"):
        sequential = data.read_frames(videos[suffix], 12, mode, np.random.default_rng(3), strategy="sequential")
        seeking = data.read_frames(videos[suffix], 12, mode, np.random.default_rng(3), strategy="seek")
        np.testing.assert_array_equal(sequential, seeking)


def test_auto_strategy_seeks_only_for_few_frames_from_long_files():
    assert video_io.choose_strategy(450, 12) == "sequential"
    assert video_io.choose_strategy(100_000, 12) == "seek"


def test_header_frame_count_that_lies_is_not_trusted(videos, tmp_path):
    # AVI keeps the frame count in the main header (avih.dwTotalFrames) and the stream header (strh.dwLength).
    content = bytearray(videos["avi"].read_bytes())
    strh = content.find(b"strh")
    content[48:52] = struct.pack("<I", 100)
    content[strh + 40:strh + 44] = struct.pack("<I", 100)
    lying = tmp_path / "lying.avi"
    lying.write_bytes(bytes(content))
    assert int(cv2.VideoCapture(str(lying)).get(cv2.CAP_PROP_FRAME_COUNT)) == 100  # the lie is in place
    for strategy in ("sequential", "seek", "auto"):
        frames = data.read_frames(lying, 8, strategy=strategy)
        # Re-sampled over the 40 frames that exist, not clamped at the end of the file.
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
    for path in (not_a_video, cut_before_index, tmp_path / "absent.mp4"):
        with pytest.raises(video_io.VideoReadError, match=path.name):
            data.read_frames(path, 4)


def test_image_is_read_as_a_repeated_one_frame_video(tmp_path):
    image = index_video_frames(1)[0]
    cv2.imwrite(str(tmp_path / "still.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    frames = data.read_frames(tmp_path / "still.png", 5)
    assert frames.shape == (5, 48, 64, 3)
    np.testing.assert_array_equal(frames, np.repeat(image[None], 5, axis=0))


# --- transforms -------------------------------------------------------------------------------------------


def test_eval_transform_resizes_crops_and_normalises():
    mean_colour = np.round(np.array(data.CLIP_MEAN) * 255).astype(np.uint8)
    frames = np.broadcast_to(mean_colour, (3, 48, 64, 3)).copy()
    video = data.video_transform(frames, train=False, image_size=224)
    assert video.shape == (3, 3, 224, 224) and video.dtype == torch.float32
    assert video.abs().max() < 0.02  # the CLIP mean colour normalises to ~0
    # Center crop of a 64x48 frame whose left half is white: shorter side 48 -> 32, width 64 -> 43, crop 32.
    half = np.zeros((1, 48, 64, 3), np.uint8)
    half[:, :, :32] = 255
    video = data.video_transform(half, train=False, image_size=32)
    assert video.shape == (1, 3, 32, 32)
    left, right = video[0, :, :, :10].mean(), video[0, :, :, -10:].mean()
    assert left > 1.5 and right < -1.5


def test_train_transform_applies_one_crop_and_flip_to_every_frame():
    rng = np.random.default_rng(0)
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, :20] = 255  # bright left band: a flip moves it to the right
    frames = np.repeat(frame[None], 4, axis=0)
    flipped = 0
    for _ in range(20):
        video = data.video_transform(frames, train=True, image_size=32, rng=rng)
        assert video.shape == (4, 3, 32, 32)
        assert all(torch.equal(video[0], video[k]) for k in range(1, 4))  # the same crop/flip for all frames
        flipped += bool(video[0, :, :, -1].mean() > video[0, :, :, 0].mean())
    assert 0 < flipped < 20  # flips happen, but not always
    never = [data.video_transform(frames, True, 32, rng, hflip=False) for _ in range(10)]
    assert all(v[0, :, :, 0].mean() >= v[0, :, :, -1].mean() for v in never)


def test_worker_init_fn_limits_opencv_to_one_thread():
    before = cv2.getNumThreads()
    try:
        data.worker_init_fn(0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    return write_tiny_video(tmp_path_factory.mktemp("clip"))


# --- the dataset ------------------------------------------------------------------------------------------


def test_items_have_the_documented_shape_and_keys(tmp_path, tiny_video):
    root = msrvtt_root(tmp_path, tiny_video)
    for split in ("train", "test"):
        item = data.build_dataset("msrvtt-9k", root, split, num_frames=4, image_size=32)[1]
        assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
        assert isinstance(item["caption"], str) and item["video_id"] in ("video0", "video3")



def test_evaluation_cache_serves_frames_without_decoding(tmp_path, tiny_video, monkeypatch):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    write_csv(tmp_path / "c.csv", ["video", "caption"], [["one.mp4", "a clip"]])
    dataset = data.build_dataset("csv", tmp_path / "c.csv", "train", train=False, num_frames=3, image_size=32,
                                 cache_dir=tmp_path / "cache")
    first = dataset[0]["video"]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the frames are cached")

    monkeypatch.setattr(data, "read_frames", no_decoding)
    assert torch.equal(dataset[0]["video"], first)


def test_training_draws_depend_on_seed_epoch_and_item_only(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4", "two.mp4"])
    write_csv(tmp_path / "t.csv", ["video", "caption"], [["one.mp4", "x"], ["two.mp4", "y"]])
    dataset = data.build_dataset("csv", tmp_path / "t.csv", "train", num_frames=4, image_size=32)
    first = dataset[0]["video"]
    dataset[1]  # drawing another item in between must not change item 0's draw
    assert torch.equal(dataset[0]["video"], first)
    epochs = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        epochs.append(dataset[0]["video"])
    assert not all(torch.equal(epochs[0], other) for other in epochs[1:])  # each epoch draws anew
    dataset.set_epoch(2)
    loader = data.make_loader(dataset, batch_size=2, num_workers=2)  # workers draw what the main process does
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 4, 3, 32, 32) and batch["caption"] == ["x", "y"]
    assert torch.equal(batch["video"][0], epochs[2])
