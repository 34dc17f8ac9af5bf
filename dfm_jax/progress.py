"""Progress lines with rate and ETA for long loops (sampling, evaluation, encoding)."""

from __future__ import annotations

import sys
import time


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """``Progress(total, "sampling", unit="img")``; ``update(n)`` after each chunk of work.

  Prints ``sampling: 300/1000 (30%)  12.3 img/s  ETA 0m57s`` to stderr at most every
  ``every_s`` seconds and once at the end (only where ``enabled``, e.g. on process 0).
  """

  def __init__(
    self,
    total: int,
    what: str,
    unit: str = "img",
    every_s: float = 10.0,
    enabled: bool = True,
    stream=None,
  ):
    self.total, self.what, self.unit = int(total), what, unit
    self.every_s, self.enabled = every_s, enabled
    self.stream = stream or sys.stderr
    self.done = 0
    self.start = self._last = time.time()

  @property
  def rate(self) -> float:
    return self.done / max(time.time() - self.start, 1e-9)

  def update(self, n: int) -> None:
    self.done += int(n)
    now = time.time()
    if not self.enabled or (now - self._last < self.every_s and self.done < self.total):
      return
    self._last = now
    pct = 100.0 * self.done / max(self.total, 1)
    eta = (self.total - self.done) / max(self.rate, 1e-9)
    print(
      f"{self.what}: {self.done}/{self.total} ({pct:.0f}%)  {self.rate:.3g} "
      f"{self.unit}/s  ETA {format_eta(eta)}",
      file=self.stream,
      flush=True,
    )
