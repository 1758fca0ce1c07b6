"""The benchmarks' annotation files: which videos a split has, and their captions.

Skip on a first reading: VoP itself only needs (video file, caption) pairs; this module reads them out of the
layouts the community distributes (CLIP4Clip / X-Pool), checks them, and names the file and line of anything
wrong. `read_annotations(name, root, split)` is its one entry point; the layouts are in docs/data.md.

    msrvtt-9k / msrvtt-7k   MSRVTT_data.json + MSRVTT_train.{9k,7k}.csv; test: MSRVTT_JSFUSION_test.csv (1k-A)
    didemo, activitynet     paragraph-to-video: a video's sentences joined into one query
    lsmdc                   tab-separated clip id, 4 timestamps, sentence
    msvd                    raw-captions.pkl + {split}_list.txt; several captions per video
    csv                     your own: a headed CSV "video,caption[,split]"
    synthetic               the demo's world (demo.py): {split}.csv in the world's folder
"""
import csv
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv")
DATASET_NAMES = ("msrvtt-9k", "msrvtt-7k", "didemo", "activitynet", "lsmdc", "msvd", "csv", "synthetic")


class AnnotationError(UserError):
    """An annotation file that does not match its documented layout."""


@dataclass
class Annotations:
    """One split: its unique videos in evaluation order, and every caption with the index of its video."""
    video_ids: list  # (V,) str, unique
    video_paths: list  # (V,) Path
    captions: list  # (T,) str
    caption_video_index: list  # (T,) int into video_ids
    annotation_file: Path
    unsplit: bool = False  # a CSV without a split column: every split is all its rows, the training rows


def read_annotations(name: str, root, split: str, video_dir=None, skip_missing: bool = False) -> Annotations:
    """The videos and captions of one split of benchmark `name` (see DATASET_NAMES), read from `root`.

    `video_dir` defaults to root/"videos" (searched recursively by file stem); for "csv", `root` is the CSV
    file and paths are relative to it; for "synthetic", `root` is the world's folder. Listed videos that are
    absent raise FileNotFoundError, or with `skip_missing` are left out with one warning that counts them.
    """
    if name not in DATASET_NAMES:
        raise AnnotationError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data root {root} does not exist: pass the dataset's folder (the CSV file for "
                                f"csv); docs/data.md shows each dataset's layout")
    if name not in ("csv", "synthetic") and root.is_file():
        raise AnnotationError(f"--data {name} takes the dataset's folder, and {root} is a file: pass the folder that "
                              f"holds it (--data csv reads a CSV file of your own)")
    video_dir = Path(video_dir) if video_dir is not None else root / "videos"
    if name in ("msrvtt-9k", "msrvtt-7k"):
        train_csv = "MSRVTT_train.9k.csv" if name == "msrvtt-9k" else "MSRVTT_train.7k.csv"
        entries, locate, annotation_file = _msrvtt_entries(root, split, train_csv, video_dir)
    elif name == "didemo":
        entries, locate, annotation_file = _didemo_entries(root, split, video_dir)
    elif name == "activitynet":
        entries, locate, annotation_file = _activitynet_entries(root, split, video_dir)
    elif name == "lsmdc":
        entries, locate, annotation_file = _lsmdc_entries(root, split, video_dir)
    elif name == "msvd":
        entries, locate, annotation_file = _msvd_entries(root, split, video_dir)
    elif name == "csv":
        _check_split("csv", split, set(CSV_SPLITS))
        if root.is_dir():
            raise AnnotationError(f"--data csv takes the CSV file itself, and {root} is a folder: pass the CSV file "
                                  f"as --data-root (e.g. {root / 'my_data.csv'})")
        entries, locate, annotation_file = _csv_entries(root, split)
    else:
        _check_split("synthetic", split, {"train", "test", "stills"})
        if root.is_file():
            raise AnnotationError(f"--data synthetic takes the world's folder (demo.make_synthetic_world), and "
                                  f"{root} is a file; for a CSV of your own, use --data csv")
        entries, locate, annotation_file = _csv_entries(root / f"{split}.csv", None)
    annotations = _assemble(entries, locate, annotation_file, skip_missing)
    annotations.unsplit = name == "csv" and not _has_split_column(root)
    return annotations


# --- the layouts: each reader returns (entries, locate, annotation_file), where entries are
# (video_id, caption, "file:line") in item order and locate(video_id) is the path the video should have.


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found. See the dataset folder trees of docs/data.md.")
    return path


def _read_csv_rows(path: Path, required_columns, delimiter=",") -> list:
    """(line number, row dict) of each row of a headed CSV; a missing column, or a line the csv module cannot
    read, is an AnnotationError naming the file and line."""
    # The csv module refuses fields over 128 KB; no field can be longer than the file (a long caption is cut
    # by the tokenizer). The limit is the module's only setting, so it is restored afterwards.
    limit = csv.field_size_limit(max(csv.field_size_limit(), _require_file(path, "annotation file").stat().st_size))
    try:
        # utf-8-sig: a CSV saved by Excel starts with a byte-order mark, which must not become part of "video".
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            try:
                header = reader.fieldnames or []
                missing = [column for column in required_columns if column not in header]
                if missing:
                    raise AnnotationError(f"{path}:1: missing column(s) {missing}; the header is {header}. "
                                          f"Expected a header with {list(required_columns)}.")
                return [(reader.line_num, row) for row in reader]
            except csv.Error as error:
                raise AnnotationError(f"{path}:{reader.line_num}: {error}; fix or delete this line") from None
            except UnicodeDecodeError:
                raise AnnotationError(f"{path}:{_first_line_not_utf8(path)}: not UTF-8 text; save the file as "
                                      f"UTF-8") from None
    finally:
        csv.field_size_limit(limit)


def _first_line_not_utf8(path: Path) -> int:
    """The number of the first line of `path` that is not UTF-8 (the csv reader reads ahead of its line count)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return raw[:error.start].count(b"\n") + 1
    return 1


def _read_json(path: Path):
    """The JSON value in an annotation file; a file that is not JSON is an AnnotationError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AnnotationError(f"{path} is not valid JSON ({error}); fix or download it again") from None


def _video_index(video_dir: Path) -> dict:
    """Map a video's file stem to its path, searching `video_dir` recursively (LSMDC nests per movie,
    DiDeMo mixes extensions), into symlinked folders too, each folder once (a link to a folder above would
    otherwise loop)."""
    if not video_dir.is_dir():
        raise FileNotFoundError(f"{video_dir}: video folder not found. Pass video_dir=... or see the README's "
                                "dataset folder trees.")
    found = {}
    for folder, files in walk_folders(video_dir):
        for file_name in files:
            stem, suffix = os.path.splitext(file_name)
            if suffix.lower() in VIDEO_SUFFIXES:
                found.setdefault(stem, Path(folder) / file_name)  # two of one name: the first in path order
    return found


def walk_folders(root, onerror=None):
    """(folder, its file names) for `root` and every folder under it, in name order, into symlinked folders
    too, each folder once (a link to a folder above would otherwise loop). `onerror`: as os.walk's."""
    seen = set()
    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=onerror):
        try:
            status = os.stat(folder)
        except OSError:  # vanished meanwhile
            status = None
        if status is None or (status.st_dev, status.st_ino) in seen:  # or reached again through a link
            subfolders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        subfolders.sort()
        yield folder, sorted(files)


def _locator(video_dir: Path, default_suffix: str):
    index = _video_index(video_dir)
    return lambda video_id: index.get(video_id, video_dir / f"{video_id}{default_suffix}")


def _check_split(name: str, split: str, allowed) -> None:
    if split not in allowed:
        raise AnnotationError(f"{name} has no split {split!r}: choose one of {', '.join(sorted(allowed))}")


def _msrvtt_entries(root: Path, split: str, train_csv: str, video_dir: Path):
    _check_split("msrvtt", split, {"train", "test"})
    if split == "test":
        # The 1k-A ("JSFusion") test: 1,000 rows, one caption per video; the same for the 9k and 7k splits.
        test_csv = root / "MSRVTT_JSFUSION_test.csv"
        entries = [(row["video_id"].strip(), row["sentence"], f"{test_csv}:{line}")
                   for line, row in _read_csv_rows(test_csv, ["video_id", "sentence"])]
        return entries, _locator(video_dir, ".mp4"), test_csv
    data_json = _require_file(root / "MSRVTT_data.json", "MSR-VTT caption file")
    contents = _read_json(data_json)
    sentences = contents.get("sentences") if isinstance(contents, dict) else None
    if not isinstance(sentences, list):
        raise AnnotationError(f"{data_json}: expected a top-level 'sentences' list (CLIP4Clip's MSRVTT_data.json)")
    captions_of = {}
    for number, sentence in enumerate(sentences):
        if "video_id" not in sentence or "caption" not in sentence:
            raise AnnotationError(f"{data_json}: sentences[{number}] lacks 'video_id' or 'caption': {sentence}")
        captions_of.setdefault(sentence["video_id"], []).append(
            (sentence["caption"], f"{data_json}: sentences[{number}]"))
    split_csv = root / train_csv
    entries = []
    for line, row in _read_csv_rows(split_csv, ["video_id"]):
        video_id = row["video_id"].strip()
        if video_id not in captions_of:
            raise AnnotationError(f"{split_csv}:{line}: video {video_id!r} has no caption in {data_json}")
        entries.extend((video_id, caption, where) for caption, where in captions_of[video_id])
    return entries, _locator(video_dir, ".mp4"), split_csv


def _didemo_entries(root: Path, split: str, video_dir: Path):
    _check_split("didemo", split, {"train", "val", "test"})
    data_json = _require_file(root / f"{split}_data.json", "DiDeMo annotation file")
    moments = _read_json(data_json)
    sentences_of = {}  # video id -> [(sentence, where)], in file order
    for number, moment in enumerate(moments):
        if "video" not in moment or "description" not in moment:
            raise AnnotationError(f"{data_json}: entry [{number}] lacks 'video' or 'description': {moment}")
        video_id = os.path.splitext(moment["video"])[0]
        sentences_of.setdefault(video_id, []).append((moment["description"], f"{data_json}: entry [{number}]"))
    return _paragraphs(sentences_of), _locator(video_dir, ".mp4"), data_json


def _paragraphs(sentences_of: dict) -> list:
    """Paragraph-to-video retrieval: a video's sentences joined, in order, into one query."""
    entries = []
    for video_id, sentences in sentences_of.items():
        for sentence, where in sentences:
            if not str(sentence).strip():
                raise AnnotationError(f"{where}: empty sentence for video {video_id!r}; fix or delete it")
        paragraph = " ".join(str(sentence).strip() for sentence, _ in sentences)
        entries.append((video_id, paragraph, sentences[0][1]))
    return entries


def _activitynet_entries(root: Path, split: str, video_dir: Path):
    _check_split("activitynet", split, {"train", "val", "test"})
    # The paper tests on val_1 (CLIP4Clip's layout has no separate test annotations).
    captions_json = _require_file(root / ("train.json" if split == "train" else "val_1.json"),
                                  "ActivityNet Captions file")
    videos = _read_json(captions_json)
    ids_json = root / ("train_ids.json" if split == "train" else "val_ids.json")
    if ids_json.is_file():
        video_order = [video_id for video_id in _read_json(ids_json) if video_id in videos]
    else:
        video_order = list(videos)
    sentences_of = {}
    for video_id in video_order:
        record = videos[video_id]
        if "sentences" not in record:
            raise AnnotationError(f"{captions_json}: video {video_id!r} lacks 'sentences'")
        sentences_of[video_id] = [(sentence, f"{captions_json}: {video_id}.sentences[{number}]")
                                  for number, sentence in enumerate(record["sentences"])]
    return _paragraphs(sentences_of), _locator(video_dir, ".mp4"), captions_json


LSMDC_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
               "test": "LSMDC16_challenge_1000_publictect.csv"}


def _lsmdc_entries(root: Path, split: str, video_dir: Path):
    _check_split("lsmdc", split, set(LSMDC_FILES))
    # Tab-separated, no header: clip id, start, end (aligned), start, end (extracted), sentence.
    annotation = _require_file(root / LSMDC_FILES[split], "LSMDC annotation file")
    entries = []
    with open(annotation, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 6:
                raise AnnotationError(f"{annotation}:{line_number}: expected 6 tab-separated fields (clip id, 4 "
                                      f"timestamps, sentence), found {len(fields)}")
            entries.append((fields[0].strip(), fields[5], f"{annotation}:{line_number}"))
    return entries, _locator(video_dir, ".avi"), annotation


def _msvd_entries(root: Path, split: str, video_dir: Path):
    _check_split("msvd", split, {"train", "val", "test"})
    captions_pkl = _require_file(root / "raw-captions.pkl", "MSVD caption file")
    tokenized = _read_plain_pickle(captions_pkl)  # video id -> list of token lists (CLIP4Clip's raw-captions.pkl)
    id_list = _require_file(root / f"{split}_list.txt", "MSVD split list")
    entries = []
    with open(id_list, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            video_id = line.strip()
            if not video_id:
                continue
            if video_id not in tokenized:
                raise AnnotationError(f"{id_list}:{line_number}: video {video_id!r} has no caption in {captions_pkl}")
            for number, tokens in enumerate(tokenized[video_id]):
                caption = " ".join(tokens) if isinstance(tokens, (list, tuple)) else str(tokens)
                entries.append((video_id, caption, f"{id_list}:{line_number} ({captions_pkl}: {video_id}[{number}])"))
    return entries, _locator(video_dir, ".avi"), id_list


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # dicts, lists and strings need no class: anything else is refused
        raise pickle.UnpicklingError(f"it asks for {module}.{name}")


def _read_plain_pickle(path: Path):
    """A pickle of plain containers (dicts, lists, tuples, strings, numbers) only: unpickling anything else could
    run code from the file, so it is refused."""
    try:
        with open(path, "rb") as handle:
            return _PlainUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise AnnotationError(f"{path} is not a pickle of plain captions ({error}); it is refused, since "
                              f"unpickling anything more could run code from the file") from None


CSV_SPLITS = ("train", "val", "test")


def _csv_entries(csv_path: Path, split: str | None):
    """The generic format: a headed CSV with `video,caption` rows, video paths relative to the CSV's folder;
    rows naming the same video give it several captions. An optional `split` column (train, val or test)
    says where each row belongs. Without it every split is every row: training rows, also evaluated on (the
    callers say "training rows" wherever such results are printed). `split` None (the synthetic world, one
    file per split) takes every row."""
    rows = list(_read_csv_rows(csv_path, ["video", "caption"]))
    if not rows:
        raise AnnotationError(f"{csv_path} has a header but no rows: add one row per (video, caption) pair")
    has_split_column = "split" in rows[0][1]
    entries = []
    for line, row in rows:
        if split is not None and has_split_column:
            row_split = (row["split"] or "").strip()
            if row_split not in CSV_SPLITS:
                raise AnnotationError(f"{csv_path}:{line}: split {row_split!r} is none of {', '.join(CSV_SPLITS)}")
            if row_split != split:
                continue
        entries.append(((row["video"] or "").strip(), row["caption"], f"{csv_path}:{line}"))
    if split is not None and has_split_column and not entries:
        present = sorted({(row["split"] or "").strip() for _, row in rows})
        raise AnnotationError(f"{csv_path}: no row of split {split!r}; the file has {', '.join(present)}")
    return entries, (lambda video_id: csv_path.parent / video_id), csv_path


def _has_split_column(csv_path: Path) -> bool:
    """Whether a CSV's header has a `split` column (the file was read already: it exists and parses)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        return "split" in (next(csv.reader(handle), None) or [])


def _assemble(entries, locate, annotation_file, skip_missing) -> Annotations:
    """Check captions and videos and group captions by video (no video is decoded)."""
    video_ids, video_paths, index_of, missing = [], [], {}, {}
    captions, caption_video_index = [], []
    for video_id, caption, where in entries:
        if not video_id:
            raise AnnotationError(f"{where}: empty video name; fix or delete this line")
        if caption is None or not str(caption).strip():
            raise AnnotationError(f"{where}: empty caption for video {video_id!r}; fix or delete this line")
        if video_id in missing:
            continue
        if video_id not in index_of:
            path = Path(locate(video_id))
            if not path.is_file():
                missing[video_id] = (where, path)
                continue
            index_of[video_id] = len(video_ids)
            video_ids.append(video_id)
            video_paths.append(path)
        captions.append(str(caption).strip())
        caption_video_index.append(index_of[video_id])
    if missing:
        first_id, (first_where, first_path) = next(iter(missing.items()))
        summary = (f"{len(missing)} of {len(missing) + len(video_ids)} videos listed in {annotation_file} are "
                   f"missing (first: {first_id!r} at {first_where}, expected at {first_path})")
        if not skip_missing:
            raise FileNotFoundError(f"{summary}. Add the videos, fix the paths, or pass --skip-missing to leave them "
                                    f"out (skip_missing=True in Python)")
        warnings.warn(f"{summary}; leaving them out (--skip-missing).", stacklevel=3)
    if not captions:
        raise AnnotationError(f"{annotation_file}: no usable (video, caption) pair")
    return Annotations(video_ids, video_paths, captions, caption_video_index, Path(annotation_file))
