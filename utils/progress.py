"""Progress lines with a rate and the time left, for every phase that can take a while. Skip on a first reading.

    progress = Progress("embedding videos", total=len(videos), unit="videos")
    for ...: progress.update(done)
    progress.finish()

Lines go to stderr (as tqdm's do), so stdout keeps only results. On a terminal one line is rewritten in place
(at most 5 times a second); when the output is a file or a pipe (a job's log), a plain line is written every
`every` seconds and at the end, so logs stay readable. The rate
counts from the first update, so start-up (workers starting, a model loading) does not count.
"""
import sys
import time


def format_duration(seconds: float) -> str:
    """H:MM:SS, with days when longer (a CPU run on MSR-VTT takes days): 90061 -> '1d 01:01:01'."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class Progress:
    """One phase's progress: `what`, `total` units of `unit`; see the module docstring."""

    def __init__(self, what: str, total: int, unit: str = "", stream=None, every: float = 30.0,
                 enabled: bool = True):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr  # as tqdm: stdout stays for results
        self.in_place = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.2 if self.in_place else every
        self.enabled = enabled
        self.clock = None  # (time, done) at the first update
        self.last_shown = 0.0 if self.in_place else time.monotonic()  # a file gets its first line `every` in
        self.shown_done = None  # the count in the line shown last
        self.width = 0  # of the line shown in place, to blank what a shorter line leaves

    def measure(self, done: int) -> tuple[float | None, float | None]:
        """(units per second, seconds left), both None until two updates are apart."""
        now = time.monotonic()
        if self.clock is None:
            self.clock = (now, done)
        seconds, counted = now - self.clock[0], done - self.clock[1]
        if counted <= 0 or seconds <= 0:
            return None, None
        rate = counted / seconds
        return rate, (self.total - done) / rate

    def line(self, done: int, note: str = "") -> str:
        rate, left = self.measure(done)
        unit = f" {self.unit}" if self.unit else ""
        speed = f", {rate:.1f}{unit}/s, ETA {format_duration(left)}" if rate else ""
        return f"{self.what}: {done}/{self.total}{unit}{speed}{f'; {note}' if note else ''}"

    def update(self, done: int, note: str = "") -> None:
        text = self.line(done, note)  # measures even when nothing is shown, so the rate starts at the first call
        if not self.enabled or (time.monotonic() - self.last_shown < self.every and done < self.total):
            return
        self.last_shown = time.monotonic()
        self._show(text, done)

    def finish(self, note: str = "") -> None:
        """The last line (unless it is already shown), and a new line after one rewritten in place."""
        if not self.enabled:
            return
        if self.shown_done != self.total or note:
            self._show(self.line(self.total, note), self.total)
        if self.in_place and self.shown_done is not None:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self, text: str, done: int) -> None:
        self.shown_done = done
        if self.in_place:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
