"""Progress lines for long jobs: `[precompute] 300/1000 images (30%) 120.5 img/s eta 6s`.

Plain lines, not a terminal bar, so they read the same in a terminal, in `ray job logs` and in CI.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, name: str, total: int, unit: str = "images", interval_s: float = 10.0, stream=None):
        self.name, self.total, self.unit, self.interval_s = name, total, unit, interval_s
        self.stream = stream or sys.stderr
        self.start = self.last_print = time.monotonic()
        self.done = 0

    def update(self, n: int, extra: str = "", force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self.last_print >= self.interval_s:
            self.last_print = now
            self.log(self.line(extra))

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, extra: str = "") -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = self.total - self.done
        eta = f" eta {left / self.rate:.0f}s" if self.rate > 0 and left > 0 else ""
        tail = f" {extra}" if extra else ""
        return f"{self.done}/{self.total} {self.unit}{pct} {self.rate:.1f} {self.unit}/s{eta}{tail}"

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", file=self.stream, flush=True)
