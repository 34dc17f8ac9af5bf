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
