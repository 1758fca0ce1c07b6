"""search.py: a trained model's index of a folder gives evaluate.py's recall and the cosines of encode_text and
encode_video; incremental updates embed only what is new or changed; another model's index is refused; unreadable
videos are listed, never fatal; a stopped or killed update leaves an index that opens and that a rerun completes;
--json and --html; one-line errors; the exact chunked top-k; the fingerprint; torchrun's split."""
import base64
import html.parser
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils import cli
import data
import evaluate
import search
import train
from formats import video_index, video_io
import vop
from clip_model import CLIP, CLIPConfig
from helpers import (fake_tokenize, free_port, message_lines, place_videos, small_config, start_python,
                     write_tiny_video)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(small_setup, tmp_path_factory):
    """(a train.py checkpoint of VoP `pos` on the small world, the world's folder)."""
    out_dir = tmp_path_factory.mktemp("search_run")
    train.train(small_config(small_setup, out_dir, epochs=1))
    return out_dir / "last.pt", small_setup[1]


@pytest.fixture(scope="module")
def model(trained):
    return search.load_model(trained[0])


@pytest.fixture(scope="module")
def test_index(trained, tmp_path_factory):
    """The world's test clips indexed by the command line: (index path, checkpoint)."""
    checkpoint, world = trained
    index = tmp_path_factory.mktemp("search_index") / "test.index"
    search.main(["index", str(world / "test"), "--checkpoint", str(checkpoint), "--index", str(index),
                 "--num-workers", "0", "--batch-size", "3"])
    return index, checkpoint


def query_json(capsys, *arguments) -> list:
    capsys.readouterr()
    search.main(["query", *arguments, "--json"])
    return json.loads(capsys.readouterr().out)


def copy_clips(world, folder, count, start=0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    clips = sorted((world / "train").glob("*.mp4"))[start:start + count]
    return [Path(shutil.copy2(clip, folder / clip.name)) for clip in clips]


def one_line_error(capsys, argv) -> str:
    """What search.py prints for a user error: exactly one line on stderr, exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run_command(search.main, argv, "search.py")
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    return lines[0]


# -- search gives what evaluation measures ----------------------------------------------------------------

def test_search_finds_what_evaluation_measures_with_the_cosines_of_the_encoders(test_index, trained, model,
                                                                                  capsys):
    index, checkpoint = test_index
    world = trained[1]
    dataset = data.build_dataset("synthetic", world, "test", num_frames=4, image_size=32)
    text_embeddings, video_embeddings = evaluate.embed(model, dataset, batch_size=4, num_workers=0)
    expected = evaluate.metrics_from_embeddings(text_embeddings, video_embeddings, dataset.caption_video_index)
    # The encoders called directly: encode_text of the tokens, encode_video of the evaluation frames.
    with torch.no_grad():
        texts = model.encode_text(model.tokenize(dataset.captions))  # (T, E)
        frames = torch.stack([data.video_transform(data.read_frames(path, 4, "uniform"), False, 32)
                              for path in dataset.video_paths])  # (V, F, 3, R, R)
        videos = model.encode_video(frames)  # (V, E)
    cosine = {(caption, str(path)): float(texts[i] @ videos[j]) for i, caption in enumerate(dataset.captions)
              for j, path in enumerate(dataset.video_paths)}
    own_video = [str(dataset.video_paths[j]) for j in dataset.caption_video_index]
    found_at = []  # the rank of each caption's own clip among all videos
    differences = []
    for caption, own in zip(dataset.captions, own_video):
        hits = query_json(capsys, caption, "--index", str(index), "-k", str(len(dataset.video_paths)))
        assert [hit["rank"] for hit in hits] == list(range(1, len(dataset.video_paths) + 1))
        assert {hit["video"] for hit in hits} == {str(path) for path in dataset.video_paths}
        found_at.append(next(hit["rank"] for hit in hits if hit["video"] == own))
        differences += [abs(hit["score"] - cosine[caption, hit["video"]]) for hit in hits]
    assert max(differences) < 1e-4  # the index keeps float16: about 2^-11 of each component
    for k in (1, 5):
        recall = 100 * float(np.mean([rank <= k for rank in found_at]))
        assert recall == pytest.approx(expected["t2v"][f"R@{k}"]), k
    assert np.mean(found_at) == pytest.approx(expected["t2v"]["MnR"])


def test_the_python_api(test_index, trained, model, tmp_path):
    index, _ = test_index
    world = trained[1]
    videos = search.VideoSearch(model, index)
    clip = sorted((world / "test").glob("*.mp4"))[0]
    hits = videos.search_text("a red circle moves left", k=3)
    assert len(hits) == 3 and all(isinstance(path, str) and isinstance(score, float) for path, score in hits)
    assert [score for _, score in hits] == sorted([score for _, score in hits], reverse=True)
    [first, second] = videos.search_text(["a red circle moves left", "a blue square moves up"], k=2)
    assert [path for path, _ in first] == [path for path, _ in hits[:2]] and len(second) == 2
    assert [score for _, score in first] == pytest.approx([score for _, score in hits[:2]], abs=1e-6)
    # A video query: its nearest videos, itself left out; the same from its frames as from its path.
    nearest = videos.search_video(clip, k=3)
    assert len(nearest) == 3 and str(clip) not in [path for path, _ in nearest]
    direct = videos.embed_videos([clip])  # (1, E)
    from_frames = dict(videos.search_video(data.read_frames(clip, 4, "uniform"), k=2))  # frames: nothing left out
    assert from_frames[str(clip)] == pytest.approx(1, abs=1e-3)  # (its reversed twin is about as near)
    for path, score in nearest:  # the index keeps float16: a direction within 2^-11 of the embedding's
        assert score == pytest.approx(float(videos.embed_videos([path])[0] @ direct[0]), abs=2 ** -11)
    # Video -> text: the captions ranked by their cosine to the video.
    captions = ["a red circle moves left", "a green triangle moves right", "a yellow square moves down"]
    ranked = videos.rank_captions(clip, captions)
    expected = (videos.embed_texts(captions) @ direct[0]).tolist()
    assert sorted(caption for caption, _ in ranked) == sorted(captions)
    assert [score for _, score in ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    with pytest.raises(search.VideoReadError, match="nothing.mp4"):
        videos.embed_videos([tmp_path / "nothing.mp4"])


# -- incremental updates, one model per index ---------------------------------------------------------------

def test_an_update_embeds_only_new_and_changed_videos_and_drops_gone_ones(trained, model, tmp_path,
                                                                          monkeypatch):
    world = trained[1]
    folder = tmp_path / "videos"
    first, changed, gone = copy_clips(world, folder, 3)
    (folder / "notes.txt").write_text("not a video")
    videos = search.VideoSearch(model, tmp_path / "my.index", num_workers=0, show_progress=False)
    counts = videos.update([folder])
    assert counts == {"new": 3, "changed": 0, "gone": 0, "unchanged": 0, "unreadable": 0, "videos": 3}
    before = video_index.VideoIndex(tmp_path / "my.index")
    row_of = {before.video_path(row): row for row in range(len(before.sizes))}
    unchanged_embedding = np.array(before.embeddings[row_of[str(first)]])

    read = []
    real_getitem = data.VideoFiles.__getitem__
    monkeypatch.setattr(data.VideoFiles, "__getitem__", lambda self, i: (read.append(str(self.paths[i])),
                                                                        real_getitem(self, i))[1])
    shutil.copy2(sorted((world / "train").glob("*.mp4"))[10], changed)  # other content under the same name
    gone.unlink()
    [added] = copy_clips(world, folder / "more", 1, start=5)
    counts = videos.update([folder])
    assert counts == {"new": 1, "changed": 1, "gone": 1, "unchanged": 1, "unreadable": 0, "videos": 3}
    assert sorted(read) == sorted([str(changed), str(added)])  # the unchanged video was not read again
    after = video_index.VideoIndex(tmp_path / "my.index")
    assert len(after.sizes) == 3 and after.live.all()  # the dead rows (changed, gone) were removed
    paths = [after.video_path(row) for row in range(3)]
    assert sorted(paths) == sorted([str(first), str(changed), str(added)])
    assert np.array_equal(after.embeddings[paths.index(str(first))], unchanged_embedding)
    new_content = videos.embed_videos([changed])[0].to(torch.float16).numpy()
    assert np.array_equal(after.embeddings[paths.index(str(changed))], new_content)
    assert len(list(tmp_path.glob("my.index.*.f16"))) == 1  # the old embeddings file is gone
    # Another folder adds to the index; the first folder's videos stay (they still exist).
    other = tmp_path / "other"
    copy_clips(world, other, 2, start=20)
    read.clear()
    assert videos.update([other])["new"] == 2 and len(read) == 2
    assert len(video_index.VideoIndex(tmp_path / "my.index")) == 5


def test_another_model_is_refused_and_the_same_model_elsewhere_is_not(test_index, trained, small_setup, tmp_path,
                                                                      capsys):
    shared_index, checkpoint = test_index
    index = tmp_path / shared_index.name  # a copy: updating it records this test's checkpoint path
    for part in shared_index.parent.glob(f"{shared_index.name}*"):
        shutil.copy2(part, tmp_path / part.name)
    world = trained[1]
    moved = Path(shutil.copy(checkpoint, tmp_path / "moved.pt"))  # the same model, another path: accepted
    search.main(["index", str(world / "test"), "--checkpoint", str(moved), "--index", str(index),
                 "--num-workers", "0"])
    assert "0 new, 0 changed, 0 gone, 8 unchanged" in capsys.readouterr().out
    other = tmp_path / "other_run"
    train.train(small_config(small_setup, other, epochs=1, seed=1))  # other prompts
    stamp = index.stat().st_mtime_ns
    line = one_line_error(capsys, ["index", str(world / "test"), "--checkpoint", str(other / "last.pt"),
                                   "--index", str(index), "--num-workers", "0"])
    assert str(index) in line and "another model" in line and "new --index" in line
    line = one_line_error(capsys, ["index", str(world / "test"), "--clip", str(small_setup[0]), "--num-frames",
                                   "4", "--index", str(index), "--num-workers", "0"])  # zero-shot CLIP
    assert "new --index" in line
    assert index.stat().st_mtime_ns == stamp  # untouched
    line = one_line_error(capsys, ["query", "a red circle moves left", "--index", str(index), "--checkpoint",
                                   str(other / "last.pt")])
    assert "another model" in line


def test_the_fingerprint_is_what_the_model_computes(trained, small_setup, tmp_path):
    checkpoint = trained[0]
    fingerprint = search.model_fingerprint(search.load_model(checkpoint))
    assert search.model_fingerprint(search.load_model(shutil.copy(checkpoint, tmp_path / "x.pt"))) == fingerprint
    model = search.load_model(checkpoint)
    name, tensor = sorted(model.trainable_state_dict().items())[0]
    with torch.no_grad():
        tensor.view(-1)[0] = torch.nextafter(tensor.view(-1)[0], torch.tensor(np.inf))  # one ulp in one prompt
    assert search.model_fingerprint(model) != fingerprint
    zero_shot = [search.load_model(clip=small_setup[0], num_frames=frames, clip_activation=activation)
                 for frames, activation in ((4, None), (8, None), (4, "gelu"))]
    assert len({fingerprint, *map(search.model_fingerprint, zero_shot)}) == 4
    built = search.load_model(clip=small_setup[0], num_frames=4)
    del built.clip.source  # a backbone built in Python: its tensors are hashed instead
    assert search.model_fingerprint(built) != search.model_fingerprint(zero_shot[0])


# -- unreadable videos, stops and kills -----------------------------------------------------------------------

def test_an_unreadable_video_is_skipped_listed_and_not_read_again_until_it_changes(trained, tmp_path,
                                                                                   monkeypatch, capsys):
    world = trained[1]
    folder = tmp_path / "videos"
    copy_clips(world, folder, 2)
    broken = folder / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 100)
    index = tmp_path / "x.index"
    checkpoint = str(trained[0])
    counts = search.main(["index", str(folder), "--checkpoint", checkpoint, "--index", str(index),
                          "--num-workers", "0"])
    assert counts["unreadable"] == 1 and counts["videos"] == 2 and counts["new"] == 2  # the broken one is not new
    captured = capsys.readouterr()
    assert f"{index}: 2 videos; 2 new, 0 changed, 0 gone, 0 unchanged, 1 unreadable" in captured.out
    assert "1 video could not be read and was skipped" in captured.err and "x.index.skipped.txt" in captured.err
    listed = [line.split("\t") for line in (tmp_path / "x.index.skipped.txt").read_text().splitlines()
              if not line.startswith("#")]
    assert [path for path, _ in listed] == [str(broken)] and "broken.mp4" in listed[0][1]
    assert str(broken) not in [hit["video"] for hit in query_json(capsys, "a red circle", "--index", str(index))]

    read = []
    real_getitem = data.VideoFiles.__getitem__
    monkeypatch.setattr(data.VideoFiles, "__getitem__", lambda self, i: (read.append(self.paths[i].name),
                                                                        real_getitem(self, i))[1])
    counts = search.main(["index", str(folder), "--checkpoint", checkpoint, "--index", str(index),
                          "--num-workers", "0"])
    assert read == [] and counts["unreadable"] == 1 and (tmp_path / "x.index.skipped.txt").exists()
    shutil.copy(sorted((world / "train").glob("*.mp4"))[7], broken)  # repaired
    counts = search.main(["index", str(folder), "--checkpoint", checkpoint, "--index", str(index),
                          "--num-workers", "0"])
    assert read == ["broken.mp4"] and counts["unreadable"] == 0 and counts["videos"] == 3 and counts["new"] == 1
    assert not (tmp_path / "x.index.skipped.txt").exists()


def _start_slow_index(folder, checkpoint, index):
    """search.py index in another process, each video taking a fifth of a second longer to read."""
    code = (f"import time, data, search; from utils import cli; real = data.VideoFiles.__getitem__\n"
            f"data.VideoFiles.__getitem__ = lambda self, i: (time.sleep(0.2), real(self, i))[1]\n"
            f"cli.run_command(search.main, ['index', {str(folder)!r}, '--checkpoint', {str(checkpoint)!r}, "
            f"'--index', {str(index)!r}, '--num-workers', '0', '--batch-size', '1'], 'search.py')")
    return start_python(code, REPO)


def _wait_for_videos(process, index, at_least) -> int:
    for _ in range(600):
        if process.poll() is not None:
            break
        try:
            if len(video_index.VideoIndex(index)) >= at_least:
                return len(video_index.VideoIndex(index))
        except video_index.IndexFileError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the index never held {at_least} videos: {process.communicate()}")


def test_a_stopped_or_killed_update_leaves_an_index_that_opens_and_a_rerun_completes(trained, model, tmp_path):
    world, checkpoint = trained[1], trained[0]
    folder = tmp_path / "videos"
    copy_clips(world, folder, 16)
    index = tmp_path / "stop.index"

    running = _start_slow_index(folder, checkpoint, index)  # Ctrl-C: what was embedded is kept
    _wait_for_videos(running, index, 2)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=60)
    assert running.returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command again" in stderr.strip().splitlines()[-1]
    after_stop = len(video_index.VideoIndex(index))
    assert 2 <= after_stop < 16

    running = _start_slow_index(folder, checkpoint, index)  # SIGKILL: the last commit stays whole
    _wait_for_videos(running, index, after_stop + 2)
    running.kill()
    running.communicate(timeout=60)
    after_kill = len(video_index.VideoIndex(index))
    assert after_stop + 2 <= after_kill < 16

    counts = search.VideoSearch(model, index, num_workers=0, show_progress=False).update([folder])
    assert counts["new"] == 16 - after_kill and counts["unchanged"] == after_kill and counts["videos"] == 16
    assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.glob("stop.index.*.f16"))) == 1
    # The same index as one uninterrupted run.
    whole = search.VideoSearch(model, tmp_path / "whole.index", num_workers=0, show_progress=False)
    whole.update([folder])
    resumed, fresh = video_index.VideoIndex(index), video_index.VideoIndex(tmp_path / "whole.index")
    order = sorted(range(16), key=resumed.video_path)
    assert [resumed.video_path(row) for row in order] == [fresh.video_path(row) for row in range(16)]
    assert np.array_equal(np.asarray(resumed.embeddings)[order], np.asarray(fresh.embeddings))


def test_a_second_update_at_once_is_refused(trained, tmp_path, capsys):
    folder = tmp_path / "videos"
    copy_clips(trained[1], folder, 6)
    index = tmp_path / "busy.index"
    running = _start_slow_index(folder, trained[0], index)
    try:
        _wait_for_videos(running, index, 1)
        line = one_line_error(capsys, ["index", str(folder), "--checkpoint", str(trained[0]), "--index", str(index),
                                       "--num-workers", "0"])
        assert "being updated by another process" in line
    finally:
        running.kill()
        running.communicate()


# -- output: --json, --html, captions, errors -------------------------------------------------------------

def test_json_is_a_sorted_list_and_nothing_else(test_index, capsys, tmp_path):
    index, _ = test_index
    hits = query_json(capsys, "a red circle moves left", "--index", str(index), "-k", "5")
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]
    assert all(set(hit) == {"rank", "score", "video"} for hit in hits)
    assert [hit["score"] for hit in hits] == sorted([hit["score"] for hit in hits], reverse=True)
    clip = hits[0]["video"]
    nearest = query_json(capsys, "--video", clip, "--index", str(index), "-k", "3")
    assert len(nearest) == 3 and clip not in [hit["video"] for hit in nearest]
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle moves left\n\na blue square moves up\na green triangle moves right\n")
    ranked = query_json(capsys, "--video", clip, "--captions", str(captions), "--checkpoint", str(test_index[1]))
    assert all(set(hit) == {"rank", "score", "caption"} for hit in ranked) and len(ranked) == 3
    assert [hit["score"] for hit in ranked] == sorted([hit["score"] for hit in ranked], reverse=True)
    capsys.readouterr()
    search.main(["query", "a red circle moves left", "--index", str(index), "-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2"] and lines[0].split()[2] == hits[0]["video"]


def test_queries_from_a_file_are_searched_together_and_each_gives_its_own_hits(test_index, capsys, tmp_path):
    index, _ = test_index
    texts = ["a red circle moves left", "a blue square moves up", "a green triangle moves right"]
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{texts[0]}\n\n  {texts[1]}  \n{texts[2]}\n", encoding="utf-8")  # blank lines skipped
    capsys.readouterr()
    search.main(["query", "--queries", str(queries), "--index", str(index), "-k", "3", "--json"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # one JSON object per line
    answers = [json.loads(line) for line in lines]
    assert [answer["query"] for answer in answers] == texts
    for answer in answers:  # the hits one query at a time gives
        alone = query_json(capsys, answer["query"], "--index", str(index), "-k", "3")
        assert [hit["video"] for hit in answer["hits"]] == [hit["video"] for hit in alone]
        assert [hit["rank"] for hit in answer["hits"]] == [1, 2, 3]
        assert [hit["score"] for hit in answer["hits"]] == pytest.approx([hit["score"] for hit in alone], abs=1e-5)
    search.main(["query", "--queries", str(queries), "--index", str(index), "-k", "2"])
    blocks = capsys.readouterr().out.split("\n\n")
    assert [block.splitlines()[0] for block in blocks if block] == texts  # each text, then its hits
    assert [line.split()[2] for line in blocks[1].splitlines()[1:]] == [hit["video"] for hit in answers[1]["hits"][:2]]
    # Searched together: one pass over the index for QUERIES_PER_PASS texts.
    passes = []
    original = search.top_k
    search.top_k = lambda queries, *rest, **options: passes.append(len(queries)) or original(queries, *rest, **options)
    try:
        search.main(["query", "--queries", str(queries), "--index", str(index), "--json"])
    finally:
        search.top_k = original
    assert passes == [3]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert "holds no texts" in one_line_error(capsys, ["query", "--queries", str(empty), "--index", str(index)])
    assert "one thing to search for" in one_line_error(capsys, ["query", "a dog", "--queries", str(queries), "--index",
                                                                str(index)])
    assert "--html" in one_line_error(capsys, ["query", "--queries", str(queries), "--index", str(index), "--html",
                                               str(tmp_path / "hits.html")])
    assert not (tmp_path / "hits.html").exists()


def damage_rows(index: Path, rows: list[int], length_tells: bool = True) -> None:
    """Write NaN into rows of an index's embeddings, as a float16 overflow on a GPU would; with `length_tells`,
    their stored lengths too (what IndexWriter.add stores for such a row), else only the rows change."""
    header, table = video_index._read(index)
    embeddings = np.memmap(index.parent / header["embeddings_file"], np.float16, mode="r+",
                           shape=(len(table["sizes"]), header["embedding_size"]))
    embeddings[rows] = np.nan
    embeddings.flush()
    if length_tells:
        table["norms"][rows] = np.nan
        with open(index, "wb") as handle:
            np.savez(handle, header=np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8), **table)


def test_videos_with_embeddings_that_are_not_finite_are_never_ranked_and_are_embedded_again(test_index, trained,
                                                                                           capsys, tmp_path):
    index, checkpoint = test_index
    copy = tmp_path / index.name
    for file in index.parent.glob(f"{index.name}*"):  # the table and the embeddings file its header names
        shutil.copy(file, tmp_path / file.name)
    total = len(video_index.VideoIndex(copy))
    before = query_json(capsys, "a red circle moves left", "--index", str(copy), "-k", str(total))
    damaged = [before[0]["video"], before[3]["video"]]  # the best hit and another one
    table = video_index.VideoIndex(copy)
    damage_rows(copy, [row for row in range(total) if table.video_path(row) in damaged])
    capsys.readouterr()
    search.main(["query", "a red circle moves left", "--index", str(copy), "-k", str(total), "--json"])
    printed = capsys.readouterr()
    hits = json.loads(printed.out, parse_constant=lambda constant: pytest.fail(f"{constant} in the JSON"))
    assert [hit["video"] for hit in hits] == [hit["video"] for hit in before if hit["video"] not in damaged]
    assert [hit["rank"] for hit in hits] == list(range(1, total - 1))  # no gap, nothing pushed out
    [warning] = printed.err.strip().splitlines()
    assert warning.startswith(f"warning: 2 of the {total} videos in {copy}") and damaged[0] in warning
    assert "not finite" in warning and "search.py index" in warning
    # A row damaged after its length was taken (its length does not tell): never ranked either, without a warning.
    damage_rows(copy, [next(row for row in range(total) if table.video_path(row) == before[1]["video"])], False)
    hits = query_json(capsys, "a red circle moves left", "--index", str(copy), "-k", "3")
    assert before[1]["video"] not in [hit["video"] for hit in hits] and len(hits) == 3
    # The next update embeds the videos whose length tells again; they rank where they did.
    world = trained[1]
    counts = search.main(["index", str(world / "test"), "--checkpoint", str(checkpoint), "--index", str(copy),
                          "--num-workers", "0"])
    assert counts["changed"] == 2 and counts["videos"] == total
    capsys.readouterr()
    again = query_json(capsys, "a red circle moves left", "--index", str(copy), "-k", "1")
    assert again[0]["video"] == before[0]["video"] and again[0]["score"] == pytest.approx(before[0]["score"], abs=1e-4)


def test_an_embedding_that_is_not_finite_is_listed_as_unreadable_not_indexed(model, trained, tmp_path, monkeypatch):
    clips = copy_clips(trained[1], tmp_path / "videos", 3)
    videos = search.VideoSearch(model, tmp_path / "mine.index", num_workers=0, show_progress=False)
    embedded = search.VideoSearch._embedded_batches

    def overflowing(self, paths):  # what fp16 autocast on a GPU can give: a NaN in one video's embedding
        for indices, embeddings, errors in embedded(self, paths):
            embeddings[[paths[index] == str(clips[1]) for index in indices]] = torch.nan
            yield indices, embeddings, errors

    monkeypatch.setattr(search.VideoSearch, "_embedded_batches", overflowing)
    counts = videos.update([tmp_path / "videos"])
    assert counts["new"] == 2 and counts["unreadable"] == 1 and counts["videos"] == 2  # new: those now indexed
    index = video_index.VideoIndex(tmp_path / "mine.index")
    assert str(clips[1]) not in [index.video_path(row) for row in range(len(index.sizes))]
    assert np.isfinite(np.asarray(index.embeddings)).all()
    listed = video_index.skipped_list(tmp_path / "mine.index").read_text()
    assert f"{clips[1]}\t{search.NOT_FINITE}" in listed and "--precision fp32" in listed


class StrictPage(html.parser.HTMLParser):
    """Collects a page's structure and fails on what a browser would repair: unclosed or misnested tags."""
    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.open, self.items, self.doctype, self.title = [], [], None, ""

    def handle_decl(self, declaration):
        self.doctype = declaration

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "li":
            self.items.append({"text": "", "images": []})
        if tag == "img":
            (self.items[-1]["images"] if "li" in self.open else []).append(attributes)
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, text):
        if "li" in self.open:
            self.items[-1]["text"] += text + " "
        if self.open and self.open[-1] == "title":
            self.title += text


def parse_page(path) -> StrictPage:
    page = StrictPage()
    page.feed(Path(path).read_text(encoding="utf-8"))
    page.close()
    assert page.doctype.lower() == "doctype html" and page.open == [], page.open
    return page


def test_the_html_page_is_valid_and_shows_every_hit(test_index, capsys, tmp_path):
    index, _ = test_index
    page_path = tmp_path / "hits.html"
    hits = query_json(capsys, "a red circle <moves> left & right", "--index", str(index), "-k", "4", "--html",
                      str(page_path))
    page = parse_page(page_path)
    assert "a red circle <moves> left & right" in page.title  # escaped in the file, itself once parsed
    assert len(page.items) == len(hits) == 4
    for item, hit in zip(page.items, hits):
        words = item["text"].split()
        assert words[:2] == [str(hit["rank"]), f"{hit['score']:.4f}"] and Path(hit["video"]).name in words
        assert len(item["images"]) == 4  # the strip: 4 frames, each a JPEG inside the page
        for image in item["images"]:
            assert image["src"].startswith("data:image/jpeg;base64,")
            with Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))) as thumbnail:
                assert thumbnail.height == search.THUMBNAIL_HEIGHT == int(image["height"])


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="needs a headless chromium on PATH: installing one (Debian: apt install chromium) runs it")
def test_a_browser_renders_every_hit_and_thumbnail(test_index, capsys, tmp_path):
    index, _ = test_index
    page_path = tmp_path / "hits.html"
    query_json(capsys, "a red circle moves left", "--index", str(index), "-k", "3", "--html", str(page_path))
    # A copy of the page with a script that counts, after loading, the hits and the thumbnails that decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text(encoding="utf-8").replace("</body>", (
        "<script>window.onload = () => { const images = [...document.images]; document.body.setAttribute("
        "'data-seen', document.querySelectorAll('li').length + ' hits, ' + images.filter(i => i.complete && "
        "i.naturalWidth > 0).length + '/' + images.length + ' images'); };</script></body>")), encoding="utf-8")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    completed = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                                "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-seen="3 hits, 12/12 images"' in completed.stdout, completed.stderr[-2000:]


def test_folders_without_videos_and_bad_queries_are_one_line(trained, tmp_path, capsys):
    checkpoint = str(trained[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "vop.pdf").write_bytes(b"%PDF")
    index = tmp_path / "x.index"
    for folder, says in ((empty, "is empty"), (papers, "no videos"), (tmp_path / "nowhere", "does not exist")):
        line = one_line_error(capsys, ["index", str(folder), "--checkpoint", checkpoint, "--index", str(index)])
        assert str(folder) in line and says in line
    assert not index.exists()  # nothing was created
    line = one_line_error(capsys, ["query", "a dog", "--index", str(index)])
    assert "no index at" in line
    (tmp_path / "fake.index").write_text("hello")
    line = one_line_error(capsys, ["query", "a dog", "--index", str(tmp_path / "fake.index")])
    assert "not a search index" in line
    clip = copy_clips(trained[1], tmp_path / "clips", 1)[0]
    for not_an_index in (clip, trained[0]):  # numpy reads a video as a pickle, a checkpoint as a zip
        line = one_line_error(capsys, ["query", "a dog", "--index", str(not_an_index)])
        assert f"{not_an_index} is not a search index" in line and "pickle" not in line and "Error" not in line
    assert "--index" in one_line_error(capsys, ["index", str(papers), "--checkpoint", checkpoint])
    assert "one thing to search for" in one_line_error(capsys, ["query", "a dog", "--video", "x.mp4", "--index",
                                                                str(index)])
    assert "--video" in one_line_error(capsys, ["query", "a dog", "--captions", "c.txt", "--index", str(index)])
    line = one_line_error(capsys, ["query", "--captions", "c.txt", "--index", str(index)])
    assert "--captions c.txt ranks captions for a video: give --video FILE too" in line and "both" not in line
    line = one_line_error(capsys, ["query", "--index", str(index)])
    assert "give a text to search for" in line and "--video FILE" in line and "both" not in line
    assert "command" in one_line_error(capsys, ["find", "a dog"])
    assert "give a model: --checkpoint or --clip" in one_line_error(capsys, ["query", "--video", "x.mp4",
                                                                             "--captions", "c.txt"])


# -- the pieces -------------------------------------------------------------------------------------------

def brute_force(queries, stored, k, norms=None, live=None):
    """What top_k must return: every row scored in float32 (the float16 row times the query, over its length),
    unrankable rows (dead, or a length that is not a positive finite number) left out, best first, a tie to the
    lower row; as many hits for each query as rows can be ranked, at most k."""
    rows = torch.from_numpy(np.asarray(stored)).float()  # (N, E)
    lengths = torch.from_numpy(norms) if norms is not None else torch.ones(len(rows))
    scores = (queries.float() @ rows.T / lengths).numpy()  # (Q, N)
    rankable = ((live if live is not None else True) & np.isfinite(lengths.numpy()) & (lengths.numpy() > 0)
                & np.isfinite(scores).all(axis=0))  # (N,)
    best = [[row for row in np.lexsort((np.arange(len(rows)), -query_scores)) if rankable[row]][:k]
            for query_scores in scores]  # by score, then by row
    return torch.from_numpy(np.array([query_scores[rows] for query_scores, rows in zip(scores, best)])), best


def unit(rows, generator):
    return torch.nn.functional.normalize(torch.randn(*rows, generator=generator), dim=-1)


def test_top_k_is_exact_on_random_rows_with_dead_damaged_and_tied_rows():
    generator = torch.Generator().manual_seed(0)
    embeddings = unit((3000, 512), generator)
    queries = unit((70, 512), generator)
    embeddings[2000] = embeddings[1000] = embeddings[10]  # ties, in three chunks at 1000, 333 or 64 rows a chunk
    queries[1] = embeddings[10]  # ... at the top for query 1
    stored = embeddings.to(torch.float16).numpy()
    stored[[20, 2999]] = np.nan  # damaged rows: a NaN ...
    stored[30, 5] = np.inf  # ... or an inf in them
    norms = np.linalg.norm(stored.astype(np.float32), axis=1)  # NaN and inf there: what an index stores
    stored[40, 7] = np.nan  # a row damaged after its length was taken: its length does not tell
    live = np.ones(3000, bool)
    live[[5, 1000, 2500]] = False  # dead rows (one of the ties among them)
    for count in (1, 3, 70):
        expected_scores, expected_rows = brute_force(queries[:count], stored, 10, norms, live)
        for rows_per_chunk in (3000, 1000, 333, 64):
            scores, rows = search.top_k(queries[:count], stored, 10, norms=norms, live=live,
                                        rows_per_chunk=rows_per_chunk)
            assert rows.tolist() == expected_rows, (count, rows_per_chunk)
            torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=0)
    _, rows = search.top_k(queries[1:2], stored, 3, norms=norms, live=live, rows_per_chunk=64)
    assert rows.tolist()[0][:2] == [10, 2000]  # the tie, to the lower row; 1000 is dead
    assert not {5, 20, 30, 40, 1000, 2500, 2999} & set(search.top_k(queries, stored, 3000, norms=norms,
                                                                       live=live)[1].flatten().tolist())


def test_top_k_returns_every_rankable_row_when_k_is_larger():
    generator = torch.Generator().manual_seed(1)
    stored = unit((50, 64), generator).to(torch.float16).numpy()
    queries = unit((4, 64), generator)
    stored[3] = np.nan
    norms = np.linalg.norm(stored.astype(np.float32), axis=1)
    live = np.arange(50) % 4 != 0  # 37 live rows, one of them damaged: 36 can be ranked
    for rows_per_chunk in (50, 16, 1):
        scores, rows = search.top_k(queries, stored, 1000, norms=norms, live=live, rows_per_chunk=rows_per_chunk)
        expected_scores, expected_rows = brute_force(queries, stored, 1000, norms, live)
        assert rows.shape == (4, 36) and rows.tolist() == expected_rows
        torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=0)
    scores, rows = search.top_k(queries, stored, 5, norms=norms, live=np.zeros(50, bool))
    assert scores.shape == rows.shape == (4, 0)
    scores, rows = search.top_k(queries, stored[:0], 5, norms=norms[:0], live=live[:0])
    assert scores.shape == rows.shape == (4, 0)


def test_top_k_rescoring_in_float32_finds_what_the_float16_product_alone_misranks(monkeypatch):
    """Rows whose cosines differ by less than float16 can tell, half of them leaning towards the side the query
    loses by its rounding to float16: the float16 product alone ranks them wrongly; top_k ranks them exactly,
    and would not with no margin around the float16 scores."""
    generator = torch.Generator().manual_seed(2)
    query = unit((1, 512), generator)  # (1, E)
    lost = query.half().float() - query  # what rounding the query to float16 changes
    lean = torch.nn.functional.normalize(lost - (lost @ query.T) * query, dim=1)  # (1, E), orthogonal to the query
    other = torch.randn(1, 512, generator=generator)
    other = torch.nn.functional.normalize(other - (other @ query.T) * query - (other @ lean.T) * lean, dim=1)
    closeness = 0.6 + 2e-3 * torch.rand(4000, 1, generator=generator)  # cosines 0.6 to 0.602 ...
    leaning = torch.randint(0, 2, (4000, 1), generator=generator) * 2 - 1  # ... float16 moves by about +-3e-4
    stored = (closeness * query + leaning * lean + 0.8 * other).to(torch.float16).numpy()  # (N, E), lengths ~1.4
    norms = np.linalg.norm(stored.astype(np.float32), axis=1)
    expected_scores, expected_rows = brute_force(query, stored, 10, norms)
    rough = (torch.from_numpy(stored) @ query.half().T)[:, 0].float() / torch.from_numpy(norms)
    assert rough.topk(10).indices.tolist() != expected_rows[0]  # float16 alone misranks these rows
    for rows_per_chunk in (4000, 500):
        scores, rows = search.top_k(query, stored, 10, norms=norms, rows_per_chunk=rows_per_chunk)
        assert rows.tolist() == expected_rows
        torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=0)
    monkeypatch.setattr(search, "_float16_margin", lambda queries: np.zeros(len(queries)))
    assert search.top_k(query, stored, 10, norms=norms, rows_per_chunk=500)[1].tolist() != expected_rows


def test_a_float16_product_sums_in_float32_within_the_margin_top_k_allows():
    """top_k's margin holds only if torch sums float16 products in float32 on the CPU. Rows built so that a
    float16 sum would show: a first product of 1, then 511 small ones with bits below float16's step at 1."""
    generator = torch.Generator().manual_seed(3)
    for count in (1, 10):
        rows = torch.rand(4096, 512, generator=generator) * 2 ** -5 - 2 ** -6  # (N, E), products ~2^-13
        rows[:, 0] = 1
        queries = torch.rand(count, 512, generator=generator) * 2 - 1  # (Q, E)
        queries[:, 0] = 1
        rows, queries = rows.half(), queries.half()
        exact = rows.double() @ queries.double().T  # (N, Q)
        product = (rows @ queries.T).double()  # (N, Q): rounded once, to float16, from a float32 sum
        sum_error = 1.01 * 512 * 2 ** -24 * (rows.double().abs() @ queries.double().abs().T)  # of a float32 sum
        error = (product - exact).abs() / (exact.abs() * 2 ** -11 + sum_error)  # (N, Q), at most 1
        assert float(error.max()) <= 1  # a float16 sum would be off by many float16 steps
    # The margin, for unit rows and queries of this size, covers the query's rounding as well, twice over.
    unit_queries = unit((5, 512), generator)
    margin = search._float16_margin(unit_queries)
    assert margin.shape == (5,) and bool((margin > 2 * (2 * 2 ** -11 + 512 * 2 ** -24)).all())
    assert search._float16_margin(unit_queries * 3) is None and search._float16_margin(unit_queries * np.nan) is None


def test_top_k_scores_in_float32_where_the_float16_margin_does_not_hold():
    """Without the rows' lengths, or for queries far from unit length, every row is scored in float32 (the path
    other devices take too); rows of unusual length among unit ones are scored in float32 whatever their
    float16 score. The same exact answer each way."""
    generator = torch.Generator().manual_seed(4)
    stored = unit((300, 32), generator).to(torch.float16).numpy()
    stored[7] = np.nan
    queries = unit((3, 32), generator)
    queries[2] = torch.from_numpy(stored[100]).float()
    for rows_per_chunk in (300, 13):
        scores, rows = search.top_k(queries, stored, 10, rows_per_chunk=rows_per_chunk)
        expected_scores, expected_rows = brute_force(queries, stored, 10)
        assert rows.tolist() == expected_rows and rows[2, 0] == 100
        torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=0)
    stored[[50, 60]] *= np.float16(8)  # lengths of 8: outside what the float16 margin covers
    stored[70] *= np.float16(0.1)
    norms = np.linalg.norm(stored.astype(np.float32), axis=1)
    for some_queries in (queries, 3 * queries):  # 3: queries too long for the float16 margin
        for rows_per_chunk in (300, 13):
            scores, rows = search.top_k(some_queries, stored, 10, norms=norms, rows_per_chunk=rows_per_chunk)
            expected_scores, expected_rows = brute_force(some_queries, stored, 10, norms)
            assert rows.tolist() == expected_rows
            torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    _, rows = search.top_k(torch.from_numpy(stored[[50, 70]]).float() / torch.from_numpy(norms[[50, 70], None]), stored,
                           1, norms=norms)
    assert rows.tolist() == [[50], [70]]  # each long or short row found by its own direction


def test_bf16_precision_indexes_close_to_fp32(test_index, trained, model, tmp_path):
    videos = search.VideoSearch(model, tmp_path / "bf16.index", precision="bf16", num_workers=0,
                                show_progress=False)
    videos.update([trained[1] / "test"])
    fp32 = video_index.VideoIndex(test_index[0])
    bf16 = video_index.VideoIndex(tmp_path / "bf16.index")
    assert bf16.header["precision"] == "bf16" and fp32.header["precision"] == "fp32"
    difference = np.abs(np.asarray(bf16.embeddings, np.float32) - np.asarray(fp32.embeddings, np.float32))
    assert 0 < difference.max() < 0.05  # bf16 keeps 8 bits of mantissa


# -- torchrun ---------------------------------------------------------------------------------------------

def _index_worker(rank, world_size, port, argv, counts_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    Path(f"{counts_path}.{rank}").write_text(json.dumps(search.main(argv)))


@pytest.mark.slow
def test_under_torchrun_each_process_embeds_a_share_and_rank_0_writes(trained, tmp_path):
    checkpoint, world = trained
    index = tmp_path / "shared.index"
    folder = tmp_path / "videos"
    copy_clips(world, folder, 5)  # 5 videos, batch 2: shares of 3 and 2, the last round uneven
    torch.multiprocessing.spawn(_index_worker, args=(2, free_port(), [
        "index", str(folder), "--checkpoint", str(checkpoint), "--index", str(index), "--num-workers", "0",
        "--batch-size", "2", "--device", "cpu"], tmp_path / "counts"), nprocs=2, join=True)
    counts = [json.loads(Path(f"{tmp_path / 'counts'}.{rank}").read_text()) for rank in range(2)]
    assert counts[0] == counts[1] and counts[0]["videos"] == counts[0]["new"] == 5  # every process is told
    single = search.VideoSearch(search.load_model(checkpoint), tmp_path / "single.index", num_workers=0,
                                show_progress=False)
    single.update([folder])
    shared, alone = video_index.VideoIndex(index), video_index.VideoIndex(tmp_path / "single.index")
    assert [shared.video_path(row) for row in range(5)] == [alone.video_path(row) for row in range(5)]
    assert np.array_equal(np.asarray(shared.embeddings), np.asarray(alone.embeddings))


def test_the_search_page_example_runs(trained, tmp_path, capsys):
    """The Python example of docs/search.md, as printed, on this test's checkpoint, world and a fresh index."""
    checkpoint, world = trained
    page = (REPO / "docs" / "search.md").read_text(encoding="utf-8")
    example = page.split("\n## From Python\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) < 15
    example = (example.replace("runs/demo/last.pt", str(checkpoint)).replace("demo.index", str(tmp_path / "demo.index"))
               .replace("~/.cache/vop/demo/world/test", str(world / "test")))
    namespace = {"__name__": "__main__"}  # as a script runs it
    exec(compile(example, "docs/search.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and all(Path(line.split()[1]).is_file() for line in printed)
    assert len(namespace["nearest"]) == 5 and len(namespace["captions"]) == 2
    assert namespace["vectors"].shape == namespace["texts"].shape == (1, 32)


def python_example() -> str:
    """The Python example of the documentation (README.md or docs/*.md): the block that builds a VideoSearch."""
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in page.read_text(encoding="utf-8").split("```python\n")[1:]:
            if "VideoSearch(" in block:
                return block.split("```", 1)[0]
    raise AssertionError("no Python example with VideoSearch in README.md or docs/")


@pytest.mark.slow
def test_the_python_example_runs_as_a_saved_script_and_piped_into_python(trained, tmp_path):
    """The documented Python example, as printed, saved as try_api.py in a copy of the repository's folder (its
    files linked) and run there as a new user would: `python try_api.py`, then `python - < try_api.py`. Its
    DataLoader workers must not run the script a second time (which would find the index busy), nor look for a
    file named '<stdin>'. HOME is a folder whose ~/.cache/vop/demo/world is the small world, and runs/demo/last.pt
    this module's checkpoint."""
    checkpoint, world = trained
    clone = tmp_path / "clone"
    clone.mkdir()
    for entry in REPO.iterdir():
        if not entry.name.startswith(".") and entry.name not in ("runs", "tests"):
            (clone / entry.name).symlink_to(entry)
    (clone / "runs" / "demo").mkdir(parents=True)
    (clone / "runs" / "demo" / "last.pt").symlink_to(checkpoint)
    home = tmp_path / "home"
    (home / ".cache" / "vop" / "demo").mkdir(parents=True)
    (home / ".cache" / "vop" / "demo" / "world").symlink_to(world)
    (clone / "try_api.py").write_text(python_example(), encoding="utf-8")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HOME"] = str(home)
    for how in (["try_api.py"], ["-"]):
        for leftover in clone.glob("demo.index*"):
            leftover.unlink()  # each run indexes afresh, so each starts its workers
        with open(clone / "try_api.py", encoding="utf-8") as script:
            completed = subprocess.run([sys.executable, *how], cwd=clone, env=environment, capture_output=True,
                                       text=True, timeout=300, stdin=script if how == ["-"] else None)
        assert completed.returncode == 0 and "Traceback" not in completed.stderr, (how, completed.stderr[-3000:])
        printed = completed.stdout.strip().splitlines()
        assert len(printed) == 5 and all(Path(line.split()[1]).is_file() for line in printed), completed.stdout


def test_a_video_query_leaves_the_video_itself_out_and_says_so(test_index, trained, capsys):
    index, _ = test_index
    clips = sorted((trained[1] / "test").glob("*.mp4"))
    capsys.readouterr()
    search.main(["query", "--video", str(clips[0]), "--index", str(index), "-k", str(len(clips))])
    shown = capsys.readouterr()
    rows = shown.out.strip().splitlines()
    assert len(rows) == len(clips) - 1 and str(clips[0]) not in shown.out
    assert f"the query video itself is left out of the {len(clips) - 1} hits" in shown.err


def test_the_search_at_scale_page_runs_as_shown(model, tmp_path, capsys):
    """docs/search_at_scale.md's code, every block in order, on an index of 3,000 videos made by this test's model
    (random embeddings): FAISS's IVF and HNSW built from the index's rows, their recall@10 against top_k, and an
    IVF index answering from disk with the index's paths."""
    pytest.importorskip("faiss", reason="faiss-cpu is optional (pip install faiss-cpu): the page needs it")
    index = tmp_path / "my.index"
    generator = torch.Generator().manual_seed(5)
    with video_index.IndexWriter(index, search.VideoSearch(model).model_record(), 32) as writer:
        paths = [f"/videos/{row:04d}.mp4" for row in range(3000)]
        writer.add(paths, [(1, 1)] * 3000, torch.nn.functional.normalize(torch.randn(3000, 32, generator=generator),
                                                                         dim=1))
        writer.sizes[7] = -1  # a dead row
        writer.finish()
    page = (REPO / "docs" / "search_at_scale.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in page.split("```python\n")[1:]]
    assert len(blocks) == 6
    namespace = {}
    capsys.readouterr()
    for block in blocks:
        block = block.replace("my_videos.index", str(index)).replace("my_videos.ivf", str(tmp_path / "my.ivf"))
        exec(compile(block, "docs/search_at_scale.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("2,999 videos, 32-d float16")
    recall = {line.split(":")[0]: float(line.split("recall@10 ")[1].split(",")[0]) for line in printed
              if "recall@10" in line}
    assert set(recall) == {"IVF, nprobe 1", "IVF, nprobe 4", "IVF, nprobe 16", "IVF, nprobe 64", "IVF, nprobe 256",
                           "HNSW, efSearch 16", "HNSW, efSearch 64", "HNSW, efSearch 256", "HNSW, efSearch 1024"}
    assert recall["IVF, nprobe 64"] >= 0.9  # 55 lists: every list searched, so all but float16's near-ties
    answers = printed[-5:]
    assert all(line.split()[1] in paths[:7] + paths[8:] for line in answers)  # the index's own paths
    assert [float(line.split()[0]) for line in answers] == sorted((float(line.split()[0]) for line in answers),
                                                                  reverse=True)


# -- a video has one name; an index stays whole; a model's name stays a name -------------------------------

def test_a_folder_named_another_way_adds_no_second_copy_of_its_videos(model, trained, tmp_path, monkeypatch):
    clips = copy_clips(trained[1], tmp_path / "a" / "videos", 2)
    (tmp_path / "b").mkdir()
    videos = search.VideoSearch(model, tmp_path / "mine.index", num_workers=0, show_progress=False)
    videos.update([tmp_path / "a" / "videos"])
    monkeypatch.chdir(tmp_path / "b")
    counts = videos.update([Path("..") / "a" / "videos"])  # the same folder, through ..
    assert counts["new"] == 0 and counts["unchanged"] == 2 and counts["videos"] == 2
    hits = videos.search_video(Path("..") / "a" / "videos" / clips[0].name, k=5)
    assert [Path(path).name for path, _ in hits] == [clips[1].name]  # the query video itself is left out


def test_a_stop_in_the_middle_of_adding_a_batch_leaves_an_index_that_opens(model, trained, tmp_path):
    clips = copy_clips(trained[1], tmp_path / "videos", 3)
    record = search.VideoSearch(model, tmp_path / "mine.index").model_record()
    with video_index.IndexWriter(tmp_path / "mine.index", record, 32, "fp32") as writer:
        stats = [(clip.stat().st_size, clip.stat().st_mtime_ns) for clip in clips]
        writer.add([str(clips[0])], stats[:1], torch.nn.functional.normalize(torch.randn(1, 32), dim=1))
        writer.norms.append(1.0)  # what a Ctrl-C between two columns of the next `add` leaves
        writer.paths.append(str(clips[1]))
        writer.commit()
    index = video_index.VideoIndex(tmp_path / "mine.index")
    assert len(index.embeddings) == 1 and index.video_path(0) == str(clips[0])


def test_an_index_named_like_a_glob_pattern_removes_its_own_leftover_files(model, tmp_path):
    index = tmp_path / "v[1].index"
    record = search.VideoSearch(model, index).model_record()
    with video_index.IndexWriter(index, record, 32, "fp32") as writer:
        leftover = index.with_name(f"{index.name}.0123abcd.f16")  # what a kill during dead-row removal leaves
        leftover.touch()
        writer._remove_other_embeddings_files()
        assert not leftover.exists() and writer.embeddings_file.exists()


def test_an_openai_model_name_is_recorded_as_a_name(monkeypatch, trained):
    loaded, real_loader = [], evaluate.load_model_from_checkpoint
    monkeypatch.setattr(evaluate, "load_model_from_checkpoint",
                        lambda checkpoint, device, clip: (loaded.append(clip) or real_loader(checkpoint, device)))
    model = search.load_model(trained[0], clip="ViT-B/32")
    assert model.source["clip"] == "ViT-B/32" and loaded == ["ViT-B/32"]
    assert search.load_model(trained[0], clip="weights.pt").source["clip"] == str(Path("weights.pt").absolute())


# -- off the happy path: crafted indexes, names no codec expects, full disks, pages that replace files ---------

def _rewrite_header(index, **changes):
    """Change fields of an index's JSON header in place, as a crafted or damaged index would have them."""
    with np.load(index, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    header = json.loads(arrays["header"].tobytes().decode("utf-8"))
    arrays["header"] = np.frombuffer(json.dumps({**header, **changes}).encode("utf-8"), np.uint8)
    with open(index, "wb") as handle:
        np.savez(handle, **arrays)


def test_a_crafted_header_never_points_the_index_at_another_file(model, trained, tmp_path, capsys):
    folder = tmp_path / "videos"
    clips = copy_clips(trained[1], folder, 2)
    index = tmp_path / "index" / "my.index"
    search.VideoSearch(model, index, num_workers=0, show_progress=False).update([folder])
    victim = tmp_path / "victims" / "b.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"precious\n" * 1600)  # 14,400 bytes
    clips[1].unlink()  # the update would drop its row: a new embeddings file, the old one deleted
    checkpoint = str(trained[0])
    for named in (str(victim), "../victims/b.txt", "my.index.0123abcd.f16/../../victims/b.txt",
                  "other.index.0123abcd.f16"):
        _rewrite_header(index, embeddings_file=named)
        line = one_line_error(capsys, ["index", str(folder), "--checkpoint", checkpoint, "--index", str(index),
                                       "--num-workers", "0"])
        assert "not one of this index's own files" in line and repr(named) in line, line
        line = one_line_error(capsys, ["query", "a red circle", "--index", str(index)])
        assert "not one of this index's own files" in line
        assert victim.read_bytes() == b"precious\n" * 1600  # neither truncated nor deleted
    # The index's own embeddings file as a link to a file elsewhere is refused too.
    own = index.with_name("my.index.0123abcd.f16")
    own.symlink_to(victim)
    _rewrite_header(index, embeddings_file=own.name)
    line = one_line_error(capsys, ["index", str(folder), "--checkpoint", checkpoint, "--index", str(index),
                                   "--num-workers", "0"])
    assert "symbolic link" in line and victim.read_bytes() == b"precious\n" * 1600


@pytest.mark.parametrize("workers", [0, 1], ids=["in the main process", "in a DataLoader worker"])
def test_video_names_that_are_not_utf8_are_indexed_listed_and_printed(model, trained, tmp_path, capsys, workers):
    """cv2.VideoCapture crashes the process on a name that is not valid UTF-8: such a video is read all the same,
    and every output prints its name with \\xNN escapes."""
    folder = tmp_path / "videos"
    [plain, other] = copy_clips(trained[1], folder, 2)
    odd = Path(os.fsdecode(bytes(folder) + b"/caf\xe9.mp4"))  # Latin-1 bytes, not UTF-8
    other.rename(odd)
    broken = Path(os.fsdecode(bytes(folder) + b"/bro\xffken.mp4"))
    broken.write_bytes(b"\x00not a video" * 100)
    index = tmp_path / "x.index"
    counts = search.main(["index", str(folder), "--checkpoint", str(trained[0]), "--index", str(index),
                          "--num-workers", str(workers)])
    assert counts["videos"] == 2 and counts["unreadable"] == 1
    videos = search.VideoSearch(model, index)
    assert sorted(path for path, _ in videos.search_text("a red circle", k=5)) == sorted([str(plain), str(odd)])
    assert videos.embed_videos([odd]).shape == (1, 32)
    listed = (tmp_path / "x.index.skipped.txt").read_bytes().decode("utf-8")  # UTF-8 throughout
    assert f"{folder}/bro\\xffken.mp4\t" in listed
    capsys.readouterr()
    search.main(["query", "a red circle", "--index", str(index)])
    printed = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[2] for line in printed) == sorted([str(plain), f"{folder}/caf\\xe9.mp4"])
    hits = query_json(capsys, "a red circle", "--index", str(index))
    assert sorted(hit["video"] for hit in hits) == sorted([str(plain), f"{folder}/caf\\xe9.mp4"])
    page = tmp_path / "hits.html"
    query_json(capsys, "a red circle", "--index", str(index), "--html", str(page))
    assert any("caf\\xe9.mp4" in item["text"] for item in parse_page(page).items)


def test_a_full_disk_while_indexing_is_one_line_and_a_rerun_completes(tmp_path):
    """RLIMIT_FSIZE (ulimit -f, SIGXFSZ ignored) fails every write past its size as a full disk does (EFBIG):
    here the embeddings file, 2 KB a row (a CLIP of 1,024-d embeddings), reaches it at the fourth video."""
    torch.manual_seed(0)
    clip = tmp_path / "wide_clip.pt"
    torch.save(CLIP(CLIPConfig(embed_dim=1024, image_resolution=32, vision_layers=1, vision_width=64,
                               vision_patch_size=16, transformer_width=64, transformer_heads=1,
                               transformer_layers=1)).state_dict(), clip)
    place_videos(write_tiny_video(tmp_path), tmp_path / "videos", [f"v{i}.mp4" for i in range(6)])
    index = tmp_path / "x.index"
    argv = [sys.executable, "search.py", "index", str(tmp_path / "videos"), "--clip", str(clip), "--num-frames", "2",
            "--index", str(index), "--num-workers", "0", "--batch-size", "2"]

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    completed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    [line] = message_lines(completed.stderr)
    assert "could not write" in line and ".f16: File too large" in line and "keeps what its last commit holds" in line
    assert len(video_index.VideoIndex(index)) < 6  # it opens, with what its last commit holds
    completed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0 and len(video_index.VideoIndex(index)) == 6, completed.stderr


def test_html_replaces_only_a_page_it_wrote_and_is_checked_before_any_work(test_index, tmp_path, capsys,
                                                                           monkeypatch):
    index, _ = test_index
    own_files = [index, *index.parent.glob(f"{index.name}.*.f16"), index.parent / f"{index.name}.lock"]
    before = {path: path.read_bytes() for path in own_files}
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (tmp_path / "pages").mkdir()
    monkeypatch.setattr(search, "load_recorded_model", lambda *args: pytest.fail("the model was loaded first"))
    for page, says in [(path, "one of the files of the index") for path in own_files] + [
            (tmp_path / "pages", "is a folder"), (notes, "not a page that search.py query wrote"),
            (tmp_path / "nowhere" / "hits.html", "does not exist")]:
        line = one_line_error(capsys, ["query", "a red circle", "--index", str(index), "--html", str(page)])
        assert says in line and f"--html {page}" in line, line
    assert {path: path.read_bytes() for path in own_files} == before and notes.read_text() == "my notes\n"
    monkeypatch.undo()
    page = tmp_path / "hits.html"
    query_json(capsys, "a red circle", "--index", str(index), "-k", "2", "--html", str(page))
    query_json(capsys, "a blue square", "--index", str(index), "-k", "3", "--html", str(page))  # its own page
    assert search.PAGE_MARKER in page.read_text() and len(parse_page(page).items) == 3


def test_a_named_pipe_among_the_videos_is_listed_as_unreadable_and_never_waited_for(trained, tmp_path):
    folder = tmp_path / "videos"
    copy_clips(trained[1], folder, 2)
    os.mkfifo(folder / "pipe.mp4")  # opening it would wait for a writer for ever
    index = tmp_path / "x.index"
    code = (f"import search; from utils import cli; "
            f"cli.run_command(search.main, ['index', {str(folder)!r}, '--checkpoint', "
            f"{str(trained[0])!r}, '--index', {str(index)!r}, '--num-workers', '0'], 'search.py')")
    running = start_python(code, REPO)
    try:
        out, err = running.communicate(timeout=120)
    finally:
        running.kill()
    assert running.returncode == 0, err
    assert "2 videos; 2 new, 0 changed, 0 gone, 0 unchanged, 1 unreadable" in out and "1 video could not be read" in err
    [listed] = [line for line in (tmp_path / "x.index.skipped.txt").read_text().splitlines() if line[0] != "#"]
    assert listed.startswith(f"{folder / 'pipe.mp4'}\t") and "not a regular file" in listed


def test_a_backbone_with_a_smaller_vocabulary_than_the_tokenizer_is_refused_when_built(trained, small_setup,
                                                                                       tmp_path, capsys,
                                                                                       monkeypatch):
    tiny = REPO / "tests" / "fixtures" / "tiny_clip_openai_jit.pt"  # a vocabulary of 1,000 ids
    folder = tmp_path / "videos"
    copy_clips(trained[1], folder, 1)
    line = one_line_error(capsys, ["index", str(folder), "--clip", str(tiny), "--index", str(tmp_path / "x.index")])
    assert str(tiny) in line and "1,000 ids" in line and "49,407" in line and "49,408" in line
    assert not (tmp_path / "x.index").exists()
    with pytest.raises(vop.VocabularyError, match="tiny_clip_openai_jit.pt: its token embedding holds 1,000 ids"):
        train.train(small_config(small_setup, tmp_path / "run", clip=str(tiny)))
    assert not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr(vop.VoP, "tokenize", fake_tokenize)  # a tokenizer of the tiny CLIP's own ids: accepted
    assert search.load_model(clip=tiny, num_frames=4).clip.token_embedding.num_embeddings == 1000


def test_a_very_wide_clip_among_the_hits_gets_a_thumbnail_of_bounded_width(trained, tmp_path):
    frames = np.zeros((8, 8, 8000, 3), np.uint8)
    frames[:, :, 3984:4016] = 255  # a white bar in the middle
    wide = video_io.write_video(tmp_path / "wide.mp4", frames, 10)
    tall = video_io.write_video(tmp_path / "tall.mp4", frames.transpose(0, 2, 1, 3).copy(), 10)
    clip = copy_clips(trained[1], tmp_path, 1)[0]
    height, width = data.read_frames(clip, 1).shape[1:3]
    hits = [{"rank": rank, "score": 0.5, "video": str(path)} for rank, path in enumerate((wide, clip, tall), 1)]
    search.write_page(tmp_path / "hits.html", "wide", hits)
    [wide_item, clip_item, tall_item] = parse_page(tmp_path / "hits.html").items
    clip_width = round(width * search.THUMBNAIL_HEIGHT / height)  # an ordinary clip keeps its aspect
    for item, width in ((wide_item, 4 * search.THUMBNAIL_HEIGHT), (clip_item, clip_width), (tall_item, 24)):
        assert len(item["images"]) == 4
        for image in item["images"]:
            with Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))) as thumbnail:
                assert thumbnail.size == (width, search.THUMBNAIL_HEIGHT) == (int(image["width"]),
                                                                              int(image["height"]))
                if item is wide_item:  # the middle of the frame, where the bar is, is kept
                    assert np.asarray(thumbnail.convert("L"))[:, width // 2].mean() > 200


def _named_semaphores(pid: int) -> set:
    """The named POSIX semaphores (/dev/shm/sem.NAME) process `pid` has open. /proc/PID/maps shows each under
    the temporary name glibc created it with, since removed, so they are found by their inode."""
    inodes = {int(line.split()[4]) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
              if "/dev/shm/sem." in line}
    return {entry.name for entry in os.scandir("/dev/shm") if entry.inode() in inodes}


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or not Path("/proc/self/maps").exists(),
                    reason="named semaphores in /dev/shm, found through /proc")
def test_killing_the_whole_index_process_group_leaves_no_semaphores(trained, tmp_path):
    folder = tmp_path / "videos"
    copy_clips(trained[1], folder, 8)
    # Videos that take a second each to read, in the workers too (which import the class from its module).
    (tmp_path / "slow_videos.py").write_text("import time, data\n\nclass SlowVideoFiles(data.VideoFiles):\n"
                                             "    def __getitem__(self, i):\n        time.sleep(1)\n"
                                             "        return super().__getitem__(i)\n")
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(tmp_path)!r}]\n"
            f"import data, search, slow_videos; from utils import cli; data.VideoFiles = slow_videos.SlowVideoFiles\n"
            # A process that has decoded a video starts its workers from a fork server (data.worker_start_method),
            # whose queues' semaphores are named files until they are released; forked workers' are unlinked at once.
            f"data.read_frames({str(sorted(folder.iterdir())[0])!r}, 1)\n"
            f"cli.run_command(search.main, ['index', {str(folder)!r}, '--checkpoint', {str(trained[0])!r}, "
            f"'--index', {str(tmp_path / 'x.index')!r}, '--num-workers', '2', '--batch-size', '1'], 'search.py')")
    running = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)  # a process group of its own
    try:
        deadline, semaphores = time.time() + 120, set()
        while len(semaphores) < 10:  # the DataLoader's queues and events: 14 with 2 workers
            assert running.poll() is None and time.time() < deadline, running.communicate()[1][-2000:]
            time.sleep(0.2)
            semaphores = _named_semaphores(running.pid)
        time.sleep(1)  # its workers at work
    finally:
        os.killpg(running.pid, signal.SIGKILL)  # the whole group: the program, its fork server and its workers
        running.communicate()
    deadline = time.time() + 20
    while any(os.path.exists(f"/dev/shm/{name}") for name in semaphores) and time.time() < deadline:
        time.sleep(0.2)
    left = [name for name in semaphores if os.path.exists(f"/dev/shm/{name}")]
    for name in left:  # so that a failure here does not fill /dev/shm
        os.unlink(f"/dev/shm/{name}")
    assert not left and all(name.startswith("sem.mp-") for name in semaphores)


def test_the_page_can_leave_every_folder_out_and_help_says_what_it_shows(test_index, trained, tmp_path, capsys):
    index, checkpoint = test_index
    query = str(sorted((trained[1] / "test").glob("*.mp4"))[0])
    for folders, page in (([], tmp_path / "full.html"), (["--no-html-folders"], tmp_path / "names.html")):
        query_json(capsys, "--video", query, "--index", str(index), "-k", "3", "--html", str(page), *folders)
    full, names = (tmp_path / "full.html").read_text(), (tmp_path / "names.html").read_text()
    for folder in (index.parent, checkpoint.parent, trained[1] / "test"):
        assert str(folder) in full and str(folder) not in names
    items = parse_page(tmp_path / "names.html").items
    assert len(items) == 3 and all(Path(query).name not in item["text"] for item in items)
    assert Path(query).name in names and checkpoint.name in names and index.name in names
    capsys.readouterr()
    with pytest.raises(SystemExit):
        search.main(["query", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "absolute paths" in shown and "--no-html-folders" in shown
