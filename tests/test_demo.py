"""The demo end to end, shrunk: world, tiny-CLIP pretraining with train.py, prompt tuning, evaluation."""
import numpy as np
import pytest
import torch

import data
import demo
from utils.errors import UserError


@pytest.mark.slow
def test_demo_runs_end_to_end_and_caches_its_clip(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_ROOT", tmp_path / "cache")
    monkeypatch.setattr(demo, "WORLD", dict(seed=0, num_videos=32, num_test_pairs=4, num_stills=64,
                                            frame_size=32, clip_frames=8))
    monkeypatch.setattr(demo, "PRETRAIN", {**demo.PRETRAIN, "epochs": 1, "batch_size": 32})
    monkeypatch.setattr(demo, "TUNE", {**demo.TUNE, "epochs": 1, "batch_size": 16})
    results = demo.main(["--prompts", "pos,ctx", "--out-dir", str(tmp_path / "run")])
    output = capsys.readouterr().out
    assert "pretraining a tiny CLIP" in output and "reversal pairs" in output
    assert set(results) >= {"t2v", "v2t", "pairs"} and 0 <= results["pairs"] <= 100
    assert results["trainable"] > 0 and (tmp_path / "run" / "last.pt").is_file()
    assert (tmp_path / "run" / "curves.png").is_file() or "matplotlib is not installed" in output
    link = tmp_path / "cache" / "tiny_clip.pt"  # the stable name the demo prints for training on one's own data
    assert link.is_file() and f"--clip {link} --data csv --data-root my_data.csv --no-flip" in output
    assert f"wrote {tmp_path / 'run' / 'curves.png'}" in output or "matplotlib is not installed" in output
    assert demo.clip_model.load(link).config.vision_width == 128

    # the second run reuses the pretrained tiny CLIP
    demo.run({"prompts": "fn", "out_dir": str(tmp_path / "run2")}, evaluate_before=False)
    assert "using the tiny CLIP pretrained earlier" in capsys.readouterr().out


def test_a_bad_flag_is_refused_before_anything_is_built_or_trained(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_ROOT", tmp_path / "cache")
    monkeypatch.setattr(demo, "make_synthetic_world", lambda *args, **kwargs: pytest.fail("the world was built"))
    for argv, error, says in ((["--prompts", "position"], UserError, "--prompts: unknown \\['position'\\]"),
                              (["--prompts", "pos", "--tune", "full"], UserError, "--prompts"),
                              (["--lr", "0"], UserError, "--lr"),
                              (["--precision", "fp8"], SystemExit, None),  # argparse's choices: exit status 2
                              (["--clip", str(tmp_path / "none.pt")], FileNotFoundError, "--clip")):
        with pytest.raises(error, match=says):
            demo.main(argv)
    assert not (tmp_path / "cache").exists()


def test_the_demo_prints_the_own_data_command_with_no_flip(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_ROOT", tmp_path)
    monkeypatch.setattr(demo, "make_synthetic_world", lambda root, **settings: root)
    clip = tmp_path / "tiny_clip_0123.pt"
    clip.write_bytes(b"")
    monkeypatch.setattr(demo, "pretrained_tiny_clip", lambda world, root, overrides: clip)

    class Trained(Exception):
        pass

    def train(config):
        raise Trained

    monkeypatch.setattr(demo.train, "train", train)
    with pytest.raises(Trained):
        demo.main(["--prompts", "pos"])
    assert (f"python train.py --clip {tmp_path / 'tiny_clip.pt'} --data csv --data-root my_data.csv --no-flip"
            in capsys.readouterr().out)


def test_demo_options_take_all_and_train_py_flags():
    assert demo.parse_options(["--all", "--epochs", "3"]) == ({"epochs": 3}, True)
    assert demo.parse_options(["--prompts", "pos,ctx"]) == ({"prompts": "pos,ctx"}, False)


# --- the synthetic world ----------------------------------------------------------------------------------

SMALL_WORLD = dict(num_videos=8, num_test_pairs=4, num_stills=12)


def horizontal_centre(frames):
    """x of the bright object's centre of mass in each frame. (F, H, W, 3) -> (F,)"""
    weight = frames.astype(float).sum(axis=(1, 3))  # (F, W)
    return (weight * np.arange(frames.shape[2])).sum(1) / weight.sum(1)


def test_synthetic_world_test_split_is_made_of_time_reversal_pairs(tmp_path):
    world = demo.make_synthetic_world(tmp_path / "world", **SMALL_WORLD)
    test = data.build_dataset("synthetic", world, "test")
    assert len(test) == 8
    for a in range(0, len(test), 2):
        caption_a, caption_b = test.captions[a], test.captions[a + 1]
        *object_a, direction_a = caption_a.split()
        *object_b, direction_b = caption_b.split()
        assert object_a == object_b and demo.OPPOSITE[direction_a] == direction_b
        clip_a = data.read_frames(test.video_paths[a], 16)  # all 16 frames, in order
        clip_b = data.read_frames(test.video_paths[a + 1], 16)
        assert np.abs(clip_a[::-1].astype(int) - clip_b).mean() < 2  # B is A backwards (up to mp4v loss)
        assert np.abs(clip_a.astype(int) - clip_b).mean() > 5
        if direction_a in ("left", "right"):  # the caption says where the object really goes
            x = horizontal_centre(clip_a)
            assert (x[-1] - x[0] > 10) == (direction_a == "right")


def test_synthetic_world_is_deterministic_reused_and_has_stills(tmp_path):
    first = demo.make_synthetic_world(tmp_path / "one", seed=3, **SMALL_WORLD)
    second = demo.make_synthetic_world(tmp_path / "two", seed=3, **SMALL_WORLD)
    for name in ("train.csv", "test.csv", "stills.csv", "train/00005.mp4"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    stamp = (first / "train.csv").stat().st_mtime_ns
    demo.make_synthetic_world(first, seed=3, **SMALL_WORLD)
    assert (first / "train.csv").stat().st_mtime_ns == stamp  # same settings: reused, not rewritten
    demo.make_synthetic_world(first, seed=4, **SMALL_WORLD)
    assert (first / "train.csv").read_bytes() != (second / "train.csv").read_bytes()

    stamp = (second / "train.csv").stat().st_mtime_ns
    stills = data.build_dataset("synthetic", second, "stills", num_frames=1, image_size=32)
    assert (second / "train.csv").stat().st_mtime_ns == stamp  # no settings given: the world there is used
    assert len(stills) == 12 and stills[0]["video"].shape == (1, 3, 32, 32)
    words = stills.captions[0].split()
    assert words[0] == "a" and words[1] in demo.WORLD_COLOURS and words[2] in demo.WORLD_SHAPES
    assert " ".join(words[3:]) in demo.WORLD_PLACES.values()
    train = data.build_dataset("synthetic", second, "train", num_frames=4, image_size=32)
    assert len(train) == 8 and all(c.split()[-1] in demo.WORLD_DIRECTIONS for c in train.captions)
    assert not train.augment  # a flip would swap "left" and "right"


def test_reversal_pair_accuracy():
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(6, 8, generator=generator)
    twins = torch.randn(3, 8, generator=generator).repeat_interleave(2, dim=0)  # order-blind: twins identical
    assert demo.reversal_pair_accuracy(text, twins) == 50.0
    assert demo.reversal_pair_accuracy(torch.eye(6), torch.eye(6)) == 100.0
    # Caption 0 prefers the wrong twin, caption 1 its own, captions 2 and 3 tie: (0 + 1 + 1/2 + 1/2) / 4.
    text = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert demo.reversal_pair_accuracy(text, video) == 50.0
    assert demo.reversal_pair_accuracy(torch.eye(2)[[1, 0]], torch.eye(2)) == 0.0
    with pytest.raises(ValueError, match="even"):
        demo.reversal_pair_accuracy(torch.eye(3), torch.eye(3))
