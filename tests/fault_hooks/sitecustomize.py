"""Test-only fault injection for `tests/test_reliability_cli.py`, loaded by Python at start-up
when this folder is on ``PYTHONPATH`` (nothing else puts it there).

``DFM_TEST_FAIL_SAVE_AT_STEP=N``: finalising checkpoint step ``N`` fails in the background save
thread with ``OSError(ENOSPC)``, as on a full disk. Permission changes cannot do this when the
tests run as root (root ignores write permissions), so the fault is injected where Orbax renames
the finished temporary directory into place, exactly as ``tests/test_checkpoint_integrity.py``
does in-process.
"""

import errno
import os

_STEP = os.environ.get("DFM_TEST_FAIL_SAVE_AT_STEP", "")

if _STEP:
  import orbax.checkpoint as ocp

  _cls = ocp.path.atomicity.AtomicRenameTemporaryPath
  _finalize = _cls.finalize

  async def _failing_finalize(self, *args, **kwargs):
    if self._final_path.name == _STEP:  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await _finalize(self, *args, **kwargs)

  _cls.finalize = _failing_finalize
