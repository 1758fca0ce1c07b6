"""Evaluate a VoP checkpoint (or zero-shot CLIP) on text-to-video and video-to-text retrieval.

One job: turn a model and a test split into the paper's numbers (R@1, R@5, R@10, median and mean rank).

1. The ranking (read this first): for each query, count the wrong candidates that score above the correct
   one (`greater`) and exactly level with it (`tied`); the rank is greater + 1 + tied / 2 and R@K is
   P(rank <= K), both under random tie-breaking. Counting a tie as a hit (or a miss) flatters (or punishes) a
   model that maps many videos to one point (CLIP4Clip#80). `text_to_video_counts` and
   `video_to_text_counts` count a chunk of query rows at a time, so 100,000 x 100,000 fits in memory.
2. `embed`: every caption and every unique video once, L2-normalised.
3. `score_chunks`, the score matrix a chunk of query rows at a time, and the checks of the inputs (skip on a
   first reading).

The protocol is X-Pool's (modules/metrics.py: t2v_metrics, v2t_metrics) and CLIP4Clip's (metrics.py).
Text -> video: each caption is a query; its one correct video is ranked among all V videos. Video -> text:
each video is a query and the candidates are the V videos, each scored by its best caption; the correct
candidate is the query video itself (X-Pool and CLIP4Clip pad the captions to M per video with -inf and take
the max over M of a (V, M, V) tensor). With one caption per video this is ranking among the captions.
Identical embeddings are scored once, so they tie exactly; without ties the ranks equal X-Pool's and
CLIP4Clip's. MdR is the usual median (the mean of the two middle ranks for an even count, as np.median).
`dsl=True` re-scores with dual softmax (CAMoE, CLIP2Video), not the paper's protocol and labelled so wherever
it is printed: the caption x video matrix s becomes s * softmax(temperature * s) over the direction's queries
(captions for text -> video, videos for video -> text), and only then does each video take its best caption.

Shapes: T captions, V videos, E embedding size, M most captions of any one video, Q queries and C candidates
(T and V for text -> video; V and the V videos for video -> text), `rows` the query rows of one chunk.

    python evaluate.py --checkpoint runs/msrvtt-9k/vop/last.pt [--data ... --data-root ... --split test]
    python evaluate.py --zero-shot --clip ViT-B/32 --data msrvtt-9k --data-root data/msrvtt
    python evaluate.py --checkpoint cv_vit-b32_retrieval_vop --data msrvtt-9k --data-root data/msrvtt
"""
import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from machinery import checkpoints
import clip_model
from formats import clip_weights
import data
from utils import distributed
from formats.annotations import DATASET_NAMES
from utils.cli import (PRECISIONS, ConfigError, Options, at_least, greater_than, option, parse_config,
                       resolve_device, resolve_precision, run_command)
from machinery.figures import draw_examples
from machinery.frame_store import FrameStore
from utils.progress import Progress
from vop import VoP, VoPConfig, load_release

RECALL_AT = (1, 5, 10)
SCORES_PER_CHUNK = 2**24  # default chunk: about 16M scores (64 MB in float32) whatever the number of candidates
DSL_LABEL = "(DSL re-ranked; not the paper's protocol)"


# ----------------------------------------------------------------------------------------------------------
# 1. Ranks and metrics on the whole score matrix (read this first)
#
# Sort a query's scores against its C candidates: the correct candidate's rank is 1 + the number of wrong
# candidates scoring above it (`greater`). Candidates scoring exactly the same (`tied`) are put in random
# order, so the rank is greater + 1 + tied / 2 on average and lies in the top K with probability
# (K - greater) / (tied + 1), clipped to [0, 1]. R@K is that probability averaged over the queries (in
# percent), MdR and MnR the median and mean rank. Only the score matrix differs between the directions.


def dense_counts(scores: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater (Q,), tied (Q,)) for the whole score matrix scores (Q, C), whose query q's correct candidate
    is column correct[q]: how many wrong candidates score above it, and how many exactly the same."""
    correct_scores = scores.gather(1, correct[:, None])  # (Q, 1)
    greater = (scores > correct_scores).sum(dim=1)  # (Q,)
    tied = (scores == correct_scores).sum(dim=1) - 1  # (Q,) the correct candidate equals itself: not a tie
    return greater, tied


def expected_ranks(greater: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    """(Q,) float64: the correct candidate's rank, averaged over the random orders of the tied candidates."""
    return greater.double() + 1 + tied.double() / 2


def recall_probability(greater: torch.Tensor, tied: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) float64: P(rank <= k). The correct candidate is equally likely at ranks greater+1 ... greater+tied+1."""
    return ((k - greater.double()) / (tied.double() + 1)).clamp(0, 1)


def retrieval_metrics(greater: torch.Tensor, tied: torch.Tensor) -> dict:
    """{"R@1", "R@5", "R@10"} in percent (expected recall), "MdR" and "MnR" (median / mean expected rank)."""
    if len(greater) == 0 or greater.shape != tied.shape:
        raise ValueError(f"need equally long, non-empty greater and tied counts, got {tuple(greater.shape)} "
                         f"and {tuple(tied.shape)}")
    ranks = expected_ranks(greater, tied)  # (Q,)
    metrics = {f"R@{k}": 100 * float(recall_probability(greater, tied, k).mean()) for k in RECALL_AT}
    metrics["MdR"] = _median(ranks)
    metrics["MnR"] = float(ranks.mean())
    return metrics


def _median(values: torch.Tensor) -> float:
    """The usual median (mean of the two middle values for an even count; torch.median takes the lower)."""
    ordered = values.sort().values
    n = len(ordered)
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)


def text_to_video_counts(text_embeddings: torch.Tensor, video_embeddings: torch.Tensor, caption_video_index,
                         dsl: bool = False, temperature: float = 100.0, chunk_size: int | None = None,
                         score_device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater (T,), tied (T,)): each caption ranks the V videos; its correct one is caption_video_index[i].
    text_embeddings (T, E), video_embeddings (V, E), L2-normalised.

    The scores come a chunk of captions at a time (`score_chunks`: cosines, or with `dsl` the dual-softmax
    scores), so the (T, V) matrix is never whole; each chunk is counted as it comes."""
    _check_embeddings(text_embeddings, video_embeddings)
    correct_video = _as_index(caption_video_index, len(text_embeddings), len(video_embeddings))  # (T,)
    greater, tied = [], []
    for start, scores in score_chunks(text_embeddings, video_embeddings, chunk_size, dsl, temperature,
                                      score_device):  # scores (rows, V): captions start.. against every video
        counts = dense_counts(scores, correct_video[start:start + len(scores)].to(scores.device))
        greater.append(counts[0].cpu())
        tied.append(counts[1].cpu())
    return torch.cat(greater), torch.cat(tied)


def video_to_text_counts(text_embeddings: torch.Tensor, video_embeddings: torch.Tensor, caption_video_index,
                         dsl: bool = False, temperature: float = 100.0, chunk_size: int | None = None,
                         score_device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater (V,), tied (V,)): each video ranks the V videos, each scored by its best caption; its correct
    candidate is itself (X-Pool's and CLIP4Clip's convention, see the module docstring).
    text_embeddings (T, E), video_embeddings (V, E), L2-normalised; a chunk of query videos at a time."""
    _check_embeddings(video_embeddings, text_embeddings)
    owner_video = _as_index(caption_video_index, len(text_embeddings), len(video_embeddings))  # (T,)
    _check_every_video_has_a_caption(owner_video, len(video_embeddings))
    num_videos = len(video_embeddings)
    greater, tied = [], []
    for start, scores in score_chunks(video_embeddings, text_embeddings, chunk_size, dsl, temperature,
                                      score_device):  # scores (rows, T): query videos start.. against each caption
        # Each candidate video takes its best caption's score: (rows, T) -> (rows, V).
        owner = owner_video.to(scores.device)[None, :].expand(len(scores), -1)  # (rows, T)
        best_caption = scores.new_full((len(scores), num_videos), -torch.inf)  # (rows, V)
        best_caption.scatter_reduce_(1, owner, scores, "amax")
        query_video = torch.arange(start, start + len(scores), device=scores.device)  # (rows,) the correct ones
        counts = dense_counts(best_caption, query_video)
        greater.append(counts[0].cpu())
        tied.append(counts[1].cpu())
    return torch.cat(greater), torch.cat(tied)


# ----------------------------------------------------------------------------------------------------------
# 2. Embeddings


def embed(model: VoP, dataset: data.VideoTextDataset, batch_size: int = 32, num_workers: int | None = None,
          device="cpu", autocast_dtype: torch.dtype | None = None,
          show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_embeddings (T, E), video_embeddings (V, E)), float32 on the CPU, L2-normalised: every caption of
    `dataset.captions` and every unique video of `dataset.videos()`, each encoded exactly once. `show_progress`
    prints a progress line (first process only) while the videos are embedded."""
    if len(dataset.captions) == 0 or len(dataset.video_ids) == 0:
        raise ValueError(f"dataset {dataset.name!r} has no captions or no videos to evaluate")
    progress = Progress(f"embedding {len(dataset.video_ids)} {dataset.name} videos", len(dataset.video_ids),
                        "videos", enabled=show_progress and distributed.rank_and_world_size()[0] == 0)
    video_embeddings = embed_videos(model, dataset.videos(), batch_size, num_workers, device, autocast_dtype,
                                    lambda done, total: progress.update(done))
    progress.finish()
    text_embeddings = embed_captions(model, dataset.captions, batch_size, device, autocast_dtype)
    return text_embeddings, video_embeddings


def embed_videos(model: VoP, videos, batch_size: int = 32, num_workers: int | None = None, device="cpu",
                 autocast_dtype: torch.dtype | None = None, progress=None) -> torch.Tensor:
    """(V, E) float32 on the CPU, L2-normalised: the videos of `videos`, a dataset of items {"video": (F, 3, R,
    R)} in the evaluation protocol's frames (data.VideoOnlyDataset, data.VideoFiles), in its order.

    The model runs in eval mode without gradients; its train/eval mode is restored afterwards, so train.py can
    call this between epochs. `autocast_dtype` (torch.float16 on CUDA, torch.bfloat16 on CPU) runs the encoder
    under torch.autocast; the weights stay float32. Under torchrun every process embeds its share (videos
    r, r + W, ...) and every process gets all of them back. `progress(done, total)` is called after each batch.
    """
    rank, world_size = distributed.rank_and_world_size()
    share = torch.utils.data.Subset(videos, range(rank, len(videos), world_size))
    embeddings = []  # each (B, E)
    for _, batch_embeddings in embed_video_batches(model, share, batch_size, num_workers, device, autocast_dtype):
        embeddings.append(batch_embeddings)
        if progress is not None:  # every process embeds at about the same rate: count all of them
            progress(min(len(videos), sum(len(part) for part in embeddings) * world_size), len(videos))
    mine = torch.cat(embeddings) if embeddings else torch.empty(0)  # (rows of this process, E)
    return distributed.join_shares(mine, len(videos))  # (V, E)


def embed_video_batches(model: VoP, videos, batch_size: int = 32, num_workers: int | None = None, device="cpu",
                        autocast_dtype: torch.dtype | None = None):
    """Yield (batch, embeddings (B, E) float32 on the CPU, L2-normalised) for the consecutive batches of
    `videos`, all of them, in this process: embed_videos without the sharing, for callers that keep each batch
    as it comes or read its other fields (search.py writes each batch to its index)."""
    loader = data.make_loader(videos, batch_size, num_workers, shuffle=False,
                              pin_memory=torch.device(device).type == "cuda")
    try:
        for batch in loader:
            with _inference(model, device, autocast_dtype):  # per batch: the caller's code keeps its own mode
                embeddings = model.encode_video(batch["video"].to(device, non_blocking=True)).float().cpu()  # (B, E)
            yield batch, embeddings
    finally:
        data.stop_workers(loader)  # at the end, and when stopped or abandoned early


def embed_captions(model: VoP, captions: list[str], batch_size: int = 32, device="cpu",
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(T, E) float32 on the CPU, L2-normalised: each caption encoded once (under torchrun, each process its
    share, as embed_videos)."""
    rank, world_size = distributed.rank_and_world_size()
    share = list(captions[rank::world_size])
    embeddings = []  # each (B, E)
    with _inference(model, device, autocast_dtype):
        for start in range(0, len(share), batch_size):
            tokens = model.tokenize(share[start:start + batch_size]).to(device)  # (B, L)
            embeddings.append(model.encode_text(tokens).float().cpu())
    mine = torch.cat(embeddings) if embeddings else torch.empty(0)  # (rows of this process, E)
    return distributed.join_shares(mine, len(captions))  # (T, E)


@contextlib.contextmanager
def _inference(model: VoP, device, autocast_dtype: torch.dtype | None):
    """Eval mode, no gradients, autocast if asked; the model's train/eval mode is restored afterwards."""
    device = torch.device(device)
    _check_model_device(model, device)
    was_training = model.training
    model.eval()
    try:
        # not inference_mode: callers may reuse the tensors
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            yield
    finally:
        model.train(was_training)


def _check_model_device(model: torch.nn.Module, device: torch.device) -> None:
    parameter = next(model.parameters())
    same = parameter.device.type == device.type and device.index in (None, parameter.device.index)
    if not same:
        raise ValueError(f"the model is on {parameter.device} but device={device}: move it first (model.to(device))")


# ----------------------------------------------------------------------------------------------------------
# 3. The score matrix a chunk of query rows at a time, and the checks of the inputs (skip on a first reading)


def _check_embeddings(queries: torch.Tensor, candidates: torch.Tensor) -> None:
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"embeddings must be (Q, E) and (C, E) with the same E, got {tuple(queries.shape)} "
                         f"and {tuple(candidates.shape)}")
    for what, embeddings in (("query", queries), ("candidate", candidates)):
        if len(embeddings) == 0:
            raise ValueError(f"no {what} embeddings")
        if not torch.isfinite(embeddings).all():
            raise ValueError(f"{what} embeddings contain NaN or inf (did training diverge?)")


def _as_index(caption_video_index, num_captions: int, num_videos: int) -> torch.Tensor:
    index = torch.as_tensor(caption_video_index, dtype=torch.long)  # (T,)
    if index.shape != (num_captions,):
        raise ValueError(f"caption_video_index must have one entry per caption ({num_captions}), "
                         f"got shape {tuple(index.shape)}")
    if len(index) and (index.min() < 0 or index.max() >= num_videos):
        raise ValueError(f"caption_video_index must lie in 0..{num_videos - 1}, got {index.min()}..{index.max()}")
    return index


def _check_every_video_has_a_caption(caption_video_index: torch.Tensor, num_videos: int) -> None:
    counts = torch.bincount(caption_video_index, minlength=num_videos)  # (V,)
    captionless = (counts == 0).nonzero().flatten()
    if len(captionless):
        raise ValueError(f"{len(captionless)} videos have no caption (first: video {captionless[0].item()}): "
                         f"video -> text retrieval needs at least one per video")


def _chunk_rows(num_candidates: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, SCORES_PER_CHUNK // num_candidates)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return chunk_size


def _score_device(score_device, embeddings: torch.Tensor) -> torch.device:
    return embeddings.device if score_device is None else torch.device(score_device)


def score_chunks(queries: torch.Tensor, candidates: torch.Tensor, chunk_size: int | None = None,
                 dsl: bool = False, temperature: float = 100.0, score_device=None):
    """Yield (start, scores (rows, C)) for consecutive chunks of at most `chunk_size` query rows (default: about
    SCORES_PER_CHUNK scores a chunk): cosine similarities, or with `dsl` the dual-softmax scores
    sims * softmax(sims * temperature, over all Q queries). The chunks are computed on `score_device`
    (default: the embeddings' device): a GPU scores 100k x 100k in seconds, 2 CPU cores take about half an hour.

    queries (Q, E), candidates (C, E). The softmax over queries needs, for each candidate, the logsumexp of its
    column over all Q queries: a first chunked pass accumulates it, the second yields the re-scored chunks.

    Identical candidates (one caption text under several videos, a duplicated video) are scored once and
    share the result, so they tie exactly: computed apart, rounding could split them (a one-row matrix
    product, or a column sum, can round two identical columns differently).
    """
    rows = _chunk_rows(len(candidates), chunk_size)
    dtype = torch.promote_types(queries.dtype, candidates.dtype)
    score_device = _score_device(score_device, queries)
    queries, candidates = queries.to(score_device, dtype), candidates.to(score_device, dtype)
    distinct, column_of = torch.unique(candidates, dim=0, return_inverse=True)  # (C', E), (C,)
    if len(distinct) == len(candidates):
        distinct, column_of = candidates, None  # no duplicates: keep the order, skip the copying
    distinct_logsumexp = None  # (C',)
    if dsl:
        distinct_logsumexp = torch.full((len(distinct),), -torch.inf, dtype=dtype, device=score_device)
        for start in range(0, len(queries), rows):
            logits = temperature * (queries[start:start + rows] @ distinct.T)  # (rows, C')
            distinct_logsumexp = torch.logaddexp(distinct_logsumexp, torch.logsumexp(logits, dim=0))
    for start in range(0, len(queries), rows):
        sims = queries[start:start + rows] @ distinct.T  # (rows, C')
        if dsl:
            sims = sims * torch.exp(temperature * sims - distinct_logsumexp)  # (rows, C'): softmax over queries
        yield start, sims if column_of is None else sims[:, column_of]  # (rows, C)


# ----------------------------------------------------------------------------------------------------------
# 4. A model on a test set, a checkpoint's model


def metrics_from_embeddings(text_embeddings, video_embeddings, caption_video_index, dsl: bool = False,
                            dsl_temperature: float = 100.0, chunk_size: int | None = None,
                            score_device=None) -> dict:
    """{"t2v": metrics, "v2t": metrics, "dsl": bool}."""
    arguments = (text_embeddings, video_embeddings, caption_video_index, dsl, dsl_temperature, chunk_size,
                 score_device)
    return {"t2v": retrieval_metrics(*text_to_video_counts(*arguments)),
            "v2t": retrieval_metrics(*video_to_text_counts(*arguments)), "dsl": dsl}


def evaluate(model: VoP, dataset: data.VideoTextDataset, batch_size: int = 32, num_workers: int | None = None,
             device="cpu", autocast_dtype: torch.dtype | None = None, dsl: bool = False,
             dsl_temperature: float = 100.0, show_progress: bool = True) -> dict:
    """Embed `dataset` with `model` and score it: {"t2v": {...}, "v2t": {...}, "dsl": bool}."""
    text_embeddings, video_embeddings = embed(model, dataset, batch_size, num_workers, device, autocast_dtype,
                                              show_progress)
    return metrics_from_embeddings(text_embeddings, video_embeddings, dataset.caption_video_index, dsl,
                                   dsl_temperature, score_device=device)


def format_results(results: dict, title: str) -> str:
    """The paper's table: one row per direction, R@1 R@5 R@10 MdR MnR."""
    if results.get("dsl"):
        title = f"{title} {DSL_LABEL}"
    width = max(len(title), len("video -> text")) + 2
    lines = [f"{title:<{width}}{'R@1':>6}{'R@5':>6}{'R@10':>6}{'MdR':>6}{'MnR':>7}"]
    for key, label in (("t2v", "text -> video"), ("v2t", "video -> text")):
        m = results[key]
        lines.append(f"{label:<{width}}{m['R@1']:6.1f}{m['R@5']:6.1f}{m['R@10']:6.1f}{m['MdR']:6.1f}{m['MnR']:7.1f}")
    return "\n".join(lines)


def load_model_from_checkpoint(path, device="cpu", clip=None) -> tuple[VoP, dict]:
    """(VoP in eval mode on `device`, the checkpoint dict) from a file written by train.py, or from the authors'
    released model folder (formats/modelscope.py: configuration.json + VoP_msrvtt9k.pth or VoPSE_msrvtt9k.pth).

    The backbone is the one the checkpoint records (its name or path, activation and SHA-256); `clip`
    points at the same weights somewhere else, and weights with another SHA-256 are refused. A release
    folder holds its own backbone, so `clip` must then be None.
    """
    if Path(path).expanduser().is_dir():
        if clip is not None:
            raise clip_weights.WeightsError(f"{path} is a folder: the authors' release holds its own backbone (drop "
                                            f"--clip); for a train.py run, pass its last.pt")
        return load_release(path, device)
    checkpoint = checkpoints.load_checkpoint(path, VoPConfig)
    run = checkpoint["run"]
    backbone = clip_model.load(clip or run["backbone"], device, activation=run.get("activation"),
                               sha256=run.get("backbone_sha256"))
    model = VoP(backbone, VoPConfig(**checkpoint["vop_config"])).to(device)
    try:
        model.load_trainable_state_dict(checkpoint["trainable"])
    except ValueError as error:
        raise checkpoints.CheckpointError(f"{path}: {error}") from None
    return model.eval(), checkpoint


# ----------------------------------------------------------------------------------------------------------
# 5. Command line


@dataclass
class EvalConfig(Options):
    """Everything evaluate.py's command line can set; each field is the flag --field-name."""
    checkpoint: str | None = option(None, "a train.py checkpoint (e.g. runs/msrvtt-9k/vop/last.pt), or the authors' "
                                          "released model folder (configuration.json + VoP_msrvtt9k.pth)")
    zero_shot: bool = option(False, "evaluate plain CLIP (--clip) instead of a checkpoint")
    clip: str | None = option(None, "CLIP name or weights file/folder: for --zero-shot (default ViT-B/32), or where "
                                    "a checkpoint's backbone now lies")
    clip_activation: str | None = option(None, "for --zero-shot on a state dict without config: quick_gelu or gelu",
                                         choices=("quick_gelu", "gelu"))
    data: str | None = option(None, "dataset; default: the checkpoint's", choices=DATASET_NAMES)
    data_root: str | None = option(None, "dataset folder; default: the checkpoint's")
    split: str = option("test", "which split to evaluate")
    num_frames: int | None = option(None, "frames per video; default: the model's (12 for --zero-shot)", at_least(1))
    batch_size: int = option(32, "videos (and captions) per batch", at_least(1))
    num_workers: int | None = option(None, "DataLoader workers decoding videos; default: this machine's cores",
                                     at_least(0))
    device: str = option("auto", "cuda, cpu, ...; auto picks cuda when available")
    precision: str = option("auto", "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 autocast",
                            choices=("auto", *PRECISIONS))
    frame_store: str | None = option(None, "read (and keep) the decoded test frames here, as train.py does")
    dsl: bool = option(False, "dual-softmax re-ranking (not the paper's protocol)")
    dsl_temperature: float = option(100.0, "DSL softmax temperature", greater_than(0))
    examples: str | None = option(None, "write a PNG of retrieval examples: a few text queries with their top-5 "
                                        "videos, a few videos with their top-5 captions")


def check_image_path(path, flag: str) -> None:
    """Refuse, before any work, an image file Pillow cannot write: a name whose suffix is no format Pillow saves
    a colour image in (none, .txt, ...), a folder, or a file in a folder that does not exist. A ConfigError
    naming `flag` and the fix."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: name the image file, e.g. {flag} examples.png")
    Image.init()
    image_format = Image.registered_extensions().get(path.suffix.lower())
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), image_format)  # what Pillow can write, here, in colour
    except Exception:  # no suffix, an unknown one, a format Pillow reads only, or not in colour
        what = f"Pillow writes no image as {path.suffix!r}" if path.suffix else "the name has no suffix"
        raise ConfigError(f"{flag} {path}: {what}; name a .png (or .jpg) file, e.g. {flag} examples.png") from None
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {path.parent} does not exist; create it or name another")


def main(argv=None) -> dict:
    config = parse_config(EvalConfig, argv, __doc__.split("\n\n")[0])
    if config.zero_shot and config.checkpoint is not None:
        raise ConfigError("give --checkpoint PATH or --zero-shot, not both")
    if not config.zero_shot and config.checkpoint is None:
        raise ConfigError("give --checkpoint PATH or --zero-shot: a train.py run's last.pt to evaluate, or zero-shot "
                          "CLIP (--clip, with --data and --data-root)")
    if config.examples:
        check_image_path(config.examples, "--examples")  # before any work, not after the whole evaluation
    device = resolve_device(config.device)
    model, trained = None, {}  # trained: train.py's settings (the authors' release folder names no dataset)
    release = config.checkpoint is not None and Path(config.checkpoint).expanduser().is_dir()
    if config.checkpoint and not release:
        # read first: a bad file is named before any video is read or anything downloaded
        trained = checkpoints.load_checkpoint(config.checkpoint, VoPConfig)["config"]
    name = config.data or trained.get("data")
    root = config.data_root or trained.get("data_root")
    if name is None or root is None:
        raise ConfigError(f"--data and --data-root are needed ({config.checkpoint} names no dataset)"
                          if config.checkpoint else "--zero-shot needs --data and --data-root")
    if release:  # it holds its backbone: a damaged or incomplete folder is named before any video is read
        model, _ = load_model_from_checkpoint(config.checkpoint, device, config.clip)
    store = FrameStore(config.frame_store, data.FRAME_RULE) if config.frame_store else None
    # The annotations are read before the backbone, which may need a download: a wrong data root is found first.
    dataset = data.build_dataset(name, root, config.split, train=False, frame_store=store)
    if config.zero_shot:
        clip = clip_model.load(config.clip or "ViT-B/32", device, activation=config.clip_activation)
        model = VoP(clip, VoPConfig(tune="zero-shot", num_frames=config.num_frames or 12)).to(device).eval()
    elif model is None:
        model, _ = load_model_from_checkpoint(config.checkpoint, device, config.clip)
    model_name = f"zero-shot {config.clip or 'ViT-B/32'}" if config.zero_shot else config.checkpoint
    if config.num_frames and config.num_frames != model.num_frames and model.video_prompts:
        raise ConfigError(f"--num-frames {config.num_frames}: this model's video prompts are made for "
                          f"{model.num_frames} frames per video; leave --num-frames out")
    model.check_vocabulary()  # before any caption is tokenized
    dataset.num_frames = config.num_frames or model.num_frames  # the model's frames, and input side
    dataset.image_size = model.clip.visual.input_resolution
    print(f"{model_name} on {name} {config.split}: {len(dataset.captions)} captions, "
          f"{len(dataset.video_ids)} videos", file=sys.stderr)
    if dataset.unsplit:
        print(f"note: {root} has no 'split' column, so every split is all its rows, the training rows: the results "
              f"describe training rows, not held-out ones", file=sys.stderr)
    if store is not None:
        store.build(dataset, config.num_workers, log=lambda line: print(line, file=sys.stderr))
    text_embeddings, video_embeddings = embed(model, dataset, config.batch_size, config.num_workers, device,
                                              resolve_precision(config.precision, device), show_progress=True)
    results = metrics_from_embeddings(text_embeddings, video_embeddings, dataset.caption_video_index, config.dsl,
                                      config.dsl_temperature, score_device=device)
    training_rows = config.split == trained.get("train_split", "train") or dataset.unsplit
    rows = " (training rows)" if training_rows else ""
    print(format_results(results, f"{name} {config.split}{rows}"))
    if config.examples:
        draw_examples(dataset, text_embeddings, video_embeddings, config.examples,
                      title=f"{model_name} on {name} {config.split}{rows}")
        print(f"wrote {config.examples}", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_command(main, sys.argv[1:], "evaluate.py")
