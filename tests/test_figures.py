"""machinery/figures.py: training curves after every epoch, the demo's comparison, and a clear note without
matplotlib. (The examples figure is tested in test_evaluate.py.)"""
import builtins
import importlib.util
import json

import pytest
from PIL import Image

from machinery import figures
import train
from helpers import small_config

# The pictures are optional: .ci/run installs matplotlib to test them; the note without it is tested everywhere.
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed")


@needs_matplotlib
def test_a_run_draws_its_curves_after_every_epoch(small_setup, tmp_path, monkeypatch):
    drawn = []
    real = figures.draw_curves

    def recording(log_path, path):
        drawn.append(sum(1 for line in open(log_path) if '"eval"' in line))  # evaluations logged so far
        return real(log_path, path)

    monkeypatch.setattr("machinery.runs.draw_curves", recording)
    train.train(small_config(small_setup, tmp_path, epochs=2, eval_each_epoch=True))
    assert drawn == [1, 2]  # once per epoch, each time with that epoch's evaluation
    with Image.open(tmp_path / "curves.png") as image:
        assert image.width > 1000 and image.height > 300


@needs_matplotlib
def test_an_epoch_that_logged_nothing_yet_still_gets_its_curves(small_setup, tmp_path, capsys):
    """With --log-every above an epoch's steps, the first epoch ends before log.jsonl exists: empty axes, and
    the run goes on (a picture never stops a run)."""
    train.train(small_config(small_setup, tmp_path, epochs=2, log_every=20))
    assert "was not drawn" not in capsys.readouterr().out
    assert len([r for r in figures.read_log(tmp_path / "log.jsonl") if "loss" in r]) == 1  # the last step only
    with Image.open(tmp_path / "curves.png") as image:
        assert image.width > 1000


@needs_matplotlib
def test_curves_skip_a_line_cut_short_by_a_crash(tmp_path):
    records = [{"epoch": 1, "step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 5)]
    records.append({"epoch": 1, "step": 4, "eval": {d: {"R@1": 10.0, "R@5": 40.0, "MnR": 5.0} for d in ("t2v", "v2t")}})
    (tmp_path / "log.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"epoch": 2, "st')
    assert len(figures.read_log(tmp_path / "log.jsonl")) == 5
    assert figures.draw_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@needs_matplotlib
def test_the_demo_comparison_figure(tmp_path):
    rows = [{"name": "zero-shot CLIP", "t2v R@1": 2.5, "reversal pairs": 48.1},
            {"name": "VoP pos", "t2v R@1": 18.8, "reversal pairs": 77.5}]
    assert figures.draw_comparison(rows, tmp_path / "comparison.png", "demo")
    rows[1]["t2v R@1"] = 60.0  # another number: another picture (the bars are drawn from the rows)
    assert figures.draw_comparison(rows, tmp_path / "other.png", "demo")
    with Image.open(tmp_path / "comparison.png") as image, Image.open(tmp_path / "other.png") as other:
        assert image.width >= 700 and image.size == other.size and image.tobytes() != other.tobytes()


def test_without_matplotlib_the_run_says_so_once_and_goes_on(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(figures, "_SAID", set())
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "step": 1, "loss": 1.0, "lr": 0.001}\n')
    assert not figures.draw_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    assert not figures.draw_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")
    output = capsys.readouterr().out
    assert output.count("note: matplotlib is not installed") == 1 and "pip install matplotlib" in output
    assert not (tmp_path / "curves.png").exists()
