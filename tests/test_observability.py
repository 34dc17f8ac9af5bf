"""What a run shows while it trains: interval-mean metrics, step and data-wait time, hparams and
the parameter table in TensorBoard, a profiler window, small evaluations, progress lines."""

import glob
import io
import os
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dfm_jax import train
from dfm_jax.progress import Progress
from tests.train_utils import tiny_config


def _events(workdir):
  """Every summary value in the run's TensorBoard event files (TFRecord framing: length,
  length CRC, payload, payload CRC)."""
  values = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "**", "events.*"), recursive=True):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      assert pos + 16 + length <= len(data), f"truncated event file {path}"
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      values += [(event.step, v) for v in event.summary.value]
  return values


def _scalars(workdir):
  out = {}
  for step, v in _events(workdir):
    if v.HasField("simple_value"):
      out.setdefault(v.tag, []).append((step, v.simple_value))
  return out


@pytest.mark.integration
def test_run_logs_interval_means_times_profile_and_small_eval(tmp_path, capsys):
  workdir = str(tmp_path)
  config = tiny_config(
    total_steps=4,
    log_every=4,
    checkpoint_every=4,
    profile_steps=(2, 3),
    eval__every=4,
    eval__train_num_samples=20,
    eval__metrics=("classifier",),
  )
  train.train(config, workdir, devices=jax.devices()[:1])
  scalars = _scalars(workdir)
  # One log line for the 4-step interval (that its value is the interval's mean is asserted by
  # test_interval_means_average_every_step, on the function the loop logs through).
  assert [s for s, _ in scalars["loss"]] == [4]
  for tag in (
    "time/step_s",
    "time/data_wait_s",
    "steps_per_sec",
    "grad_norm",
    "eval/classifier_fd",
    "eval/classifier_accuracy",
  ):
    assert tag in scalars, tag
  assert scalars["time/step_s"][0][1] > 0 and scalars["time/data_wait_s"][0][1] >= 0
  assert 0.0 <= scalars["eval/classifier_accuracy"][0][1] <= 1.0
  tags = {v.tag for _, v in _events(workdir)}
  assert any("config" in t for t in tags) and any("parameters" in t for t in tags), tags
  # The hyperparameters belong to the run itself: no second run folder beside its event file.
  assert "_hparams_/session_start_info" in tags and "hparams/parameters" in scalars
  assert not [
    p for p in os.listdir(os.path.join(workdir, "tensorboard")) if not p.startswith("events.")
  ]
  traces = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces, "no profiler trace written"
  out = capsys.readouterr().out
  assert "step 4/4" in out and "data" in out and "ETA" in out and "TFLOP/s" in out


def test_interval_means_average_every_step():
  pending = [(1, {"loss": 1.0, "nonfinite": 0}), (2, {"loss": 3.0, "nonfinite": 0})]
  assert train._interval_means(pending) == {"loss": 2.0}  # pylint: disable=protected-access


def test_progress_reports_rate_and_eta():
  stream = io.StringIO()
  p = Progress(100, "sampling", every_s=0.0, stream=stream)
  p.update(25)
  p.update(75)
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith("sampling: 25/100 (25%)") and "img/s" in lines[0]
  assert "ETA" in lines[0] and lines[-1].startswith("sampling: 100/100 (100%)")
  quiet = io.StringIO()
  Progress(10, "x", stream=quiet, enabled=False).update(10)
  assert quiet.getvalue() == ""
  np.testing.assert_allclose(p.done, 100)
