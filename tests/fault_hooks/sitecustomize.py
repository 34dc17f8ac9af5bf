"""Test-only fault injection for `tests/test_reliability_cli.py`, loaded by Python at start-up
when this folder is on ``PYTHONPATH`` (nothing else puts it there).

``DFM_TEST_FAIL_SAVE_AT_STEP=N``: finalising checkpoint step ``N`` fails in the background save
thread with ``OSError(ENOSPC)``, as on a full disk; from then on TensorBoard's event writer fails
the same way when it flushes (a full disk is full for every writer). Permission changes cannot do
this when the tests run as root (root ignores write permissions), so the fault is injected where
Orbax renames the finished temporary directory into place, exactly as
``tests/test_checkpoint_integrity.py`` does in-process.

``DFM_TEST_FULL_DISK_FOR_IMAGES=1``: every PNG written through Pillow (sample grids, TensorBoard
images) fails with ``OSError(ENOSPC)``, as when the disk fills up between two checkpoints.
"""

import errno
import os


def _disk_full() -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


_STEP = os.environ.get("DFM_TEST_FAIL_SAVE_AT_STEP", "")

if _STEP:
  import orbax.checkpoint as ocp
  from tensorboardX import event_file_writer

  _full = []
  _cls = ocp.path.atomicity.AtomicRenameTemporaryPath
  _finalize = _cls.finalize
  _flush = event_file_writer.EventFileWriter.flush

  async def _failing_finalize(self, *args, **kwargs):
    if self._final_path.name == _STEP:  # pylint: disable=protected-access
      _full.append(True)
      raise _disk_full()
    return await _finalize(self, *args, **kwargs)

  def _failing_flush(self):
    if _full:
      raise _disk_full()
    return _flush(self)

  _cls.finalize = _failing_finalize
  event_file_writer.EventFileWriter.flush = _failing_flush

if os.environ.get("DFM_TEST_FULL_DISK_FOR_IMAGES"):
  from PIL import Image

  def _failing_save(self, fp, format=None, **params):  # pylint: disable=redefined-builtin
    raise _disk_full()

  Image.Image.save = _failing_save
