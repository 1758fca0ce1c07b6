"""The demo end to end, shrunk: world, tiny-CLIP pretraining with train.py, prompt tuning, evaluation."""
import pytest

import demo
import train


@pytest.mark.slow
def test_demo_runs_end_to_end_and_caches_its_clip(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_ROOT", tmp_path / "cache")
    monkeypatch.setattr(demo, "WORLD", dict(seed=0, num_videos=32, num_test_pairs=4, num_stills=64,
                                            frame_size=32, clip_frames=8))
    monkeypatch.setattr(demo, "PRETRAIN", {**demo.PRETRAIN, "epochs": 1, "batch_size": 32})
    monkeypatch.setattr(demo, "TUNE", {**demo.TUNE, "epochs": 1, "batch_size": 16})
    results = train.main(["--prompts", "pos,ctx", "--out-dir", str(tmp_path / "run")])
    output = capsys.readouterr().out
    assert "pretraining a tiny CLIP" in output and "reversal pairs" in output
    assert set(results) >= {"t2v", "v2t", "pairs"} and 0 <= results["pairs"] <= 100
    assert results["trainable"] > 0 and (tmp_path / "run" / "last.pt").is_file()

    demo.run({"prompts": "fn", "out_dir": str(tmp_path / "run2")}, evaluate_before=False)  # the second run reuses the pretrained tiny CLIP
    assert "using the tiny CLIP pretrained earlier" in capsys.readouterr().out
