"""Pictures a person reads: the retrieval examples (evaluate.py --examples), the training curves (train.py writes
out_dir/curves.png after every epoch) and the demo's comparison of its variants. Skip on a first reading.

The examples are drawn with Pillow (a required dependency), the curves and the comparison with matplotlib, an
optional one: without it, `draw_curves` and `draw_comparison` say once that they draw nothing (and how to get
them), and the program runs on.

Legend of shapes: T captions, V videos, E embedding size, F frames, S a frame's side.
"""
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from formats.clip_weights import CLIP_MEAN, CLIP_STD

CORRECT = (30, 160, 60)  # the item the query was written for
ALSO_CORRECT = (150, 215, 120)  # another item with the same caption text: also right
OTHER = (190, 190, 190)
INK, GREY_INK, PAPER = (20, 20, 20), (90, 90, 90), (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # an older Pillow: its bitmap font, small but legible
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """`text`, cut with '...' to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    fits, too_long = 0, len(text)  # the longest start that fits with '...' lies in [fits, too_long)
    while too_long - fits > 1:  # a bisection: a paragraph-long caption costs a few measures, not thousands
        middle = (fits + too_long) // 2
        fits, too_long = (middle, too_long) if font.getlength(text[:middle] + "...") <= width else (fits, middle)
    return text[:fits] + "..."


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """`text` in lines of at most `width` pixels, at most `max_lines` (the last one cut with '...')."""
    characters = max(8, int(width / max(font.getlength("n"), 1)))
    lines = textwrap.wrap(text, characters) or [""]
    while any(font.getlength(line) > width for line in lines) and characters > 8:
        characters -= 2
        lines = textwrap.wrap(text, characters)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [_fit(" ".join(lines[max_lines - 1:]), font, width)]
    return lines


def _to_pixels(video: torch.Tensor) -> np.ndarray:
    """(F, 3, S, S) CLIP-normalised -> (F, S, S, 3) uint8 RGB: undo data.normalize."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (video.float() * std + mean).clamp(0, 1) * 255  # (F, 3, S, S)
    return pixels.round().byte().permute(0, 2, 3, 1).numpy()


def protocol_rank(scores: torch.Tensor, correct: int) -> float:
    """The rank of `correct` among `scores` (C,) under random tie-breaking, counted as evaluate.py counts it:
    1 + the items above it + half the items exactly level with it."""
    greater = int((scores > scores[correct]).sum())
    tied = int((scores == scores[correct]).sum()) - 1
    return greater + 1 + tied / 2


# ----------------------------------------------------------------------------------------------------------
# The examples figure: text -> video rows, then video -> text rows


class _Sheet:
    """Sizes and drawing helpers shared by the two panels."""

    def __init__(self, thumb: int, frames: int):
        self.thumb, self.frames = thumb, frames
        self.frame_gap, self.border, self.hit_gap, self.margin = 4, 5, 18, 16
        self.strip_width = frames * thumb + (frames - 1) * self.frame_gap + 2 * self.border
        self.strip_height = thumb + 2 * self.border
        self.title_font, self.text_font, self.small_font = _font(22), _font(17), _font(14)
        self.line = 22  # height of a line of text_font

    def strip(self, canvas, draw, pixels: np.ndarray, left: int, top: int, colour) -> None:
        """A video as `frames` of its frames in time order, with gaps and an arrow of time under them."""
        draw.rectangle([left, top, left + self.strip_width - 1, top + self.strip_height - 1], fill=colour)
        shown = np.linspace(0, len(pixels) - 1, self.frames).round().astype(int)
        for slot, frame in enumerate(shown):
            thumb = Image.fromarray(pixels[frame]).resize((self.thumb, self.thumb), Image.BICUBIC)
            x = left + self.border + slot * (self.thumb + self.frame_gap)
            draw.rectangle([x - 1, top + self.border - 1, x + self.thumb, top + self.border + self.thumb], fill=PAPER)
            canvas.paste(thumb, (x, top + self.border))
        y = top + self.strip_height + 5  # the arrow of time: left to right
        x0, x1 = left + self.border, left + self.strip_width - self.border
        draw.line([x0, y, x1, y], fill=GREY_INK, width=2)
        draw.polygon([(x1, y), (x1 - 8, y - 4), (x1 - 8, y + 4)], fill=GREY_INK)

    def label(self, draw, left: int, top: int, width: int, lines: list[str], font=None) -> None:
        for number, text in enumerate(lines):
            draw.text((left, top + number * self.line), _fit(text, font or self.small_font, width), fill=INK,
                      font=font or self.small_font)


def draw_examples(dataset, text_embeddings: torch.Tensor, video_embeddings: torch.Tensor, path,
                  num_queries: int = 4, top_k: int = 5, frames_per_video: int = 4, thumb_size: int = 72,
                  title: str = "") -> Image.Image:
    """Save a PNG of retrieval examples and return it: `num_queries` text -> video rows (captions spread evenly
    over the test set, each with its top-k videos by cosine) and `num_queries` video -> text rows (videos spread
    evenly, each with its top-k captions). Every hit shows its rank and score; the item the query was written
    for is framed green and, when it is not among the top k, its rank and score end the row; items that share
    the query's caption text are framed light green (also correct). A video is a strip of `frames_per_video`
    of its frames, time running left to right. The image's `info["hits"]` records what was drawn, one dict per
    hit: direction ("t2v" or "v2t"), query and item (caption or video index), rank, score, kind ("correct",
    "also correct", "other") and box (left, top, right, bottom) of its frame (None where nothing is drawn).

    dataset: a data.VideoTextDataset (captions, caption_video_index, video_paths, videos()), text_embeddings
    (T, E), video_embeddings (V, E), both L2-normalised.
    """
    num_queries = min(num_queries, len(text_embeddings), len(video_embeddings))
    top_k = min(top_k, len(video_embeddings), len(text_embeddings))
    sheet = _Sheet(thumb_size, min(frames_per_video, dataset.num_frames))
    videos, pixels_of = dataset.videos(), {}

    def pixels(video: int) -> np.ndarray:  # (F, S, S, 3), each shown video decoded once
        if video not in pixels_of:
            pixels_of[video] = _to_pixels(videos[video]["video"])
        return pixels_of[video]

    captions = [caption.strip().lower() for caption in dataset.captions]
    owner = torch.as_tensor(dataset.caption_video_index)  # (T,)
    scores = text_embeddings.float() @ video_embeddings.float().T  # (T, V)
    text_queries = torch.linspace(0, len(text_embeddings) - 1, num_queries).round().long().tolist()
    video_queries = torch.linspace(0, len(video_embeddings) - 1, num_queries).round().long().tolist()

    column = sheet.strip_width + sheet.hit_gap
    width = 2 * sheet.margin + (top_k + 1) * column + sheet.hit_gap
    row_height = sheet.line * 2 + sheet.strip_height + 12 + 2 * sheet.line + 16
    header = 4 * sheet.line + 16
    height = 2 * header + 2 * num_queries * row_height + sheet.margin
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    hits = []

    def record(direction, query, item, rank, score, colour, left, top_):
        kind = {CORRECT: "correct", ALSO_CORRECT: "also correct"}.get(colour, "other")
        hits.append({"direction": direction, "query": query, "item": item, "rank": rank, "score": score,
                     "kind": kind, "box": (left, top_, left + sheet.strip_width - 1, top_ + sheet.strip_height - 1)})

    top = _legend(draw, sheet, width, title or "Retrieval examples", sheet.margin)

    # Text -> video: each caption ranks the videos.
    draw.text((sheet.margin, top), f"Text -> video: each caption and its top {top_k} videos", fill=INK,
              font=sheet.text_font)
    top += sheet.line + 8
    for query in text_queries:
        correct = int(owner[query])
        same_text = {int(owner[t]) for t in range(len(captions)) if captions[t] == captions[query]} - {correct}
        row = scores[query]  # (V,)
        ranked = torch.argsort(row, descending=True, stable=True)[:top_k].tolist()
        sheet.label(draw, sheet.margin, top, width - 2 * sheet.margin, [f"query: \u201c{dataset.captions[query]}\u201d"],
                    sheet.text_font)
        strip_top = top + sheet.line + 4
        for place, video in enumerate(ranked):
            left = sheet.margin + place * column
            colour = CORRECT if video == correct else ALSO_CORRECT if video in same_text else OTHER
            sheet.strip(canvas, draw, pixels(video), left, strip_top, colour)
            sheet.label(draw, left, strip_top + sheet.strip_height + 12, sheet.strip_width,
                        [f"#{place + 1}   score {float(row[video]):.3f}", Path(dataset.video_paths[video]).name])
            record("t2v", query, video, place + 1, float(row[video]), colour, left, strip_top)
        if correct not in ranked:
            left = sheet.margin + top_k * column + sheet.hit_gap
            draw.line([left - sheet.hit_gap, strip_top, left - sheet.hit_gap, strip_top + sheet.strip_height],
                      fill=GREY_INK, width=2)
            sheet.strip(canvas, draw, pixels(correct), left, strip_top, CORRECT)
            sheet.label(draw, left, strip_top + sheet.strip_height + 12, sheet.strip_width,
                        [f"correct one: rank {protocol_rank(row, correct):g}", f"score {float(row[correct]):.3f}  "
                         f"{Path(dataset.video_paths[correct]).name}"])
            record("t2v", query, correct, protocol_rank(row, correct), float(row[correct]), CORRECT, left, strip_top)
        top += row_height

    # Video -> text: each video ranks the captions, each distinct caption text once (a text written for several
    # videos has one embedding, so its copies would only tie with each other).
    top += 8
    draw.text((sheet.margin, top), f"Video -> text: each video and its top {top_k} captions", fill=INK,
              font=sheet.text_font)
    top += sheet.line + 8
    first_of_text = {}
    for number, text in enumerate(captions):
        first_of_text.setdefault(text, number)
    distinct = torch.tensor(sorted(first_of_text.values()))  # (distinct texts,) a caption index for each text
    for video in video_queries:
        own_texts = {captions[t] for t in (owner == video).nonzero().flatten().tolist()}
        row = scores[distinct, video]  # (distinct texts,)
        ranked = torch.argsort(row, descending=True, stable=True)[:top_k].tolist()
        sheet.label(draw, sheet.margin, top, width - 2 * sheet.margin,
                    [f"query: {Path(dataset.video_paths[video]).name}"], sheet.text_font)
        strip_top = top + sheet.line + 4
        sheet.strip(canvas, draw, pixels(video), sheet.margin, strip_top, INK)
        for place, text in enumerate(ranked):
            caption = int(distinct[text])
            colour = CORRECT if captions[caption] in own_texts else OTHER  # written for this video (maybe others too)
            left = sheet.margin + (place + 1) * column
            _caption_box(draw, sheet, left, strip_top, dataset.captions[caption], colour)
            sheet.label(draw, left, strip_top + sheet.strip_height + 12, sheet.strip_width,
                        [f"#{place + 1}   score {float(row[text]):.3f}"])
            record("v2t", video, caption, place + 1, float(row[text]), colour, left, strip_top)
        if not any(captions[int(distinct[text])] in own_texts for text in ranked):
            best = max((text for text in range(len(distinct)) if captions[int(distinct[text])] in own_texts),
                       key=lambda text: float(row[text]))
            sheet.label(draw, sheet.margin, strip_top + sheet.strip_height + 12, sheet.strip_width,
                        [f"its best own caption: rank {protocol_rank(row, best):g}", f"score {float(row[best]):.3f}"])
            hits.append({"direction": "v2t", "query": video, "item": int(distinct[best]),
                         "rank": protocol_rank(row, best), "score": float(row[best]), "kind": "correct", "box": None})
        top += row_height
    canvas = canvas.crop((0, 0, width, min(height, top + sheet.margin)))
    canvas.save(path)
    canvas.info["hits"] = hits
    return canvas


def _legend(draw, sheet: _Sheet, width: int, title: str, top: int) -> int:
    """The title and what the colours and strips mean; returns where the panels start."""
    draw.text((sheet.margin, top), title, fill=INK, font=sheet.title_font)
    top += sheet.line + 12
    x = sheet.margin
    for colour, meaning in ((CORRECT, "correct: the query's own video, or caption"),
                            (ALSO_CORRECT, "also correct: the same caption text"), (OTHER, "other")):
        draw.rectangle([x, top + 3, x + 26, top + 17], fill=colour)
        draw.text((x + 34, top), meaning, fill=INK, font=sheet.small_font)
        x += 44 + int(sheet.small_font.getlength(meaning))
    top += sheet.line + 2
    draw.text((sheet.margin, top), f"A video is {sheet.frames} of its frames, time running left to right (arrow); "
              "#n is the rank, score the cosine similarity.", fill=GREY_INK, font=sheet.small_font)
    return top + sheet.line + 14


def _caption_box(draw, sheet: _Sheet, left: int, top: int, caption: str, colour) -> None:
    right, bottom = left + sheet.strip_width - 1, top + sheet.strip_height - 1
    draw.rectangle([left, top, right, bottom], fill=colour)
    draw.rectangle([left + sheet.border, top + sheet.border, right - sheet.border, bottom - sheet.border], fill=PAPER)
    lines = _wrap(caption, sheet.text_font, sheet.strip_width - 4 * sheet.border,
                  max(1, (sheet.strip_height - 2 * sheet.border) // sheet.line))
    for number, text in enumerate(lines):
        draw.text((left + 2 * sheet.border, top + 2 * sheet.border + number * sheet.line), text, fill=INK,
                  font=sheet.text_font)


# ----------------------------------------------------------------------------------------------------------
# Curves and comparisons (matplotlib, optional)

_SAID = set()  # what was already said about a missing matplotlib


def _pyplot(what: str):
    """matplotlib's pyplot on a file-only backend, or None (said once per `what`) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        if what not in _SAID:
            _SAID.add(what)
            print(f"note: matplotlib is not installed, so no {what} is drawn (pip install matplotlib); the numbers "
                  f"are in the logs")
        return None


def read_log(path) -> list[dict]:
    """The records of a run's log.jsonl: the lines that are JSON objects. Any other line (one cut short by a
    crash, bytes that are not UTF-8, a value that is not an object such as [1, 2] or 5) is skipped."""
    records = []
    for line in Path(path).read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def draw_curves(log_path, path, evaluated_on: str = "") -> bool:
    """out_dir/curves.png from a run's log.jsonl (`curves_figure`). Returns whether it drew (matplotlib is
    optional)."""
    plt = _pyplot("training curve")
    if plt is None:
        return False
    records = read_log(log_path) if Path(log_path).is_file() else []  # nothing logged yet: empty axes
    figure = curves_figure(plt, records, evaluated_on)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def curves_figure(plt, records: list[dict], evaluated_on: str = ""):
    """The training curves as a matplotlib figure of 3 panels: loss and learning rate per logged step; text ->
    video and video -> text R@1 and R@5 (%) and mean rank per evaluated epoch, on `evaluated_on` (e.g. "msrvtt-9k
    test", "csv test (training rows)"). Readable with a single point: every point has a marker, t2v a circle
    and v2t a square, and the axes start at 0 (recall up to 100%), not at the one value."""
    from matplotlib.ticker import MaxNLocator
    steps = [r for r in records if "loss" in r]
    evaluations = [r for r in records if "eval" in r]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    loss_axis, recall_axis, rank_axis = axes
    if steps:
        marker = "o" if len(steps) <= 30 else None  # few logged steps: a line alone would hide them
        loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", marker=marker,
                       label="loss")
        lr_axis = loss_axis.twinx()
        lr_axis.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange", marker=marker,
                     markersize=4, label="learning rate")
        lr_axis.set_ylabel("learning rate", color="tab:orange")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lr_axis.set_ylim(bottom=0)
        loss_axis.set_ylim(bottom=0)
        if len(steps) == 1:  # one point: an axis around it, not an axis of width zero
            loss_axis.set_xlim(steps[0]["step"] - 1, steps[0]["step"] + 1)
        loss_axis.legend(handles=loss_axis.lines + lr_axis.lines, loc="upper right", fontsize=9)
    loss_axis.set(title="training loss (InfoNCE) and learning rate", xlabel="step", ylabel="loss")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    loss_axis.yaxis.label.set_color("tab:blue")
    epochs = [r["epoch"] for r in evaluations]
    # t2v a filled circle, v2t an open square around it: both stay visible where they coincide
    for direction, style, look in (("t2v", "-", dict(marker="o", markersize=6)),
                                   ("v2t", "--", dict(marker="s", markersize=10, markerfacecolor="none",
                                                      markeredgewidth=1.5))):
        for metric, colour in (("R@1", "tab:green"), ("R@5", "tab:purple")):
            values = [r["eval"][direction][metric] for r in evaluations]
            recall_axis.plot(epochs, values, style, color=colour, label=f"{direction} {metric}", **look)
        rank_axis.plot(epochs, [r["eval"][direction]["MnR"] for r in evaluations], style, color="tab:red",
                       label=f"{direction} MnR", **look)
    recall_axis.set(title=f"recall, higher is better: {evaluated_on or 'the evaluated split'}", xlabel="epoch",
                    ylabel="%", ylim=(-2, 102))
    rank_axis.set(title="mean rank (lower is better; 1 is best)", xlabel="epoch", ylabel="MnR")
    if evaluations:
        worst = max(r["eval"][direction]["MnR"] for r in evaluations for direction in ("t2v", "v2t"))
        rank_axis.set_ylim(0, 1.15 * worst + 0.5)  # from 0, so that 1 (the best rank) is on the axis
    for axis in (recall_axis, rank_axis):
        if evaluations:
            axis.legend(loc="best", fontsize=9)
            axis.set_xticks(sorted(set(epochs)))
            if len(set(epochs)) == 1:
                axis.set_xlim(epochs[0] - 1, epochs[0] + 1)
    figure.tight_layout()
    return figure


def draw_comparison(rows: list[dict], path, title: str) -> bool:
    """A bar chart comparing methods: each row {"name", "t2v R@1", "reversal pairs"} (percent). Returns whether
    it drew (matplotlib is optional)."""
    plt = _pyplot("comparison figure")
    if plt is None:
        return False
    names = [row["name"] for row in rows]
    positions = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(max(7, 1.1 * len(rows) + 2), 4.5))
    width = 0.38
    for offset, key, colour in ((-width / 2, "t2v R@1", "tab:blue"), (width / 2, "reversal pairs", "tab:orange")):
        values = [row[key] for row in rows]
        bars = axis.bar(positions + offset, values, width, label=key, color=colour)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.axhline(50, color="grey", linestyle=":", linewidth=1, label="chance on reversal pairs (50%)")
    axis.set_xticks(positions, names, rotation=20, ha="right")
    axis.set(ylabel="%", title=title, ylim=(0, max(100, math.ceil(max(r["reversal pairs"] for r in rows)) + 5)))
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
