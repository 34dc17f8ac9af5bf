"""One trainer per workdir: exclusive lock file, holder named, stale locks taken over once."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from dfm_jax import workdir_lock
from dfm_jax.workdir_lock import WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tries the lock from another process: prints "won" (and holds it for HOLD seconds) or the error.
TRY_LOCK = """
import sys, time
from dfm_jax import workdir_lock
start, hold = float(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
  time.sleep(0.001)
try:
  lock = workdir_lock.acquire(sys.argv[1], process_index=0)
except workdir_lock.WorkdirLockedError as e:
  print("locked:", e)
  sys.exit(3)
print("won", flush=True)
time.sleep(hold)
lock.release()
"""


def try_lock(workdir, start=0.0, hold=0.0) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-c", TRY_LOCK, str(workdir), str(start), str(hold)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def write_lock(workdir, **fields):
  now = time.time()
  holder = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": "earlier",
    "started_unix": now,
    "heartbeat_unix": now,
    "token": "someone-else",
  }
  holder.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".lock"), "w") as f:
    json.dump(holder, f)
  return holder


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
  with workdir_lock.acquire(str(tmp_path), process_index=0) as lock:
    holder = json.load(open(tmp_path / ".lock"))
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert lock.held
    proc = try_lock(tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert f"host {socket.gethostname()} pid {os.getpid()}" in out
    assert str(tmp_path / ".lock") in out
    with pytest.raises(WorkdirLockedError, match="already holds"):
      workdir_lock.acquire(str(tmp_path), process_index=0)
  assert not (tmp_path / ".lock").exists()
  lock = workdir_lock.acquire(str(tmp_path), process_index=0)  # free again
  lock.release()
  lock.release()  # harmless


def test_only_process_zero_takes_it(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path / "w"), process_index=1)
  assert not lock.held and not (tmp_path / "w" / ".lock").exists()
  lock.release()


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_log_line(tmp_path, caplog):
  pid = dead_pid()
  write_lock(str(tmp_path), pid=pid)
  with caplog.at_level(logging.WARNING, logger="dfm_jax.workdir_lock"):
    lock = workdir_lock.acquire(str(tmp_path), process_index=0)
  assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and f"pid {pid} is gone" in lines[0] and "took over" in lines[0]
  lock.release()
  assert not (tmp_path / ".lock").exists()


def test_reused_pid_is_stale(tmp_path):
  write_lock(str(tmp_path), pid=os.getppid(), pid_start="1")
  if workdir_lock._pid_start(os.getppid()) is None:  # pylint: disable=protected-access
    pytest.skip("no /proc on this system")
  workdir_lock.acquire(str(tmp_path), process_index=0).release()


def test_lock_of_another_host_is_live_until_its_heartbeat_is_old(tmp_path):
  write_lock(str(tmp_path), host="other-host", pid=4242, started="2024-01-01T00:00:00")
  with pytest.raises(WorkdirLockedError) as err:
    workdir_lock.acquire(str(tmp_path), process_index=0)
  assert "host other-host pid 4242 (started 2024-01-01T00:00:00)" in str(err.value)
  assert err.value.holder["host"] == "other-host"
  write_lock(str(tmp_path), host="other-host", pid=4242, heartbeat_unix=time.time() - 3600)
  workdir_lock.acquire(str(tmp_path), process_index=0).release()


def test_unreadable_lock_is_live_while_young_then_stale(tmp_path):
  (tmp_path / ".lock").write_text("")
  with pytest.raises(WorkdirLockedError, match="being written by another trainer"):
    workdir_lock.acquire(str(tmp_path), process_index=0)
  old = time.time() - 60
  os.utime(tmp_path / ".lock", (old, old))
  workdir_lock.acquire(str(tmp_path), process_index=0).release()


def test_heartbeat_refreshes_and_release_spares_a_stolen_lock(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path), process_index=0, heartbeat_s=0.02)
  first = json.load(open(tmp_path / ".lock"))["heartbeat_unix"]
  deadline = time.time() + 10
  while json.load(open(tmp_path / ".lock"))["heartbeat_unix"] == first:
    assert time.time() < deadline, "no heartbeat"
    time.sleep(0.02)
  thief = write_lock(str(tmp_path), token="thief")
  lock.release()
  assert json.load(open(tmp_path / ".lock"))["token"] == thief["token"]


def test_racing_trainers_on_a_stale_lock_one_wins(tmp_path):
  write_lock(str(tmp_path), pid=dead_pid())
  start = time.time() + 1.5
  procs = [try_lock(tmp_path, start, hold=1.0) for _ in range(4)]
  results = [p.communicate(timeout=60) for p in procs]
  winners = [out for out, _ in results if out.startswith("won")]
  assert len(winners) == 1, results
  assert all(p.returncode in (0, 3) for p in procs), results
  assert not (tmp_path / ".lock").exists()
