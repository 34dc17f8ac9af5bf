"""Unreadable records: the error that names them, and reading past them under
``data.skip_corrupt`` (record i replaced by the next readable one, i+1, i+2, ..., so element i
stays a deterministic function of i and batch shapes are fixed)."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, TypeVar
from dfm_jax.errors import CorruptRecordError

MAX_CONSECUTIVE = 100
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_skipped: collections.Counter = collections.Counter()
T = TypeVar("T")


def skipped_records() -> dict[str, int]:
  """{record name: times skipped} for corrupt records replaced in this process (with
  num_workers > 0 the workers count their own and log each record once)."""
  with _lock:
    return dict(_skipped)


def _count_skip(name: str, err: Exception):
  with _lock:
    _skipped[name] += 1
    first, total = _skipped[name] == 1, sum(_skipped.values())
  if first:
    _log.warning(
      "skipping unreadable %s (%s: %s); %d skip(s) so far in this process",
      name,
      type(err).__name__,
      err,
      total,
    )


def read_skipping(
  load: Callable[[int], T],
  record_name: Callable[[int], str],
  index: int,
  count: int,
  skip_corrupt: bool,
) -> tuple[int, T]:
  """``(i, load(i))`` for the first readable i of index, index + 1, ... (mod ``count``); without
  ``skip_corrupt`` the first failure raises CorruptRecordError naming the record."""
  for attempt in range(min(count, MAX_CONSECUTIVE)):
    i = (index + attempt) % count
    try:
      return i, load(i)
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, RuntimeError...
      name = record_name(i)
      if not skip_corrupt:
        raise CorruptRecordError(
          f"cannot decode {name}: {type(err).__name__}: {err} (set data.skip_corrupt=True to "
          "skip unreadable records)"
        ) from err
      _count_skip(name, err)
  raise CorruptRecordError(
    f"{MAX_CONSECUTIVE} consecutive unreadable records from {record_name(index)}"
  )
