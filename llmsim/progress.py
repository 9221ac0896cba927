"""Progress of long commands: a bar on a terminal, a line every ``interval_s`` elsewhere (CI logs, notebooks),
nothing with ``--quiet``."""

from __future__ import annotations

import sys
import time


class LineProgress:
    """tqdm's ``update`` / context-manager interface, printing plain lines to stderr."""

    def __init__(self, total: int | None, unit: str, desc: str, interval_s: float = 10.0):
        self.total, self.unit, self.desc, self.interval_s = total, unit, desc, interval_s
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{share} after {now - self.start:.0f} s", file=sys.stderr,
              flush=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        if time.monotonic() - self.start >= self.interval_s:
            self._line(time.monotonic())


def progress(total: int | None, unit: str, desc: str, quiet: bool):
    if quiet:
        from tqdm import tqdm

        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, desc=desc, leave=False)
    return LineProgress(total, unit, desc)
