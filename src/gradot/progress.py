"""What the command line shows while it works: stage lines, a spinner for silent stretches, and
which third-party output is noise.

Everything here writes to stderr (stdout carries results). On a terminal a silent stage shows a
spinner with the seconds elapsed, then ``loading model default: done in 5 s``; elsewhere (a log
file, a pipe) nothing but an INFO log line (shown by ``gradot -v``). A stage that fails erases its
spinner: the error is the one line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

#: Third-party loggers whose warnings are not the user's concern (kept under ``-v``): lm-eval warns
#: twice per evaluation that it was handed a ready model, which is how gradot uses it.
NOISY_LOGGERS = ("lm_eval",)


def verbose() -> bool:
    """True under ``gradot -v`` (the CLI then logs at INFO)."""
    return logging.getLogger("gradot").isEnabledFor(logging.INFO)


def quiet_third_party(is_verbose: bool) -> None:
    """Filter output that is not the user's concern unless ``-v``: lm-eval's repeated warnings, the
    progress bars of dataset preparation (``datasets``) and of weight loading and writing
    (``transformers``: instant on the models gradot runs on a CPU). Must run before those libraries
    are imported (they read the environment once)."""
    if is_verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def say(text: str) -> None:
    """One progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def stage(text: str, stream=None) -> Iterator[None]:
    """Show ``text`` while the block runs: a spinner and the seconds elapsed on a terminal, then
    ``text: done in 12 s``; elsewhere only an INFO log of that line. On failure the spinner is erased
    (the caller reports the error). Use it around blocks that print nothing else."""
    stream = stream or sys.stderr
    t0 = time.perf_counter()
    tty = hasattr(stream, "isatty") and stream.isatty()
    stop = threading.Event()
    thread = None
    if tty:
        def spin():
            frames = "|/-\\"
            i = 0
            while not stop.wait(0.25):
                stream.write(f"\r{text} {frames[i % 4]} {_duration(time.perf_counter() - t0)}  ")
                stream.flush()
                i += 1

        stream.write(f"{text} ...")
        stream.flush()
        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        end = f"{text}: done in {_duration(time.perf_counter() - t0)}" if ok else ""
        if tty:
            width = len(text) + 16
            stream.write(f"\r{end:<{width}}" + ("\n" if ok else "\r"))
            stream.flush()
        if ok:
            logging.getLogger("gradot").info(end)


class StageCounter:
    """``[3/12] gradot: Emu FT on piqa (4 min so far, about 9 min left)``: a numbered line per stage,
    with an estimate from the mean time of the stages computed so far in this run (cached stages
    cost nothing and are not counted)."""

    def __init__(self, total: int, write=say):
        self.total, self.write = total, write
        self.index = 0
        self.computed = 0
        self.t0 = time.perf_counter()
        self.spent = 0.0  # seconds in computed stages
        self._started: float | None = None

    def start(self, label: str, cached: bool = False) -> None:
        self._finish()
        self.index += 1
        head = f"[{self.index}/{self.total}] {label}"
        if cached:
            self.write(f"{head} (cached)")
            return
        elapsed = time.perf_counter() - self.t0
        if self.computed:
            left = self.spent / self.computed * (self.total - self.index + 1)
            head += f" ({_duration(elapsed)} so far, about {_duration(left)} left)"
        self.write(head)
        self._started = time.perf_counter()

    def _finish(self) -> None:
        if self._started is not None:
            self.spent += time.perf_counter() - self._started
            self.computed += 1
            self._started = None

    def done(self) -> None:
        self._finish()
