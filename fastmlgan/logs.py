"""Logging set-up and a dependency-free progress bar (rank 0 only)."""

from __future__ import annotations

import logging
import sys
import time


class ConsoleHandler(logging.StreamHandler):
    """A handler for ``sys.stdout`` or ``sys.stderr`` as they are when a record is written, not as
    they were when logging was set up: a caller that swaps the stream later (pytest's capture, a
    notebook) never leaves logging writing to a closed file."""

    def __init__(self, name: str = "stderr") -> None:
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup_logging(
    is_main: bool = True,
    stream: str = "stdout",
    level: int = logging.INFO,
    fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s",
) -> None:
    """The root logger of a command: ``level`` on rank 0 (WARNING on the others), one console
    handler on ``stream`` ("stdout" for training's progress, "stderr" where stdout carries results)."""
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level if is_main else logging.WARNING, handlers=[handler], force=True)


class Progress:
    """``total`` steps; redraws one line on a terminal, prints a line every ~10% otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None) -> None:
        self.total = max(total, 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count = 0
        self.start = time.perf_counter()
        self.postfix = ""
        self._last_decile = -1

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        decile = 10 * self.count // self.total
        if self.tty or decile != self._last_decile or self.count == self.total:
            self._last_decile = decile
            self._draw()

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * min(self.count, self.total) / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"{self.desc} [{bar}] {self.count}/{self.total} "
            f"{elapsed:.0f}s<{eta:.0f}s {rate:.2f}it/s {self.postfix}"
        )
        if self.tty:
            self.stream.write("\r" + line[:200] + "\033[K")
            if self.count >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.count < self.total:
            self.stream.write("\n")
            self.stream.flush()
