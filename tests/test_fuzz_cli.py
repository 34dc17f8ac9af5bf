"""The command line under drawn input (integration): a config field set to a drawn value (in
range, out of range, wrong type, empty; tests/test_config_schema.py's strategies), or a
byte of a checkpoint file flipped. Each run goes up to its first training steps and must end in
exit 0, or one ``error: ...`` line and exit 1 or 2, never a traceback, and must change no
file outside its own workdir. The fixed slice here runs in CI; a longer run:

  DFM_JAX_FUZZ_CLI_EXAMPLES=200 python -m pytest tests/test_fuzz_cli.py -m integration
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfm_jax import config_schema as S
from tests.test_config_schema import _in_range, _out_of_range
from tests.train_utils import REPO, env, main_command, tiny_flags

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("DFM_JAX_FUZZ_CLI_EXAMPLES", "3"))
STEPS = ["--config.total_steps=2", "--config.checkpoint_every=2", "--config.sample_every=1000"]


def _flag_value(value) -> str:
  if isinstance(value, tuple):
    return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return repr(value) if isinstance(value, str) else str(value)


def _git_status() -> str:
  return subprocess.run(
    ["git", "status", "--porcelain", "--untracked-files=all"],
    cwd=REPO,
    capture_output=True,
    text=True,
  ).stdout


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
  assert "Traceback" not in proc.stderr, (what, proc.stderr[-3000:])
  assert proc.returncode in (0, 1, 2), (what, proc.returncode, proc.stderr[-3000:])
  if proc.returncode:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, (what, proc.stderr[-3000:])


def _run(tmp: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    main_command(os.path.join(tmp, "run"), *tiny_flags(), *STEPS, *flags),
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


_SETTINGS = settings(
  max_examples=EXAMPLES,
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@_SETTINGS
@given(data=st.data())
def test_a_drawn_config_value_is_trained_or_refused_in_one_line(tmp_path_factory, data):
  name = data.draw(st.sampled_from(sorted(S.SCHEMA)), label="field")
  spec = S.SCHEMA[name]
  bad = data.draw(st.booleans(), label="out of range")
  value = data.draw(_out_of_range(spec) if bad else _in_range(spec), label="value")
  tmp = str(tmp_path_factory.mktemp("fuzz"))
  before = _git_status()
  proc = _run(tmp, f"--config.{name}={_flag_value(value)}")
  _check(proc, f"--config.{name}={value!r}")
  assert os.listdir(tmp) in ([], ["run"]), os.listdir(tmp)
  assert _git_status() == before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("trained"))
  proc = _run(tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return os.path.join(tmp, "run")


@_SETTINGS
@given(data=st.data())
def test_a_damaged_checkpoint_is_resumed_or_refused_in_one_line(trained, tmp_path_factory, data):
  tmp = str(tmp_path_factory.mktemp("damaged"))
  workdir = os.path.join(tmp, "run")
  shutil.copytree(trained, workdir)
  files = sorted(
    os.path.join(root, f)
    for root, _, names in os.walk(os.path.join(workdir, "checkpoints"))
    for f in names
    if os.path.getsize(os.path.join(root, f))
  )
  path = data.draw(st.sampled_from(files), label="file")
  size = os.path.getsize(path)
  offset = data.draw(st.integers(0, size - 1), label="offset")
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))
  proc = _run(tmp, "--config.total_steps=4")
  _check(proc, f"{os.path.relpath(path, workdir)} byte {offset}")
