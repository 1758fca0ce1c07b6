"""What a person reads: each message names the right thing (the flag, the file, the fix) in one line, every
script's --help describes that script and returns at once, and progress lines show a rate and the time left."""
import dataclasses
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from formats import annotations
from machinery import checkpoints
import data
import demo
import evaluate
import search
from utils import cli
from utils import files
from utils import progress
import train
from formats import video_io
from helpers import message_lines, small_config, write_csv, write_tiny_video

REPO = Path(__file__).resolve().parents[1]


def one_line_error(arguments, cwd=REPO, timeout=120) -> str:
    """Run a script; it must fail with exit status 2 and one line on stderr besides progress lines: no
    traceback, no decoder warnings."""
    completed = subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True,
                               timeout=timeout)
    assert completed.returncode == 2, completed.stderr
    lines = message_lines(completed.stderr)
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr
    return lines[0]


# -- annotations --------------------------------------------------------------------------------------------

def test_a_csv_with_a_header_and_no_rows_says_so(tmp_path):
    write_csv(tmp_path / "empty.csv", ["video", "caption", "split"], [])
    with pytest.raises(annotations.AnnotationError) as refused:
        annotations.read_annotations("csv", tmp_path / "empty.csv", "test")
    assert "no rows" in str(refused.value) and "no 'split' column" not in str(refused.value)


def test_missing_videos_name_the_flag_that_skips_them(tmp_path):
    write_csv(tmp_path / "d.csv", ["video", "caption"], [["gone.mp4", "a caption"]])
    with pytest.raises(FileNotFoundError, match="--skip-missing"):
        annotations.read_annotations("csv", tmp_path / "d.csv", "train")


def test_data_csv_with_a_folder_asks_for_the_csv_file(tmp_path):
    with pytest.raises(annotations.AnnotationError, match="pass the CSV file"):
        annotations.read_annotations("csv", tmp_path, "train")
    line = one_line_error(["train.py", "--data", "csv", "--data-root", str(tmp_path / "nowhere.csv"), "--out-dir",
                           str(tmp_path / "run")])
    assert "nowhere.csv" in line and "CSV file" in line and "folder" not in line.replace(str(tmp_path), "")


# -- videos -------------------------------------------------------------------------------------------------

def test_an_unreadable_video_is_called_permission_denied(tmp_path, monkeypatch):
    video = write_tiny_video(tmp_path)
    video.chmod(0)
    if os.geteuid() == 0:  # root reads any file, so the denial is staged: a file that does not open, unreadable
        video.write_text("not a video\n" * 20)
        monkeypatch.setattr(video_io.os, "access", lambda path, mode: False)
    error = video_io.probe_video(video).error
    assert "permission denied" in error and "corrupt" not in error and error.count(str(video)) == 1


def test_an_unreadable_test_video_is_named_once_without_decoder_noise(small_setup, tmp_path):
    clip_path, world = small_setup
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video\n" * 50)
    lines = (world / "test.csv").read_text().splitlines()
    rows = [lines[0]] + [f"{world / line.split(',')[0]},{line.split(',', 1)[1]}" for line in lines[1:]]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.csv").write_text("\n".join(rows + [f"{fake},a fake clip"]) + "\n")
    (tmp_path / "data" / "train.csv").write_text((world / "train.csv").read_text().replace("train/", f"{world}/train/"))
    line = one_line_error(["train.py", "--clip", str(clip_path), "--data", "synthetic", "--data-root",
                           str(tmp_path / "data"), "--num-frames", "4", "--num-workers", "0", "--out-dir",
                           str(tmp_path / "run")])
    assert line.count(str(fake)) == 1 and "unreadable_test_videos.txt" in line


# -- runs ---------------------------------------------------------------------------------------------------

def test_the_resume_refusal_lists_one_difference_per_line(small_setup, tmp_path):
    train.train(small_config(small_setup, tmp_path, epochs=1))
    with pytest.raises(checkpoints.CheckpointError) as refused:
        train.train(small_config(small_setup, tmp_path, epochs=2, batch_size=4, resume="auto"))
    lines = str(refused.value).splitlines()
    assert any(line.strip().startswith("batch_size:") for line in lines)
    assert any(line.strip().startswith("epochs:") for line in lines)
    assert all(len(line) < 200 for line in lines)


def test_a_finished_run_resumed_writes_nothing_and_does_not_say_saved(small_setup, tmp_path, capsys):
    config = small_config(small_setup, tmp_path, epochs=1)
    train.train(config)
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    train.train(dataclasses.replace(config, resume="auto"))
    output = capsys.readouterr().out
    assert "finished" in output and "R@1" in output and "saved" not in output
    assert (tmp_path / "last.pt").stat().st_mtime_ns == stamp


def test_a_lock_whose_pid_now_belongs_to_another_process_is_cleared(tmp_path):
    """After a reboot the PID in run.lock can belong to an unrelated live process: the lock records when its
    process started, so it is not mistaken for the holder."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(f"{holder.pid} {socket.gethostname()} another-boot/12345\n")
        with checkpoints.RunFolder(tmp_path):  # not refused: that PID is another process now
            assert (tmp_path / "run.lock").read_text().split()[0] == str(os.getpid())
        (tmp_path / "run.lock").write_text(f"{holder.pid} {socket.gethostname()} "
                                          f"{files.process_start(holder.pid)}\n")
        with pytest.raises(checkpoints.RunFolderError) as refused:  # the holder itself: refused, with the way out
            checkpoints.RunFolder(tmp_path).__enter__()
        assert str(holder.pid) in str(refused.value) and "delete" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(small_setup, tmp_path):
    config = small_config(small_setup, tmp_path / "run", clip=str(tmp_path / "no_such_clip.pt"))
    with pytest.raises(FileNotFoundError, match="no_such_clip.pt"):
        train.train(config)
    assert not (tmp_path / "run").exists()


def test_video_prompts_on_a_baseline_name_the_flags():
    line = one_line_error(["train.py", "--prompts", "pos", "--tune", "full"])
    assert "--prompts: pos need tune 'prompts', not 'full'" in line


def test_a_bad_value_is_refused_as_the_config_is_made_naming_its_flag(capsys):
    # In Python (the API, the demo) as on the command line: a config that exists holds valid values.
    with pytest.raises(cli.ConfigError, match=r"^--epochs: must be >= 0, got -1$"):
        train.TrainConfig(epochs=-1)
    with pytest.raises(cli.ConfigError, match=r"^--data: must be one of .*got 'kinetics'$"):
        train.TrainConfig(data="kinetics")
    with pytest.raises(cli.ConfigError, match="--eval-batch-size"):
        dataclasses.replace(train.TrainConfig(), eval_batch_size=0)
    with pytest.raises(cli.ConfigError, match="--batch-size"):
        evaluate.EvalConfig(batch_size=0)
    with pytest.raises(cli.ConfigError, match="^-+k: must be >= 1"):
        search.QueryConfig(k=0)
    with pytest.raises(SystemExit) as stopped:
        train.parse_train_config(["--warmup", "2"])
    assert stopped.value.code == 2 and "--warmup: must be between 0 and 1, got 2.0" in capsys.readouterr().err
    assert train.TrainConfig(lr=None, num_workers=None).lr is None  # None means "the default": not checked


def test_the_eta_does_not_wrap_after_a_day():
    assert progress.format_duration(59) == "00:00:59"
    assert progress.format_duration(25 * 3600) == "1d 01:00:00"
    assert progress.format_duration(90061) == "1d 01:01:01"


# -- flags and help -----------------------------------------------------------------------------------------

SCRIPTS = {"train.py": "Train VoP", "evaluate.py": "Evaluate a VoP checkpoint", "demo.py": "demo",
           "benchmarks/bench_clip.py": "throughput", "benchmarks/bench_data.py": "data path",
           "benchmarks/bench_text_padding.py": "[EOT]", "benchmarks/bench_train.py": "end-to-end training",
           "benchmarks/bench_vop.py": "Training cost", "benchmarks/gpu_check.py": "GPU check",
           "search.py": "Search your own videos", "benchmarks/bench_search.py": "a million videos"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_scripts_help_describes_it_and_returns_at_once(script):
    started = time.monotonic()
    completed = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 0 and time.monotonic() - started < 30, completed.stderr
    assert Path(script).name in completed.stdout  # usage: <this script> ...
    assert SCRIPTS[script].lower() in " ".join(completed.stdout.lower().split())
    if script == "demo.py":
        assert "--all" in completed.stdout
    if script == "train.py":  # the learning rates per --tune, not an internal name
        assert "DEFAULT_LR" not in completed.stdout and "prompts 0.001" in " ".join(completed.stdout.split())


def in_process_error(capsys, main, argv, program) -> str:
    """What a script's main prints for a user error, run in this process: one line on stderr, exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run_command(main, argv, program)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_evaluate_says_what_is_missing_or_too_much(capsys):
    line = in_process_error(capsys, evaluate.main, [], "evaluate.py")
    assert "give --checkpoint PATH or --zero-shot" in line and "not both" not in line
    line = in_process_error(capsys, evaluate.main, ["--zero-shot", "--checkpoint", "last.pt"], "evaluate.py")
    assert "not both" in line


def help_text(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_help_gives_each_default_once_and_each_command_its_usage(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse's width: each flag's help on one line
    for main, argv in ((train.main, []), (evaluate.main, []), (search.main, ["index"]), (search.main, ["query"]),
                       (demo.main, [])):
        for line in help_text(capsys, main, [*argv, "--help"]).splitlines():
            assert "(default: None)" not in line and "(default: )" not in line, line
            assert line.lower().count("default") <= 1, line  # a text that gives its default gets no second one
    train_help = help_text(capsys, train.main, ["--help"])
    assert "default runs/<data>/<method>" in train_help and "(default: 12)" in train_help
    assert help_text(capsys, search.main, ["index", "--help"]).startswith("usage: search.py index [-h]")
    query_help = help_text(capsys, search.main, ["query", "--help"])
    assert query_help.startswith("usage: search.py query [-h]") and "itself left out" in query_help
    demo_help = help_text(capsys, demo.main, ["--help"])
    assert "--data-root" not in demo_help and "--data " not in demo_help
    assert "where last.pt, log.jsonl and curves.png go; default runs/demo" in demo_help
    assert "(the demo's setting: 8)" in demo_help  # its own settings, not train.py's defaults


def test_an_unquoted_text_of_several_words_gets_a_hint_to_quote_it(capsys):
    line = in_process_error(capsys, search.main, ["query", "a", "red", "cup", "--index", "x.index"], "search.py")
    assert line == ('search.py: error: unrecognized arguments: red cup; a text of several words goes in quotes, as '
                    'one argument: "a red cup"')
    line = in_process_error(capsys, search.main, [], "search.py")
    assert "give a command" in line and "python search.py index" in line


def test_no_flip_keeps_left_and_right(tmp_path):
    """A caption that names a direction must not see its video mirrored: with --no-flip nothing is flipped."""
    frames = np.zeros((20, 48, 64, 3), np.uint8)
    frames[:, :, :32] = (255, 0, 0)  # red on the left, black on the right
    video_io.write_video(tmp_path / "half.avi", frames, 30, "MJPG")
    write_csv(tmp_path / "d.csv", ["video", "caption"], [["half.avi", "red on the left"]] * 16)

    def red_on_the_left(hflip: bool) -> list[bool]:
        dataset = data.build_dataset("csv", tmp_path / "d.csv", "train", num_frames=2, image_size=32, train=True,
                                     augment=True, hflip=hflip)
        sides = [dataset[(0, item)]["video"][0, 0] for item in range(16)]  # the red channel of the first frame
        return [bool(side[:, :8].mean() > side[:, -8:].mean()) for side in sides]

    assert not all(red_on_the_left(hflip=True))  # flips happen by default ...
    assert all(red_on_the_left(hflip=False))  # ... and never with --no-flip
    assert train.parse_train_config(["--no-flip"]).flip is False and train.TrainConfig().flip is True


# -- progress lines -----------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_writes_plain_lines_to_a_file():
    terminal, log_file = _Terminal(), io.StringIO()
    for stream in (terminal, log_file):
        line = progress.Progress("probing 4 videos", 4, "videos", stream=stream, every=0.0)
        for done in range(1, 5):
            time.sleep(0.01)
            line.update(done)
        line.finish()
    assert "\r" in terminal.getvalue() and terminal.getvalue().count("\n") == 1
    lines = log_file.getvalue().splitlines()
    assert "\r" not in log_file.getvalue() and len(lines) >= 2
    assert lines[-1].startswith("probing 4 videos: 4/4 videos") and "videos/s" in lines[-1] and "ETA" in lines[-1]


def test_evaluation_and_the_probe_show_progress(small_setup, tmp_path, capsys):
    train.train(small_config(small_setup, tmp_path, epochs=1))
    shown = capsys.readouterr()
    assert "probing" in shown.err and "embedding" in shown.err and "ETA" in shown.err
    assert "probing" not in shown.out  # stdout keeps the results
