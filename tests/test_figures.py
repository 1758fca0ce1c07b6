"""machinery/figures.py: training curves after every epoch, the demo's comparison, and a clear note without
matplotlib. (The examples figure is tested in test_evaluate.py.)"""
import builtins
import importlib.util
import json

import pytest
from PIL import Image

from machinery import figures, runs
import train
from helpers import small_config

# The pictures are optional: .ci/run installs matplotlib to test them; the note without it is tested everywhere.
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed: pip install matplotlib runs it")


@needs_matplotlib
def test_a_run_draws_its_curves_after_every_epoch(small_setup, tmp_path, monkeypatch):
    drawn = []
    real = figures.draw_curves

    def recording(log_path, path, evaluated_on):
        drawn.append(sum(1 for line in open(log_path) if '"eval"' in line))  # evaluations logged so far
        assert evaluated_on == "synthetic test"  # the recall panel names the split it shows
        return real(log_path, path, evaluated_on)

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
def test_the_curves_of_a_run_that_evaluated_once_are_readable():
    """One logged step and one evaluation (the demo's curves): every point visible, t2v and v2t told apart by
    their markers and named in a legend, the mean rank on an axis that shows 1 (the best rank), the recall panel
    naming the rows it was measured on."""
    import matplotlib.pyplot as plt
    result = {"t2v": {"R@1": 12.5, "R@5": 62.5, "MnR": 6.0}, "v2t": {"R@1": 10.0, "R@5": 50.0, "MnR": 6.25}}
    records = [{"epoch": 1, "step": 4, "loss": 2.1, "lr": 1e-3}, {"epoch": 1, "step": 4, "eval": result}]
    figure = figures.curves_figure(plt, records, "csv test (training rows)")
    loss_axis, recall_axis, rank_axis = figure.axes[:3]
    assert loss_axis.lines[0].get_marker() not in (None, "None", "", " ")  # the one step is a point
    low, high = loss_axis.get_xlim()
    assert low < 4 < high
    for axis in (recall_axis, rank_axis):
        marker_of = {line.get_label(): line.get_marker() for line in axis.lines}
        metric = "R@1" if axis is recall_axis else "MnR"
        assert marker_of[f"t2v {metric}"] != marker_of[f"v2t {metric}"]
        assert {text.get_text() for text in axis.get_legend().get_texts()} >= {f"t2v {metric}", f"v2t {metric}"}
    low, high = rank_axis.get_ylim()
    assert low <= 1 and high > 6.25 and high - low > 5  # not 5.8-6.3 around the one value
    assert recall_axis.get_ylim()[0] <= 0 and recall_axis.get_ylim()[1] >= 100
    assert "csv test (training rows)" in recall_axis.get_title()
    plt.close(figure)
    assert runs.evaluated_on(train.TrainConfig(data="synthetic", train_split="stills", test_split="stills"),
                             None) == "synthetic stills (training rows)"


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
