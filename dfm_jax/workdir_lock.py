"""One trainer per workdir: a lock file ``<workdir>/.lock`` naming its holder.

    with workdir_lock.acquire(workdir, process_index=jax.process_index()):
      train(...)

The lock file holds JSON ``{"host", "pid", "pid_start", "started", "started_unix",
"heartbeat_unix", "token", "argv"}``. On a local (or mounted network) filesystem it is created
atomically with ``O_CREAT | O_EXCL``, so of two trainers started at once exactly one gets it; the
other gets ``WorkdirLockedError`` naming the holder's host and pid. While held, a daemon thread
rewrites the file every ``heartbeat_s`` seconds with a fresh ``heartbeat_unix``.

A lock is *stale*, and is taken over with one warning line, when

* its holder ran on this host and its pid is gone (or now belongs to a process started at
  another time: a reused pid), or
* its heartbeat is older than ``stale_after_s`` (default 15 minutes): the holder's machine died
  or was preempted (a restarted job usually lands on another host).

A takeover happens under a second ``O_EXCL`` file, ``.lock.takeover``, after re-reading the lock
unchanged, so two trainers taking over the same stale lock cannot both win.

Only process 0 of a multi-host job takes the lock (pass ``process_index``); the others get a
no-op ``Lock``. On object stores (``gs://...``) there is no exclusive create: the lock is written
and checked the same way (through ``etils.epath``) but is advisory -- two trainers started within
the same second may both get it -- and a storage error while taking or releasing it is one
warning line, not a failed run.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from dfm_jax import storage
from dfm_jax.errors import WorkdirLockedError

LOCK_NAME = ".lock"
_TAKEOVER_SUFFIX = ".takeover"
_log = logging.getLogger(__name__)
_held: set[str] = set()  # lock paths held by this process
_held_mutex = threading.Lock()


def _pid_start(pid: int) -> str | None:
  """The start time of ``pid`` in clock ticks since boot (Linux), else None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()[19]
  except (OSError, ValueError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OSError:
    return False
  return True


def _describe(holder: dict) -> str:
  return (
    f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
    f"(started {holder.get('started', '?')})"
  )


def _staleness(holder: dict, stale_after_s: float | None) -> str | None:
  """Why the lock ``holder`` is stale, or None if its holder may be alive."""
  pid = holder.get("pid")
  if holder.get("host") == socket.gethostname() and isinstance(pid, int):
    if not _pid_alive(pid):
      return f"pid {pid} is gone"
    start = _pid_start(pid)
    if start is not None and holder.get("pid_start") not in (None, start):
      return f"pid {pid} now belongs to another process"
  beat = holder.get("heartbeat_unix", holder.get("started_unix"))
  if stale_after_s is not None and isinstance(beat, (int, float)):
    age = time.time() - beat
    if age > stale_after_s:
      return f"its last heartbeat was {age / 60:.0f} min ago"
  return None


class _Store:
  """The few file operations the lock needs, for local paths or (via etils.epath) URLs."""

  def __init__(self, path: str):
    self.path = path
    self.local = not storage.is_remote(path)

  def create(self, path: str, text: str) -> bool:
    """Creates ``path`` holding ``text`` if it does not exist; False if it does."""
    if self.local:
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      return True
    from etils import epath  # pylint: disable=g-import-not-at-top

    p = epath.Path(path)
    if p.exists():
      return False
    p.write_text(text)
    return True

  def read(self, path: str) -> str | None:
    """The text of ``path``, or None if it does not exist."""
    try:
      if self.local:
        with open(path) as f:
          return f.read()
      from etils import epath  # pylint: disable=g-import-not-at-top

      return epath.Path(path).read_text()
    except FileNotFoundError:
      return None

  def replace(self, path: str, text: str) -> None:
    storage.write_text(path, text)

  def remove(self, path: str) -> None:
    try:
      if self.local:
        os.unlink(path)
      else:
        from etils import epath  # pylint: disable=g-import-not-at-top

        epath.Path(path).unlink()
    except FileNotFoundError:
      pass


class Lock:
  """A held workdir lock (or a no-op one on processes other than 0). Release it with
  ``release()`` or by leaving its ``with`` block; releasing twice is harmless."""

  def __init__(
    self, path: str, holder: dict | None, store: _Store | None, heartbeat_s: float | None
  ):
    self.path, self.holder, self._store = path, holder, store
    self._stop = threading.Event()
    self._thread = None
    if holder is not None and heartbeat_s:
      self._thread = threading.Thread(
        target=self._beat, args=(heartbeat_s,), name="workdir-lock-heartbeat", daemon=True
      )
      self._thread.start()

  @property
  def held(self) -> bool:
    return self.holder is not None

  def _beat(self, every: float) -> None:
    warned = False
    while not self._stop.wait(every):
      try:
        current = self._store.read(self.path)
        if current is None or json.loads(current).get("token") != self.holder["token"]:
          if not warned:
            _log.warning("the workdir lock %s was removed or taken by another process", self.path)
            warned = True
          continue
        self.holder = dict(self.holder, heartbeat_unix=time.time())
        self._store.replace(self.path, json.dumps(self.holder, indent=1))
      except Exception as e:  # pylint: disable=broad-except
        if not warned:
          _log.warning("cannot refresh the workdir lock %s: %s", self.path, e)
          warned = True

  def release(self) -> None:
    """Removes the lock file if it is still this lock's."""
    if self.holder is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      current = self._store.read(self.path)
      if current is not None and json.loads(current).get("token") == self.holder["token"]:
        self._store.remove(self.path)
      else:
        _log.warning("the workdir lock %s is no longer this process's; left as it is", self.path)
    except Exception as e:  # pylint: disable=broad-except
      if self._store.local and not isinstance(e, (OSError, ValueError)):
        raise
      _log.warning("cannot release the workdir lock %s: %s", self.path, e)
    finally:
      with _held_mutex:
        _held.discard(self.path)
      self.holder = None

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def __repr__(self) -> str:
    return f"Lock({self.path!r}, held={self.held})"


def acquire(
  workdir: str,
  *,
  process_index: int | None = None,
  heartbeat_s: float | None = 60.0,
  stale_after_s: float | None = 900.0,
) -> Lock:
  """Takes ``<workdir>/.lock`` (creating ``workdir``); returns the held ``Lock``.

  Args:
    workdir: local path or URL (``gs://``: advisory, see the module docstring).
    process_index: this process's index in a multi-host job (default ``jax.process_index()`` if
      jax is imported, else 0); only process 0 takes the lock, the others get a no-op ``Lock``.
    heartbeat_s: how often the holder refreshes ``heartbeat_unix`` (None: never).
    stale_after_s: a lock whose heartbeat is older than this is taken over (None: only a dead pid
      on this host makes a lock stale). Keep it well above ``heartbeat_s``.

  Raises:
    WorkdirLockedError: another live trainer holds the workdir (the message names its host, pid
      and start time, and the file to delete if that run is known to be gone).
  """
  if process_index is None:
    process_index = sys.modules["jax"].process_index() if "jax" in sys.modules else 0
  path = os.path.join(
    os.path.abspath(workdir) if not storage.is_remote(workdir) else workdir, LOCK_NAME
  )
  if process_index != 0:
    return Lock(path, None, None, None)
  store = _Store(path)
  if store.local:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  now = time.time()
  holder = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "pid_start": _pid_start(os.getpid()),
    "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
    "started_unix": now,
    "heartbeat_unix": now,
    "token": uuid.uuid4().hex,
    "argv": sys.argv[:8],
  }
  text = json.dumps(holder, indent=1)
  with _held_mutex:
    if path in _held:
      raise WorkdirLockedError(f"this process already holds the workdir lock {path}", holder)
  try:
    if not store.create(path, text):
      _take_over_if_stale(store, path, text, stale_after_s)
  except WorkdirLockedError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if store.local:
      raise
    # Advisory on object stores: a storage error must not stop the run.
    _log.warning(
      "cannot take the advisory workdir lock %s (%s); training without it",
      path,
      f"{type(e).__name__}: {e}".splitlines()[0][:300],
    )
    return Lock(path, None, None, None)
  with _held_mutex:
    _held.add(path)
  return Lock(path, holder, store, heartbeat_s)


def _read_holder(store: _Store, path: str) -> tuple[str | None, dict]:
  text = store.read(path)
  if text is None:
    return None, {}
  try:
    holder = json.loads(text)
    return text, holder if isinstance(holder, dict) else {}
  except ValueError:
    return text, {}


def _take_over_if_stale(store: _Store, path: str, text: str, stale_after_s: float | None) -> None:
  """Creates the lock in place of a stale one; raises WorkdirLockedError if it is live."""
  seen, holder = _read_holder(store, path)
  if seen is None:  # released between our create and read
    if store.create(path, text):
      return
    seen, holder = _read_holder(store, path)
  reason = _staleness(holder, stale_after_s) if holder else None
  if reason is None and not holder and seen is not None:
    # Unreadable: a holder killed between creating and writing it, or one writing it right now.
    age = time.time() - _mtime(path) if store.local else 0.0
    if age > 10:
      reason = "its content is unreadable"
  if reason is None and not holder:
    raise WorkdirLockedError(
      f"the workdir lock {path} is being written by another trainer or is unreadable; retry, "
      "or delete it if no trainer uses this workdir",
      holder,
    )
  if reason is None:
    raise WorkdirLockedError(
      f"workdir {os.path.dirname(path)} is in use by {_describe(holder)}; "
      f"stop that run first, or delete {path} if it is known to be gone",
      holder,
    )
  breaker = path + _TAKEOVER_SUFFIX
  if not store.create(breaker, json.dumps({"host": socket.gethostname(), "pid": os.getpid()})):
    raise WorkdirLockedError(
      f"another process is taking over the stale workdir lock {path} (delete {breaker} if "
      "no process is)",
      holder,
    )
  try:
    again = store.read(path)
    if again != seen:  # released, refreshed or already replaced: decide afresh
      if again is None and store.create(path, text):
        return
      raise WorkdirLockedError(
        f"workdir {os.path.dirname(path)} is in use by {_describe(_read_holder(store, path)[1])}"
        f"; stop that run first, or delete {path} if it is known to be gone",
        holder,
      )
    store.remove(path)
    if not store.create(path, text):
      raise WorkdirLockedError(
        f"workdir {os.path.dirname(path)} was locked by another trainer "
        "while its stale lock was being removed",
        holder,
      )
    _log.warning("took over the stale workdir lock %s of %s: %s", path, _describe(holder), reason)
  finally:
    store.remove(breaker)


def _mtime(path: str) -> float:
  try:
    return os.path.getmtime(path)
  except OSError:
    return time.time()
