"""evaluate.py: tie-aware ranks on hand-computed similarity matrices in both directions (several captions per
video, ties), the ranking against independent references (X-Pool's padded max over captions, ranks read off a
sort), the chunked counts against the dense ones, DSL, reversal pairs, and one end-to-end run of a tiny VoP on
the synthetic world (plus checkpoint reload).

Most tests write a similarity matrix S (captions x videos) directly: with text embeddings S and video
embeddings the identity, text @ video.T is exactly S.
"""
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from machinery import checkpoints
from utils import cli
import data
import demo
import evaluate as ev
from machinery import figures
from helpers import fake_tokenize
from vop import VoP, VoPConfig

FIXTURES_CLIP = Path(__file__).parent / "fixtures" / "tiny_clip_openai_jit.pt"


def t2v_ranks(*args, **kwargs) -> torch.Tensor:
    return ev.expected_ranks(*ev.text_to_video_counts(*args, **kwargs))


def v2t_ranks(*args, **kwargs) -> torch.Tensor:
    return ev.expected_ranks(*ev.video_to_text_counts(*args, **kwargs))


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


@pytest.mark.method
def test_perfect_retrieval():
    text, video = embeddings_for(torch.eye(5))
    results = ev.metrics_from_embeddings(text, video, list(range(5)))
    for direction in ("t2v", "v2t"):
        assert results[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.0}
    assert results["dsl"] is False and "pairs" not in results


@pytest.mark.method
def test_known_rank():
    # Caption 0's video (index 0, 0.5) is beaten by three others (0.9, 0.8, 0.7): rank 4, in R@5, not R@1.
    text, video = embeddings_for([[0.5, 0.9, 0.1, 0.8, 0.7, 0.0]])
    greater, tied = ev.text_to_video_counts(text, video, [0])
    assert greater.tolist() == [3] and tied.tolist() == [0]
    assert t2v_ranks(text, video, [0]).tolist() == [4.0]
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == 0 and metrics["R@5"] == 100 and metrics["MdR"] == 4 and metrics["MnR"] == 4


@pytest.mark.method
def test_two_identical_candidates_give_half_a_hit():
    text, video = embeddings_for([[0.5, 0.5]])
    greater, tied = ev.text_to_video_counts(text, video, [0])
    assert greater.tolist() == [0] and tied.tolist() == [1]
    assert t2v_ranks(text, video, [0]).tolist() == [1.5]
    assert ev.retrieval_metrics(greater, tied)["R@1"] == 50.0
    # Identical video embeddings (an order-blind model on a reversal pair): each caption gets R@1 = 50.
    text = torch.nn.functional.normalize(torch.randn(2, 8, dtype=torch.float64), dim=1)
    video = torch.randn(1, 8, dtype=torch.float64).expand(2, 8)
    assert ev.retrieval_metrics(*ev.text_to_video_counts(text, video, [0, 1]))["R@1"] == 50.0


@pytest.mark.method
def test_recall_is_the_exact_probability_under_ties():
    # Three above and three tied: the correct item is equally likely at ranks 4, 5, 6, 7.
    greater, tied = torch.tensor([3]), torch.tensor([3])
    assert ev.recall_probability(greater, tied, 5).item() == 0.5
    assert ev.recall_probability(greater, tied, 3).item() == 0.0
    assert ev.recall_probability(greater, tied, 7).item() == 1.0
    assert ev.expected_ranks(greater, tied).item() == 5.5


@pytest.mark.method
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


@pytest.mark.method
def test_multi_caption_text_to_video():
    text, video = embeddings_for(MSVD_SIMILARITIES)
    greater, tied = ev.text_to_video_counts(text, video, MSVD_INDEX)
    assert greater.tolist() == [0, 1, 1, 0, 2, 0, 1]
    assert tied.tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert t2v_ranks(text, video, MSVD_INDEX).tolist() == [1, 2, 2.5, 1, 3, 1, 2.5]
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == pytest.approx(100 * 3 / 7)
    assert metrics["R@5"] == 100 and metrics["MdR"] == 2.0 and metrics["MnR"] == pytest.approx(13 / 7)
    assert [c.tolist() for c in dense_text_to_video_counts(text, video, MSVD_INDEX)] == [greater.tolist(),
                                                                                          tied.tolist()]


@pytest.mark.method
def test_multi_caption_video_to_text():
    # Each video's column: its best own caption against each other video's best caption.
    # v0: own 0.9, 0.3, 0.2 -> 0.9; v1's best 0.4 (c4), v2's 0.6 (c6): rank 1.
    # v1: own 0.7, 0.3 -> 0.7; v0's best 0.5 (c1), v2's 0.7 (c6): one tie: rank 1.5.
    # v2: own 0.5, 0.6 -> 0.6; v0's best 0.6 (c2), v1's 0.8 (c4): one above, one tie: rank 2.5.
    text, video = embeddings_for(MSVD_SIMILARITIES)
    greater, tied = ev.video_to_text_counts(text, video, MSVD_INDEX)
    assert greater.tolist() == [0, 0, 1] and tied.tolist() == [0, 1, 1]
    assert v2t_ranks(text, video, MSVD_INDEX).tolist() == [1, 1.5, 2.5]
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == pytest.approx(50.0)
    assert metrics["MdR"] == 1.5 and metrics["MnR"] == pytest.approx(5 / 3)


CAPTIONS_PER_VIDEO = [2, 1, 3, 2, 2, 3, 1, 2, 1, 1, 2, 1]  # of videos v0 ... v11: T = 21 captions


def best_caption_case() -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities (21, 12), caption_video_index (21,)): captions x videos, so column j scores every caption
    against query video j. A video's own captions score 0.9 and all others 0, except where set below."""
    index = torch.repeat_interleave(torch.arange(12), torch.tensor(CAPTIONS_PER_VIDEO))  # (21,)
    similarities = torch.zeros(21, 12, dtype=torch.float64)
    similarities[torch.arange(21), index] = 0.9
    scores = {  # (query video, video): the scores of that video's captions against the query video
        # v0: own best 0.5. v1, v2 and v3 have a caption above it (v2 all three: still one video); v4 ties.
        (0, 0): [0.5, 0.3], (0, 1): [0.6], (0, 2): [0.7, 0.6, 0.55], (0, 3): [0.6, 0.1], (0, 4): [0.5, 0.4],
        # v1: own best 0.2. All ten videos v2 ... v11 score 0.3 with every caption; v0 ties.
        (1, 1): [0.2], (1, 0): [0.2, 0.1], **{(1, video): [0.3] * CAPTIONS_PER_VIDEO[video] for video in range(2, 12)},
        # v2: own best 0.8. v3, v4, v5, v6 above; v7 and v8 tie.
        (2, 2): [0.8, 0.2, 0.1], (2, 3): [0.9, 0.85], (2, 4): [0.9, 0.9], (2, 5): [0.95, 0.1, 0.9], (2, 6): [0.9],
        (2, 7): [0.8, 0.3], (2, 8): [0.8],
        # v3: own best 0.7; v5's second caption ties.
        (3, 3): [0.7, 0.6], (3, 5): [0.1, 0.7, 0.2],
        # v4, v5, v6 (own 0.9): one video above each (above v6: both captions of v7, still one video).
        (4, 0): [0.95, 0.0], (5, 6): [0.92], (6, 7): [0.91, 0.91],
    }
    for (query, video), values in scores.items():
        similarities[index == video, query] = torch.tensor(values, dtype=torch.float64)
    return similarities, index


@pytest.mark.method
def test_video_to_text_ranks_videos_by_their_best_caption():
    # X-Pool's and CLIP4Clip's convention: the candidates are videos, each scored by its best caption.
    #   video   above  tied  rank   P(rank<=1)  P(rank<=5)        P(rank<=10)
    #   v0      3      1     4.5    0           1                 1
    #   v1      10     1     11.5   0           0                 (10 - 10) / 2 = 0
    #   v2      4      2     6      0           (5 - 4) / 3 = 1/3  1
    #   v3      0      1     1.5    1/2         1                 1
    #   v4-v6   1      0     2      0           1                 1
    #   v7-v11  0      0     1      1           1                 1
    # R@1 = 5.5 / 12, R@5 = 10 1/3 / 12, R@10 = 11 / 12; MnR = 34.5 / 12 = 2.875; sorted ranks 1 x5, 1.5, 2 x3,
    # 4.5, 6, 11.5: MdR = (1.5 + 2) / 2 = 1.75. Ranking among all captions instead would put v0 at 6.5 (five
    # captions above), v1 at 19.5 (18 captions above) and v6 at 3.
    similarities, index = best_caption_case()
    text, video = embeddings_for(similarities)
    greater, tied = ev.video_to_text_counts(text, video, index)
    assert greater.tolist() == [3, 10, 4, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert tied.tolist() == [1, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    metrics = ev.retrieval_metrics(greater, tied)
    assert metrics["R@1"] == pytest.approx(100 * 5.5 / 12)
    assert metrics["R@5"] == pytest.approx(100 * (10 + 1 / 3) / 12)
    assert metrics["R@10"] == pytest.approx(100 * 11 / 12)
    assert metrics["MdR"] == 1.75 and metrics["MnR"] == pytest.approx(2.875)
    for counts in (dense_video_to_text_counts(text, video, index),
                   ev.video_to_text_counts(text, video, index, chunk_size=5)):
        assert [c.tolist() for c in counts] == [greater.tolist(), tied.tolist()]


@pytest.mark.method
def test_video_without_caption_is_an_error():
    text, video = embeddings_for([[1.0, 0.0, 0.0]])
    for video_to_text in (ev.video_to_text_counts, dense_video_to_text_counts):
        with pytest.raises(ValueError, match="no caption"):
            video_to_text(text, video, [0])
    with pytest.raises(ValueError, match="caption_video_index"):
        ev.text_to_video_counts(text, video, [3])
    with pytest.raises(ValueError, match="NaN"):
        ev.text_to_video_counts(text * math.nan, video, [0])


# ----------------------------------------------------------------------------------------------------------
# Against independent references, on random problems


# The ranking on the whole score matrix at once, written independently of evaluate.py's chunks: the
# reference every chunked count must equal.


def dense_text_to_video_counts(text_embeddings: torch.Tensor, video_embeddings: torch.Tensor,
                               caption_video_index, dsl: bool = False,
                               temperature: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater (T,), tied (T,)): each caption ranks the V videos; its correct one is caption_video_index[i]."""
    correct_video = ev._as_index(caption_video_index, len(text_embeddings), len(video_embeddings))  # (T,)
    scores = text_embeddings @ video_embeddings.T  # (T, V)
    if dsl:  # dual softmax over the queries: a video that every caption likes counts less for each of them
        scores = scores * torch.softmax(temperature * scores, dim=0)  # (T, V)
    return ev.dense_counts(scores, correct_video)


def dense_video_to_text_counts(text_embeddings: torch.Tensor, video_embeddings: torch.Tensor,
                               caption_video_index, dsl: bool = False,
                               temperature: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater (V,), tied (V,)): each video ranks the V videos, each scored by its best caption; its
    correct candidate is itself (X-Pool's and CLIP4Clip's convention, see the module docstring)."""
    owner_video = ev._as_index(caption_video_index, len(text_embeddings), len(video_embeddings))  # (T,)
    ev._check_every_video_has_a_caption(owner_video, len(video_embeddings))
    scores = text_embeddings @ video_embeddings.T  # (T, V): caption t against query video j
    if dsl:  # dual softmax over the queries, which here are the videos; before the max over captions
        scores = scores * torch.softmax(temperature * scores, dim=1)  # (T, V)
    best_caption = torch.stack([scores[owner_video == video].amax(dim=0)  # (V, V): [candidate, query]
                                for video in range(len(video_embeddings))])
    query_video = torch.arange(len(video_embeddings))  # (V,) query j's correct candidate is video j
    return ev.dense_counts(best_caption.T, query_video)



def random_retrieval_problem(seed=0, num_videos=11, max_captions=5, integer=False, duplicates=True):
    """(text (T, E), video (V, E), caption_video_index list of T): 1..max_captions captions per video, listed in
    random order. `integer`: small whole-number embeddings, so every score is exact (equal scores are equal
    however a matrix product adds them up) and ties are many. Otherwise float64 unit vectors, tie-free unless
    `duplicates` copies embeddings (ties in both directions)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_captions + 1, (num_videos,), generator=generator)  # (V,)
    index = torch.repeat_interleave(torch.arange(num_videos), counts)  # (T,)
    index = index[torch.randperm(len(index), generator=generator)]
    if integer:
        video = torch.randint(-2, 3, (num_videos, 6), generator=generator).double()  # (V, 6)
        text = video[index] + torch.randint(-1, 2, (len(index), 6), generator=generator).double()  # (T, 6)
    else:
        video = torch.nn.functional.normalize(torch.randn(num_videos, 16, generator=generator,
                                                          dtype=torch.float64), dim=1)  # (V, 16)
        noise = torch.randn(len(index), 16, generator=generator, dtype=torch.float64)  # (T, 16)
        text = torch.nn.functional.normalize(video[index] + 0.9 * noise, dim=1)  # (T, 16)
    if duplicates:  # text -> video: videos 3 and 4 tie; video -> text: videos 1 and 2 have the same best caption
        video[3] = video[4]
        text[(index == 1) | (index == 2)] = text[index == 2][0]
    return text, video, index.tolist()


def reference_matrices(text, video, index, dsl=False, temperature=100.0) -> dict:
    """{"t2v" | "v2t": (scores (Q, C), correct (Q,))}, written apart from evaluate.py. Video -> text the X-Pool
    way (modules/metrics.py, sim_matrix_inference + v2t_metrics): the caption x video matrix, DSL-rescored
    first if asked, padded per video with -inf to (V, M, V); the max over each video's M captions; transposed."""
    sims = text @ video.T  # (T, V)
    t2v = sims * torch.softmax(temperature * sims, dim=0) if dsl else sims  # softmax over captions
    v2t = sims * torch.softmax(temperature * sims, dim=1) if dsl else sims  # softmax over videos
    own = [[t for t, owner in enumerate(index) if owner == v] for v in range(len(video))]
    padded = torch.full((len(video), max(map(len, own)), len(video)), -torch.inf, dtype=sims.dtype)  # (V, M, V)
    for v, captions in enumerate(own):
        padded[v, :len(captions)] = v2t[captions]
    return {"t2v": (t2v, torch.as_tensor(index)), "v2t": (padded.amax(dim=1).T, torch.arange(len(video)))}


def reference_ranks(scores, correct) -> tuple[torch.Tensor, dict]:
    """(expected rank (Q,), {k: P(rank <= k) (Q,)}) read off a descending sort of each row: under random
    tie-breaking the correct candidate is equally likely at each place holding its score."""
    places = [(row.sort(descending=True).values == row[answer]).nonzero().flatten() + 1  # 1-based
              for row, answer in zip(scores, correct.tolist())]
    ranks = torch.stack([p.double().mean() for p in places])
    return ranks, {k: torch.stack([(p <= k).double().mean() for p in places]) for k in ev.RECALL_AT}


def assert_counts_match(counts, scores, correct):
    ranks, recalls = reference_ranks(scores, correct)
    assert torch.equal(ev.expected_ranks(*counts), ranks)
    for k, recall in recalls.items():
        assert torch.allclose(ev.recall_probability(*counts, k), recall, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.method
def test_counts_equal_the_xpool_way_on_tied_problems(seed):
    text, video, index = random_retrieval_problem(seed, num_videos=13, integer=True)
    reference = reference_matrices(text, video, index)
    for direction, counts in (("t2v", ev.text_to_video_counts), ("v2t", ev.video_to_text_counts)):
        for chunk_size in (1, 4, None):
            assert_counts_match(counts(text, video, index, chunk_size=chunk_size), *reference[direction])
    assert ev.video_to_text_counts(text, video, index)[1].sum() > 0  # the problem does have ties


@pytest.mark.method
def test_single_caption_video_to_text_ranks_among_the_captions():
    # One caption per video: each video's best caption is its caption, so the videos rank as their captions do.
    text, video, index = random_retrieval_problem(seed=5, num_videos=15, max_captions=1, integer=True)
    own_caption = torch.argsort(torch.tensor(index))  # (V,) the caption of each video
    greater, tied = ev.video_to_text_counts(text, video, index)
    assert_counts_match((greater, tied), video @ text.T, own_caption)
    assert tied.sum() > 0


# DSL only on tie-free problems: a dense softmax and the chunked passes round their column sums differently,
# so the dense version could split an exact tie (the chunked one cannot: test_identical_candidates_tie_exactly).
@pytest.mark.parametrize("ties, dsl", [(True, False), (False, False), (False, True)])
@pytest.mark.method
def test_dense_and_chunked_counts_agree(ties, dsl):
    for seed in range(3):
        text, video, index = random_retrieval_problem(seed, integer=ties, duplicates=ties)
        for dense, chunked in ((dense_text_to_video_counts, ev.text_to_video_counts),
                               (dense_video_to_text_counts, ev.video_to_text_counts)):
            expected = dense(text, video, index, dsl=dsl)
            for chunk_size in (1, 3, None):
                greater, tied = chunked(text, video, index, dsl=dsl, chunk_size=chunk_size)
                assert torch.equal(greater, expected[0]) and torch.equal(tied, expected[1])
            assert (expected[1].sum() > 0) == ties


@pytest.mark.parametrize("dsl", [False, True])
@pytest.mark.method
def test_chunks_never_exceed_chunk_size(monkeypatch, dsl):
    text, video, index = random_retrieval_problem(integer=not dsl)
    whole = [counts(text, video, index, dsl=dsl, chunk_size=10**6)
             for counts in (ev.text_to_video_counts, ev.video_to_text_counts)]
    # Record every chunk the scorer builds: none may have more than chunk_size rows.
    seen_rows = []
    original = ev.score_chunks

    def recording(*args, **kwargs):
        for start, scores in original(*args, **kwargs):
            seen_rows.append(len(scores))
            yield start, scores

    monkeypatch.setattr(ev, "score_chunks", recording)
    for chunk_size in (1, 3, 7):
        seen_rows.clear()
        chunked = [counts(text, video, index, dsl=dsl, chunk_size=chunk_size)
                   for counts in (ev.text_to_video_counts, ev.video_to_text_counts)]
        assert max(seen_rows) <= chunk_size and sum(seen_rows) == len(text) + len(video)
        for (greater, tied), (whole_greater, whole_tied) in zip(chunked, whole):
            assert torch.equal(greater, whole_greater) and torch.equal(tied, whole_tied)
    assert whole[0][1].sum() > 0 and whole[1][1].sum() > 0  # the duplicates did produce ties


@pytest.mark.parametrize("dsl", [False, True])
@pytest.mark.method
def test_identical_candidates_tie_exactly(dsl):
    # float32, as evaluation runs. A one-row matrix product (chunk_size=1) or a column sum can round two
    # identical columns differently; identical candidates are scored once, so they tie in every chunking.
    generator = torch.Generator().manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(203, 32, generator=generator), dim=1)  # (V, 32)
    text = torch.nn.functional.normalize(video + 0.9 * torch.randn(203, 32, generator=generator), dim=1)  # (T, 32)
    text[202] = text[0]  # the first and the last video have the same caption: tied as video -> text candidates
    video[202] = video[1]  # a duplicated video: tied as a text -> video candidate
    index = list(range(203))
    for chunk_size in (1, 64, None):
        _, tied = ev.video_to_text_counts(text, video, index, dsl=dsl, chunk_size=chunk_size)
        assert tied[0] == 1 and tied[202] == 1
        _, tied = ev.text_to_video_counts(text, video, index, dsl=dsl, chunk_size=chunk_size)
        assert tied[1] == 1 and tied[202] == 1


@pytest.mark.method
def test_default_chunk_size_bounds_the_chunk_not_the_queries(monkeypatch):
    monkeypatch.setattr(ev, "SCORES_PER_CHUNK", 40)  # 40 scores / 11 videos -> chunks of 3 captions
    text, video, index = random_retrieval_problem()
    rows = [len(scores) for _, scores in ev.score_chunks(text, video)]
    assert max(rows) == 3 and sum(rows) == len(text)


@pytest.mark.method
def test_dsl_rescues_a_query_lost_to_a_hub_video():
    # Video 0 is a "hub": both captions like it (0.9). Caption 0's own video 1 scores 0.8 and loses plainly.
    # DSL divides the hub's score between the two captions (softmax over captions: 1/2 each -> 0.45), while
    # video 1 is caption 0's alone (softmax ~ 1 -> 0.8): caption 0 now finds its video.
    text, video = embeddings_for([[0.9, 0.8], [0.9, 0.1]])
    index = [1, 0]
    assert t2v_ranks(text, video, index).tolist() == [2, 1]
    assert t2v_ranks(text, video, index, dsl=True).tolist() == [1, 1]
    results = ev.metrics_from_embeddings(text, video, index, dsl=True)
    assert results["t2v"]["R@1"] == 100 and results["dsl"] is True
    assert ev.DSL_LABEL in ev.format_results(results, "toy")


@pytest.mark.parametrize("temperature", [100.0, 10.0])
@pytest.mark.method
def test_chunked_dsl_equals_the_reference(temperature):
    # DSL re-scores the caption x video matrix, then each video takes its best caption (reference_matrices).
    text, video, index = random_retrieval_problem(seed=1, num_videos=9, max_captions=3, duplicates=False)
    reference = reference_matrices(text, video, index, dsl=True, temperature=temperature)
    plain = reference_matrices(text, video, index)
    for direction, ranks in (("t2v", t2v_ranks), ("v2t", v2t_ranks)):
        expected = reference_ranks(*reference[direction])[0]
        assert not torch.equal(expected, reference_ranks(*plain[direction])[0])  # DSL does change the ranking
        for chunk_size in (2, 5, None):
            assert torch.equal(ranks(text, video, index, dsl=True, temperature=temperature, chunk_size=chunk_size),
                               expected)
    # The other order (best caption first, DSL on the video x video matrix) ranks differently here.
    best_first = reference_matrices(text, video, index)["v2t"][0]  # (V, V)
    other_order = best_first * torch.softmax(temperature * best_first, dim=0)  # softmax over the query videos
    assert not torch.equal(reference_ranks(other_order, torch.arange(len(video)))[0],
                           v2t_ranks(text, video, index, dsl=True, temperature=temperature))


def test_format_results_layout():
    metrics = {"R@1": 40.1, "R@5": 65.7, "R@10": 77.7, "MdR": 2.0, "MnR": 16.9}
    table = ev.format_results({"t2v": metrics, "v2t": metrics, "dsl": False}, "MSR-VTT")
    lines = table.splitlines()
    assert lines[0].split() == ["MSR-VTT", "R@1", "R@5", "R@10", "MdR", "MnR"]
    assert lines[1].split() == ["text", "->", "video", "40.1", "65.7", "77.7", "2.0", "16.9"]
    assert lines[2].startswith("video -> text") and len(lines) == 3
    assert ev.DSL_LABEL not in table


def parse(argv):
    return cli.parse_config(ev.EvalConfig, argv)


def test_config_and_parser(capsys):
    config = parse(["--checkpoint", "run/last.pt", "--dsl", "--num-frames", "8", "--batch-size", "4"])
    assert config.checkpoint == "run/last.pt" and config.dsl and config.num_frames == 8 and config.batch_size == 4
    assert config.data is None and config.split == "test" and not config.zero_shot
    assert parse([]) == ev.EvalConfig()
    assert cli.resolve_precision("auto", torch.device("cpu")) is None
    assert cli.resolve_precision("auto", torch.device("cuda")) is torch.float16
    with pytest.raises(cli.ConfigError, match="--zero-shot"):
        ev.main(["--checkpoint", "x.pt", "--zero-shot"])
    for flag, value in (("--batch-size", "0"), ("--num-frames", "0"), ("--dsl-temperature", "-1"),
                        ("--precision", "fp8")):
        with pytest.raises(SystemExit):
            parse([flag, value])
        assert flag in capsys.readouterr().err


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="nope.pt"):
        ev.load_model_from_checkpoint(tmp_path / "nope.pt")
    torch.save({"trainable": {}}, tmp_path / "odd.pt")
    with pytest.raises(checkpoints.CheckpointError, match="odd.pt.*format"):
        ev.load_model_from_checkpoint(tmp_path / "odd.pt")
    torch.save({"format": checkpoints.FORMAT, "trainable": {}}, tmp_path / "odd.pt")
    with pytest.raises(checkpoints.CheckpointError, match="odd.pt.*'config'"):
        ev.load_model_from_checkpoint(tmp_path / "odd.pt")


# ----------------------------------------------------------------------------------------------------------
# End to end on the tiny CLIP and a tiny synthetic world


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    demo.make_synthetic_world(root, num_videos=8, num_test_pairs=3, num_stills=4, frame_size=32, clip_frames=8)
    return root


def test_end_to_end_and_checkpoint_reload(tiny_clip, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(VoP, "tokenize", fake_tokenize)
    torch.manual_seed(0)
    model = VoP(tiny_clip, VoPConfig(num_frames=4, fn_layers=2))
    with torch.no_grad():  # make the prompts unlike any fresh initialisation, so reloading is really tested
        for parameter in model.trainable_state_dict().values():
            parameter.add_(torch.randn_like(parameter))
    model.train()
    dataset = data.build_dataset("synthetic", tiny_world, "test", num_frames=4, image_size=64)

    results = ev.evaluate(model, dataset, batch_size=4)
    assert model.training  # evaluate restores the caller's mode
    assert set(results) == {"t2v", "v2t", "dsl"}
    for direction in ("t2v", "v2t"):
        metrics = results[direction]
        assert set(metrics) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 100
        assert 1 <= metrics["MdR"] <= 6 and 1 <= metrics["MnR"] <= 6

    text_embeddings, video_embeddings = ev.embed(model, dataset, batch_size=4)
    assert text_embeddings.shape == (6, 64) and video_embeddings.shape == (6, 64)
    assert text_embeddings.dtype == torch.float32
    assert torch.allclose(video_embeddings.norm(dim=1), torch.ones(6), atol=1e-5)

    checkpoint_path = tmp_path / "last.pt"
    checkpoints.save_checkpoint({
        "config": {"data": "synthetic", "data_root": str(tiny_world)}, "vop_config": model.config.as_dict(),
        "run": {"backbone": str(FIXTURES_CLIP)}, "trainable": model.trainable_state_dict(), "optimizer": {},
        "scaler": {}, "step": 3, "history": [], "replaced_videos": 0}, checkpoint_path)
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
    with Image.open(picture) as image:
        assert image.width > 1000 and image.height > 500


def test_another_frame_count_for_a_model_with_position_prompts_is_refused_up_front(tiny_clip, tiny_world, tmp_path):
    model = VoP(tiny_clip, VoPConfig(num_frames=4, video_prompts="pos"))
    checkpoints.save_checkpoint({
        "config": {"data": "synthetic", "data_root": str(tiny_world)}, "vop_config": model.config.as_dict(),
        "run": {"backbone": str(FIXTURES_CLIP)}, "trainable": model.trainable_state_dict(), "optimizer": {},
        "scaler": {}, "step": 3, "history": [], "replaced_videos": 0}, tmp_path / "last.pt")
    with pytest.raises(cli.ConfigError, match="--num-frames 8: this model's video prompts are made for 4 frames"):
        ev.main(["--checkpoint", str(tmp_path / "last.pt"), "--num-frames", "8", "--num-workers", "0"])


def test_examples_figure_shows_ranks_scores_and_which_hits_are_correct(tiny_world, tmp_path):
    """Both directions; every hit with its rank and score; the query's own item framed green, and written at
    the end of its row with its rank when it is not in the top k; a video sharing the query's caption text is
    framed as also correct."""
    dataset = data.build_dataset("synthetic", tiny_world, "test", num_frames=4, image_size=64)
    num_videos = len(dataset.video_ids)  # 6 clips, one caption each
    text = torch.eye(num_videos)
    text[0, 1] = 0.5  # caption 0: its video first, video 1 second
    video = torch.eye(num_videos)
    video[5] = torch.tensor([0.0, 0, 1, 1, 0, 0])  # far from caption 5, its own: every video ties at 0
    text, video = torch.nn.functional.normalize(text, dim=1), torch.nn.functional.normalize(video, dim=1)
    dataset.captions[1] = dataset.captions[0]  # videos 0 and 1 now share a caption text
    image = figures.draw_examples(dataset, text, video, tmp_path / "x.png", num_queries=num_videos, top_k=2,
                                  frames_per_video=2, thumb_size=24)
    hits = image.info["hits"]
    t2v = [hit for hit in hits if hit["direction"] == "t2v"]
    assert {hit["query"] for hit in t2v} == set(range(num_videos))
    first = [hit for hit in t2v if hit["query"] == 0]
    assert (first[0]["item"], first[0]["rank"], first[0]["kind"]) == (0, 1, "correct")
    assert first[0]["score"] == pytest.approx(1 / 1.25 ** 0.5)  # the cosine of caption 0 and video 0
    assert any(hit["item"] == 1 and hit["kind"] == "also correct" for hit in first)  # the same caption text
    last = [hit for hit in t2v if hit["query"] == 5]
    assert [hit["kind"] for hit in last[:2]] == ["other", "other"]  # not in the top 2 ...
    assert (last[2]["item"], last[2]["kind"]) == (5, "correct") and last[2]["rank"] > 2  # ... so shown with its rank
    v2t = [hit for hit in hits if hit["direction"] == "v2t"]
    assert {hit["query"] for hit in v2t} == set(range(num_videos))
    assert [hit["kind"] for hit in v2t if hit["query"] == 2][0] == "correct"
    colour = {"correct": figures.CORRECT, "also correct": figures.ALSO_CORRECT, "other": figures.OTHER}
    for hit in hits:  # the frame drawn around each hit has its kind's colour
        if hit["box"] is not None:
            assert image.getpixel(hit["box"][:2]) == colour[hit["kind"]]
    with Image.open(tmp_path / "x.png") as saved:
        assert saved.size == image.size


def test_zero_shot_command_line(tiny_world, monkeypatch, capsys):
    monkeypatch.setattr(VoP, "tokenize", fake_tokenize)
    results = ev.main(["--zero-shot", "--clip", str(FIXTURES_CLIP), "--data", "synthetic", "--data-root",
                       str(tiny_world), "--num-frames", "4", "--device", "cpu", "--num-workers", "0", "--dsl"])
    assert results["dsl"] is True and 0 <= results["t2v"]["R@1"] <= 100
    assert ev.DSL_LABEL in capsys.readouterr().out
    with pytest.raises(cli.ConfigError, match="--data"):
        ev.main(["--zero-shot", "--clip", str(FIXTURES_CLIP)])  # no dataset to evaluate on
