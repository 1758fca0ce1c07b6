"""evaluate.py: tie-aware ranks on hand-computed similarity matrices, multi-caption mapping, chunking, DSL,
reversal pairs, and one end-to-end run of a tiny VoP on the synthetic world (plus checkpoint reload).

Most tests write a similarity matrix S (queries x videos) directly: with text embeddings S and video
embeddings the identity, text @ video.T is exactly S.
"""
import math

import pytest
import torch
from PIL import Image

import data
import demo
import evaluate as ev
from vop import VoP

FIXTURES_CLIP = ev.Path(__file__).parent / "fixtures" / "tiny_clip_openai_jit.pt"
SOT, EOT = 998, 999  # the tiny fixture CLIP's vocabulary of 1,000


def embeddings_for(similarities) -> tuple[torch.Tensor, torch.Tensor]:
    """(text (T, V), video (V, V)) whose products are exactly `similarities` (T, V)."""
    similarities = torch.as_tensor(similarities, dtype=torch.float64)
    return similarities, torch.eye(similarities.shape[1], dtype=torch.float64)


# MSVD-like: 3 videos, 7 captions (3 + 2 + 2). Rows are captions, columns videos.
MSVD_INDEX = [0, 0, 0, 1, 1, 2, 2]
MSVD_SIMILARITIES = [
    [0.9, 0.1, 0.2],  # c0 -> v0: best                                    rank 1
    [0.3, 0.5, 0.1],  # c1 -> v0: v1 above                                rank 2
    [0.2, 0.2, 0.6],  # c2 -> v0: v2 above, v1 tied                       rank 2.5
    [0.1, 0.7, 0.0],  # c3 -> v1: best                                    rank 1
    [0.4, 0.3, 0.8],  # c4 -> v1: v0 and v2 above                         rank 3
    [0.0, 0.1, 0.5],  # c5 -> v2: best                                    rank 1
    [0.6, 0.7, 0.6],  # c6 -> v2: v1 above, v0 tied                       rank 2.5
]


def test_perfect_retrieval():
    text, video = embeddings_for(torch.eye(5))
    results = ev.metrics_from_embeddings(text, video, list(range(5)))
    for direction in ("t2v", "v2t"):
        assert results[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.0}
    assert results["dsl"] is False and "pairs" not in results


def test_known_rank():
    # Caption 0's video (index 0, 0.5) is beaten by three others (0.9, 0.8, 0.7): rank 4, in R@5, not R@1.
    text, video = embeddings_for([[0.5, 0.9, 0.1, 0.8, 0.7, 0.0]])
    greater, tied = ev.text_to_video_counts(text, video, [0])
    assert greater.tolist() == [3] and tied.tolist() == [0]
    assert ev.text_to_video_ranks(text, video, [0]).tolist() == [4.0]
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == 0 and metrics["R@5"] == 100 and metrics["MdR"] == 4 and metrics["MnR"] == 4


def test_two_identical_candidates_give_half_a_hit():
    text, video = embeddings_for([[0.5, 0.5]])
    greater, tied = ev.text_to_video_counts(text, video, [0])
    assert greater.tolist() == [0] and tied.tolist() == [1]
    assert ev.text_to_video_ranks(text, video, [0]).tolist() == [1.5]
    assert ev.retrieval_metrics(greater, tied)["R@1"] == 50.0
    # Identical video embeddings (an order-blind model on a reversal pair): each caption gets R@1 = 50.
    text = torch.nn.functional.normalize(torch.randn(2, 8, dtype=torch.float64), dim=1)
    video = torch.randn(1, 8, dtype=torch.float64).expand(2, 8)
    assert ev.retrieval_metrics(*ev.text_to_video_counts(text, video, [0, 1]))["R@1"] == 50.0


def test_recall_is_the_exact_probability_under_ties():
    # Three above and three tied: the correct item is equally likely at ranks 4, 5, 6, 7.
    greater, tied = torch.tensor([3]), torch.tensor([3])
    assert ev.recall_probability(greater, tied, 5).item() == 0.5
    assert ev.recall_probability(greater, tied, 3).item() == 0.0
    assert ev.recall_probability(greater, tied, 7).item() == 1.0
    assert ev.expected_ranks(greater, tied).item() == 5.5


def test_retrieval_metrics_values():
    greater = torch.tensor([0, 1, 4, 9, 0])
    tied = torch.tensor([0, 0, 1, 0, 3])
    # ranks 1, 2, 5.5, 10, 2.5; R@1 hits 1, 0, 0, 0, 1/4; R@5 hits 1, 1, 1/2, 0, 1; R@10 all.
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == pytest.approx(25.0)
    assert metrics["R@5"] == pytest.approx(70.0)
    assert metrics["R@10"] == pytest.approx(100.0)
    assert metrics["MdR"] == 2.5
    assert metrics["MnR"] == pytest.approx(4.2)
    # An even count: the median is the mean of the two middle ranks (1, 2, 3, 10 -> 2.5).
    assert ev.retrieval_metrics(torch.tensor([0, 1, 2, 9]), torch.zeros(4, dtype=torch.long))["MdR"] == 2.5
    with pytest.raises(ValueError, match="non-empty"):
        ev.retrieval_metrics(torch.tensor([]), torch.tensor([]))


def test_multi_caption_text_to_video():
    text, video = embeddings_for(MSVD_SIMILARITIES)
    greater, tied = ev.text_to_video_counts(text, video, MSVD_INDEX)
    assert greater.tolist() == [0, 1, 1, 0, 2, 0, 1]
    assert tied.tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert ev.text_to_video_ranks(text, video, MSVD_INDEX).tolist() == [1, 2, 2.5, 1, 3, 1, 2.5]
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == pytest.approx(100 * 3 / 7)
    assert metrics["R@5"] == 100 and metrics["MdR"] == 2.0 and metrics["MnR"] == pytest.approx(13 / 7)


def test_multi_caption_video_to_text():
    # v0: own captions score 0.9, 0.3, 0.2 -> best 0.9; others' (0.1, 0.4, 0.0, 0.6) all below: rank 1.
    # v1: own 0.7, 0.3 -> 0.7; others' 0.1, 0.5, 0.2, 0.1, 0.7: one tie (c6): rank 1.5.
    # v2: own 0.5, 0.6 -> 0.6; others' 0.2, 0.1, 0.6, 0.0, 0.8: c4 above, c2 tied: rank 2.5.
    text, video = embeddings_for(MSVD_SIMILARITIES)
    greater, tied = ev.video_to_text_counts(text, video, MSVD_INDEX)
    assert greater.tolist() == [0, 0, 1] and tied.tolist() == [0, 1, 1]
    assert ev.video_to_text_ranks(text, video, MSVD_INDEX).tolist() == [1, 1.5, 2.5]
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == pytest.approx(50.0)
    assert metrics["MdR"] == 1.5 and metrics["MnR"] == pytest.approx(5 / 3)


def test_captions_of_videos_table():
    table = ev.captions_of_videos(torch.tensor([0, 0, 1, 0]), 2)
    assert table.tolist() == [[0, 1, 3], [2, -1, -1]]
    assert ev.captions_of_videos(torch.tensor(MSVD_INDEX), 3).tolist() == [[0, 1, 2], [3, 4, -1], [5, 6, -1]]


def test_video_without_caption_is_an_error():
    text, video = embeddings_for([[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no caption"):
        ev.video_to_text_counts(text, video, [0])
    with pytest.raises(ValueError, match="caption_video_index must lie"):
        ev.text_to_video_counts(text, video, [3])
    with pytest.raises(ValueError, match="NaN"):
        ev.text_to_video_counts(text * math.nan, video, [0])


def random_retrieval_problem(num_videos=11, seed=0):
    """Unit embeddings with 1-3 captions per video and some exact duplicates (so there are ties)."""
    generator = torch.Generator().manual_seed(seed)
    video = torch.nn.functional.normalize(torch.randn(num_videos, 16, generator=generator), dim=1)
    video[3] = video[4]  # a duplicated video: ties in both directions
    caption_video_index = torch.randint(0, num_videos, (30,), generator=generator)
    caption_video_index[:num_videos] = torch.arange(num_videos)  # every video has a caption
    text = torch.nn.functional.normalize(video[caption_video_index] + 0.8 * torch.randn(30, 16, generator=generator),
                                         dim=1)
    text[7] = text[8]
    return text, video, caption_video_index.tolist()


@pytest.mark.parametrize("dsl", [False, True])
def test_chunked_equals_unchunked(monkeypatch, dsl):
    text, video, index = random_retrieval_problem()
    whole = [counts(text, video, index, dsl=dsl, chunk_size=10**6)
             for counts in (ev.text_to_video_counts, ev.video_to_text_counts)]
    # Record every chunk the scorer builds: none may have more than chunk_size rows.
    seen_rows = []
    original = ev.similarity_chunks

    def recording(*args, **kwargs):
        for start, scores in original(*args, **kwargs):
            seen_rows.append(len(scores))
            yield start, scores

    monkeypatch.setattr(ev, "similarity_chunks", recording)
    for chunk_size in (1, 3, 7):
        seen_rows.clear()
        chunked = [counts(text, video, index, dsl=dsl, chunk_size=chunk_size)
                   for counts in (ev.text_to_video_counts, ev.video_to_text_counts)]
        assert max(seen_rows) <= chunk_size and sum(seen_rows) == len(text) + len(video)
        for (greater, tied), (whole_greater, whole_tied) in zip(chunked, whole):
            assert torch.equal(greater, whole_greater) and torch.equal(tied, whole_tied)
    assert whole[0][1].sum() > 0  # the duplicates did produce ties


def test_default_chunk_size_bounds_the_chunk_not_the_queries(monkeypatch):
    monkeypatch.setattr(ev, "SCORES_PER_CHUNK", 40)  # 40 scores / 11 videos -> chunks of 3 captions
    text, video, index = random_retrieval_problem()
    rows = [len(scores) for _, scores in ev.similarity_chunks(text, video)]
    assert max(rows) == 3 and sum(rows) == len(text)


def test_dsl_rescues_a_query_lost_to_a_hub_video():
    # Video 0 is a "hub": both captions like it (0.9). Caption 0's own video 1 scores 0.8 and loses plainly.
    # DSL divides the hub's score between the two captions (softmax over captions: 1/2 each -> 0.45), while
    # video 1 is caption 0's alone (softmax ~ 1 -> 0.8): caption 0 now finds its video.
    text, video = embeddings_for([[0.9, 0.8], [0.9, 0.1]])
    index = [1, 0]
    assert ev.text_to_video_ranks(text, video, index).tolist() == [2, 1]
    assert ev.text_to_video_ranks(text, video, index, dsl=True).tolist() == [1, 1]
    results = ev.metrics_from_embeddings(text, video, index, dsl=True)
    assert results["t2v"]["R@1"] == 100 and results["dsl"] is True
    assert ev.DSL_LABEL in ev.format_results(results, "toy")


def full_matrix_dsl_ranks(queries, candidates, is_correct, temperature):
    """Independent reference: the whole matrix, softmax over queries, rank by sorting (no ties in use)."""
    sims = queries @ candidates.T  # (Q, N)
    rescored = sims * torch.softmax(sims * temperature, dim=0)  # (Q, N)
    best_correct = torch.where(is_correct, rescored, torch.full_like(rescored, -torch.inf)).max(dim=1).values
    competitors = torch.where(is_correct, torch.full_like(rescored, -torch.inf), rescored)
    return (competitors > best_correct[:, None]).sum(dim=1).double() + 1  # (Q,)


@pytest.mark.parametrize("temperature", [100.0, 10.0])
def test_chunked_dsl_equals_full_matrix_dsl(temperature):
    generator = torch.Generator().manual_seed(1)
    video = torch.nn.functional.normalize(torch.randn(9, 16, generator=generator, dtype=torch.float64), dim=1)
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 3, 3, 5])
    text = torch.nn.functional.normalize(video[index] + 0.9 * torch.randn(13, 16, generator=generator,
                                                                         dtype=torch.float64), dim=1)
    t2v_correct = torch.arange(9)[None, :] == index[:, None]  # (T, V)
    expected_t2v = full_matrix_dsl_ranks(text, video, t2v_correct, temperature)
    expected_v2t = full_matrix_dsl_ranks(video, text, t2v_correct.T, temperature)
    plain_t2v = full_matrix_dsl_ranks(text, video, t2v_correct, 0.0)  # softmax of a constant: plain order
    assert not torch.equal(expected_t2v, plain_t2v)  # DSL does change this ranking
    for chunk_size in (2, 5, None):
        assert torch.equal(ev.text_to_video_ranks(text, video, index, dsl=True, temperature=temperature,
                                                  chunk_size=chunk_size), expected_t2v)
        assert torch.equal(ev.video_to_text_ranks(text, video, index, dsl=True, temperature=temperature,
                                                  chunk_size=chunk_size), expected_v2t)


def test_reversal_pair_accuracy():
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(6, 8, generator=generator)
    twins = torch.randn(3, 8, generator=generator).repeat_interleave(2, dim=0)  # order-blind: twins identical
    assert ev.reversal_pair_accuracy(text, twins) == 50.0
    assert ev.reversal_pair_accuracy(torch.eye(6), torch.eye(6)) == 100.0
    # Caption 0 prefers the wrong twin, caption 1 its own, captions 2 and 3 tie: (0 + 1 + 1/2 + 1/2) / 4.
    text = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert ev.reversal_pair_accuracy(text, video) == 50.0
    assert ev.reversal_pair_accuracy(torch.eye(2)[[1, 0]], torch.eye(2)) == 0.0
    with pytest.raises(ValueError, match="even"):
        ev.reversal_pair_accuracy(torch.eye(3), torch.eye(3))


def test_format_results_layout():
    metrics = {"R@1": 40.1, "R@5": 65.7, "R@10": 77.7, "MdR": 2.0, "MnR": 16.9}
    table = ev.format_results({"t2v": metrics, "v2t": metrics, "dsl": False, "pairs": 97.5}, "MSR-VTT")
    lines = table.splitlines()
    assert lines[0].split() == ["MSR-VTT", "R@1", "R@5", "R@10", "MdR", "MnR"]
    assert lines[1].split() == ["text", "->", "video", "40.1", "65.7", "77.7", "2.0", "16.9"]
    assert lines[2].startswith("video -> text")
    assert lines[3] == "reversal pairs: 97.5% (chance 50%)"
    assert ev.DSL_LABEL not in table


def test_config_and_parser():
    config = ev.parse_config(["--checkpoint", "run/last.pt", "--dsl", "--num-frames", "8", "--batch-size", "4"])
    assert config.checkpoint == "run/last.pt" and config.dsl and config.num_frames == 8 and config.batch_size == 4
    assert config.data is None and config.split == "test" and not config.zero_shot
    assert ev.parse_config([]) == ev.EvalConfig()
    assert ev.resolve_precision("auto", torch.device("cpu")) is None
    assert ev.resolve_precision("auto", torch.device("cuda")) is torch.float16
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", "x.pt", "--zero-shot"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_model_from_checkpoint(tmp_path / "nope.pt")
    torch.save({"trainable": {}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not a VoP checkpoint"):
        ev.load_model_from_checkpoint(tmp_path / "odd.pt")
    torch.save({"config": {"clip": None}, "vop_settings": {}, "trainable": {}}, tmp_path / "no_clip.pt")
    with pytest.raises(ValueError, match="which CLIP"):
        ev.load_model_from_checkpoint(tmp_path / "no_clip.pt")


# ----------------------------------------------------------------------------------------------------------
# End to end on the tiny CLIP and a tiny synthetic world


def fake_tokenize(self, captions):
    """The tiny CLIP's vocabulary is not CLIP's BPE: map each word to a stable id in 1..997 instead."""
    tokens = torch.zeros(len(captions), self.text_context_length, dtype=torch.long)  # (B, 69)
    for row, caption in enumerate(captions):
        ids = [SOT] + [1 + sum(map(ord, word)) % 997 for word in caption.split()] + [EOT]
        tokens[row, :len(ids)] = torch.tensor(ids)
    return tokens


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    demo.make_synthetic_world(root, num_videos=8, num_test_pairs=3, num_stills=4, frame_size=32, clip_frames=8)
    return root


def test_end_to_end_and_checkpoint_reload(tiny_clip, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(VoP, "tokenize", fake_tokenize)
    torch.manual_seed(0)
    model = VoP(tiny_clip, num_frames=4, fn_layers=2)
    with torch.no_grad():  # make the prompts unlike any fresh initialisation, so reloading is really tested
        for parameter in model.trainable_state_dict().values():
            parameter.add_(torch.randn_like(parameter))
    model.train()
    dataset = data.build_dataset("synthetic", tiny_world, "test", num_frames=4, image_size=64)

    results = ev.evaluate(model, dataset, batch_size=4)
    assert model.training  # evaluate restores the caller's mode
    assert set(results) == {"t2v", "v2t", "dsl", "pairs"}
    for direction in ("t2v", "v2t"):
        metrics = results[direction]
        assert set(metrics) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 100
        assert 1 <= metrics["MdR"] <= 6 and 1 <= metrics["MnR"] <= 6
    assert 0 <= results["pairs"] <= 100
    assert "reversal pairs" in ev.format_results(results, "synthetic test")

    text_embeddings, video_embeddings = ev.embed(model, dataset, batch_size=4)
    assert text_embeddings.shape == (6, 64) and video_embeddings.shape == (6, 64)
    assert text_embeddings.dtype == torch.float32
    assert torch.allclose(video_embeddings.norm(dim=1), torch.ones(6), atol=1e-5)

    checkpoint_path = tmp_path / "last.pt"
    torch.save({"config": {"clip": str(FIXTURES_CLIP), "data": "synthetic", "data_root": str(tiny_world),
                           "num_frames": 4},
                "vop_settings": model.settings, "trainable": model.trainable_state_dict(), "step": 3}, checkpoint_path)
    reloaded, checkpoint = ev.load_model_from_checkpoint(checkpoint_path)
    assert checkpoint["step"] == 3 and not reloaded.training
    reloaded_text, reloaded_video = ev.embed(reloaded, dataset, batch_size=4)
    assert torch.allclose(reloaded_text, text_embeddings, atol=1e-6)
    assert torch.allclose(reloaded_video, video_embeddings, atol=1e-6)

    # The command line: the dataset comes from the checkpoint's config; the examples picture has its size.
    picture = tmp_path / "examples.png"
    cli_results = ev.main(["--checkpoint", str(checkpoint_path), "--device", "cpu", "--num-workers", "0",
                           "--batch-size", "4", "--examples", str(picture)])
    assert cli_results["t2v"] == pytest.approx(results["t2v"])
    num_queries, top_k, frames, thumb, border, gap, caption = 4, 5, 4, 64, 3, 8, 14
    with Image.open(picture) as image:
        assert image.size == (gap + top_k * (frames * thumb + 2 * border + gap),
                              gap + num_queries * (caption + thumb + 2 * border + gap))


def test_examples_marks_the_correct_video_green(tiny_world, tmp_path):
    dataset = data.build_dataset("synthetic", tiny_world, "test", num_frames=4, image_size=64)
    video = torch.eye(6)
    image = ev.draw_examples(dataset, torch.eye(6), video, tmp_path / "x.png", num_queries=1, top_k=2,
                             frames_per_video=2, thumb_size=16)
    assert image.size == (8 + 2 * (2 * 16 + 6 + 8), 8 + 1 * (14 + 16 + 6 + 8))
    # Query 0 retrieves video 0 first (correct: green frame) then another (grey frame).
    assert image.getpixel((8, 8 + 14)) == (40, 200, 60)
    assert image.getpixel((8 + 2 * 16 + 6 + 8, 8 + 14)) == (170, 170, 170)


def test_zero_shot_command_line(tiny_world, monkeypatch, capsys):
    monkeypatch.setattr(VoP, "tokenize", fake_tokenize)
    results = ev.main(["--zero-shot", "--clip", str(FIXTURES_CLIP), "--data", "synthetic", "--data-root",
                       str(tiny_world), "--num-frames", "4", "--device", "cpu", "--num-workers", "0", "--dsl"])
    assert results["dsl"] is True and 0 <= results["t2v"]["R@1"] <= 100
    # (Not exactly 50: a reversed clip's sampled frames are other frames, compressed differently.)
    assert 0 <= results["pairs"] <= 100
    printed = capsys.readouterr().out
    assert ev.DSL_LABEL in printed and "% (chance 50%)" in printed
    with pytest.raises(SystemExit):
        ev.main(["--zero-shot", "--clip", str(FIXTURES_CLIP)])  # no dataset to evaluate on
