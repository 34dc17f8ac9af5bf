"""Model FLOPs (what MFU counts) against XLA's own count, and the chips' peak figures."""

import pytest

from dfm_jax import compile_check, experiment, hardware
from tests.train_utils import config_file


@pytest.mark.parametrize("hidden, depth", [(128, 2), (256, 4)])
def test_model_flops_are_the_matmuls_of_xlas_count(hidden, depth):
  """XLA's count of the unrolled train step also holds the element-wise work (norms, the
  optimizer), so the model FLOPs are a little below it, and close."""
  c = config_file(
    "default.py", "runlocal", model__hidden_size=hidden, model__depth=depth, model__num_heads=4
  )
  model = experiment.from_config(c, 1, check_data=False).model
  ratio = c.batch_size * model.train_flops_per_sample() / compile_check.step_flops(c, depth)
  assert 0.9 < ratio < 1.0


def test_peak_of_each_chip_kind():
  assert hardware.peak_tflops("TPU v4") == 275.0
  assert hardware.peak_tflops("TPU v5 lite") == 197.0
  assert hardware.peak_tflops("TPU v5") == 459.0
  assert hardware.peak_tflops("TPU v6 lite") == 918.0
  assert hardware.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert hardware.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert hardware.peak_tflops("NVIDIA H200") == 989.0
  assert hardware.peak_tflops("cpu") is None
