"""Tests for data.py: frame sampling, CLIP's preprocessing (against its arithmetic written out here), the
dataset (determinism, broken videos, leaving videos out) and the loader. Decoding is tested in
test_video_io.py, the frame store in test_frame_store.py."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

import data
from formats import video_io
from helpers import msrvtt_root, place_videos, python_env, write_csv, write_tiny_video

# --- sampler ----------------------------------------------------------------------------------------------


def published_uniform_indices(vlen: int, num_frames: int) -> list[int]:
    """The frames the published code reads in 'uniform' mode (X-Pool's load_frames_from_video, kept by the authors'
    ModelScope release), written out: integer segment edges, each segment's (first + last) // 2."""
    intervals = np.linspace(start=0, stop=vlen, num=num_frames + 1).astype(int)
    ranges = [(intervals[k], intervals[k + 1] - 1) for k in range(num_frames)]
    return [(first + last) // 2 for first, last in ranges]


@pytest.mark.parametrize("num_frames", [8, 12])
@pytest.mark.method
def test_uniform_picks_exactly_the_published_frames(num_frames):
    for vlen in [*range(num_frames, 2001), 4321, 10_000, 54_000]:
        assert data.sample_frame_indices(vlen, num_frames, "uniform").tolist() == \
            published_uniform_indices(vlen, num_frames), vlen
    assert data.sample_frame_indices(450, 12)[:4].tolist() == [18, 55, 93, 130]  # an MSR-VTT-like 15 s clip


@pytest.mark.method
def test_uniform_frames_are_what_read_frames_decodes(tmp_path):
    """A real file, read with a seek to each wanted frame: the decoded frames are the published ones."""
    from helpers import decoded_indices, index_video_frames
    clip = video_io.write_video(tmp_path / "index.avi", index_video_frames(40), 30, "MJPG")
    for num_frames in (8, 12):
        for strategy in ("seek", "sequential"):
            frames = data.read_frames(clip, num_frames, "uniform", strategy=strategy)
            assert decoded_indices(frames).tolist() == published_uniform_indices(40, num_frames)


@pytest.mark.method
def test_rand_draws_every_frame_of_its_segment_and_no_other():
    rng = np.random.default_rng(0)
    num_total, num_frames = 100, 12
    edges = np.linspace(0, num_total, num_frames + 1).astype(int)  # the published segments
    draws = np.stack([data.sample_frame_indices(num_total, num_frames, "rand", rng) for _ in range(600)])
    for k in range(num_frames):
        assert set(draws[:, k].tolist()) == set(range(edges[k], edges[k + 1]))  # the last frame included


@pytest.mark.method
def test_short_video_repeats_frames_to_keep_the_length():
    for mode in ("uniform", "rand"):
        indices = data.sample_frame_indices(3, 12, mode, np.random.default_rng(1))
        assert len(indices) == 12 and set(indices.tolist()) == {0, 1, 2}
        assert (np.diff(indices) >= 0).all()
    np.testing.assert_array_equal(data.sample_frame_indices(1, 4), [0, 0, 0, 0])


@pytest.mark.method
def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        data.sample_frame_indices(10, 4, "middle")
    with pytest.raises(ValueError, match="0 frames"):
        data.sample_frame_indices(0, 4)


# --- CLIP's preprocessing ---------------------------------------------------------------------------------


def clip_preprocess_reference(frame: np.ndarray, size: int) -> torch.Tensor:
    """OpenAI CLIP's `_transform(size)` on one RGB frame, its torchvision arithmetic written out: Resize(size,
    BICUBIC) on a PIL image gives the shorter side `size` and the longer `int(size * long / short)` (and does
    nothing if the image has that size already); CenterCrop(size) starts at int(round((new - size) / 2.0));
    ToTensor divides by 255; Normalize subtracts the mean and divides by the std. (3, size, size) float32."""
    image = Image.fromarray(frame)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BICUBIC)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float().div(255)
    mean = torch.as_tensor(data.CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(data.CLIP_STD, dtype=torch.float32)[:, None, None]
    return tensor.sub_(mean).div_(std)


# (width, height): MSR-VTT, QCIF, 480p wide, portrait, square, smaller than 224, 720p, already 224 tall.
FRAME_SIZES = [(320, 240), (176, 144), (852, 480), (240, 320), (300, 300), (100, 80), (1280, 720), (298, 224)]


@pytest.mark.parametrize("width,height", FRAME_SIZES)
@pytest.mark.method
def test_evaluation_frames_are_exactly_clips_preprocessing(width, height):
    rng = np.random.default_rng(width * height)
    smooth = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    frames = np.stack([np.clip(smooth + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
                       for _ in range(2)])  # (2, H, W, 3): texture, so a pixel of offset shows
    video = data.video_transform(frames, augment=False, image_size=224)
    reference = torch.stack([clip_preprocess_reference(frame, 224) for frame in frames])
    assert video.shape == (2, 3, 224, 224) and video.dtype == torch.float32
    assert torch.equal(video, reference)  # bit-identical, not merely close


@pytest.mark.method
def test_clip_resize_truncates_the_longer_side():
    assert data.clip_resize_size(240, 320, 224) == (224, 298)  # 298.67 -> 298 (rounding would give 299)
    assert data.clip_resize_size(144, 176, 224) == (224, 273)
    assert data.clip_resize_size(480, 852, 224) == (224, 397)
    assert data.clip_resize_size(320, 240, 224) == (298, 224)  # portrait
    assert data.clip_resize_size(300, 300, 224) == (224, 224)


@pytest.mark.method
def test_eval_transform_normalises_with_clips_mean_and_std():
    mean_colour = np.round(np.array(data.CLIP_MEAN) * 255).astype(np.uint8)
    frames = np.broadcast_to(mean_colour, (3, 48, 64, 3)).copy()
    video = data.video_transform(frames, augment=False, image_size=224)
    assert video.shape == (3, 3, 224, 224) and video.abs().max() < 0.02  # the CLIP mean colour -> ~0


@pytest.mark.method
def test_random_resized_crop_box_keeps_torchvisions_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = data.random_resized_crop_box(240, 320, rng)
        assert 0 <= left < right <= 320 and 0 <= top < bottom <= 240
        area, aspect = (right - left) * (bottom - top) / (240 * 320), (right - left) / (bottom - top)
        assert 0.5 - 0.02 < area <= 1.0 and 3 / 4 - 0.02 < aspect < 4 / 3 + 0.02  # up to the pixel rounding
    # No allowed box fits a 1000x10 strip: torchvision falls back to the widest central crop of ratio 4/3.
    assert data.random_resized_crop_box(10, 1000, rng) == (493, 0, 506, 10)
    assert data.random_resized_crop_box(1000, 10, rng) == (0, 493, 10, 506)  # and of ratio 3/4, upright


@pytest.mark.method
def test_train_transform_applies_one_crop_and_flip_to_every_frame():
    rng = np.random.default_rng(0)
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, :20] = 255  # bright left band: a flip moves it to the right
    frames = np.repeat(frame[None], 4, axis=0)
    flipped = 0
    for _ in range(20):
        video = data.video_transform(frames, augment=True, image_size=32, rng=rng)
        assert video.shape == (4, 3, 32, 32) and video.is_contiguous()
        assert all(torch.equal(video[0], video[k]) for k in range(1, 4))  # the same crop/flip for all frames
        flipped += bool(video[0, :, :, -1].mean() > video[0, :, :, 0].mean())
    assert 0 < flipped < 20  # flips happen, but not always
    never = [data.video_transform(frames, True, 32, rng, hflip=False) for _ in range(10)]
    assert all(v[0, :, :, 0].mean() >= v[0, :, :, -1].mean() for v in never)


@pytest.mark.method
def test_train_crop_is_the_box_resized_like_pils_bicubic():
    frames = np.clip(np.random.default_rng(2).normal(128, 30, (2, 240, 320, 3)), 0, 255).astype(np.uint8)
    video = data.video_transform(frames, True, 224, np.random.default_rng(5), hflip=False)
    box = data.random_resized_crop_box(240, 320, np.random.default_rng(5))  # the same draw
    pil = np.stack([np.asarray(Image.fromarray(f).crop(box).resize((224, 224), Image.BICUBIC)) for f in frames])
    assert (video - data.normalize(pil)).abs().mean() < 0.01  # within a level or two of 255 on average


# --- the dataset ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    return write_tiny_video(tmp_path_factory.mktemp("clip"))


def csv_dataset(folder, tiny_video, names, captions_per_video=1, **kwargs):
    """A csv dataset over copies of the tiny clip; video k has captions "v{k} c{j}"."""
    place_videos(tiny_video, folder, names)
    rows = [[name, f"v{k} c{j}"] for j in range(captions_per_video) for k, name in enumerate(names)]
    write_csv(folder / "d.csv", ["video", "caption"], rows)
    return data.build_dataset("csv", folder / "d.csv", "train", **{"num_frames": 4, "image_size": 32, **kwargs})


def test_items_have_the_documented_shape_and_keys(tmp_path, tiny_video):
    root = msrvtt_root(tmp_path, tiny_video)
    for split in ("train", "test"):
        item = data.build_dataset("msrvtt-9k", root, split, num_frames=4, image_size=32)[1]
        assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
        assert isinstance(item["caption"], str) and item["video_id"] in ("video0", "video3")
        assert item["replaced_video"] == ""


def test_training_draws_depend_on_seed_epoch_and_item_only(tmp_path, tiny_video):
    dataset = csv_dataset(tmp_path, tiny_video, ["one.mp4", "two.mp4"])
    first = dataset[0]["video"]
    dataset[1]  # drawing another item in between must not change item 0's draw
    assert torch.equal(dataset[0]["video"], first)
    epochs = [dataset[(epoch, 0)]["video"] for epoch in range(4)]
    assert torch.equal(epochs[0], first)  # a plain index is epoch 0
    assert not all(torch.equal(epochs[0], other) for other in epochs[1:])  # each epoch draws anew
    dataset[(1, 1)]
    assert torch.equal(dataset[(2, 0)]["video"], epochs[2])  # and the same again, whatever came between


def test_persistent_workers_follow_the_epoch_in_each_key(tmp_path, tiny_video):
    dataset = csv_dataset(tmp_path, tiny_video, ["one.mp4", "two.mp4", "three.mp4"])
    order = data.EpochSampler(len(dataset), batch_size=3)
    loader = data.make_loader(dataset, batch_size=3, num_workers=2, sampler=order)
    assert loader.persistent_workers and loader.prefetch_factor == 2
    try:
        for epoch in (0, 3):
            order.set_epoch(epoch)
            items = [item for _, item in order.keys]
            batch = next(iter(loader))
            assert batch["caption"] == [f"v{item} c0" for item in items] and batch["replaced_video"] == ["", "", ""]
            for row, item in enumerate(items):  # workers drew what the main process draws for (epoch, item)
                assert torch.equal(batch["video"][row], dataset[(epoch, item)]["video"])
    finally:
        data.stop_workers(loader)


def test_workers_fork_until_the_process_opens_a_video_then_come_from_a_fork_server(monkeypatch):
    """Forked workers do not import the main script again (a script without a __main__ guard runs once); once
    FFmpeg has run in this process, whose thread pools do not survive fork(), a fork server starts them."""
    monkeypatch.setattr(video_io, "_opened_a_video", False)
    assert data.worker_start_method() == ("fork" if sys.platform.startswith("linux") else "forkserver")
    monkeypatch.setattr(video_io, "_opened_a_video", True)
    assert data.worker_start_method() == "forkserver"


def test_under_torchrun_workers_come_from_a_fork_server(monkeypatch):
    """A process group's threads do not survive fork() (a forked rank can abort at exit)."""
    monkeypatch.setattr(video_io, "_opened_a_video", False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert data.worker_start_method() == "forkserver"


def test_workers_start_for_a_program_piped_into_python(tiny_video):
    """`python - < script.py` names the main module '<stdin>', which a fork server would try to import again as
    a file: after decoding a video (so that the workers come from the fork server) a loader still runs."""
    script = (f"import data\nfiles = data.VideoFiles([{str(tiny_video)!r}] * 4, 4, 32)\nfiles[0]\n"
              f"assert data.worker_start_method() == 'forkserver'\nloader = data.make_loader(files, 2, 2)\n"
              f"print(sum(len(batch['index']) for batch in loader))\ndata.stop_workers(loader)\n")
    completed = subprocess.run([sys.executable, "-"], input=script, cwd=tiny_video.parent, env=python_env(),
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and completed.stdout.split() == ["4"], completed.stderr[-2000:]


def test_epoch_order_depends_on_seed_and_epoch_and_a_resumed_epoch_skips_its_done_batches():
    def keys(epoch, first_batch=0, seed=0, rank=0, world_size=1):
        order = data.EpochSampler(10, batch_size=2, rank=rank, world_size=world_size, seed=seed)
        order.set_epoch(epoch, first_batch)
        return order.keys

    assert keys(1) == keys(1) and keys(1) != keys(2) and keys(1, seed=1) != keys(1)
    assert list(data.EpochSampler(10, batch_size=2)) == keys(0)  # before any set_epoch: epoch 0, not nothing
    assert sorted(item for _, item in keys(1)) == list(range(10)) and {epoch for epoch, _ in keys(1)} == {1}
    assert keys(1, first_batch=3) == keys(1)[6:]
    shares = keys(1, rank=0, world_size=2) + keys(1, rank=1, world_size=2)  # 2 processes, 2 whole batches each
    assert len(shares) == 8 and len(set(shares)) == 8


def test_default_workers_are_this_processs_share_of_its_cpus(monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert data.default_num_workers() == 2  # never more than DataLoader's own suggested maximum
    assert data.default_num_workers(processes_per_machine=2) == 1
    assert data.default_num_workers(processes_per_machine=8) == 1  # never 0: the main process must not decode
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert data.default_num_workers(processes_per_machine=4) == 4


def test_worker_init_fn_limits_opencv_to_one_thread():
    import cv2

    before = cv2.getNumThreads()
    try:
        data.worker_init_fn(0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)


def test_a_training_video_that_fails_is_replaced_and_reported(tmp_path, tiny_video):
    dataset = csv_dataset(tmp_path, tiny_video, ["a.mp4", "b.mp4", "broken.mp4", "d.mp4"])
    (tmp_path / "broken.mp4").write_text("passed the probe once, not a video now\n")
    broken_item = dataset.captions.index("v2 c0")
    item = dataset[(1, broken_item)]
    assert item["replaced_video"].endswith("broken.mp4")
    assert item["video_index"] != 2 and item["caption"] == dataset.captions[item["video_index"]]
    assert torch.equal(item["video"], dataset[(1, item["video_index"])]["video"])  # that other item, as drawn
    again = dataset[(1, broken_item)]
    assert again["caption"] == item["caption"] and torch.equal(again["video"], item["video"])  # deterministic
    batch = default_collate([dataset[0], item])  # the report collates into a batch
    assert batch["replaced_video"] == ["", item["replaced_video"]]


def test_an_evaluation_video_that_fails_raises_naming_it(tmp_path, tiny_video):
    dataset = csv_dataset(tmp_path, tiny_video, ["a.mp4", "broken.mp4"], train=False)
    (tmp_path / "broken.mp4").write_bytes(b"")
    with pytest.raises(video_io.VideoReadError, match="broken.mp4"):
        dataset[1]
    with pytest.raises(video_io.VideoReadError, match="broken.mp4"):
        dataset.videos()[1]


def test_without_videos_drops_their_captions_and_renumbers(tmp_path, tiny_video):
    dataset = csv_dataset(tmp_path, tiny_video, ["a.mp4", "b.mp4", "c.mp4"], captions_per_video=2, seed=7)
    subset = dataset.without_videos([1])
    assert subset.video_ids == [dataset.video_ids[0], dataset.video_ids[2]]
    assert subset.captions == ["v0 c0", "v2 c0", "v0 c1", "v2 c1"]
    assert subset.caption_video_index == [0, 1, 0, 1]
    assert (subset.train, subset.seed, subset.num_frames, subset.image_size) == (True, 7, 4, 32)
    assert subset[1]["video_id"] == dataset.video_ids[2]
    one_each = data.build_dataset("csv", tmp_path / "d.csv", "train", one_caption_per_video=True).without_videos([0])
    assert one_each.captions == ["v1 c0", "v2 c0"] and one_each.captions_per_video == [["v1 c0", "v1 c1"],
                                                                                         ["v2 c0", "v2 c1"]]
