"""Checkpointer round trip, and a short error naming the difference when the model changed."""

import jax
import numpy as np
import pytest
from flax import nnx

from dfm_jax.checkpoint import Checkpointer, CheckpointMismatchError


class Net(nnx.Module):
  def __init__(self, width: int, extra: bool, rngs: nnx.Rngs):
    self.first = nnx.Linear(2, width, rngs=rngs)
    self.extra = nnx.Linear(width, 1, rngs=rngs) if extra else None


def abstract(module):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(module))


def test_round_trip_and_mismatch_is_named(tmp_path):
  saved = Net(3, True, nnx.Rngs(0))
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, nnx.state(saved))
  ckpt.wait()

  restored = ckpt.restore(5, abstract(Net(3, True, nnx.Rngs(1))))
  np.testing.assert_array_equal(restored["first"]["kernel"][...], saved.first.kernel[...])

  with pytest.raises(CheckpointMismatchError) as err:  # a ValueError
    ckpt.restore(5, abstract(Net(4, False, nnx.Rngs(1))))
  message = str(err.value)
  assert "not in the model: extra/bias, extra/kernel" in message
  assert "first/kernel saved (2, 3) vs model (2, 4)" in message
  assert "config.json" in message and len(message) < 800
  ckpt.close()


def test_facts_are_kept_with_every_step_and_a_step_with_other_facts_is_refused(tmp_path):
  """The per-stage statistics live in the checkpoints: ``saved_facts`` reads the newest step's
  without restoring it, and restoring a step saved with other facts is refused by name."""
  from dfm_jax.checkpoint import saved_facts

  assert saved_facts(str(tmp_path / "none")) is None
  net = Net(3, False, nnx.Rngs(0))
  a = {"stage_stats": {"mean": [0.1], "std": [0.5]}}
  ckpt = Checkpointer(str(tmp_path), async_save=False, facts=a)
  ckpt.save(1, nnx.state(net))
  ckpt.wait()
  ckpt.close()
  b = {"stage_stats": {"mean": [0.2], "std": [0.5]}}
  ckpt = Checkpointer(str(tmp_path), async_save=False, facts=b)
  ckpt.save(2, nnx.state(net))
  ckpt.wait()
  assert saved_facts(str(tmp_path)) == b
  ckpt.restore(2, abstract(net))
  with pytest.raises(CheckpointMismatchError, match="other stage_stats than this run's"):
    ckpt.restore(1, abstract(net))
  (tmp_path / "2" / "integrity" / "metadata").write_text("{")  # the newest step's manifest
  assert saved_facts(str(tmp_path)) == a
  ckpt.close()
