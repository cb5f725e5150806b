"""Messages and progress for long jobs, through `logging` (logger "ebd").

    [precompute] 300/1000 images (30%) 120.5 img/s eta 6s

A terminal gets a tqdm bar; anything else (`ray job logs`, CI, a file) gets those plain lines every `interval_s`.
The library only logs; the jobs (`run_cli`) and Ray worker entry points call `configure_logging()` so messages
reach stderr in the line format above. Python users configure logging as they like (`logging.getLogger("ebd")`).
"""

from __future__ import annotations

import logging
import sys
import time

LOGGER = logging.getLogger("ebd")
LOGGER.addHandler(logging.NullHandler())  # a library stays silent until its user configures logging


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message is logged: notebooks and pytest swap it after set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Messages to stderr as plain lines (idempotent): for the jobs and for Ray worker processes."""
    if not any(getattr(h, "_ebd", False) for h in LOGGER.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._ebd = True
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(level)


def log_line(name: str, message: str) -> None:
    """One line `[name] message` through the ebd logger."""
    LOGGER.info(f"[{name}] {message}")


class Progress:
    def __init__(self, name: str, total: int, unit: str = "images", interval_s: float = 10.0, stream=None,
                 done: int = 0):
        self.name, self.total, self.unit, self.interval_s = name, total, unit, interval_s
        self.start = self.last_print = time.monotonic()
        self.done = self.done_at_start = done  # a resumed job's rate counts only what it did itself
        self.bar = None
        stream = stream or sys.stderr
        if total and interval_s > 0 and hasattr(stream, "isatty") and stream.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit=unit, desc=name, file=stream, dynamic_ncols=True)

    def update(self, n: int, extra: str = "", force: bool = False) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if extra:
                self.bar.set_postfix_str(extra, refresh=False)
            if self.done >= self.total:
                self.bar.close()
            return
        now = time.monotonic()
        if force or now - self.last_print >= self.interval_s:
            self.last_print = now
            self.log(self.line(extra))

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0

    def line(self, extra: str = "") -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = self.total - self.done
        eta = f" eta {left / self.rate:.0f}s" if self.rate > 0 and left > 0 else ""
        tail = f" {extra}" if extra else ""
        return f"{self.done}/{self.total} {self.unit}{pct} {self.rate:.1f} {self.unit}/s{eta}{tail}"

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[{self.name}] {message}", file=sys.stderr)
        else:
            log_line(self.name, message)
