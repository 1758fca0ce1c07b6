"""formats/annotations.py: each benchmark's annotation layout on small files written here, the errors for bad
input, splits, and the caption-to-video map."""
import csv
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from formats import annotations
import data
from helpers import msrvtt_root, place_videos, write_csv, write_tiny_video


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    return write_tiny_video(tmp_path_factory.mktemp("clip"))


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
    with pytest.raises(annotations.AnnotationError, match=r"LSMDC16_annos_val.csv:1"):
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
    dataset = data.build_dataset("csv", tmp_path / "mine.csv", "train")
    assert dataset.video_ids == ["clips/one.mp4", "clips/two.mp4"]
    assert dataset.caption_video_index == [0, 1, 0] and dataset.captions[2] == "first again"


def test_csv_without_split_column_is_every_row_in_every_split(tmp_path, tiny_video):
    """The README's own-data CSV ("video,caption"): each split is all its rows, marked as training rows."""
    place_videos(tiny_video, tmp_path, ["one.mp4", "two.mp4"])
    write_csv(tmp_path / "plain.csv", ["video", "caption"], [["one.mp4", "a clip"], ["two.mp4", "another"]])
    for split in ("train", "val", "test"):
        read = annotations.read_annotations("csv", tmp_path / "plain.csv", split)
        assert read.captions == ["a clip", "another"] and read.unsplit, split
    assert data.build_dataset("csv", tmp_path / "plain.csv", "test").unsplit
    assert data.build_dataset("csv", tmp_path / "plain.csv", "test").without_videos([0]).unsplit
    (tmp_path / "split.csv").write_text("\ufeffvideo,caption,split\none.mp4,a clip,test\n", encoding="utf-8")
    assert not annotations.read_annotations("csv", tmp_path / "split.csv", "test").unsplit  # a split column (Excel)
    assert not annotations.read_annotations("synthetic", _world(tmp_path, tiny_video), "test").unsplit


def _world(tmp_path, tiny_video):
    world = tmp_path / "world"
    place_videos(tiny_video, world, ["a.mp4"])
    write_csv(world / "test.csv", ["video", "caption"], [["a.mp4", "a clip"]])
    return world


def test_a_benchmark_given_a_file_asks_for_its_folder(tmp_path):
    (tmp_path / "my_data.csv").write_text("video,caption\n")
    for name in ("msrvtt-9k", "didemo", "synthetic"):
        with pytest.raises(annotations.AnnotationError, match=rf"--data {name} takes the .*folder.*my_data.csv is a"):
            annotations.read_annotations(name, tmp_path / "my_data.csv", "test")


def test_the_own_data_command_trains_and_evaluates_a_csv_without_a_split_column(small_setup, tmp_path, capsys):
    """`train.py --clip TINY --data csv --data-root my_data.csv --no-flip` on a "video,caption" CSV trains and
    evaluates, saying that the results describe training rows; evaluate.py then needs no --split."""
    import evaluate
    import train
    clip_path, world = small_setup
    lines = (world / "train.csv").read_text().splitlines()
    rows = [[str(world / line.split(",")[0]), line.split(",", 1)[1]] for line in lines[1:17]]
    write_csv(tmp_path / "my_data.csv", ["video", "caption"], rows)
    train.main(["--clip", str(clip_path), "--data", "csv", "--data-root", str(tmp_path / "my_data.csv"), "--no-flip",
                "--num-frames", "4", "--batch-size", "8", "--epochs", "1", "--num-workers", "0", "--out-dir",
                str(tmp_path / "run")])
    output = capsys.readouterr().out
    assert "no 'split' column" in output and "epoch 1 (csv test (training rows), 16 captions)" in output
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--num-workers", "0"])
    shown = capsys.readouterr()
    assert shown.out.startswith("csv test (training rows)") and "no 'split' column" in shown.err


def test_csv_split_column_selects_rows_and_unknown_splits_are_named(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4", "two.mp4", "three.mp4"])
    rows = [["one.mp4", "first", "train"], ["two.mp4", "second", "test"], ["three.mp4", "third", "train"],
            ["two.mp4", "second again", "test"]]
    write_csv(tmp_path / "split.csv", ["video", "caption", "split"], rows)
    train = annotations.read_annotations("csv", tmp_path / "split.csv", "train")
    test = annotations.read_annotations("csv", tmp_path / "split.csv", "test")
    assert train.video_ids == ["one.mp4", "three.mp4"] and train.captions == ["first", "third"]
    assert test.video_ids == ["two.mp4"] and test.caption_video_index == [0, 0]
    with pytest.raises(annotations.AnnotationError, match=r"split.csv.*'val'.*test, train"):
        annotations.read_annotations("csv", tmp_path / "split.csv", "val")  # names the splits that exist
    with pytest.raises(annotations.AnnotationError, match="nonsense"):
        annotations.read_annotations("csv", tmp_path / "split.csv", "nonsense")
    write_csv(tmp_path / "odd.csv", ["video", "caption", "split"], [["one.mp4", "x", "training"]])
    with pytest.raises(annotations.AnnotationError, match=r"odd.csv:2.*training"):
        annotations.read_annotations("csv", tmp_path / "odd.csv", "train")


def test_csv_with_a_byte_order_mark(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    (tmp_path / "excel.csv").write_bytes("\ufeffvideo,caption\none.mp4,a clip\n".encode("utf-8"))
    assert annotations.read_annotations("csv", tmp_path / "excel.csv", "train").video_ids == ["one.mp4"]


def test_missing_data_root_is_named_before_anything_else(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        annotations.read_annotations("msrvtt-9k", tmp_path / "nowhere", "train")
    # the unknown name is met with the list of known ones
    with pytest.raises(annotations.AnnotationError, match="msrvtt-9k"):
        annotations.read_annotations("msr-vtt", tmp_path, "train")


def test_bad_annotations_get_messages_naming_file_and_line(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    write_csv(tmp_path / "no_caption_column.csv", ["video", "text"], [["one.mp4", "hello"]])
    with pytest.raises(annotations.AnnotationError, match=r"no_caption_column.csv:1.*caption"):
        data.build_dataset("csv", tmp_path / "no_caption_column.csv", "train")
    write_csv(tmp_path / "empty.csv", ["video", "caption"], [["one.mp4", "fine"], ["one.mp4", "  "]])
    with pytest.raises(annotations.AnnotationError, match=r"empty.csv:3"):
        data.build_dataset("csv", tmp_path / "empty.csv", "train")


def test_annotation_files_that_are_not_utf8_or_not_json_are_named(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    (tmp_path / "latin1.csv").write_bytes("video,caption\none.mp4,fine\none.mp4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(annotations.AnnotationError, match=r"latin1.csv:3: not UTF-8 text; save the file as UTF-8"):
        data.build_dataset("csv", tmp_path / "latin1.csv", "train")
    assert csv.field_size_limit() == 131072  # the csv module's limit is restored
    root = msrvtt_root(tmp_path, tiny_video)
    (root / "MSRVTT_data.json").write_text('{"sentences": [')  # cut short by a failed download
    with pytest.raises(annotations.AnnotationError, match=r"MSRVTT_data.json is not valid JSON"):
        data.build_dataset("msrvtt-9k", root, "train")


def test_missing_videos_raise_by_default_and_are_skipped_with_one_warning(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    rows = [["one.mp4", "here"], ["gone.mp4", "absent"], ["lost.mp4", "absent too"], ["gone.mp4", "again"]]
    write_csv(tmp_path / "partial.csv", ["video", "caption"], rows)
    with pytest.raises(FileNotFoundError, match=r"2 of 3.*partial.csv:3"):
        data.build_dataset("csv", tmp_path / "partial.csv", "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.build_dataset("csv", tmp_path / "partial.csv", "train", skip_missing=True)
    assert len(caught) == 1 and "2 of 3 videos" in str(caught[0].message)
    assert len(dataset) == 1 and dataset.video_ids == ["one.mp4"]


def test_a_caption_longer_than_the_csv_modules_field_limit_is_read_whole(tmp_path, tiny_video):
    place_videos(tiny_video, tmp_path, ["one.mp4"])
    long_caption = "a" * 1_000_000  # the csv module's own limit is 128 KB
    write_csv(tmp_path / "long.csv", ["video", "caption"], [["one.mp4", "short"], ["one.mp4", long_caption]])
    limit = csv.field_size_limit()
    dataset = data.build_dataset("csv", tmp_path / "long.csv", "train")
    assert dataset.captions == ["short", long_caption]
    assert csv.field_size_limit() == limit  # the module's setting is left as it was


def test_videos_in_a_symlinked_subfolder_are_found_and_a_link_loop_ends(tmp_path, tiny_video):
    root = msrvtt_root(tmp_path, tiny_video)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "videos" / "video4.mp4").rename(elsewhere / "video4.mp4")
    (root / "videos" / "more").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(root / "videos", target_is_directory=True)  # a loop through the link
    test = annotations.read_annotations("msrvtt-9k", root, "test")
    assert Path(os.path.realpath(test.video_paths[test.video_ids.index("video4")])) == elsewhere / "video4.mp4"
