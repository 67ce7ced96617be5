"""Progress bars: tqdm when it is installed (and wanted), else a plain line every tenth of the way."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.total = max(1, total)
        self.description = description
        self.count = 0
        self.started = time.perf_counter()
        self._bar = None
        self._next_print = 0.1
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                print(f"{description}: 0/{self.total}", flush=True)
            else:
                self._bar = tqdm(total=self.total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and self.count >= self._next_print * self.total:
            while self._next_print * self.total <= self.count:
                self._next_print += 0.1
            elapsed = time.perf_counter() - self.started
            print(f"{self.description}: {self.count}/{self.total} ({elapsed:.0f} s)", flush=True)

    def close(self) -> float:
        """Close the bar; returns the seconds since it was opened."""
        if self._bar is not None:
            self._bar.close()
        return time.perf_counter() - self.started

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
