"""Reading video files with OpenCV: decode the frames a sampler asked for, surviving the lies real files tell.

Skip on a first reading: data.py says *which* frames VoP uses; this module only gets their pixels.

- `decode_frames(path, sample, strategy)`: (F, H, W, 3) uint8 RGB, where `sample(num_total)` says which frames.
  The header's frame count is a hint only (it can be wrong or 0); a file that ends early is re-sampled over the
  frames that really decode; a frame that fails to decode is replaced by the nearest one that does; an
  unreadable file raises `VideoReadError` naming it.
- two strategies that return identical frames, one sequential pass or a seek per wanted frame, and `auto`,
  which picks the cheaper one from where the file's keyframes are (`scan_video`, `choose_strategy`).
- `probe_videos(paths, num_workers, cache_file)`: does each video open, how many frames, does its first frame
  decode; in parallel, cached, so that a run can leave unreadable videos out before it starts.
- `write_video`: encode frames with OpenCV (tests and the synthetic demo make their clips with it).
"""
import contextlib
import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Callable

import cv2
import numpy as np

from utils.errors import UserError
from utils.files import atomic_write, process_exists, process_start
from utils.progress import Progress

# A broken file makes FFmpeg and OpenCV print a screen of warnings before our one line that names it; quiet them
# unless the user asked for them (OPENCV_FFMPEG_LOGLEVEL, OPENCV_LOG_LEVEL). Read when FFmpeg first opens a file.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
if "OPENCV_LOG_LEVEL" not in os.environ:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Whether this process has opened a video with FFmpeg (to read or to write one): FFmpeg's thread pools do not
# survive fork(), so from then on worker processes are started by a fork server instead (data.make_loader).
_opened_a_video = False


def opened_a_video() -> bool:
    """Whether this process (or the process it was forked from) has opened a video file with FFmpeg."""
    return _opened_a_video


class VideoReadError(UserError):
    """A video file that OpenCV cannot open or from which no frame decodes."""


# What reading one video may raise that means "this video cannot be read" rather than a bug.
READ_ERRORS = (VideoReadError, OSError, cv2.error)


def _bgr_to_rgb(frame_bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)  # (H, W, 3) uint8


def _read_image(path: Path) -> np.ndarray:
    """A still image, which the readers treat as a one-frame video: (H, W, 3) uint8 RGB."""
    image_bgr = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR) if path.is_file() else None
    if image_bgr is None:
        raise VideoReadError(f"{path}: cannot read this image (missing or corrupt); check the file")
    return _bgr_to_rgb(image_bgr)


def _why_unopenable(path: Path) -> str:
    if not path.exists():
        return "the file does not exist"
    if not os.access(path, os.R_OK):
        return "permission denied (make the file readable: chmod a+r)"
    return ("it is not a video OpenCV's FFmpeg can open (corrupt, truncated before its index, or an unknown codec; "
            "ffprobe on the file tells more)")


def _open_capture(path: Path, raw_packets: bool = False) -> cv2.VideoCapture:
    """An opened capture through OpenCV's FFmpeg backend, decoding with as many threads as OpenCV itself may
    use (cv2.getNumThreads(): 1 in a DataLoader worker; FFmpeg would otherwise start one thread per core in
    every worker). `raw_packets`: grab() reads packets without decoding them (see `scan_video`)."""
    try:
        status = os.stat(path)
    except OSError:
        status = None  # _why_unopenable says why, below
    if status is not None and not S_ISREG(status.st_mode):  # a named pipe would block the open for ever
        raise VideoReadError(f"{path}: cannot open video: it is not a regular file (a named pipe, a device or a "
                             f"socket); only video files are read")
    global _opened_a_video
    _opened_a_video = True
    params = [cv2.CAP_PROP_N_THREADS, cv2.getNumThreads()] if hasattr(cv2, "CAP_PROP_N_THREADS") else []
    with _name_for_opencv(path) as name:
        capture = cv2.VideoCapture(name, cv2.CAP_FFMPEG, params + ([cv2.CAP_PROP_FORMAT, -1] if raw_packets else []))
        if not capture.isOpened() and not raw_packets:
            capture = cv2.VideoCapture(name)  # an OpenCV whose FFmpeg backend refuses it: any other backend
    if not capture.isOpened():
        raise VideoReadError(f"{path}: cannot open video: {_why_unopenable(path)}")
    return capture


@contextlib.contextmanager
def _name_for_opencv(path: Path):
    """A name under which OpenCV can open `path`: its own, or, for a name that is not valid UTF-8 (os.fsdecode
    keeps such bytes as lone surrogates, and cv2.VideoCapture crashes the process on them), a symbolic link with
    a plain name in a private temporary folder, removed as soon as the file is open."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield name
        return
    folder = tempfile.mkdtemp(prefix="vop-video-")
    suffix = path.suffix if path.suffix.isascii() and path.suffix[1:].isalnum() else ""  # FFmpeg's format hint
    link = os.path.join(folder, f"video{suffix}")
    try:
        os.symlink(os.path.abspath(os.fsencode(path)), link)
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the link only; the open capture keeps the file


# ----------------------------------------------------------------------------------------------------------
# What the file is: frame count and keyframes, read from the container without decoding

@dataclass(frozen=True)
class VideoLayout:
    header_frames: int  # the container's frame count (CAP_PROP_FRAME_COUNT); 0 when it gives none
    packets: int  # video packets in the file (one per frame in practice); -1 when not scanned
    keyframes: np.ndarray  # (keyframes,) packet indices of keyframes, ascending; empty when unknown
    fourcc: str  # the codec's four characters as the container names them ("h264", "FMP4", "MJPG", ...)


_LAYOUTS: dict = {}  # (path, size, mtime_ns) -> VideoLayout: a worker scans each file once per process


def scan_video(path) -> VideoLayout:
    """Frame count and keyframe positions of a video, from its packets alone (no decoding: about 3 us per
    packet, against 100-200 us to decode a 320x240 frame). Uses OpenCV's raw-stream mode (CAP_PROP_FORMAT -1,
    CAP_PROP_LRF_HAS_KEY_FRAME, OpenCV >= 4.6); where that is missing the keyframes are left unknown.
    Raises VideoReadError naming a file that cannot be opened."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise VideoReadError(f"{path}: cannot open video: {error.strerror or error}") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    capture = None
    if hasattr(cv2, "CAP_PROP_LRF_HAS_KEY_FRAME"):
        try:
            capture = _open_capture(path, raw_packets=True)
        except VideoReadError:
            capture = None  # the plain open below says why, or reads what raw mode could not
    if capture is None:  # no raw mode here: the header is all we learn
        capture = _open_capture(path)
        layout = VideoLayout(max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0), -1, np.zeros(0, np.int64),
                             _fourcc(capture))
    else:
        header_frames, fourcc = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0), _fourcc(capture)
        keyframes, packets = [], 0
        while capture.grab():  # in raw mode grab() reads one packet and decodes nothing
            if capture.get(cv2.CAP_PROP_LRF_HAS_KEY_FRAME) == 1:  # (-1 would mean: not supported)
                keyframes.append(packets)
            packets += 1
        layout = VideoLayout(header_frames, packets, np.array(keyframes, np.int64), fourcc)
    capture.release()
    if len(_LAYOUTS) > 100_000:  # a bound, not a policy: a worker that saw this many files starts afresh
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


def _fourcc(capture: cv2.VideoCapture) -> str:
    code = int(capture.get(cv2.CAP_PROP_FOURCC))
    return "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00")


# ----------------------------------------------------------------------------------------------------------
# Two ways to get the wanted frames, and the rule that picks one

# Seeking with CAP_PROP_POS_FRAMES makes OpenCV jump to the last keyframe at or before (target - 16) and decode
# forward to the target (OpenCV's cap_ffmpeg seek); one sequential pass decodes every frame up to the last
# wanted one. So the cost of each, in decoded frames, follows from where the keyframes are. Measured on
# 320x240 H.264 (keyframe every 250 frames, or 30), MPEG-4 (every 12) and MJPEG (every frame) files, a seek
# cost what this model says to within a few frames (benchmarks/bench_data.py prints the fit).
OPENCV_SEEK_LOOKBACK_FRAMES = 16
SEEK_OVERHEAD_FRAMES = 2  # flushing the decoder and seeking in the container, in decoded-frame units
# When the keyframes are unknown (no raw-stream mode in this OpenCV): x264's default keyframe interval, the
# encoder behind most of the benchmarks' downloads; intra-only codecs have a keyframe on every frame.
ASSUMED_KEYFRAME_INTERVAL = 250
INTRA_ONLY_FOURCCS = {"mjpg", "mjpa", "mjpb", "jpeg", "png", "png ", "rle ", "raw ", "rgba", "ulrg", "uly0"}


def choose_strategy(wanted: np.ndarray, layout: VideoLayout) -> str:
    """"seek" if seeking to each wanted frame decodes fewer frames than one pass up to the last one, else
    "sequential". `wanted` (F,) frame indices; `layout` from `scan_video`."""
    keyframes = layout.keyframes
    if len(keyframes) == 0 or keyframes[0] != 0:
        interval = 1 if layout.fourcc.lower() in INTRA_ONLY_FOURCCS else ASSUMED_KEYFRAME_INTERVAL
        keyframes = np.arange(0, int(np.max(wanted)) + 1, interval)
    targets = np.unique(wanted)  # (distinct,) the seeking reader visits each distinct frame once
    lookback = np.maximum(targets - OPENCV_SEEK_LOOKBACK_FRAMES, 0)
    starts = keyframes[np.searchsorted(keyframes, lookback, side="right") - 1]  # (distinct,) where each seek lands
    seek_cost = int(np.sum(targets - starts + 1 + SEEK_OVERHEAD_FRAMES))
    sequential_cost = int(targets[-1]) + 1
    return "seek" if seek_cost < sequential_cost else "sequential"


def _nearest_decoded(wanted: np.ndarray, decoded: dict) -> np.ndarray:
    """Stack, for each wanted index, the decoded frame whose index is nearest. Returns (F, H, W, 3) uint8."""
    available = np.array(sorted(decoded))  # (decoded,)
    nearest = available[np.abs(available[None, :] - np.asarray(wanted)[:, None]).argmin(axis=1)]  # (F,)
    return np.stack([decoded[int(index)] for index in nearest])


def _read_sequential(path: Path, wanted: np.ndarray, convert=_bgr_to_rgb):
    """One pass: grab() every frame up to the last wanted one, retrieve() only the wanted ones.

    Returns (frames (F, H, W, 3) uint8 RGB or None, number of frames grabbed, whether the stream ended early).
    A wanted frame that fails to retrieve is replaced by the next one that does (or the nearest earlier one).
    `convert` turns each retrieved BGR frame into what is kept (see decode_frames).
    """
    capture = _open_capture(path)
    wanted_set = set(int(i) for i in wanted)
    last_wanted = int(wanted.max())
    decoded = {}  # frame index -> (H, W, 3) uint8 RGB
    need_replacement = False  # a wanted frame failed: keep retrieving until one succeeds
    index = 0
    ended_early = False
    while index <= last_wanted or need_replacement:
        if not capture.grab():
            ended_early = index <= last_wanted
            break
        if index in wanted_set or need_replacement:
            ok, frame_bgr = capture.retrieve()
            if ok and frame_bgr is not None:
                decoded[index] = convert(frame_bgr)
                need_replacement = False
            elif index in wanted_set:
                need_replacement = True
        index += 1
    capture.release()
    if ended_early or not decoded:
        return None, index, ended_early
    return _nearest_decoded(wanted, decoded), index, False


def _read_seeking(path: Path, wanted: np.ndarray, convert=_bgr_to_rgb):
    """Seek to each wanted frame with CAP_PROP_POS_FRAMES (the X-Pool / ModelScope way).

    Returns (F, H, W, 3) uint8 RGB, or None if any seek or read fails or lands elsewhere (the caller then falls
    back to the sequential pass, which knows how to handle short, broken and mislabelled files).
    """
    capture = _open_capture(path)
    frames = {}
    for index in sorted(set(int(i) for i in wanted)):
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame_bgr = capture.read()
        # OpenCV clamps a seek past the frame count its header gives, and then reads another frame: the
        # position after the read tells.
        if not ok or frame_bgr is None or int(capture.get(cv2.CAP_PROP_POS_FRAMES)) != index + 1:
            capture.release()
            return None
        frames[index] = convert(frame_bgr)
    capture.release()
    return np.stack([frames[int(i)] for i in wanted])


def _count_decodable_frames(path: Path) -> int:
    """Frame count by decoding, for files whose header gives none and whose packets could not be counted."""
    capture = _open_capture(path)
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


def decode_frames(path, sample: Callable[[int], np.ndarray], strategy: str = "auto", transform=None) -> np.ndarray:
    """Decode the frames `sample(num_total)` picks out of a video of num_total frames: (F, H, W, 3) uint8 RGB.

    `strategy`: "sequential" (one grab() pass, retrieve() only wanted frames), "seek" (CAP_PROP_POS_FRAMES per
    frame), or "auto" (`choose_strategy`, from the file's keyframes). Both give identical frames. Images (.png,
    .jpg, ...) are read as a one-frame video. The fps is never used (it can be 0). The frame count is the file's
    packets, counted (`scan_video`); the header's count only where they could not be counted; if the stream
    ends before that count, the frames are re-sampled over the frames that really decode.
    `transform(frame)`, if given, maps each (H, W, 3) frame as soon as it is decoded (to (h, w, 3)), so that a
    large video is never held whole: the frame store shrinks 4000x3000 frames this way.
    Raises VideoReadError naming the file if it cannot be opened or nothing decodes.
    """
    path = Path(path)
    if strategy not in ("auto", "sequential", "seek"):
        raise ValueError(f"decode_frames: strategy must be 'auto', 'sequential' or 'seek', got {strategy!r}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = _read_image(path)  # (H, W, 3)
        return np.repeat((image if transform is None else transform(image))[None], len(sample(1)), axis=0)
    convert = _bgr_to_rgb if transform is None else (lambda frame_bgr: transform(_bgr_to_rgb(frame_bgr)))

    layout = scan_video(path)
    # What the file holds (its packets, counted) over what its header claims: a header that under-reports would
    # make the segments cover only the start of the video. The header is used only when packets were not counted.
    num_total = (layout.packets if layout.packets > 0 else layout.header_frames) or _count_decodable_frames(path)
    if num_total < 1:
        raise VideoReadError(f"{path}: no frame decodes; the file is empty or corrupt. Re-encode or remove it.")

    wanted = sample(num_total)  # (F,)
    if strategy == "seek" or (strategy == "auto" and choose_strategy(wanted, layout) == "seek"):
        frames = _read_seeking(path, wanted, convert)
        if frames is not None:
            return frames
    frames, num_grabbed, ended_early = _read_sequential(path, wanted, convert)
    if frames is None and ended_early and num_grabbed > 0:
        # The header promised more frames than the file holds (truncated file, wrong count): sample again
        # over the frames that do exist, so the segments still span the whole real video.
        wanted = sample(num_grabbed)
        frames, _, _ = _read_sequential(path, wanted, convert)
    if frames is None:
        raise VideoReadError(f"{path}: no frame decodes (it should hold {num_total} frames); the file is "
                             "corrupt. Re-encode it, or remove it from the annotations.")
    return frames


# ----------------------------------------------------------------------------------------------------------
# Probing many videos before a run

@dataclass(frozen=True)
class ProbeResult:
    frames: int  # the header's frame count, or the counted packets when the header gives none; 0 if unreadable
    error: str = ""  # why the video is unreadable, naming the file; "" when it is readable

    @property
    def ok(self) -> bool:
        return not self.error


def probe_video(path) -> ProbeResult:
    """Does the video open, how many frames does it report, does its first frame decode."""
    path = Path(path)
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            _read_image(path)
            return ProbeResult(1)
        capture = _open_capture(path)
        frames = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        ok, frame = capture.read()
        capture.release()
        if not ok or frame is None:
            raise VideoReadError(f"{path}: opens, but its first frame does not decode (corrupt or cut short); "
                                 "re-encode or remove it")
        if frames == 0:
            frames = max(scan_video(path).packets, 1)
        return ProbeResult(frames)
    except VideoReadError as error:
        return ProbeResult(0, str(error))
    except (cv2.error, OSError) as error:
        return ProbeResult(0, f"{path}: {error}")


def _probe_in_worker(path: str) -> ProbeResult:
    cv2.setNumThreads(1)  # each worker decodes one frame at a time; the pool gives the parallelism
    return probe_video(path)


def probe_videos(paths, num_workers: int | None = None, cache_file=None, show_progress: bool = False) -> dict:
    """{path: ProbeResult} for every path (keys as given), probed in parallel by `num_workers` processes
    (default: the CPUs this process may use). With `cache_file` (JSON), results are kept per (path, size,
    mtime): a rerun probes only new or changed files. The cache is replaced atomically, so concurrent runs
    (torchrun ranks) never read half of one. About 2 ms of one core per 320x240 H.264 video.
    `show_progress` prints a progress line with the rate and the time left (progress.Progress)."""
    paths = list(paths)
    cache = _read_probe_cache(cache_file)
    results, keys, todo = {}, {}, []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:  # gone, a broken link, a folder that cannot be searched
            results[path] = ProbeResult(0, f"{path}: cannot open video: {error.strerror or error}")
            continue
        keys[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        cached = _cached_probe(cache.get(str(path)), keys[path])
        if cached is not None:
            results[path] = cached
        else:
            todo.append(path)
    if num_workers is None:
        num_workers = available_cpus()
    progress = Progress(f"probing {len(todo)} videos", len(todo), "videos", enabled=show_progress and bool(todo))
    if num_workers <= 1 or len(todo) < 64:  # a process pool costs about a second to start
        probed = []
        for path in todo:
            probed.append(probe_video(path))
            progress.update(len(probed))
    else:  # a file on which FFmpeg crashes kills its process: it is reported unreadable, the rest go on
        probed = map_in_processes(_probe_in_worker, [str(path) for path in todo], num_workers,
                                  on_crash=lambda path: ProbeResult(0, f"{path}: the decoder crashed on it"),
                                  on_result=lambda done, total: progress.update(done))
    progress.finish()
    for path, result in zip(todo, probed):
        results[path] = result
        cache[str(path)] = {**keys[path], "frames": result.frames, "error": result.error}
    if cache_file is not None and todo:
        _write_json_atomically(Path(cache_file), {"version": 1, "videos": cache})
    return {path: results[path] for path in paths}


def map_in_processes(function, items: list, num_workers: int, on_crash, on_result=None, initializer=None) -> list:
    """[function(item) for item in items], computed by `num_workers` processes (forkserver: they do not inherit
    the FFmpeg threads of a parent that has decoded video). A process that dies (FFmpeg crashing on a broken
    file, the out-of-memory killer) does not hang the caller, as it would a multiprocessing.Pool: after the
    first death the unfinished items run again one at a time, in order, so the item whose process dies is known
    and gets `on_crash(item)`. `on_result(done, total)` is called as results arrive (for progress lines);
    `initializer()` runs once in each process. An error that `function` raises, Ctrl-C or SIGTERM ends every
    process at once (queued items are dropped) and is raised here."""
    context = multiprocessing.get_context(
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    start_resource_tracker_apart()
    initializer = functools.partial(_start_worker, initializer, os.getpid())
    results, pending, isolating = {}, list(range(len(items))), False
    while pending:
        # Chunks of items per task (a task costs about a millisecond to send); one item per task after a death.
        size = 1 if isolating else max(1, min(64, len(pending) // (8 * num_workers)))
        chunks = [pending[start:start + size] for start in range(0, len(pending), size)]
        try:
            with ProcessPoolExecutor(num_workers, mp_context=context, initializer=initializer) as pool:
                futures = {pool.submit(_apply_to_each, function, [items[i] for i in chunk]): chunk for chunk in chunks}
                try:
                    while futures:
                        finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                        for future in finished:
                            results.update(zip(futures.pop(future), future.result()))
                            if on_result is not None:
                                on_result(len(results), len(items))
                except BrokenProcessPool:
                    raise
                except BaseException:  # Ctrl-C, SIGTERM, an item's error: end the workers now, not after every task
                    _end_workers(pool)
                    raise
        except BrokenProcessPool:
            if isolating:  # one process, one item a task, in order: the first unfinished item killed it
                culprit = next(i for i in pending if i not in results)
                results[culprit] = on_crash(items[culprit])
            num_workers, isolating = 1, True
        pending = [i for i in pending if i not in results]
    return [results[i] for i in range(len(items))]


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's processes and wait for them (a few seconds at most), so that none is left running
    and what they were writing can be recognised as left over (files.remove_leftover_temporaries)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # the executor has no public way
    for process in processes:
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=5)


def _apply_to_each(function, items: list) -> list:
    return [function(item) for item in items]


def _start_worker(initializer, main_process: int) -> None:
    exit_when_process_ends(main_process)
    if initializer is not None:
        initializer()


def available_cpus() -> int:
    """The CPUs this process may use (its affinity mask, which a job scheduler may set below the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(processes_per_machine: int = 1) -> int:
    """DataLoader workers per training process: this process's share of the CPUs it may use (as DataLoader
    counts them, so the default never draws its "too many workers" warning), and at least 1, so that the main
    process never decodes. Under torchrun pass the processes per machine (LOCAL_WORLD_SIZE)."""
    return max(1, available_cpus() // max(1, processes_per_machine))


def exit_when_process_ends(pid: int, interval: float = 1.0) -> None:
    """In a worker process: end it within `interval` seconds of process `pid` (the main process) ending.

    Workers started by a fork server are its children, not the main process's: when the main process is
    killed (SIGKILL, the out-of-memory killer), they would wait for work forever, and keep the fork server and
    the resource tracker alive with them. A daemon thread that polls the main process ends them instead. A
    killed main process that its parent has not reaped yet (a zombie) counts as ended: a parent that reads the
    run's output to its end before reaping it would otherwise wait for the workers, and they for it."""
    started = process_start(pid)  # so that a later process given the same PID is not taken for it

    def watch():
        while process_exists(pid, started):
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="exit-when-main-ends", daemon=True).start()


_TRACKER = None  # the resource tracker's Popen, when start_resource_tracker_apart started it


def start_resource_tracker_apart() -> None:
    """Start multiprocessing's resource tracker, if it is not running yet, in its own process session.

    Worker processes started by a fork server (DataLoader workers, `map_in_processes`) share their queues' locks
    through named POSIX semaphores (/dev/shm/sem.mp-*), which only the resource tracker removes when the program
    is killed. Started as usual it belongs to the program's process group, so a kill of the whole group (a job
    scheduler's, `kill -9 -PGID`) killed it too and left about 14 semaphores behind per kill; apart,
    it outlives the kill and removes them once every process of the program has ended."""
    from multiprocessing import resource_tracker, util

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if tracker is None or getattr(tracker, "_fd", None) is not None or not hasattr(util, "spawnv_passfds"):
        return  # already running (then it stays where it is), or a Python whose tracker works otherwise
    spawn = util.spawnv_passfds

    def spawn_in_own_session(path, args, passfds):
        global _TRACKER
        _TRACKER = subprocess.Popen(args, executable=path, pass_fds=passfds, start_new_session=True)
        return _TRACKER.pid

    util.spawnv_passfds = spawn_in_own_session
    try:
        tracker.ensure_running()
    finally:
        util.spawnv_passfds = spawn


def _read_probe_cache(cache_file) -> dict:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        content = json.loads(Path(cache_file).read_text(encoding="utf-8"))
        return dict(content["videos"]) if content.get("version") == 1 else {}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}  # unreadable cache (a foreign or damaged file): probe again and replace it


def _cached_probe(entry, key: dict) -> ProbeResult | None:
    """The cached result of a file whose size and mtime are `key`'s, or None: a file that changed, or an entry
    that is not what probe_videos writes (a damaged or edited cache), is probed again."""
    if not isinstance(entry, dict) or any(entry.get(name) != value for name, value in key.items()):
        return None
    frames, error = entry.get("frames"), entry.get("error")
    if not (isinstance(frames, int) and not isinstance(frames, bool) and isinstance(error, str)):
        return None
    readable, unreadable = frames >= 1 and not error, frames == 0 and error.strip()
    return ProbeResult(frames, error) if readable or unreadable else None


def _write_json_atomically(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle)


# ----------------------------------------------------------------------------------------------------------

def write_video(path, frames_rgb: np.ndarray, fps: float = 8.0, fourcc: str = "mp4v") -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames with cv2.VideoWriter. Raises if OpenCV cannot encode them."""
    global _opened_a_video
    _opened_a_video = True
    path = Path(path)
    height, width = frames_rgb.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise VideoReadError(f"{path}: OpenCV cannot encode {fourcc!r} into {path.suffix!r}; try 'mp4v' in .mp4 "
                             "or 'MJPG' in .avi")
    for frame in frames_rgb:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path
