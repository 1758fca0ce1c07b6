"""Off the happy path: files that would run code, broken videos, failing evaluations, busy or used output
folders, mismatched resumes, bad flags. Every test asserts what is written, refused or counted."""
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from machinery import checkpoints
from utils import cli
import evaluate as ev
from utils import files
from machinery import runs
import train
from clip_model import CLIP
from utils.errors import UserError
from machinery.frame_store import FrameStoreError
from helpers import SMALL_CLIP, message_lines, read_log, small_config, start_python
from vop import VoPConfig

REPO = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_pickle(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "vop_config": {}, "trainable": RunsCode(marker)}, path)
    return path, marker


def exit_status(function, *args) -> int:
    with pytest.raises(SystemExit) as stopped:
        function(*args)
    return stopped.value.code


# -- no file runs code ------------------------------------------------------------------------------------

def test_crafted_pickles_run_nothing_anywhere(small_setup, tmp_path, capsys):
    evil, marker = crafted_pickle(tmp_path)
    assert exit_status(cli.run_command, ev.main, ["--checkpoint", str(evil)], "evaluate.py") == 2
    assert "evil.pt" in capsys.readouterr().err
    config = small_config(small_setup, tmp_path / "run", epochs=1)
    for changed in ({"clip": str(evil)}, {"resume": str(evil)}):
        with pytest.raises(UserError) as refused:
            train.train(dataclasses.replace(config, **changed))
        assert "evil.pt" in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"just some text\n" * 10, b"PK\x03\x04 cut short"])
def test_unreadable_checkpoints_are_named(tmp_path, content):
    path = tmp_path / "odd.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoints.CheckpointError, match="odd.pt"):
        checkpoints.load_checkpoint(path, VoPConfig)
    with pytest.raises(checkpoints.CheckpointError, match="folder"):
        checkpoints.load_checkpoint(tmp_path, VoPConfig)


# -- broken videos ----------------------------------------------------------------------------------------

def world_with_broken_videos(world: Path, folder: Path, broken_test: bool = False) -> Path:
    """A copy of the world's CSVs (pointing at its videos) plus three unreadable training videos: empty, not a
    video, and an mp4 cut before its index. With `broken_test`, the test split gets one too."""
    folder.mkdir()
    good = next((world / "train").glob("*.mp4")).read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video\n" * 50)
    (folder / "cut.mp4").write_bytes(good[: len(good) // 3])
    broken = [("empty.mp4", "a red circle moves left"), ("text.mp4", "a blue square moves up"),
              ("cut.mp4", "a green triangle moves down")]
    for split in ("train", "test"):
        lines = (world / f"{split}.csv").read_text().splitlines()
        rows = [lines[0]] + [f"{world / line.split(',')[0]},{line.split(',', 1)[1]}" for line in lines[1:]]
        if split == "train" or broken_test:
            rows += [f"{folder / name},{caption}" for name, caption in (broken if split == "train" else broken[:1])]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_unreadable_training_videos_are_left_out_and_listed(small_setup, tmp_path, capsys):
    clip_path, world = small_setup
    root = world_with_broken_videos(world, tmp_path / "broken")
    config = small_config(small_setup, tmp_path / "run", data_root=str(root), epochs=1)
    results = train.train(config)
    assert "t2v" in results
    listed = (tmp_path / "run" / "skipped_videos.txt").read_text()
    assert all(name in listed for name in ("empty.mp4", "text.mp4", "cut.mp4"))
    assert "3 of" in capsys.readouterr().out  # one warning that counts them
    probe_cache = tmp_path / "run" / "video_probe.json"
    assert probe_cache.is_file()
    stamp = probe_cache.stat().st_mtime_ns
    train.train(dataclasses.replace(config, overwrite=True))  # a rerun reads the probe cache
    assert probe_cache.stat().st_mtime_ns == stamp


def test_an_unreadable_test_video_stops_the_run_before_training(small_setup, tmp_path):
    clip_path, world = small_setup
    root = world_with_broken_videos(world, tmp_path / "broken", broken_test=True)
    config = small_config(small_setup, tmp_path / "run", data_root=str(root), epochs=1)
    with pytest.raises(Exception, match="empty.mp4") as stopped:
        train.train(config)
    assert isinstance(stopped.value, cli.USER_ERRORS)
    assert "empty.mp4" in (tmp_path / "run" / "unreadable_test_videos.txt").read_text()
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "run.lock").exists()


# -- never lose a trained epoch ---------------------------------------------------------------------------

def test_a_failing_evaluation_keeps_the_epoch_and_resume_evaluates_it(small_setup, tmp_path, monkeypatch, capsys):
    config = small_config(small_setup, tmp_path, epochs=1)

    def broken(*args, **kwargs):
        raise RuntimeError("the test set's disk went away")

    monkeypatch.setattr(train, "evaluate", broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        train.train(config)
    assert "python evaluate.py --checkpoint" in capsys.readouterr().out
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["step"] == 32 // 8 and saved["history"] == []  # the epoch is saved, its evaluation is not
    monkeypatch.undo()
    results = train.train(dataclasses.replace(config, resume="auto"))  # evaluates the trained epoch only
    assert "t2v" in results
    assert len([r for r in read_log(tmp_path) if "loss" in r]) == 32 // 8  # no step was trained twice
    assert len(torch.load(tmp_path / "last.pt", weights_only=True)["history"]) == 1


# -- a run owns its folder --------------------------------------------------------------------------------

def test_a_used_folder_is_refused_unless_resumed_or_overwritten(small_setup, tmp_path):
    config = small_config(small_setup, tmp_path, epochs=1)
    train.train(config)
    first = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(checkpoints.RunFolderError, match="--overwrite"):
        train.train(config)
    assert (tmp_path / "last.pt").read_bytes() == first  # untouched
    train.train(dataclasses.replace(config, overwrite=True, seed=1))
    assert (tmp_path / "last.pt").read_bytes() != first


def test_overwrite_checks_flags_and_data_before_it_deletes_anything(small_setup, tmp_path, capsys):
    """--overwrite over an earlier run with a wrong --data-root (a folder for --data csv), --clip or --resume:
    the mistake is named and the earlier run's files stay; without --overwrite the same mistake is named too,
    not hidden behind "holds an earlier run"."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    earlier = {name: f"the earlier run's {name}".encode() for name in ("last.pt", "log.jsonl", "curves.png")}
    for name, content in earlier.items():
        (out_dir / name).write_bytes(content)
    config = small_config(small_setup, out_dir, epochs=1)
    (tmp_path / "nc").mkdir()
    mistakes = [(dict(data="csv", data_root=str(tmp_path / "nc")), UserError, "takes the CSV file itself"),
                (dict(clip=str(tmp_path / "no_clip.pt")), FileNotFoundError, "--clip"),
                (dict(resume=str(tmp_path / "no_run.pt")), FileNotFoundError, "--resume"),
                (dict(batch_size=64), UserError, "fewer than one batch")]
    for overwrite in (True, False):
        for change, error, says in mistakes:
            with pytest.raises(error, match=says):
                train.train(dataclasses.replace(config, overwrite=overwrite, **change))
    assert {name: (out_dir / name).read_bytes() for name in earlier} == earlier
    assert "deleting" not in capsys.readouterr().out


def test_overwrite_names_every_file_it_deletes(tmp_path):
    for name in checkpoints.RUN_FILES:
        (tmp_path / name).write_text("earlier")
    (tmp_path / "video_probe.json").write_text("{}")  # a cache, which stays
    said = []
    with checkpoints.RunFolder(tmp_path) as folder:
        assert folder.settle_earlier_run(None, overwrite=True, trains=True, log=said.append) is None
    assert len(said) == 1 and all(name in said[0] for name in checkpoints.RUN_FILES)
    assert "curves.png" in said[0] and not any((tmp_path / name).exists() for name in checkpoints.RUN_FILES)
    assert (tmp_path / "video_probe.json").exists()


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_cleared(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(checkpoints.RunFolderError, match=str(holder.pid)):
            with checkpoints.RunFolder(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with checkpoints.RunFolder(tmp_path) as folder:  # its process is gone: the lock is stale
        assert (tmp_path / "run.lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(checkpoints.RunFolderError, match="in use"):  # and now we hold it
            checkpoints.RunFolder(tmp_path).__enter__()
    assert not (tmp_path / "run.lock").exists() and not folder.held


def test_two_runs_at_once_on_one_folder(small_setup, tmp_path):
    """A second process started while the first trains is refused; the first finishes and its log is its own."""
    config = small_config(small_setup, tmp_path, epochs=2)
    slow_steps = "real = train.training_step; train.training_step = lambda *a: (time.sleep(0.3), real(*a))[1]; "
    script = (f"import time; import train; {slow_steps}"
              f"train.train(train.TrainConfig(**{dataclasses.asdict(config)!r}))")
    first = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        lock = tmp_path / "run.lock"
        for _ in range(1200):
            if lock.exists() or first.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        assert first.poll() is None, "the first run ended before the second could start"
        with pytest.raises(checkpoints.RunFolderError, match=str(first.pid)):
            train.train(config)
    finally:
        assert first.wait(timeout=120) == 0
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == list(range(1, 9))
    assert not (tmp_path / "run.lock").exists()


# -- resume only what can be resumed ----------------------------------------------------------------------

def test_resume_refuses_another_backbone_batch_or_dataset_and_a_finished_run_says_so(small_setup, tmp_path, capsys):
    clip_path, world = small_setup
    config = small_config(small_setup, tmp_path, epochs=1)
    train.train(config)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["run"]
    assert len(saved["backbone_sha256"]) == 64 and saved["data"] == "synthetic" and saved["batch_size"] == 8

    torch.manual_seed(5)
    other_clip = tmp_path / "other_clip.pt"
    torch.save(CLIP(SMALL_CLIP).state_dict(), other_clip)
    other_world = tmp_path / "other_world"
    shutil.copytree(world, other_world)
    for changed, named in (({"clip": str(other_clip)}, "backbone_sha256"), ({"batch_size": 4}, "batch_size"),
                           ({"data_root": str(other_world)}, "data_root"), ({"epochs": 2}, "epochs")):
        with pytest.raises(checkpoints.CheckpointError, match=named):
            train.train(dataclasses.replace(config, resume="auto", **changed))

    capsys.readouterr()
    results = train.train(dataclasses.replace(config, resume="auto"))
    output = capsys.readouterr().out
    assert "finished" in output and "R@1" in output and "t2v" in results
    assert len([r for r in read_log(tmp_path) if "loss" in r]) == 32 // 8  # nothing trained again


@pytest.mark.parametrize("line", [b"[1, 2]", b"5", b'{"step": null, "loss": 1.0}', b'{"step": 3, "loss": "\xff\xfe"}',
                                  b'{"step": "2"}'], ids=["a list", "a number", "step null", "not UTF-8",
                                                          "step a string"])
def test_resume_forgets_log_lines_that_are_not_records_of_the_run(tmp_path, line):
    """forget_log_after, as --resume auto calls it: a line of log.jsonl that is not a record this project writes
    is dropped with the records after the checkpoint's step, never a traceback."""
    log = tmp_path / "log.jsonl"
    records = [json.dumps({"step": step, "loss": 1.0 / step}).encode() for step in (1, 2, 3, 4)]
    log.write_bytes(b"\n".join(records[:2] + [line] + records[2:] + [b'{"epoch": 1, "eval": {}}']) + b"\n")
    runs.forget_log_after(log, 3)
    assert log.read_bytes().decode("utf-8").count("\n") == 4  # UTF-8 JSON lines only
    assert read_log(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 1 / 3},
                                  {"epoch": 1, "eval": {}}]


# -- flags ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--grad-clip", "-1"), ("--grad-clip", "0"), ("--batch-size", "0"),
                                        ("--log-every", "0"), ("--num-frames", "0"), ("--epochs", "-1"),
                                        ("--lr", "0"), ("--warmup", "1.5"), ("--tune", "everything"),
                                        ("--data", "msr-vtt"), ("--eval-batch-size", "0")])
def test_bad_flags_are_refused_at_start_naming_the_flag(flag, value, capsys):
    assert exit_status(train.parse_train_config, [flag, value]) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("name", ["examples", "examples.txt", "a folder", "nowhere/examples.png"])
def test_an_examples_image_pillow_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch, capsys, name):
    examples = tmp_path if name == "a folder" else tmp_path / name
    monkeypatch.setattr(ev.data, "build_dataset", lambda *args, **kwargs: pytest.fail("the evaluation started"))
    arguments = ["--zero-shot", "--data", "synthetic", "--data-root", str(tmp_path), "--examples", str(examples)]
    assert exit_status(cli.run_command, ev.main, arguments, "evaluate.py") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"--examples {examples}" in line and ("examples.png" in line or "does not exist" in line)
    assert not list(tmp_path.iterdir())  # nothing written


def test_flags_that_need_the_model_are_named(small_setup, tmp_path):
    for changed, flag in (({"prompts": "fn", "fn_layers": 2}, "--fn-layers"), ({"prompts": "time"}, "--prompts"),
                          ({"prompts": "pos", "video_prompt_length": 9}, "--video-prompt-length"),
                          ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "nonsense"},
                           "--device")):
        with pytest.raises(cli.ConfigError, match=flag):
            train.train(small_config(small_setup, tmp_path / flag, **changed))


def test_user_errors_are_one_line_and_the_data_root_comes_before_any_download(tmp_path):
    completed = subprocess.run([sys.executable, "train.py", "--data", "msrvtt-9k", "--data-root",
                                str(tmp_path / "nonexistent"), "--out-dir", str(tmp_path / "run")],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    lines = message_lines(completed.stderr)
    assert len(lines) == 1 and "nonexistent" in lines[0] and "Traceback" not in completed.stderr
    assert "ViT-B" not in completed.stdout + completed.stderr  # no download was tried


def test_a_run_that_stopped_before_training_does_not_block_the_folder(small_setup, tmp_path):
    clip_path, world = small_setup
    config = small_config(small_setup, tmp_path, epochs=1)
    (tmp_path / "unreadable_test_videos.txt").write_text("gone.mp4\tcannot open\n")  # a start that was stopped
    (tmp_path / "skipped_videos.txt").write_text("bad.mp4\tcannot open\n")
    assert "t2v" in train.train(config)  # not refused: nothing had trained there
    assert not (tmp_path / "skipped_videos.txt").exists()  # and the stale lists are gone: every video reads
    (tmp_path / "last.pt").unlink()  # a run that logged steps but crashed before its first save
    results = train.train(dataclasses.replace(config, resume="auto"))
    assert "t2v" in results
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3, 4]  # the old lines are gone


def test_the_paper_setting_is_the_default_and_its_absence_points_to_the_demo(tmp_path, monkeypatch):
    config = train.TrainConfig()
    assert (config.clip, config.data, config.data_root) == ("ViT-B/32", "msrvtt-9k", "data/msrvtt")
    monkeypatch.chdir(tmp_path)  # no data/msrvtt here
    with pytest.raises(cli.ConfigError, match=r"data/msrvtt.*demo\.py"):
        train.main(["--prompts", "pos,ctx"])


# -- stopping: SIGTERM stops cleanly, SIGKILL leaves no helper behind -------------------------------------

def session_processes(session: int) -> list[str]:
    """The processes of a session other than its leader that still run (zombies have ended): 'pid command'."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, _, _, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            if int(sid) == session and int(entry.name) != session and state not in "ZX":
                command = (entry / "cmdline").read_bytes().replace(bytes(1), b" ")[:100].decode(errors="replace")
                found.append(f"{entry.name} {command}")
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
    return found


def processes_left(session: int, seconds: float) -> list[str]:
    """The session's processes still running after waiting up to `seconds` for them to end."""
    deadline = time.time() + seconds
    while session_processes(session) and time.time() < deadline:
        time.sleep(0.1)
    return session_processes(session)


@contextlib.contextmanager
def training_under_way(small_setup, out_dir: Path):
    """train.py on the small world with 2 DataLoader workers, saving every step, too long to finish, from its
    first checkpoint on (killed on leaving, if still running). It leads a new Unix session (whose id is its PID),
    so that every helper process it starts can be found."""
    clip_path, world = small_setup
    flags = dict(clip=clip_path, data="synthetic", data_root=world, prompts="pos", num_frames=4, batch_size=8,
                 epochs=1000, lr=5e-3, fn_layers=1, num_workers=2, out_dir=out_dir, log_every=1, save_every=1)
    argv = [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()] + ["--no-eval-each-epoch"]
    training = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not ((out_dir / "last.pt").exists() and len(session_processes(training.pid)) >= 3):
            assert training.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        yield training
    finally:
        training.kill()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("stop, named", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_stops_training_cleanly(small_setup, tmp_path, stop, named):
    """What a job scheduler (SIGTERM) or a person (Ctrl-C) does: one line on what is saved and how to go on."""
    out_dir = tmp_path / "run"
    with training_under_way(small_setup, out_dir) as training:
        training.send_signal(stop)
        _, err = training.communicate(timeout=60)
    assert training.returncode == 128 + stop
    assert len(message_lines(err)) == 1 and "Traceback" not in err
    assert named in err and "--resume auto" in err and "last.pt" in err
    assert processes_left(training.pid, 5) == []  # workers, fork server, resource tracker: all gone
    assert not (out_dir / "run.lock").exists() and not list(out_dir.glob("*.tmp"))
    assert checkpoints.load_checkpoint(out_dir / "last.pt", VoPConfig)["step"] >= 1


@needs_proc
@pytest.mark.slow
def test_helpers_exit_on_their_own_when_training_is_killed(small_setup, tmp_path):
    with training_under_way(small_setup, tmp_path / "run") as training:
        helpers = session_processes(training.pid)
        os.kill(training.pid, signal.SIGKILL)
        # Reading the output to its end before reaping the killed process (what subprocess.run does) returns only
        # once every helper that holds the pipe has ended, and they see a killed, unreaped process as ended.
        training.communicate(timeout=20)
    assert training.returncode == -signal.SIGKILL
    assert len(helpers) >= 3, helpers  # 2 DataLoader workers and the fork server at least
    assert processes_left(training.pid, 5) == []


def test_sigterm_ends_a_process_pool_at_once(tmp_path):
    """The probe and the frame store build (video_io.map_in_processes) end their workers when stopped instead of
    waiting for every queued task: here 8 tasks of 5 s on 2 workers."""
    stopped = subprocess.Popen([sys.executable, "-c", """
import time
from utils import cli
from formats import video_io
if __name__ == "__main__":
    cli.run_command(lambda argv: video_io.map_in_processes(time.sleep, [5] * 8, 2, on_crash=print), [], "pool")
"""], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO)
    try:
        deadline = time.time() + 60
        while len(session_processes(stopped.pid)) < 3:  # the fork server and its 2 workers
            assert stopped.poll() is None and time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        stopped.send_signal(signal.SIGTERM)
        _, err = stopped.communicate(timeout=10)  # well before the 20 s of queued work
    finally:
        stopped.kill()
    assert stopped.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert processes_left(stopped.pid, 5) == []


# -- checkpoint writes under faults -----------------------------------------------------------------------

def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    """RLIMIT_FSIZE (ulimit -f) makes every write past its size fail as a full disk does (EFBIG)."""
    saving = start_python(f"""
import resource
import torch
from machinery import checkpoints
from utils.files import WriteError
path = {str(tmp_path / "last.pt")!r}
checkpoints.save_checkpoint({{"step": 1, "trainable": {{"x": torch.zeros(10)}}}}, path)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    checkpoints.save_checkpoint({{"step": 2, "trainable": {{"x": torch.zeros(100_000)}}}}, path)
except WriteError as error:
    print(error)
""", cwd=tmp_path)
    out, err = saving.communicate(timeout=120)
    assert saving.returncode == 0, err
    assert out.count("\n") == 1 and "last.pt" in out and "previous version is intact" in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1
    assert [path.name for path in tmp_path.iterdir()] == ["last.pt"]  # no temporary left


@pytest.mark.slow
def test_train_py_on_a_full_disk_stops_in_one_line_naming_the_checkpoint(small_setup, tmp_path):
    clip_path, world = small_setup
    argv = [f"--clip={clip_path}", "--data=synthetic", f"--data-root={world}", "--prompts=pos", "--num-frames=4",
            "--batch-size=8", "--epochs=1", "--fn-layers=1", "--num-workers=0", f"--out-dir={tmp_path / 'run'}"]
    small_file_size = 30_000  # the probe cache and the log fit, the checkpoint (about 49 KB) does not
    completed = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True,
                               timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                                  (small_file_size,) * 2))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    lines = message_lines(completed.stderr)
    assert len(lines) == 1 and "last.pt" in lines[0] and "File too large" in lines[0]
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["log.jsonl", "video_probe.json"]


def test_a_save_killed_midway_leaves_a_temporary_that_the_next_start_removes(small_setup, tmp_path):
    killed = start_python(f"""
import os, signal
from utils.files import atomic_write
with atomic_write({str(tmp_path / "last.pt")!r}) as handle:
    handle.write(b"half a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""", cwd=tmp_path)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    leftover, = tmp_path.glob("last.pt.*.tmp")
    live = files.temporary_path(tmp_path / "last.pt")  # a live process's save in progress: kept
    live.write_bytes(b"being written")
    elsewhere = tmp_path / f"last.pt.{'0' * 6}.{killed.pid}.0123abcd.tmp"  # another machine's, with the same PID
    notes = tmp_path / "notes.tmp"  # not a temporary of ours: kept, however old
    for kept in (elsewhere, notes):
        kept.write_bytes(b"kept")
    os.utime(notes, (time.time() - 7200, time.time() - 7200))
    with runs.Run(small_config(small_setup, tmp_path)):
        assert not leftover.exists() and live.exists() and elsewhere.exists() and notes.exists()


# -- checkpoints of another version -----------------------------------------------------------------------

def written_checkpoint(path: Path, **changes) -> Path:
    """A checkpoint with every field train.py writes (`changes` replace fields; a value None removes one)."""
    checkpoint = {"format": checkpoints.FORMAT, "config": {}, "vop_config": VoPConfig("pos").as_dict(),
                  "run": {}, "trainable": {"prompts": torch.zeros(2, 3)}, "optimizer": {"state": {}}, "scaler": {},
                  "step": 4, "history": [], "replaced_videos": 0}
    checkpoint.update(changes)
    torch.save({name: value for name, value in checkpoint.items() if value is not None}, path)
    return path


def vop_config_with(**changes) -> dict:
    saved = {**VoPConfig("pos").as_dict(), **changes}
    return {name: value for name, value in saved.items() if value is not None}


@pytest.mark.parametrize("changes, named", [
    ({"optimizer": None}, "'optimizer'"),
    ({"vop_config": vop_config_with(pooling="mean")}, "pooling"),
    ({"vop_config": vop_config_with(num_frames=None)}, "num_frames"),
    ({"vop_config": vop_config_with(num_frames="12")}, "vop_config"),
    ({"step": "4"}, "'step'"),
    ({"step": -1}, "'step'"),
    ({"history": [3]}, "'history'"),
    ({"trainable": {"prompts": [0.0]}}, "'trainable'"),
    ({"format": 1}, "format 1"),
    ({"format": None}, "no version"),
], ids=["no optimizer", "extra VoPConfig field", "no num_frames", "num_frames a string", "step a string",
        "step negative", "history of numbers", "trainable not tensors", "format 1", "no format"])
def test_a_checkpoint_of_another_version_or_with_a_malformed_field_is_refused(tmp_path, changes, named):
    path = written_checkpoint(tmp_path / "old.pt", **changes)
    with pytest.raises(checkpoints.CheckpointError) as refused:
        checkpoints.load_checkpoint(path, VoPConfig)
    message = str(refused.value)
    assert "old.pt" in message and named in message and "\n" not in message
    if "format" in changes:
        assert f"format {checkpoints.FORMAT}" in message  # both versions


def test_evaluate_and_resume_read_checkpoints_through_the_same_checks(small_setup, tmp_path, capsys):
    assert checkpoints.load_checkpoint(written_checkpoint(tmp_path / "good.pt"), VoPConfig)["step"] == 4
    path = written_checkpoint(tmp_path / "old.pt", vop_config=vop_config_with(num_frames=None))
    assert exit_status(cli.run_command, ev.main, ["--checkpoint", str(path)], "evaluate.py") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "old.pt" in err and "num_frames" in err
    with pytest.raises(checkpoints.CheckpointError, match="old.pt.*num_frames"):
        train.train(small_config(small_setup, tmp_path / "run", resume=str(path)))


def test_a_frame_store_that_is_a_file_is_refused_before_any_video_is_read(small_setup, tmp_path):
    a_file = tmp_path / "frames.bin"
    a_file.write_bytes(b"")
    with pytest.raises(FrameStoreError, match="frames.bin is a file"):
        train.train(small_config(small_setup, tmp_path / "run", frame_store=str(a_file)))
    assert not (tmp_path / "run" / "video_probe.json").exists()
