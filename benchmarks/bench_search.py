"""Benchmark search.py (not a test): what an index of a million videos costs, how fast `index` embeds videos, and
bf16 against fp32.

1. A million videos: synthetic L2-normalised embeddings (E = 512, ViT-B/32's size) written as an index by
   formats/video_index.py's IndexWriter. Size on disk; writing it; one commit of its table; then, in a fresh
   process, opening it, its memory (resident anonymous memory, and the file pages mapped), and the latency of
   an exact top-10 query: with the embeddings file out of the page cache (cold: read from disk) and in it
   (warm). Then, on 2 threads and in rounds that take turns (so a busy neighbour slows each alike), the exact
   top-10 of 1 and of 10 queries by `search.top_k` beside FAISS's exact indexes over the same rows, when
   faiss-cpu is installed: `IndexScalarQuantizer(QT_fp16)` (the same float16 bytes) and `IndexFlatIP`
   (float32), and the floor, one pass over the 1 GB (torch's max of it as int16, on 2 threads: a read and next
   to nothing else); medians and the ratios to FAISS float16, from one run. And queries per second,
   QUERIES_PER_PASS (or more) queries per top_k.
2. `index` on MSR-VTT-like clips (320x240, 30 fps, 15 s, H.264, from ffmpeg's testsrc2; see bench_data.py):
   videos per second for the demo's tiny CLIP and for ViT-B/32 (random weights, plain VoP, 12 frames), end to
   end (VideoSearch.update: decode in DataLoader workers + encode + write), and each part alone.
3. bf16 against fp32 on the demo world: the demo's trained VoP (`python demo.py --prompts pos`, trained here
   if no --checkpoint is given) indexes the 160 test clips and answers every test caption in each precision;
   how many top-5 lists are unchanged, and the time of each; then ViT-B/32's video encoder in each precision.
4. Past an exact scan: docs/search_at_scale.md's code (FAISS IVF and HNSW built from an index's own rows;
   recall@10 against the exact top-10), run on a synthetic index of --rows videos about 10,000 topics, with
   100 texts drawn about the same topics (`around_topics`), or with no structure at all (--at-scale random).
   Needs faiss-cpu.

    python benchmarks/bench_search.py [--rows 1000000] [--clips 16] [--checkpoint runs/demo/last.pt] [--parts 1234]
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import make_clips  # noqa: E402
from common import REPO, argument_parser, machine_line, timed_median  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import clip_model  # noqa: E402
from formats import annotations  # noqa: E402
import data  # noqa: E402
import search  # noqa: E402
from formats import video_index  # noqa: E402
from vop import VoP, VoPConfig  # noqa: E402

EMBEDDING_SIZE = 512


# -- 1. a million videos ----------------------------------------------------------------------------------

TOPICS = 10_000  # part 4's synthetic videos: about 100 a topic in a million
VIDEO_CLOSENESS, TEXT_CLOSENESS = 0.7, 0.5  # cosine of a video, and of a text, to its topic's centre


def topic_centres() -> torch.Tensor:
    """(TOPICS, E) unit vectors: what part 4's synthetic videos and texts are about."""
    return torch.nn.functional.normalize(torch.randn(TOPICS, EMBEDDING_SIZE, generator=torch.Generator()
                                                     .manual_seed(10)), dim=1)


def around_topics(count: int, closeness: float, generator) -> torch.Tensor:
    """(count, E) unit vectors, each at cosine about `closeness` to a random topic's centre (the rest random):
    a text and a video of the same topic then meet at about 0.7 x 0.5 = 0.35, as CLIP's texts and videos do."""
    centres = topic_centres()[torch.randint(TOPICS, (count,), generator=generator)]
    noise = torch.nn.functional.normalize(torch.randn(count, EMBEDDING_SIZE, generator=generator), dim=1)
    return torch.nn.functional.normalize(centres + (1 / closeness ** 2 - 1) ** 0.5 * noise, dim=1)


def write_synthetic_index(path: Path, rows: int, topics: bool = False) -> float:
    """An index of `rows` unit vectors under MSR-VTT-like paths: random (no structure at all), or about topics
    (`around_topics`); returns the seconds it took."""
    record = {"fingerprint": "synthetic", "description": "synthetic embeddings", "source": None,
              "num_frames": 12, "image_size": 224}
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    with video_index.IndexWriter(path, record, EMBEDDING_SIZE) as writer:
        for start in range(0, rows, 65536):
            count = min(65536, rows - start)
            embeddings = (around_topics(count, VIDEO_CLOSENESS, generator) if topics else
                          torch.nn.functional.normalize(torch.randn(count, EMBEDDING_SIZE, generator=generator), dim=1))
            paths = [f"/data/videos/collection_{row // 1000:04d}/video{row:07d}.mp4" for row in range(start,
                                                                                                 start + count)]
            writer.add(paths, [(12_345_678, 1_700_000_000_000_000_000)] * count, embeddings)
        writer.finish()
        commit = time.perf_counter()
        writer.commit()
        print(f"one commit of the {rows:,}-video table (an update commits after a batch only when the time since "
              f"its last commit makes this at most {100 * video_index.COMMIT_COST:.0f}% of it): "
              f"{time.perf_counter() - commit:.2f} s")
    return time.perf_counter() - started


def faiss_or_none(left_out: str):
    """The faiss module, or None (with a line saying what is `left_out`) where faiss-cpu is not installed: the
    project runs without it."""
    try:
        import faiss
    except ImportError:
        print(f"faiss-cpu is not installed (pip install faiss-cpu): {left_out}", flush=True)
        return None
    return faiss


def take_turns(runs: dict, rounds: int) -> dict:
    """{name: (median, min, max) seconds} of each callable in `runs`, after one warm-up each, over `rounds`
    rounds in which each runs once in turn: a neighbour's load then falls on all of them alike."""
    for run in runs.values():
        run()
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: (statistics.median(times), min(times), max(times)) for name, times in seconds.items()}


def exact_top_10_beside_faiss(index, queries: torch.Tensor, rounds: int = 7) -> dict:
    """Median seconds of the exact top-10 of 1 and of 10 queries: search.top_k, FAISS's exact float16 and float32
    indexes over the same rows (when faiss-cpu is installed), and one pass over the embeddings' bytes; then
    queries per second of top_k for more queries at once."""
    torch.set_num_threads(2)
    embeddings, rows_at_once = index.embeddings, 65536

    def one_pass():  # the floor: read every byte once and do next to nothing with it (the largest int16), 2 threads
        torch.from_numpy(embeddings).view(torch.int16).max()

    runs = {"floor": one_pass}
    for count in (1, 10):
        runs[f"top_k {count}"] = lambda count=count: search.top_k(queries[:count], embeddings, 10, norms=index.norms,
                                                                  live=index.live)
    faiss = faiss_or_none("FAISS is left out of the comparison")
    if faiss is not None:
        faiss.omp_set_num_threads(2)
        size = embeddings.shape[1]
        exact16 = faiss.IndexScalarQuantizer(size, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        exact32 = faiss.IndexFlatIP(size)
        for start in range(0, len(embeddings), rows_at_once):
            rows = np.asarray(embeddings[start:start + rows_at_once], np.float32)
            exact16.add(rows)
            exact32.add(rows)
        for name, faiss_index in (("FAISS float16", exact16), ("FAISS float32", exact32)):
            for count in (1, 10):
                runs[f"{name} {count}"] = lambda count=count, faiss_index=faiss_index: faiss_index.search(
                    queries[:count].numpy(), 10)
    figures = take_turns(runs, rounds)
    if faiss is not None:  # the same answers, up to the lengths top_k divides by
        _, ours = search.top_k(queries, embeddings, 10, norms=index.norms, live=index.live)
        _, theirs = exact16.search(queries.numpy(), 10)
        figures["same top-10 as FAISS float16"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in
                                                                 zip(ours.tolist(), theirs.tolist())]))
    many = torch.nn.functional.normalize(torch.randn(256, embeddings.shape[1], generator=torch.Generator()
                                                     .manual_seed(2)), dim=1)
    for count in (search.QUERIES_PER_PASS, 256):
        seconds = timed_median(lambda: search.top_k(many[:count], embeddings, 10, norms=index.norms,
                                                    live=index.live), 3)[0]
        figures[f"queries/s {count}"] = count / seconds
    return figures


def print_comparison(figures: dict, rows: int) -> None:
    """The comparison as a Markdown table: milliseconds (median, min-max) and the ratio to FAISS float16."""
    names = [("top_k", "this project, `search.top_k`"), ("FAISS float16", "FAISS `IndexScalarQuantizer(QT_fp16)`"),
             ("FAISS float32", "FAISS `IndexFlatIP` (float32)")]
    print(f"\nthe exact top-10 of {rows:,} x {EMBEDDING_SIZE} float16 rows in the page cache, 2 threads, ms: median "
          f"(min-max) of rounds taken in turn; x: the ratio to FAISS float16's median in this run")
    if "FAISS float16 1" not in figures:
        print("(faiss-cpu is not installed here, so FAISS is left out: pip install faiss-cpu to compare)")
    print("| | 1 query | 10 queries |\n|---|---:|---:|")
    for key, label in names:
        if f"{key} 1" not in figures:
            continue
        cells = []
        for count in (1, 10):
            median, low, high = figures[f"{key} {count}"]
            ratio = (f" ({median / figures[f'FAISS float16 {count}'][0]:.2f}x)" if "FAISS float16 1" in figures
                     else "")
            cells.append(f"{1000 * median:,.0f} ({1000 * low:,.0f}-{1000 * high:,.0f}){ratio}")
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    median, low, high = figures["floor"]
    print(f"| floor: one read of the {rows * EMBEDDING_SIZE * 2 / 1e9:.2f} GB | {1000 * median:,.0f} "
          f"({1000 * low:,.0f}-{1000 * high:,.0f}) | the same |")
    if "same top-10 as FAISS float16" in figures:
        print(f"top_k and FAISS float16 agree on {100 * figures['same top-10 as FAISS float16']:.1f}% of the top-10 "
              f"(FAISS ranks by inner product, top_k by cosine: the rows' lengths are 1 +- 1e-3)")
    print("queries per second of top_k, many at once: " + ", ".join(
        f"{figures[name]:,.0f} with {name.split()[-1]} per call" for name in figures if name.startswith("queries/s")))


def memory() -> dict:
    """This process's resident memory in MB: anonymous (its own), file pages (the mapped index), peak."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def measure_queries(path: str) -> dict:
    """In a fresh process: open the index, query it cold and warm; the figures as a dict."""
    results = {"before": memory()}
    started = time.perf_counter()
    index = video_index.VideoIndex(path)
    results["open_s"] = time.perf_counter() - started
    results["after_open"] = memory()
    queries = torch.nn.functional.normalize(torch.randn(10, EMBEDDING_SIZE, generator=torch.Generator().manual_seed(1)),
                                            dim=1)
    def ask(some_queries):
        return search.top_k(some_queries, index.embeddings, 10, norms=index.norms, live=index.live)

    embeddings_file = index.path.parent / index.header["embeddings_file"]
    with open(embeddings_file, "rb") as handle:  # out of the page cache (this file only): a cold query
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    started = time.perf_counter()
    ask(queries[:1])
    results["cold_s"] = time.perf_counter() - started
    results["warm_s"] = timed_median(lambda: ask(queries[:1]))[0]
    results["warm_10_s"] = timed_median(lambda: ask(queries))[0]
    _, rows = ask(queries[:1])
    started = time.perf_counter()
    [index.video_path(row) for row in rows[0].tolist()]
    results["paths_s"] = time.perf_counter() - started
    results["after_queries"] = memory()
    results["compare"] = exact_top_10_beside_faiss(index, queries)
    results["load"] = os.getloadavg()[0]
    return results


def a_million_videos(out: Path, rows: int) -> None:
    path = out / "million.index"
    for old in out.glob("million.index*"):
        old.unlink()
    seconds = write_synthetic_index(path, rows)
    files = list(out.glob("million.index*"))
    size = {file.name.split(".", 2)[-1]: file.stat().st_size for file in files}
    print(f"writing the index: {seconds:.1f} s; on disk: " + ", ".join(f"{name} {bytes_ / 1e6:,.1f} MB"
                                                                       for name, bytes_ in sorted(size.items())))
    completed = subprocess.run([sys.executable, __file__, "--measure-queries", str(path)], capture_output=True,
                               text=True, check=True)
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"open: {figures['open_s']:.2f} s; resident memory after open: {figures['after_open']['RssAnon']:.0f} MB "
          f"anonymous (torch and Python: {figures['before']['RssAnon']:.0f} MB before), "
          f"{figures['after_open']['RssFile']:.0f} MB of mapped files")
    print(f"top-10 of {rows:,} for one text: {1000 * figures['cold_s']:.0f} ms cold (embeddings read from disk), "
          f"{1000 * figures['warm_s']:.0f} ms warm; 10 texts at once {1000 * figures['warm_10_s']:.0f} ms; "
          f"the 10 paths {1000 * figures['paths_s']:.2f} ms")
    print(f"after the queries: {figures['after_queries']['RssAnon']:.0f} MB anonymous, "
          f"{figures['after_queries']['RssFile']:.0f} MB of mapped file pages (the page cache: shared, "
          f"evictable), peak {figures['after_queries']['VmHWM']:.0f} MB")
    print_comparison(figures["compare"], rows)
    print(f"load average at the end: {figures['load']:.1f}")
    for file in files:
        file.unlink()


# -- 4. past an exact scan: the docs page's code on the synthetic index ----------------------------------

def search_at_scale(out: Path, rows: int, topics: bool, queries: int = 100) -> None:
    """docs/search_at_scale.md's Python blocks, in order, on a synthetic index of `rows` videos (about topics, or
    random), with `queries` texts drawn as its videos are: the first block (which loads the index's model and
    embeds texts) is replaced by what it defines; the others run as printed, and print their figures."""
    if faiss_or_none("part 4 needs it, and is left out") is None:
        return
    torch.set_num_threads(2)
    path = out / "at_scale.index"
    for old in out.glob("at_scale.index*"):
        old.unlink()
    seconds = write_synthetic_index(path, rows, topics)
    print(f"{rows:,} synthetic videos ({f'about {TOPICS:,} topics' if topics else 'random: no structure'}), "
          f"written in {seconds:.0f} s", flush=True)
    index = video_index.VideoIndex(path)
    generator = torch.Generator().manual_seed(3)
    texts = (around_topics(queries, TEXT_CLOSENESS, generator) if topics else
             torch.nn.functional.normalize(torch.randn(queries, EMBEDDING_SIZE, generator=generator), dim=1))
    namespace = {"np": np, "index": index, "rows": np.flatnonzero(index.live & ~index.damaged),
                 "embeddings": index.embeddings, "queries": texts.numpy()}
    for block in page_code(Path(REPO) / "docs" / "search_at_scale.md")[1:]:
        block = block.replace("my_videos.index", str(path)).replace("my_videos.ivf", str(out / "at_scale.ivf"))
        exec(compile(block, "docs/search_at_scale.md", "exec"), namespace)
        sys.stdout.flush()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    for old in [*out.glob("at_scale.index*"), out / "at_scale.ivf"]:
        old.unlink(missing_ok=True)


def page_code(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return [block.split("```", 1)[0] for block in page.read_text(encoding="utf-8").split("```python\n")[1:]]


# -- 2. index speed ---------------------------------------------------------------------------------------

DEMO_ROOT = Path("~/.cache/vop/demo").expanduser()  # where demo.py keeps its world and its tiny CLIP


def demo_checkpoint(out: Path) -> Path:
    """The demo's trained VoP pos (python demo.py --prompts pos, run here once), with its world and tiny CLIP."""
    checkpoint = out / "demo" / "last.pt"
    if not checkpoint.is_file() or not (DEMO_ROOT / "tiny_clip.pt").is_file():
        print("training the demo's VoP pos (python demo.py --prompts pos) ...", flush=True)
        subprocess.run([sys.executable, "demo.py", "--prompts", "pos", "--out-dir", str(out / "demo")], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
    return checkpoint


def model_of(config: clip_model.CLIPConfig) -> VoP:
    torch.manual_seed(0)
    return VoP(clip_model.CLIP(config), VoPConfig(num_frames=12)).eval()  # plain VoP, the protocol's 12 frames


def index_speed(name: str, model: VoP, folder: Path, out: Path, workers: int) -> None:
    """videos/s of VideoSearch.update (worker start-up included), of decoding alone (one process, one thread:
    per CPU-second) and of encoding alone (a batch of 16 videos, 4 for ViT-B/32)."""
    videos = sorted(folder.glob("*.mp4"))
    index = out / f"speed_{name.split()[0].replace('/', '-')}.index"  # ViT-B/32 -> speed_ViT-B-32.index
    for old in out.glob(f"{index.name}*"):
        old.unlink()
    searcher = search.VideoSearch(model, index, precision="fp32", batch_size=16, num_workers=workers,
                                  show_progress=False)
    started = time.perf_counter()
    searcher.update([folder])
    end_to_end = len(videos) / (time.perf_counter() - started)
    files = data.VideoFiles(videos[:8], 12, model.clip.visual.input_resolution)
    cv2.setNumThreads(1)
    with torch_threads(1):
        started = time.perf_counter()
        for item in range(len(files)):
            files[item]
        decode = len(files) / (time.perf_counter() - started)
    batch = 16 if model.clip.visual.input_resolution < 224 else 4  # ViT-B/32 takes seconds per video here
    frames = torch.randn(batch, 12, 3, model.clip.visual.input_resolution, model.clip.visual.input_resolution)
    with torch.no_grad():
        encode = batch / timed_median(lambda: model.encode_video(frames), 1)[0]
    print(f"| {name} | {len(videos)} | {end_to_end:.2f} | {decode:.1f} | {encode:.2f} |", flush=True)


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def index_speeds(out: Path, args) -> None:
    workers = data.default_num_workers()
    print(f"\n2. index speed, videos/s on this machine ({workers} DataLoader workers, batch 16, fp32, plain VoP, "
          f"12 frames); clips: 320x240 30 fps 15 s H.264", flush=True)
    clips = next(iter(make_clips(out, args.clips).values()))
    folders = {}
    for copies in (args.copies, 1):  # the tiny CLIP indexes every clip `copies` times, ViT-B/32 once
        folders[copies] = out / f"clips_x{copies}"
        shutil.rmtree(folders[copies], ignore_errors=True)
        folders[copies].mkdir()
        for copy in range(copies):
            for clip in clips:
                shutil.copy(clip, folders[copies] / f"{copy}_{Path(clip).name}")
    print("| model | videos | `index` end to end, all cores | decode + preprocess, per CPU-second | encode only, "
          "all cores |\n|---|---:|---:|---:|---:|")
    demo_checkpoint(out)  # the demo's tiny CLIP: 32 px, 4 + 4 layers, width 128
    tiny_clip = clip_model.load(DEMO_ROOT / "tiny_clip.pt").config
    index_speed("tiny CLIP (the demo's, 32 px)", model_of(tiny_clip), folders[args.copies], out, workers)
    index_speed("ViT-B/32 (224 px)", model_of(clip_model.CLIPConfig()), folders[1], out, workers)


# -- 3. bf16 against fp32 on the demo world ---------------------------------------------------------------

def precisions(checkpoint: Path, out: Path) -> None:
    world = DEMO_ROOT / "world"
    captions = sorted(set(annotations.read_annotations("synthetic", world, "test").captions))
    num_clips = len(list((world / "test").glob("*.mp4")))
    model = search.load_model(checkpoint)
    top5, timing = {}, {}
    for precision in ("fp32", "bf16"):
        index = out / f"demo_{precision}.index"
        for old in out.glob(f"{index.name}*"):
            old.unlink()
        searcher = search.VideoSearch(model, index, precision=precision, num_workers=0, show_progress=False)
        started = time.perf_counter()
        searcher.update([world / "test"])
        indexing = time.perf_counter() - started
        searcher.search_text(captions[:2], k=5)  # warm-up: the tokenizer's cache, the index's pages
        started = time.perf_counter()
        top5[precision] = searcher.search_text(captions, k=5)
        timing[precision] = (num_clips / indexing, len(captions) / (time.perf_counter() - started))
    same_list = np.mean([[p for p, _ in a] == [p for p, _ in b] for a, b in zip(top5["fp32"], top5["bf16"])])
    same_set = np.mean([{p for p, _ in a} == {p for p, _ in b} for a, b in zip(top5["fp32"], top5["bf16"])])
    same_first = np.mean([a[0][0] == b[0][0] for a, b in zip(top5["fp32"], top5["bf16"])])
    score_difference = max(abs(sa - sb) for a, b in zip(top5["fp32"], top5["bf16"]) for (_, sa), (_, sb) in zip(a, b))
    print(f"demo world ({checkpoint}), {len(captions)} distinct test captions over the {num_clips} test clips, index "
          f"and query each in its precision: top-5 unchanged (same videos, same order) {100 * same_list:.0f}%, same "
          f"five videos {100 * same_set:.0f}%, same top-1 {100 * same_first:.0f}%; largest score difference "
          f"{score_difference:.4f}")
    for precision, (videos, queries) in timing.items():
        print(f"  {precision}: index {videos:.1f} videos/s (no workers), {queries:.1f} queries/s")
    vit = model_of(clip_model.CLIPConfig())
    frames = torch.randn(4, 12, 3, 224, 224)
    with torch.no_grad():
        seconds = {precision: timed_median(lambda: _encode(vit, frames, dtype), 1)[0]
                   for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    print(f"ViT-B/32 encode_video, 4 videos x 12 frames: fp32 {4 / seconds['fp32']:.2f} videos/s, bf16 autocast "
          f"{4 / seconds['bf16']:.2f} videos/s ({seconds['fp32'] / seconds['bf16']:.2f}x)")


def _encode(model, frames, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return model.encode_video(frames)


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="videos in the synthetic index")
    parser.add_argument("--clips", type=int, default=16, help="MSR-VTT-like clips to index")
    parser.add_argument("--copies", type=int, default=4, help="copies of each clip the tiny CLIP indexes")
    parser.add_argument("--parts", default="1234", help="which parts to run (1, 2, 3, 4)")
    parser.add_argument("--checkpoint", help="the demo's checkpoint (trained here if not given)")
    parser.add_argument("--at-scale", default="topics", help="part 4's synthetic videos: topics, random or both "
                                                             "(topics,random)")
    parser.add_argument("--out", default="/tmp/vop_bench_search", help="where the clips and indexes go")
    parser.add_argument("--measure-queries", help=argparse.SUPPRESS)  # the fresh process of part 1
    args = parser.parse_args()
    if args.measure_queries:
        print(json.dumps(measure_queries(args.measure_queries)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine_line(), flush=True)
    print(f"load average at start (other processes share these CPUs): {os.getloadavg()[0]:.1f}\n")

    if "1" in args.parts:
        print(f"1. an index of {args.rows:,} videos (E = {EMBEDDING_SIZE}, float16)", flush=True)
        a_million_videos(out, args.rows)
    if "2" in args.parts:
        index_speeds(out, args)
    if "3" in args.parts:
        print("\n3. bf16 autocast against fp32", flush=True)
        precisions(Path(args.checkpoint) if args.checkpoint else demo_checkpoint(out), out)
    if "4" in args.parts:
        for collection in args.at_scale.split(","):
            print(f"\n4. past an exact scan: docs/search_at_scale.md on {args.rows:,} synthetic videos ({collection})",
                  flush=True)
            search_at_scale(out, args.rows, collection == "topics")


if __name__ == "__main__":
    main()
