"""Search your own videos with a trained model: the videos for a text, the nearest videos for a video, the best
captions for a video.

    python search.py index ~/videos --checkpoint runs/demo/last.pt --index my_videos.index
    python search.py query "a dog plays with its tail" --index my_videos.index -k 10 [--json] [--html hits.html]
    python search.py query --queries texts.txt --index my_videos.index [--json]       # a text per line, together
    python search.py query --video clip.mp4 --index my_videos.index                  # the nearest videos
    python search.py query --video clip.mp4 --captions captions.txt --checkpoint runs/demo/last.pt  # video -> text
    torchrun --nproc_per_node 4 search.py index ~/videos --checkpoint ... --index ...  # each process a share

What a search is (read this first): every video is embedded once, exactly as evaluation embeds a test video
(evaluate.embed_videos's pipeline: the segment middles, CLIP's resize and center crop, `encode_video`), and the
embeddings are kept on disk; a query is embedded the same way (`encode_text`, or `encode_video`), and the
videos are ranked by cosine similarity, exactly: every row of the index is scored, a chunk of rows at a time
(`top_k`: a float16 product picks the few rows that can be among the best, and those are scored again in
float32), with no approximate index (docs/search_at_scale.md: when one is needed). The scores are the cosines
the evaluation ranks by, up to the float16 in which the index keeps the videos' embeddings (about 1e-4).

    from search import VideoSearch, load_model
    videos = VideoSearch(load_model("runs/demo/last.pt"), "my_videos.index")
    videos.update(["~/videos"])                       # embeds new and changed videos, drops the gone ones
    videos.search_text("a dog plays with its tail", k=5)   # [(path, score), ...], best first

`index` is incremental: a rerun embeds only the videos that are new or changed (path, size, mtime), drops those
that are gone, and says how many of each. An index belongs to the model that made it (`model_fingerprint`:
what the model computes, not where its files lie); another model is refused, since two models' embeddings
never mix. Unreadable videos are skipped, counted and listed (`<index>.skipped.txt`); Ctrl-C keeps what was
embedded, and the next `index` continues. The index on disk and its crash safety: formats/video_index.py. The page of
`query --html` names the index, the model and each video with their absolute folders (`--no-html-folders`
leaves every folder out), and replaces only a page it wrote earlier.
"""
import base64
import contextlib
import hashlib
import html
import io
import json
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clip_model
from formats import clip_weights
import data
from utils import distributed
import evaluate
from formats.annotations import VIDEO_SUFFIXES, walk_folders
from utils.cli import (PRECISIONS, ConfigError, Options, at_least, option, parse_config, resolve_device,
                       resolve_precision, run_command)
from utils.errors import Stopped, UserError
from utils.files import atomic_write, printable
from utils.progress import Progress
from formats.video_index import IndexFileError, IndexWriter, VideoIndex, embeddings_file_pattern, skipped_list
from formats.video_io import READ_ERRORS, VideoReadError
from vop import VoP, VoPConfig

ROWS_PER_CHUNK = 1 << 16  # index rows scored at once: 64 MB of float16 at E = 512, read where it is mapped
QUERIES_PER_PASS = 64  # queries ranked in one top_k: its memory grows as queries x rows per chunk (16 MB)


NOT_FINITE = ("the model's embedding of it is not finite (NaN or inf), so it cannot be ranked; with --precision "
              "fp16 or bf16, index with --precision fp32")


class NoVideosError(UserError):
    """A folder to index that does not exist, is empty, or holds no videos."""


# ----------------------------------------------------------------------------------------------------------
# 1. Ranking: exact cosine top-k over the whole index, a chunk of rows at a time


def top_k(queries: torch.Tensor, embeddings: np.ndarray, k: int, device="cpu", norms: np.ndarray | None = None,
          live: np.ndarray | None = None, rows_per_chunk: int = ROWS_PER_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, k'), rows (Q, k')): for each query, the k rows of `embeddings` with the highest cosine, best
    first, a tie to the lower row; k' = min(k, rows that can be ranked). Exact: the answer is that of every
    stored row scored in float32 (the float16 row times the query, divided by the row's length).

    queries (Q, E) L2-normalised; embeddings (N, E) float16, memory-mapped, read a chunk of rows at a time, so
    memory stays at one chunk whatever N. `norms` (N,) float32: the rows' lengths (float16 rounding moves them off
    1 by about 1e-4), divided out so that scores are cosines. `live` (N,) bool leaves out dead rows (videos
    changed or gone since they were embedded). A row whose length is not a positive finite number (a NaN or inf
    in it) is never ranked.

    Why it is fast: on the CPU, with `norms`, each chunk is multiplied in float16 as it lies in memory (no
    float32 copy of it: that copy, not the arithmetic, was the cost), which gives every cosine to within
    `_float16_margin`; the rows that can still be among the best k at that distance (a handful per chunk) are
    scored again in float32, and only those scores are kept. Elsewhere (another device, or no `norms`) a chunk
    is converted and scored in float32 whole. Which rows to keep is decided in NumPy, on one thread: a few passes
    over (Q, rows) scores, which torch would split over threads that, on a busy machine, wait for each other."""
    queries = queries.to(device, torch.float32)  # (Q, E)
    margin = _float16_margin(queries) if norms is not None and torch.device(device).type == "cpu" else None  # (Q,)
    queries16 = queries.half() if margin is not None else None  # (Q, E)
    best_scores = torch.empty(len(queries), 0)  # (Q, <= k), best first
    best_rows = torch.empty(len(queries), 0, dtype=torch.long)  # (Q, <= k)
    for start in range(0, len(embeddings), rows_per_chunk):
        stored = torch.from_numpy(embeddings[start:start + rows_per_chunk]).to(device)  # (rows, E) float16
        stop = start + len(stored)
        usable = live[start:stop].copy() if live is not None else np.ones(len(stored), bool)  # (rows,)
        lengths = norms[start:stop] if norms is not None else None  # (rows,)
        if lengths is not None:
            usable &= np.isfinite(lengths) & (lengths > 0)
        if margin is None:  # every row of the chunk scored in float32
            scores = stored.float() @ queries.T  # (rows, Q)
            if lengths is not None:
                scores /= torch.from_numpy(lengths).to(device)[:, None]
            scores = scores.T.cpu().numpy()  # (Q, rows)
            scores[~(usable & np.isfinite(scores))] = -np.inf
            query_index, row_index = np.nonzero(_within_reach(scores, 0, best_scores, k))  # (P,) each
            exact = torch.from_numpy(scores[query_index, row_index])  # (P,)
        else:
            bounded = usable & (lengths >= 0.5) & (lengths <= 2)  # (rows,) the rows `_float16_margin` covers
            product = queries16 @ stored.T  # (Q, rows) float16; faster than torch.mv for one query
            with np.errstate(invalid="ignore"):  # NaN or inf times 0: a row left out just below
                rough = product.numpy() * np.reciprocal(lengths, where=bounded, out=np.zeros_like(lengths))  # (Q, rows)
            rough[:, ~bounded] = -np.inf  # cosines to within `margin`; -inf: not rankable, or not covered
            reach = _within_reach(rough, margin, best_scores, k)  # (Q, rows)
            reach[:, usable & ~bounded] = True  # scored in float32 whatever their float16 score
            query_index, row_index = np.nonzero(reach)  # (P,) each, by query, then by row
            query_index, row_index = torch.from_numpy(query_index), torch.from_numpy(row_index)
            exact = ((stored[row_index].float() * queries[query_index]).sum(dim=1)
                     / torch.from_numpy(lengths)[row_index])  # (P,)
            exact.masked_fill_(~exact.isfinite(), -torch.inf)  # a row changed on disk since its length was taken
        best_scores, best_rows = _merge(best_scores, best_rows, torch.as_tensor(query_index),
                                        torch.as_tensor(row_index) + start, exact.cpu(), k)
    found = int(torch.isfinite(best_scores).sum(dim=1).min()) if len(queries) else 0  # -inf pads short lists
    return best_scores[:, :found], best_rows[:, :found]


def _float16_margin(queries: torch.Tensor) -> np.ndarray | None:
    """(Q,): how far the cosine from a float16 product on the CPU (the float16 row times the query rounded to
    float16, times the row's reciprocal length in float32) can be from the float32 one, for a row of length 1/2
    to 2. For a query of length m: m 2^-11 from rounding the query to float16, m E 2^-24 from summing E exact
    products in float32 (torch sums float16 products in float32 on the CPU unless its reduced-precision switch
    is on; tested on inputs built to show a float16 sum), m 2^-11 from rounding the sum to float16, and under
    (sqrt(E) + 4) 2^-24 from numbers below float16's normal range and the float32 scaling; the whole doubled,
    for safety (2.0e-3 at E = 512 for a unit query). None, to score in float32 instead, for queries of length
    outside 1/2 to 2, or NaN."""
    allows_float16_sums = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", lambda: False)
    lengths = queries.norm(dim=1).cpu().numpy()  # (Q,)
    if allows_float16_sums() or not ((lengths >= 0.5) & (lengths <= 2)).all():
        return None
    size = queries.shape[1]
    return 2 * ((2 * 2 ** -11 + size * 2 ** -24) * 1.01 * lengths + (math.sqrt(size) + 4) * 2 ** -24)


def _within_reach(scores: np.ndarray, margin, best_scores: torch.Tensor, k: int) -> np.ndarray:
    """(Q, rows) bool: the rows of a chunk that can be among a query's best k, from `scores` (Q, rows) float32
    known to within `margin` (Q,) of the exact ones (-inf: not rankable). A row is among the best k only if its
    exact score reaches the k-th best so far (`best_scores` (Q, <= k), exact) and the chunk's own k-th exact
    score, which is at least the chunk's k-th of `scores` less `margin`: so its `scores` are at least the larger
    of (the k-th best so far - margin) and (the chunk's k-th - 2 margin). Ties at those bounds are kept."""
    count = min(k, scores.shape[1])
    best_of_chunk = np.partition(scores, -count, axis=1)[:, -count:]  # (Q, count), NaN and inf the largest
    if (np.isnan(best_of_chunk) | (best_of_chunk == np.inf)).any():  # in a row whose length did not tell (the
        np.nan_to_num(scores, copy=False, nan=-np.inf, posinf=-np.inf, neginf=-np.inf)  # file changed after)
        best_of_chunk = np.partition(scores, -count, axis=1)[:, -count:]
    chunk_kth = best_of_chunk.min(axis=1)  # (Q,)
    best_kth = best_scores[:, k - 1].numpy() if best_scores.shape[1] >= k else np.full(len(scores), -np.inf)
    threshold = np.maximum(chunk_kth - 2 * margin, best_kth - margin)  # (Q,)
    return scores >= np.maximum(threshold, np.finfo(np.float32).min)[:, None]  # never -inf


def _merge(best_scores: torch.Tensor, best_rows: torch.Tensor, query_index: torch.Tensor, rows: torch.Tensor,
           scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of each query's best so far (Q, <= k) and of a chunk's scored rows: (P,) each of query_index,
    rows (ascending for each query, all above the rows so far) and their exact scores. Best first, a tie to the
    lower row: the new rows come after the old and in row order, and the sort is stable."""
    counts = torch.bincount(query_index, minlength=len(best_scores))  # (Q,)
    width = int(counts.max()) if len(query_index) else 0
    if width == 0:
        return best_scores, best_rows
    position = torch.arange(len(query_index), device=rows.device) - (counts.cumsum(0) - counts)[query_index]  # (P,)
    new_scores = best_scores.new_full((len(best_scores), width), -torch.inf)  # (Q, width), -inf pads
    new_rows = best_rows.new_full((len(best_scores), width), -1)
    new_scores[query_index, position], new_rows[query_index, position] = scores, rows
    scores, rows = torch.cat([best_scores, new_scores], dim=1), torch.cat([best_rows, new_rows], dim=1)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), rows.gather(1, order)


# ----------------------------------------------------------------------------------------------------------
# 2. A model and its index: the Python API


class VideoSearch:
    """A model and an index of the videos it embedded: `update` the index from folders, `search_text`,
    `search_video`, `rank_captions`, and `embed_videos` / `embed_texts` for the vectors themselves.

    `index`: the index file (created by the first `update`); None to only embed and rank captions. The model
    runs on `device` (default: where it is) under `precision`'s autocast ("auto": fp16 on CUDA, fp32 on CPU;
    "bf16"). Opening an index made by another model is refused (IndexModelError)."""

    def __init__(self, model: VoP, index=None, device=None, precision: str = "auto", batch_size: int = 16,
                 num_workers: int | None = None, show_progress: bool = True):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = resolve_precision(precision, self.device)  # None: fp32
        self.precision = {dtype: name for name, dtype in PRECISIONS.items()}[self.autocast_dtype]
        self.batch_size, self.num_workers, self.show_progress = batch_size, num_workers, show_progress
        self.index_path = Path(index).expanduser().absolute() if index is not None else None
        self.fingerprint = model_fingerprint(model)
        self.image_size = model.clip.visual.input_resolution
        self._opened = (None, None)  # (the index file's stat, VideoIndex): reopened only when it changes
        if self.index_path is not None and self.index_path.exists():
            self.open_index()  # refuse another model's index now, not after embedding

    # -- embedding ------------------------------------------------------------------------------------------

    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """(T, E) float32, L2-normalised: `encode_text` of each caption (evaluate.embed_captions)."""
        return evaluate.embed_captions(self.model, list(captions), self.batch_size, self.device, self.autocast_dtype)

    def embed_videos(self, paths) -> torch.Tensor:
        """(V, E) float32, L2-normalised: `encode_video` of each video file, in evaluation's frames. A video that
        cannot be read raises VideoReadError naming it."""
        paths = [Path(path).expanduser() for path in paths]
        embeddings = torch.empty(len(paths), self._embedding_size())  # (V, E)
        errors = []
        workers = 0 if len(paths) <= 2 else self.num_workers  # starting workers costs more than 2 videos
        files = data.VideoFiles(paths, self.model.num_frames, self.image_size)
        for batch, batch_embeddings in evaluate.embed_video_batches(self.model, files, self.batch_size, workers,
                                                                    self.device, self.autocast_dtype):
            embeddings[batch["index"]] = batch_embeddings
            errors += [error for error in batch["error"] if error]
        if errors:
            raise VideoReadError(f"{errors[0]}" if len(errors) == 1 else
                                 f"{len(errors)} of the {len(paths)} videos cannot be read; the first: {errors[0]}")
        return embeddings

    def _embed_query_video(self, video) -> torch.Tensor:
        """(1, E): a video file, or its frames (F, H, W, 3) uint8 RGB with F the model's frame count."""
        if isinstance(video, (str, os.PathLike)):
            return self.embed_videos([video])
        frames = np.asarray(video)
        if frames.ndim != 4 or frames.shape[0] != self.model.num_frames:
            raise ValueError(f"a video's frames must be ({self.model.num_frames}, H, W, 3) uint8 RGB (this model's "
                             f"frame count; data.sample_frame_indices picks them), got shape {frames.shape}")
        item = {"video": data.video_transform(frames, False, self.image_size)}  # (F, 3, R, R)
        [(_, embedding)] = evaluate.embed_video_batches(self.model, [item], 1, 0, self.device, self.autocast_dtype)
        return embedding

    # -- searching ------------------------------------------------------------------------------------------

    def open_index(self) -> VideoIndex:
        """The index, opened (memory-mapped) once and again only when its file has changed; another model's
        index is refused."""
        self._require_index()
        try:
            stat = self.index_path.stat()
            key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            key = None
        if key is None or self._opened[0] != key:
            index = VideoIndex(self.index_path)
            index.check_model(self.fingerprint, "query it with the model that made it, or index your videos with "
                                                "this model into a new --index")
            damaged = np.flatnonzero(index.damaged)
            if len(damaged):  # top_k never ranks them (their length is not finite): say so once per opening
                print(f"warning: {len(damaged)} of the {len(index)} videos in {self.index_path} have embeddings that "
                      f"are not finite (NaN or inf) and are left out of every search (the first: "
                      f"{index.video_path(damaged[0])}); `search.py index` on their folder embeds them again",
                      file=sys.stderr)
            self._opened = (key, index)
        return self._opened[1]

    def search_text(self, captions, k: int = 10):
        """The k videos with the highest cosine to a caption: [(path, score), ...], best first; for a list of
        captions, one such list per caption."""
        queries = self.embed_texts([captions] if isinstance(captions, str) else captions)  # (Q, E)
        hits = self._search(queries, k)
        return hits[0] if isinstance(captions, str) else hits

    def search_video(self, video, k: int = 10) -> list[tuple[str, float]]:
        """The k videos nearest to `video` (a path, or its frames as in `_embed_query_video`): [(path, score),
        ...], best first. The query video itself, if indexed, is left out."""
        itself = os.path.realpath(Path(video).expanduser()) if isinstance(video, (str, os.PathLike)) else None
        return self._search(self._embed_query_video(video), k, leave_out=itself)[0]

    def rank_captions(self, video, captions: list[str], k: int | None = None) -> list[tuple[str, float]]:
        """Video -> text: `captions` ranked by their cosine to `video`, [(caption, score), ...], best first."""
        scores = (self.embed_texts(captions) @ self._embed_query_video(video).T)[:, 0]  # (T,)
        order = scores.sort(descending=True, stable=True).indices[:k]
        return [(captions[i], float(scores[i])) for i in order.tolist()]

    def _search(self, queries: torch.Tensor, k: int, leave_out: str | None = None) -> list[list[tuple[str, float]]]:
        """The k best hits of each query (Q, E), without the video `leave_out` (a real path); one pass over the
        index for each QUERIES_PER_PASS queries."""
        index = self.open_index()
        hits = []
        for start in range(0, len(queries), QUERIES_PER_PASS):
            scores, rows = top_k(queries[start:start + QUERIES_PER_PASS], index.embeddings, k + (leave_out is not None),
                                 self.device, index.norms, index.live)
            hits += [[(index.video_path(row), score) for row, score in zip(query_rows.tolist(), query_scores.tolist())]
                     for query_rows, query_scores in zip(rows, scores)]
        return [[hit for hit in query_hits if hit[0] != leave_out][:k] for query_hits in hits]

    # -- indexing -------------------------------------------------------------------------------------------

    def update(self, folders) -> dict:
        """Bring the index up to date with the videos under `folders`: embed the new and changed ones, drop the
        gone ones. Returns the counts {"new", "changed", "gone", "unchanged", "unreadable", "videos"}: "new" and
        "changed" the videos embedded now, "unreadable" those skipped (now, or earlier and unchanged since),
        "videos" those the index holds.
        Under torchrun every process calls this: each embeds its share, rank 0 writes the index."""
        self._require_index()
        rank, _ = distributed.rank_and_world_size()
        with contextlib.ExitStack() as stack:
            writer, todo, counts, error = None, None, None, None  # the writer lives on rank 0 only
            if rank == 0:
                try:
                    found = find_videos(folders)  # before the writer: a wrong folder creates no index
                    writer = stack.enter_context(IndexWriter(self.index_path, self.model_record(),
                                                             self._embedding_size(), self.precision))
                    for note in writer.notes:
                        print(note, file=sys.stderr)
                    todo, counts = writer.plan(found)
                except Exception as failure:  # raised in every process, below, so none waits for rank 0
                    error = failure
            todo, counts, error = distributed.from_first_process((todo, counts, error))
            if error is not None:
                raise error
            progress = Progress(f"embedding videos for {self.index_path.name}", len(todo), "videos",
                                stream=sys.stderr, enabled=self.show_progress and rank == 0)
            done, failed, failed_changed = 0, 0, 0
            try:
                for indices, embeddings, errors in self._embedded_batches([path for path, _ in todo]):
                    errors = [error or ("" if finite else NOT_FINITE) for error, finite in
                              zip(errors, embeddings.isfinite().all(dim=1).tolist())]  # never an unrankable row
                    done += len(indices)
                    failed += sum(1 for error in errors if error)
                    # writer.plan lists the changed videos first, then the new ones
                    failed_changed += sum(1 for index, error in zip(indices, errors)
                                          if error and index < counts["changed"])
                    if writer is not None:
                        _write_batch(writer, [todo[index] for index in indices], embeddings, errors)
                    if done < len(todo):  # the last line is finish's
                        progress.update(done, f"{failed} unreadable" if failed else "")
            except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (cli.run_command): keep what was embedded
                if writer is not None:
                    writer.commit()
                raise Stopped(f"{self.index_path} keeps the {done - failed} videos embedded before the stop; run "
                              f"the same command again to embed the {len(todo) - done} left",
                              getattr(stop, "signal", signal.SIGINT)) from None
            if writer is not None:
                writer.finish()
                counts["videos"] = sum(1 for size in writer.sizes if size >= 0)
            if todo:
                progress.finish(f"{failed} unreadable" if failed else "")
            counts["unreadable"] += failed
            counts["changed"] -= failed_changed
            counts["new"] -= failed - failed_changed
        return distributed.from_first_process(counts)  # rank 0's, which alone knows how many the index holds

    def _embedded_batches(self, paths: list[str]):
        """Yield (indices into `paths`, embeddings (B, E), errors [B]) for every batch of `paths`, error "" for a
        video that was read. Under torchrun each process embeds its share (paths r, r + W, ...), and every
        process gets every batch: each round, each process embeds one batch and they exchange them."""
        rank, world_size = distributed.rank_and_world_size()
        files = data.VideoFiles(paths, self.model.num_frames, self.image_size)
        share = torch.utils.data.Subset(files, range(rank, len(files), world_size))
        workers = (data.default_num_workers(distributed.processes_per_machine()) if self.num_workers is None
                   else self.num_workers)
        batches = evaluate.embed_video_batches(self.model, share, self.batch_size, workers, self.device,
                                               self.autocast_dtype)
        rounds = math.ceil(math.ceil(len(files) / world_size) / self.batch_size)  # rank 0's batches, the most
        with contextlib.closing(batches):  # its workers stop when this ends, however it ends
            yield from self._exchanged(batches, rounds)

    def _exchanged(self, batches, rounds: int):
        """Each round, this process's next batch (or none) and every other process's, joined in path order:
        (indices, embeddings (B, E) of all processes' batches, errors)."""
        for _ in range(rounds):
            batch, embeddings = next(batches, (None, None))
            mine = ((batch["index"].tolist(), embeddings, list(batch["error"])) if batch is not None
                    else ([], torch.empty(0, self._embedding_size()), []))
            parts = distributed.gather_objects(mine)  # every process's batch of this round
            indices = [index for part in parts for index in part[0]]
            if indices:  # in path order: the round's batches cover consecutive paths
                order = sorted(range(len(indices)), key=indices.__getitem__)
                embeddings, errors = torch.cat([part[1] for part in parts]), [e for part in parts for e in part[2]]
                yield [indices[i] for i in order], embeddings[order], [errors[i] for i in order]

    def _require_index(self) -> None:
        if self.index_path is None:
            raise ConfigError("no index was given: pass --index (VideoSearch(model, index=...))")

    def _embedding_size(self) -> int:
        return self.model.clip.text_projection.shape[1]

    def model_record(self) -> dict:
        """What an index keeps about its model: the fingerprint, a description, and how to load it again."""
        return {"fingerprint": self.fingerprint, "description": _describe(self.model),
                "source": getattr(self.model, "source", None), "num_frames": self.model.num_frames,
                "image_size": self.image_size}


def _write_batch(writer: IndexWriter, videos: list, embeddings: torch.Tensor, errors: list) -> None:
    """The videos of a batch ([(path, (size, mtime_ns))]) that were read go into the index with their embeddings
    (B, E), the others into its list of unreadable videos; then a commit, if one is due."""
    read = [j for j, error in enumerate(errors) if not error]
    writer.add([videos[j][0] for j in read], [videos[j][1] for j in read], embeddings[read])
    for (path, stat), error in zip(videos, errors):
        if error:
            writer.skip(path, stat, error)
    writer.commit_if_due()


# ----------------------------------------------------------------------------------------------------------
# 3. The model: loading it, and what identifies it


def load_model(checkpoint=None, clip=None, device="cpu", num_frames: int = 12,
               clip_activation: str | None = None) -> VoP:
    """A model to search with, in eval mode on `device`: a train.py checkpoint (what
    evaluate.load_model_from_checkpoint reads; `clip` then says where its backbone now lies), or, without a
    checkpoint, zero-shot CLIP from `clip` (any name or path clip_model.load reads) with `num_frames` frames.
    `model.source` records how to load it again (an index keeps it, so `query` needs no --checkpoint)."""
    if checkpoint is None and clip is None:
        raise ConfigError("give a model: --checkpoint (a train.py checkpoint) or --clip (zero-shot CLIP)")
    if checkpoint is not None:
        model, _ = evaluate.load_model_from_checkpoint(checkpoint, device, clip)
        model.source = {"checkpoint": str(Path(checkpoint).expanduser().absolute()),
                        "clip": clip if not clip or clip in clip_weights.OPENAI_MODELS else
                        str(Path(clip).expanduser().absolute())}
    else:
        backbone = clip_model.load(clip, device, activation=clip_activation)
        model = VoP(backbone, VoPConfig(tune="zero-shot", num_frames=num_frames)).to(device).eval()
        model.source = {"clip": backbone.source["clip"], "activation": backbone.source["activation"],
                        "num_frames": num_frames}
    model.check_vocabulary()  # a backbone too small for CLIP's tokenizer, said now rather than at a caption
    return model


def load_recorded_model(source: dict, device="cpu") -> VoP:
    """The model an index recorded (`VideoSearch.model_record`'s "source")."""
    if source.get("checkpoint"):
        return load_model(source["checkpoint"], source.get("clip"), device)
    return load_model(clip=source["clip"], device=device, num_frames=source["num_frames"],
                      clip_activation=source["activation"])


def model_fingerprint(model: VoP) -> str:
    """SHA-256 of what decides a model's embeddings: its backbone's weights (the weights file's SHA-256 that
    clip_model.load recorded, else the backbone's tensors themselves), every trainable tensor (name, dtype,
    shape, bytes, in name order), its VoPConfig and CLIP config (activation included), frames and input side.
    Two models that compute different embeddings never share a fingerprint; where the files lie plays no part."""
    digest = hashlib.sha256()
    backbone_sha256 = (getattr(model.clip, "source", None) or {}).get("sha256")
    if backbone_sha256:
        digest.update(f"backbone weights file {backbone_sha256}\n".encode())
    else:
        _hash_tensors(digest, model.clip.state_dict())
    _hash_tensors(digest, model.trainable_state_dict())
    settings = {"model": type(model).__qualname__, "vop": model.config.as_dict(),
                "clip": asdict(model.clip.config), "num_frames": model.num_frames,
                "image_size": model.clip.visual.input_resolution}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _hash_tensors(digest, tensors: dict) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def _describe(model: VoP, folders: bool = True) -> str:
    source = getattr(model, "source", None) or {}
    where = source.get("checkpoint") or source.get("clip") or "a model built in Python"
    if not folders and os.path.isabs(where):  # a file's name only (a model's name, such as ViT-B/32, stays)
        where = Path(where).name
    return f"{where}: {model.describe()}"


# ----------------------------------------------------------------------------------------------------------
# 4. Finding the videos of a folder


def find_videos(folders) -> dict:
    """{real path (absolute, links resolved): (size, mtime_ns)} of every video under `folders`, recursively
    (annotations.walk_folders: symlinked folders are followed, each folder once), by the suffixes the project reads
    (annotations.VIDEO_SUFFIXES, any case), in path order. A folder that does not exist, is empty or holds no
    videos is a NoVideosError naming it."""
    videos = {}
    for folder in folders:
        root = Path(folder).expanduser().resolve()  # one name per video, however the folder was named
        if not root.is_dir():
            raise NoVideosError(f"{folder} is not a folder: pass folders of videos" if root.exists() else
                                f"{folder} does not exist: pass folders of videos")
        files, found, unlisted = 0, 0, []
        for parent, file_names in walk_folders(root, onerror=unlisted.append):
            for name in file_names:
                files += 1
                if os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES:
                    found += 1
                    path = os.path.realpath(os.path.join(parent, name))
                    try:
                        status = os.stat(path)
                        videos[path] = (status.st_size, status.st_mtime_ns)
                    except OSError:  # a broken symlink: listed as unreadable when it fails to decode
                        videos[path] = (-1, -1)
        if unlisted:
            print(f"warning: {len(unlisted)} folders under {folder} cannot be listed and were left out (the first: "
                  f"{unlisted[0]})", file=sys.stderr)
        if files == 0:
            raise NoVideosError(f"{folder} is empty: there is nothing to index")
        if found == 0:
            raise NoVideosError(f"{folder} holds {files} files but no videos (suffixes {' '.join(VIDEO_SUFFIXES)}): "
                                f"pass the folder of your videos")
    return dict(sorted(videos.items()))


# ----------------------------------------------------------------------------------------------------------
# 5. What a person reads: a page of hits with their frames (skip on a first reading)

THUMBNAIL_HEIGHT = 96
THUMBNAIL_ASPECT = 4  # a frame wider than 4:1 (or taller than 1:4) is cut to that about its centre
PAGE_MARKER = "<!-- a page of hits written by search.py query --html -->"  # what --html may replace
PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } .meta { color: #666; } .time { color: #666; font-size: 0.85em; margin: 0 0 0.5em 6.5em; }
ol { list-style: none; padding: 0; }
li { display: flex; align-items: center; gap: 1em; margin: 0.6em 0; }
.rank { width: 2.5em; text-align: right; font-size: 1.3em; font-weight: bold; }
.score { width: 4em; font-family: monospace; }
.strip { display: flex; gap: 6px; }
.strip img { height: %dpx; border-radius: 2px; }
.name { font-family: monospace; } .folder { color: #888; font-size: 0.85em; }
""" % THUMBNAIL_HEIGHT


def frame_strip(path, frames: int = 4, folders: bool = True) -> str:
    """HTML: `frames` frames of a video (the segment middles, so in time order, left to right) as JPEG data
    URIs, so the page can be mailed; a note instead if the video cannot be read (naming it without its folder
    unless `folders`). Each thumbnail is THUMBNAIL_HEIGHT pixels high, its frame's aspect kept up to
    THUMBNAIL_ASPECT (an 8000x8 frame is cut about its centre to 32x8, then 384 pixels wide)."""
    try:
        decoded = data.read_frames(path, frames, "uniform")  # (frames, H, W, 3) uint8
    except READ_ERRORS as error:
        message = str(error) if folders else str(error).replace(str(path), Path(path).name)
        return f'<span class="strip">(cannot be read: {html.escape(printable(message))})</span>'
    images = []
    for number, frame in enumerate(decoded, 1):
        image = Image.fromarray(_cut_to_aspect(frame, THUMBNAIL_ASPECT))
        width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
        buffer = io.BytesIO()
        image.resize((width, THUMBNAIL_HEIGHT), Image.BICUBIC).save(buffer, "JPEG", quality=85)
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        images.append(f'<img src="{uri}" alt="frame {number} of {frames}" width="{width}" '
                      f'height="{THUMBNAIL_HEIGHT}">')
    return f'<span class="strip">{"".join(images)}</span>'


def _cut_to_aspect(frame: np.ndarray, most: float) -> np.ndarray:
    """The central part of a frame (H, W, 3) whose width over height (or height over width) is at most `most`."""
    height, width = frame.shape[:2]
    if width > most * height:
        keep = max(1, round(most * height))
        return frame[:, (width - keep) // 2:(width - keep) // 2 + keep]
    if height > most * width:
        keep = max(1, round(most * width))
        return frame[(height - keep) // 2:(height - keep) // 2 + keep]
    return frame


def write_page(path, title: str, hits: list[dict], query_video=None, about: str = "", folders: bool = True) -> None:
    """A self-contained HTML page: the query (its frames, for a video), then each hit with its rank, score and
    its frames and file name (a video) or its text (a caption). `hits` as `--json` prints them. The page names
    each video with its absolute folder, unless `folders` is False (`--no-html-folders`: file names only); the
    caller says what `title` and `about` show."""
    def text(value) -> str:  # escaped, a name that is not UTF-8 with \xNN escapes
        return html.escape(printable(str(value)))

    parts = [f"<h1>{text(title)}</h1>", f'<p class="meta">{text(about)}</p>']
    if query_video is not None:
        parts.append(f"<p>{frame_strip(query_video, folders=folders)}</p>")
    if any("video" in hit for hit in hits):
        parts.append('<p class="time">time &rarr; (4 frames per video, left to right)</p>')
    parts.append("<ol>")
    for hit in hits:
        if "video" in hit:
            video = Path(hit["video"])
            folder = f'<br><span class="folder">{text(video.parent)}</span>' if folders else ""
            what = (f'{frame_strip(video, folders=folders)}<span><span class="name">{text(video.name)}</span>'
                    f'{folder}</span>')
        else:
            what = f'<span class="caption">{text(hit["caption"])}</span>'
        parts.append(f'<li><span class="rank">{hit["rank"]}</span><span class="score">{hit["score"]:.4f}</span>'
                     f'{what}</li>')
    parts.append("</ol>")
    page = (f'<!DOCTYPE html>\n{PAGE_MARKER}\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{text(title)}'
            f'</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n' + "\n".join(parts) + "\n</body>\n</html>\n")
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(page)


def check_page_path(path, index=None) -> None:
    """Refuse, before any work, a --html page that would replace anything but a page this command wrote (which
    carries PAGE_MARKER): one of the files of `index`, a folder, any other existing file; or that has no folder
    to go into. A ConfigError naming --html and the fix."""
    page = Path(path).expanduser()
    where = Path(os.path.realpath(page))
    if index is not None:
        index = Path(os.path.realpath(Path(index).expanduser()))
        own = {index, skipped_list(index), Path(f"{index}.lock")}
        if where in own or (where.parent == index.parent and embeddings_file_pattern(index).fullmatch(where.name)):
            raise ConfigError(f"--html {path} is one of the files of the index {index}: name a new page, e.g. "
                              f"--html hits.html")
    if where.is_dir():
        raise ConfigError(f"--html {path} is a folder: name the page's file, e.g. --html hits.html")
    if where.exists():
        try:
            with open(where, "rb") as handle:
                ours = PAGE_MARKER.encode() in handle.read(4096)
        except OSError:
            ours = False
        if not ours:
            raise ConfigError(f"--html {path} exists and is not a page that search.py query wrote: name a new file "
                              f"(or move that one away first)")
    elif not where.parent.is_dir():
        raise ConfigError(f"--html {path}: the folder {where.parent} does not exist; create it or name another")


# ----------------------------------------------------------------------------------------------------------
# 6. Command line


@dataclass
class ModelOptions(Options):
    """The flags both commands share: the model, and where and how it runs."""
    checkpoint: str | None = option(None, "the model: a train.py checkpoint (e.g. runs/demo/last.pt); for query, "
                                          "if not the one the index recorded")
    clip: str | None = option(None, "zero-shot CLIP instead (a name such as ViT-B/32, or a weights file/folder); "
                                    "with --checkpoint: where its backbone now lies")
    clip_activation: str | None = option(None, "for --clip weights without a config: quick_gelu or gelu",
                                         choices=("quick_gelu", "gelu"))
    num_frames: int = option(12, "frames per video for --clip (a checkpoint has its own)", at_least(1))
    device: str = option("auto", "cuda, cpu, ...; auto picks cuda when available")
    precision: str = option("auto", "autocast: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16",
                            choices=("auto", *PRECISIONS))


@dataclass
class IndexConfig(ModelOptions):
    """search.py index: each field is the flag --field-name (the folders come first, without a flag)."""
    folders: tuple = option((), "folders of videos, searched recursively", positional="+")
    index: str | None = option(None, "the index file to create or update, e.g. my_videos.index")
    batch_size: int = option(16, "videos per batch", at_least(1))
    num_workers: int | None = option(None, "DataLoader workers decoding videos; default: this machine's cores",
                                     at_least(0))


@dataclass
class QueryConfig(ModelOptions):
    """search.py query: each field is the flag --field-name (the text comes first, without a flag)."""
    text: str | None = option(None, "what to search for (or --queries, or --video)", positional="?")
    queries: str | None = option(None, "a text file of texts to search for, one per line, searched together: each "
                                       "text, then its hits (with --json, one JSON object per line)")
    index: str | None = option(None, "the index to search (its model is loaded from what it recorded)")
    k: int = option(10, "how many hits", at_least(1), short="-k")
    video: str | None = option(None, "query with a video file instead of a text: the nearest videos (the video "
                                     "itself left out, so a query of an indexed video shows the k others)")
    captions: str | None = option(None, "with --video: a text file of captions, one per line, ranked for the video")
    json: bool = option(False, "print a JSON list of {rank, score, video or caption}, best first, and nothing else")
    html: str | None = option(None, "also write a page with each hit's frames (e.g. hits.html), thumbnails inside; "
                                    "it shows the absolute paths of the index, the model and each video's folder "
                                    "(see --no-html-folders); an existing file is replaced only if it is such a page")
    html_folders: bool = option(True, "with --html: show the folders of the videos, the index and the model; "
                                      "--no-html-folders leaves every folder out (file names only), for a page "
                                      "to mail or publish")


def index_main(config: IndexConfig) -> dict:
    if config.index is None:
        raise ConfigError("--index: name the index file to create or update, e.g. --index my_videos.index")
    _, _, device = distributed.setup(resolve_device(config.device))
    model = load_model(config.checkpoint, config.clip, device, config.num_frames, config.clip_activation)
    search = VideoSearch(model, config.index, device, config.precision, config.batch_size, config.num_workers)
    counts = search.update(config.folders)
    if distributed.rank_and_world_size()[0] == 0:
        print(f"{printable(str(search.index_path))}: {_count(counts['videos'], 'video')}; {counts['new']} new, "
              f"{counts['changed']} changed, {counts['gone']} gone, {counts['unchanged']} unchanged, "
              f"{counts['unreadable']} unreadable")
        if counts["unreadable"]:
            print(f"warning: {_count(counts['unreadable'], 'video')} could not be read and "
                  f"{'was' if counts['unreadable'] == 1 else 'were'} skipped; listed in "
                  f"{skipped_list(search.index_path)}", file=sys.stderr)
    return counts


def query_main(config: QueryConfig) -> list[dict]:
    if config.captions and not config.video:
        raise ConfigError(f"--captions {config.captions} ranks captions for a video: give --video FILE too"
                          + (", instead of a text" if config.text is not None else ""))
    if sum(given is not None for given in (config.text, config.queries, config.video)) > 1:
        raise ConfigError("give one thing to search for: a text, --queries FILE (texts, one per line) or --video "
                          "FILE, not several")
    if config.text is None and config.queries is None and config.video is None:
        raise ConfigError('give a text to search for (in quotes: search.py query "a dog runs" --index ...), '
                          '--queries FILE (texts, one per line) or --video FILE')
    if config.queries and config.html:
        raise ConfigError("--html writes the page of one query: leave it out with --queries, or give one text")
    texts = _read_lines(config.queries, "--queries", "text") if config.queries else None
    if config.index is None and not (config.captions and (config.checkpoint or config.clip)):
        raise ConfigError("give a model: --checkpoint or --clip (or --index, to use the model it recorded)"
                          if config.captions else "--index: name the index to search (made by `search.py index`)")
    if config.html:
        check_page_path(config.html, config.index)  # before any work
    device = resolve_device(config.device)
    if config.checkpoint or config.clip:
        model = load_model(config.checkpoint, config.clip, device, config.num_frames, config.clip_activation)
    else:
        source = VideoIndex(config.index).header["model"].get("source")
        if not source:
            raise IndexFileError(f"{config.index} does not record how to load its model (it was made in Python): "
                                 f"pass --checkpoint or --clip")
        model = load_recorded_model(source, device)
    search = VideoSearch(model, config.index if not config.captions else None, device, config.precision,
                         show_progress=False)
    if texts is not None:
        return _search_many(search, texts, config.k, config.json)
    if config.captions:
        captions = _read_lines(config.captions, "--captions", "caption")
        found, key = search.rank_captions(config.video, captions, config.k), "caption"
        title = f"Captions for {Path(config.video).name}"
    else:
        found = search.search_video(config.video, config.k) if config.video else search.search_text(config.text,
                                                                                                    config.k)
        key, title = "video", f"Videos for “{config.text}”" if config.text else f"Videos nearest {config.video}"
    hits = [{"rank": rank, "score": round(score, 6), key: item} for rank, (item, score) in enumerate(found, 1)]
    # What is printed holds a name that is not UTF-8 with \xNN escapes; the hits returned keep it as it is.
    if config.json:
        print(json.dumps([{**hit, key: printable(hit[key])} for hit in hits], indent=1, ensure_ascii=False))
    else:
        for hit in hits:
            print(f"{hit['rank']:4d}  {hit['score']:.4f}  {printable(hit[key])}")
    if config.video and not config.captions:
        print(f"note: the query video itself is left out of the {len(hits)} hits", file=sys.stderr)
    if config.html:
        if config.video and not config.html_folders:
            title = title.replace(config.video, Path(config.video).name)
        about = (f"index {search.index_path if config.html_folders else search.index_path.name} "
                 f"({len(search.open_index())} videos); " if not config.captions else ""
                 ) + f"model {_describe(model, config.html_folders)}; scores are cosine similarities"
        write_page(config.html, title, hits, config.video, about, config.html_folders)
        print(f"wrote {config.html}", file=sys.stderr)
    return hits


def _count(number: int, noun: str) -> str:
    """'1 video', '2 videos'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _search_many(search: VideoSearch, texts: list[str], k: int, as_json: bool) -> list[dict]:
    """--queries: each text's hits, printed as soon as its pass is done; QUERIES_PER_PASS texts are embedded and
    ranked together (one pass over the index). Returns [{"query", "hits"}], hits as for one text."""
    results = []
    for start in range(0, len(texts), QUERIES_PER_PASS):
        group = texts[start:start + QUERIES_PER_PASS]
        for text, found in zip(group, search.search_text(group, k)):
            hits = [{"rank": rank, "score": round(score, 6), "video": path} for rank, (path, score) in
                    enumerate(found, 1)]
            if as_json:  # a name that is not UTF-8 printed with \xNN escapes, as for one text
                print(json.dumps({"query": text, "hits": [{**hit, "video": printable(hit["video"])} for hit in hits]},
                                 ensure_ascii=False))
            else:
                lines = [f"{hit['rank']:4d}  {hit['score']:.4f}  {printable(hit['video'])}" for hit in hits]
                print("\n".join([text, *lines]) + "\n")  # the text, its hits, a blank line
            results.append({"query": text, "hits": hits})
        sys.stdout.flush()
    return results


def _read_lines(path, flag: str, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file given by `flag`, stripped: one `what` each."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{flag} {path}: cannot be read ({error})") from None
    if not lines:
        raise ConfigError(f"{flag} {path} holds no {what}s: write one {what} per line")
    return lines


COMMANDS = {"index": (IndexConfig, index_main, "search.py index: embed the videos under folders into an index "
                                               "(incrementally)."),
            "query": (QueryConfig, query_main, "search.py query: the videos for a text or a video, or the captions "
                                               "for a video.")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            summary, usage = __doc__.split("\n\n")[:2]
            print(f"{summary}\n\n{usage}\n\nThe flags of each command: python search.py index --help, python search.py "
                  f"query --help")
            return None
        if not argv:
            raise ConfigError('give a command: python search.py index FOLDER --checkpoint last.pt --index my.index, '
                              'then python search.py query "a text" --index my.index (python search.py --help)')
        raise ConfigError(f"the first word must be a command, index or query (got {argv[0]}); see python search.py "
                          f"--help")
    config_class, command, description = COMMANDS[argv[0]]
    return command(parse_config(config_class, argv[1:], description, prog=f"search.py {argv[0]}"))


if __name__ == "__main__":
    run_command(main, sys.argv[1:], "search.py")
