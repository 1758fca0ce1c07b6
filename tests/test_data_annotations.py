"""Tests for data.py's dataset layer: each benchmark's annotation layout on small files written here, the
errors for bad input, the evaluation caption-to-video map, the frame cache, and the synthetic world."""
import csv
import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

import data


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    """A 20-frame 64x48 mp4v clip; datasets below copy it under each name they need."""
    frames = np.zeros((20, 48, 64, 3), np.uint8)
    for i in range(20):
        frames[i, :, 3 * i:3 * i + 6] = 255
    return data.write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, 30)


def place_videos(tiny_video, folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(tiny_video, folder / name)


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as handle:
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


def test_msrvtt_9k_7k_and_1k_a_splits(tmp_path, tiny_video):
    root = msrvtt_root(tmp_path, tiny_video)
    train_9k = data.build_dataset("msrvtt-9k", root, "train")
    assert len(train_9k) == 12 and train_9k.video_ids == ["video0", "video1", "video2", "video3"]
    assert train_9k.captions[:3] == [f"caption {c} of video 0" for c in range(3)]  # every (video, caption) pair
    assert len(data.build_dataset("msrvtt-7k", root, "train")) == 6
    test = data.build_dataset("msrvtt-9k", root, "test")
    assert test.captions == ["a man sings", "a dog runs"] and test.video_ids == ["video4", "video3"]
    assert test.caption_video_index == [0, 1] and not test.train
    one_each = data.build_dataset("msrvtt-9k", root, "train", one_caption_per_video=True)
    assert len(one_each) == 4
    assert one_each[2]["caption"] in {f"caption {c} of video 2" for c in range(3)}


def test_items_have_the_documented_shape_and_keys(tmp_path, tiny_video):
    root = msrvtt_root(tmp_path, tiny_video)
    for split in ("train", "test"):
        item = data.build_dataset("msrvtt-9k", root, split, num_frames=4, image_size=32)[1]
        assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
        assert isinstance(item["caption"], str) and item["video_id"] in ("video0", "video3")


def test_didemo_and_activitynet_join_a_videos_sentences_into_one_paragraph(tmp_path, tiny_video):
    root = tmp_path / "didemo"
    root.mkdir()
    moments = [{"video": "a@1.mov", "description": "a girl walks in.", "times": [[0, 0]]},
               {"video": "b@2.mp4", "description": "a car.", "times": [[1, 1]]},
               {"video": "a@1.mov", "description": "she sits down", "times": [[2, 3]]}]
    (root / "test_data.json").write_text(json.dumps(moments))
    place_videos(tiny_video, root / "videos", ["a@1.mov", "b@2.mp4"])
    didemo = data.build_dataset("didemo", root, "test")
    assert didemo.captions == ["a girl walks in. she sits down", "a car."]
    assert didemo.video_ids == ["a@1", "b@2"] and didemo.video_paths[0].name == "a@1.mov"

    root = tmp_path / "activitynet"
    root.mkdir()
    captions = {"v_x": {"duration": 9.0, "timestamps": [[0, 3], [3, 9]], "sentences": ["One.", " Two. "]},
                "v_y": {"duration": 5.0, "timestamps": [[0, 5]], "sentences": ["Three."]}}
    (root / "val_1.json").write_text(json.dumps(captions))
    (root / "val_ids.json").write_text(json.dumps(["v_y", "v_x"]))
    place_videos(tiny_video, root / "videos", ["v_x.mp4", "v_y.mp4"])
    activitynet = data.build_dataset("activitynet", root, "test")  # the paper tests on val_1
    assert activitynet.captions == ["Three.", "One. Two."] and activitynet.video_ids == ["v_y", "v_x"]


def test_lsmdc_reads_tab_separated_rows_and_finds_nested_clips(tmp_path, tiny_video):
    root = tmp_path / "lsmdc"
    root.mkdir()
    rows = [["1001_Movie_00.01.00.000-00.01.02.000", "0", "1", "0", "1", "SOMEONE opens the door."],
            ["1002_Other_00.02.00.000-00.02.03.000", "0", "1", "0", "1", "He smiles."]]
    write_csv(root / "LSMDC16_challenge_1000_publictect.csv", None, rows, delimiter="\t")
    place_videos(tiny_video, root / "videos" / "1001_Movie", [rows[0][0] + ".avi"])
    place_videos(tiny_video, root / "videos" / "1002_Other", [rows[1][0] + ".avi"])
    lsmdc = data.build_dataset("lsmdc", root, "test")
    assert lsmdc.captions == ["SOMEONE opens the door.", "He smiles."] and len(lsmdc.videos()) == 2
    write_csv(root / "LSMDC16_annos_val.csv", None, [["clip", "0", "1", "He smiles."]], delimiter="\t")
    with pytest.raises(data.AnnotationError, match=r"LSMDC16_annos_val.csv:1: expected 6"):
        data.build_dataset("lsmdc", root, "val")


def test_msvd_maps_each_of_several_captions_to_its_video(tmp_path, tiny_video):
    root = tmp_path / "msvd"
    root.mkdir()
    raw = {"vidA_1_5": [["a", "cat", "plays"], ["a", "kitten", "plays"], ["cat"]],
           "vidB_2_9": [["a", "man", "cooks"], ["someone", "cooks"]], "vidC_0_3": [["train", "only"]]}
    with open(root / "raw-captions.pkl", "wb") as handle:
        pickle.dump(raw, handle)
    (root / "test_list.txt").write_text("vidA_1_5\nvidB_2_9\n")
    place_videos(tiny_video, root / "videos", ["vidA_1_5.avi", "vidB_2_9.avi", "vidC_0_3.avi"])
    msvd = data.build_dataset("msvd", root, "test", num_frames=2, image_size=32)
    assert len(msvd) == 5 and msvd.video_ids == ["vidA_1_5", "vidB_2_9"]
    assert msvd.captions[1] == "a kitten plays" and msvd.caption_video_index == [0, 0, 0, 1, 1]
    videos = msvd.videos()  # embed each video once, not once per caption
    assert len(videos) == 2 and videos[1]["video_id"] == "vidB_2_9"
    assert torch.equal(videos[1]["video"], msvd[3]["video"])


def test_generic_csv_resolves_paths_relative_to_the_csv_and_groups_captions(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path / "clips", ["one.mp4", "two.mp4"])
    write_csv(tmp_path / "mine.csv", ["video", "caption"],
              [["clips/one.mp4", "first"], ["clips/two.mp4", "second"], ["clips/one.mp4", "first again"]])
    dataset = data.build_dataset("csv", tmp_path / "mine.csv", "test")
    assert dataset.video_ids == ["clips/one.mp4", "clips/two.mp4"]
    assert dataset.caption_video_index == [0, 1, 0] and dataset.captions[2] == "first again"


def test_bad_annotations_get_messages_naming_file_and_line(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    write_csv(tmp_path / "no_caption_column.csv", ["video", "text"], [["one.mp4", "hello"]])
    with pytest.raises(data.AnnotationError, match=r"no_caption_column.csv:1: missing column.*caption"):
        data.build_dataset("csv", tmp_path / "no_caption_column.csv", "test")
    write_csv(tmp_path / "empty.csv", ["video", "caption"], [["one.mp4", "fine"], ["one.mp4", "  "]])
    with pytest.raises(data.AnnotationError, match=r"empty.csv:3: empty caption"):
        data.build_dataset("csv", tmp_path / "empty.csv", "test")


def test_missing_videos_raise_by_default_and_are_skipped_with_one_warning(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    rows = [["one.mp4", "here"], ["gone.mp4", "absent"], ["lost.mp4", "absent too"], ["gone.mp4", "again"]]
    write_csv(tmp_path / "partial.csv", ["video", "caption"], rows)
    with pytest.raises(FileNotFoundError, match=r"2 of 3 videos .*partial.csv:3.*skip_missing=True"):
        data.build_dataset("csv", tmp_path / "partial.csv", "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.build_dataset("csv", tmp_path / "partial.csv", "train", skip_missing=True)
    assert len(caught) == 1 and "2 of 3 videos" in str(caught[0].message)
    assert len(dataset) == 1 and dataset.video_ids == ["one.mp4"]


def test_evaluation_cache_serves_frames_without_decoding(tmp_path, tiny_video, monkeypatch):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    write_csv(tmp_path / "c.csv", ["video", "caption"], [["one.mp4", "a clip"]])
    dataset = data.build_dataset("csv", tmp_path / "c.csv", "test", num_frames=3, image_size=32,
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


# --- synthetic world --------------------------------------------------------------------------------------

SMALL_WORLD = dict(num_videos=8, num_test_pairs=4, num_stills=12)


def horizontal_centre(frames):
    """x of the bright object's centre of mass in each frame. (F, H, W, 3) -> (F,)"""
    weight = frames.astype(float).sum(axis=(1, 3))  # (F, W)
    return (weight * np.arange(frames.shape[2])).sum(1) / weight.sum(1)


def test_synthetic_world_test_split_is_made_of_time_reversal_pairs(tmp_path):
    world = data.make_synthetic_world(tmp_path / "world", **SMALL_WORLD)
    test = data.build_dataset("synthetic", world, "test", **SMALL_WORLD)
    assert len(test) == 8
    for a in range(0, len(test), 2):
        caption_a, caption_b = test.captions[a], test.captions[a + 1]
        *object_a, direction_a = caption_a.split()
        *object_b, direction_b = caption_b.split()
        assert object_a == object_b and data.OPPOSITE[direction_a] == direction_b
        clip_a = data.read_frames(test.video_paths[a], 16)  # all 16 frames, in order
        clip_b = data.read_frames(test.video_paths[a + 1], 16)
        assert np.abs(clip_a[::-1].astype(int) - clip_b).mean() < 2  # B is A backwards (up to mp4v loss)
        assert np.abs(clip_a.astype(int) - clip_b).mean() > 5
        if direction_a in ("left", "right"):  # the caption says where the object really goes
            x = horizontal_centre(clip_a)
            assert (x[-1] - x[0] > 10) == (direction_a == "right")


def test_synthetic_world_is_deterministic_reused_and_has_stills(tmp_path):
    first = data.make_synthetic_world(tmp_path / "one", seed=3, **SMALL_WORLD)
    second = data.make_synthetic_world(tmp_path / "two", seed=3, **SMALL_WORLD)
    for name in ("train.csv", "test.csv", "stills.csv", "train/00005.mp4"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    stamp = (first / "train.csv").stat().st_mtime_ns
    data.make_synthetic_world(first, seed=3, **SMALL_WORLD)
    assert (first / "train.csv").stat().st_mtime_ns == stamp  # same settings: reused, not rewritten
    data.make_synthetic_world(first, seed=4, **SMALL_WORLD)
    assert (first / "train.csv").read_bytes() != (second / "train.csv").read_bytes()

    stamp = (second / "train.csv").stat().st_mtime_ns
    stills = data.build_dataset("synthetic", second, "stills", num_frames=1, image_size=32)
    assert (second / "train.csv").stat().st_mtime_ns == stamp  # no settings given: the world there is used
    assert len(stills) == 12 and stills[0]["video"].shape == (1, 3, 32, 32)
    words = stills.captions[0].split()
    assert words[0] == "a" and words[1] in data.WORLD_COLOURS and words[2] in data.WORLD_SHAPES
    assert " ".join(words[3:]) in data.WORLD_PLACES.values()
    train = data.build_dataset("synthetic", second, "train", num_frames=4, image_size=32)
    assert len(train) == 8 and all(c.split()[-1] in data.WORLD_DIRECTIONS for c in train.captions)
    assert not train.augment  # a flip would swap "left" and "right"
