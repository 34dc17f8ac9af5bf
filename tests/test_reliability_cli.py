"""No silent data loss, through the real command line as a hostile but realistic user runs it: a
second trainer on a busy workdir, a resume with another model, Ctrl-C during training and during
start-up, a damaged checkpoint, a full disk during a save, bad configs and workdirs, sample mode
that cannot write, and the encode and fid tools on bad inputs.

Each case checks its row of the table in ``docs/reliability.md`` (exit code, message, command)
with ``check_row``, so the doc cannot drift from what the CLI does. The training runs share one
uninterrupted reference run (8 steps of ``configs/default.py:runlocal``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.test_reliability_doc import check_row
from tests.train_utils import REPO, env, main_command, read_checkpoint, run_main, tiny_flags

pytestmark = pytest.mark.integration

STEPS = 8
FLAGS = tiny_flags(total_steps=STEPS)
FAULT_HOOKS = os.path.join(REPO, "tests", "fault_hooks")


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      pytest.fail(f"the run ended ({proc.returncode}) before {what}")
    time.sleep(0.01)
  pytest.fail(f"timed out waiting for {what}")


def _steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _snapshot(folder: str) -> dict[str, str]:
  """{relative path: SHA-256} of every file under ``folder``."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _error_line(stderr: str, single: bool = True) -> str:
  """The ``error: ...`` line; with ``single``, also that it is the only one, the last line and
  that there is no traceback."""
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  if single:
    assert stderr.rstrip().splitlines()[-1] == lines[0], stderr[-3000:]
  return lines[0]


def _log_line(stderr: str, needle: str) -> str:
  lines = [line for line in stderr.splitlines() if needle in line]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def _assert_same_parameters(workdir: str, reference: str, step: int = STEPS):
  got, want = read_checkpoint(workdir, step), read_checkpoint(reference, step)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _run(cmd: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    cmd, cwd=REPO, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=600
  )


# ------------------------------------------------- the reference run and a second trainer on it


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run; while it starts up, a second trainer is started on its workdir.

  Returns ``(workdir, first, second, first_was_running)``."""
  root = tmp_path_factory.mktemp("reference")
  workdir = str(root / "run")
  cmd = main_command(workdir, *FLAGS)
  with open(root / "first.out", "w") as out, open(root / "first.err", "w") as err:
    first = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=out, stderr=err, text=True)
    _wait_for(lambda: os.path.exists(os.path.join(workdir, ".lock")), "the workdir lock", first)
    second = _run(cmd)
    first_was_running = first.poll() is None
    first.wait(timeout=600)
  first_output = (root / "first.out").read_text() + (root / "first.err").read_text()
  assert first.returncode == 0, first_output[-3000:]
  return workdir, (cmd, first.pid, first_output), second, first_was_running


def test_second_trainer_is_refused_and_the_first_finishes(reference):
  workdir, (cmd, pid, first_output), second, first_was_running = reference
  assert first_was_running, "the first trainer ended before the second one was refused"
  check_row(
    "second-trainer",
    cmd,
    second.returncode,
    _error_line(second.stderr),
    workdir=workdir,
    host=socket.gethostname(),
    pid=pid,
  )
  assert "Traceback" not in first_output and f"step {STEPS}/{STEPS}" in first_output
  assert _steps(workdir)[-1] == STEPS
  assert not os.path.exists(os.path.join(workdir, ".lock"))


# ------------------------------------------------------------------ resume with another model


def test_resume_with_another_model_names_tensors_and_changes_nothing(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  before = _snapshot(workdir)
  cmd = main_command(workdir, *FLAGS, "--config.model.hidden_size=64")
  proc = _run(cmd)
  check_row(
    "other-model",
    cmd,
    proc.returncode,
    _error_line(proc.stderr, single=False),
    checkpoints=os.path.join(workdir, "checkpoints"),
  )
  assert "shape differs:" in proc.stderr and "saved (" in proc.stderr
  assert "vs model (" in proc.stderr and "config.json" in proc.stderr
  assert _snapshot(workdir) == before  # config.json, checkpoints: byte-identical, nothing new


# ----------------------------------------------------------------------------------- Ctrl-C


def test_standardised_runs_keep_their_statistics_in_their_checkpoints(tmp_path):
  """Two standardised runs (different seeds, so different estimated statistics). The statistics
  are stored once, with every checkpoint, so the first run's checkpoints copied over the
  second's resume with the statistics their weights were trained with."""
  from dfm_jax.checkpoint import saved_facts

  flags = [*FLAGS, "--config.decomposition.standardize=True"]
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert _run(main_command(a, *flags)).returncode == 0
  assert _run(main_command(b, *flags, "--config.seed=7")).returncode == 0
  facts_a = saved_facts(os.path.join(a, "checkpoints"))
  assert facts_a["stage_stats"] != saved_facts(os.path.join(b, "checkpoints"))["stage_stats"]
  assert not os.path.exists(os.path.join(a, "stage_stats.json"))
  shutil.rmtree(os.path.join(b, "checkpoints"))
  shutil.copytree(os.path.join(a, "checkpoints"), os.path.join(b, "checkpoints"))
  proc = _run(main_command(b, *flags, "--config.seed=7", f"--config.total_steps={STEPS + 2}"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resuming from checkpoint at step {STEPS}" in proc.stderr
  assert saved_facts(os.path.join(b, "checkpoints")) == facts_a
  sample = _run(main_command(b, *flags, "--config.seed=7", "--mode=sample"))  # reads them back
  assert sample.returncode == 0, sample.stderr[-3000:]


def test_ctrl_c_saves_then_a_rerun_resumes_to_the_same_parameters(reference, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = main_command(workdir, *FLAGS)
  with open(tmp_path / "err", "w") as err:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=err, text=True)
    for line in proc.stdout:
      if line.startswith("step "):
        proc.send_signal(signal.SIGINT)
        break
    proc.communicate(timeout=300)
  stderr = (tmp_path / "err").read_text()
  assert "Traceback" not in stderr, stderr[-3000:]
  stopped = _steps(workdir)[-1]
  assert 0 < stopped < STEPS
  check_row(
    "ctrl-c-training",
    cmd,
    proc.returncode,
    _log_line(stderr, "re-run the same command to resume"),
    step=stopped,
  )

  rerun = run_main(workdir, *FLAGS)
  assert f"resuming from checkpoint at step {stopped}" in rerun.stderr
  _assert_same_parameters(workdir, reference[0])


@pytest.mark.parametrize(
  "case, signum",
  [
    ("ctrl-c-startup", signal.SIGINT),
    ("sigterm-startup", signal.SIGTERM),
  ],
)
def test_a_signal_during_start_up_exits_130_and_leaves_no_checkpoint(tmp_path, case, signum):
  workdir = str(tmp_path / "run")
  cmd = main_command(workdir, *FLAGS)
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  _wait_for(lambda: os.path.exists(os.path.join(workdir, ".lock")), "the workdir lock", proc)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  assert "Traceback" not in err and "step " not in out, err[-3000:]
  check_row(case, cmd, proc.returncode, err.rstrip().splitlines()[-1])
  assert _steps(workdir) == []
  assert not os.path.exists(os.path.join(workdir, ".lock"))


# ------------------------------------------------------------------------- damaged checkpoint


def test_damaged_newest_checkpoint_is_quarantined_and_the_run_finishes(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  data = os.path.join(checkpoints, str(STEPS), "state", "d")
  (name,) = sorted(os.listdir(data), key=lambda n: -os.path.getsize(os.path.join(data, n)))[:1]
  with open(os.path.join(data, name), "r+b") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(size // 2)
    f.write(bytes(64))  # zeros over the middle of the largest array file
  cmd = main_command(workdir, *FLAGS)
  proc = _run(cmd)
  assert "Traceback" not in proc.stderr
  check_row(
    "corrupt-checkpoint",
    cmd,
    proc.returncode,
    _log_line(proc.stderr, "is damaged"),
    checkpoints=checkpoints,
  )
  assert f"resuming from checkpoint at step {STEPS - 2}" in proc.stderr
  (moved,) = os.listdir(os.path.join(checkpoints, "quarantine"))
  assert moved.startswith(f"{STEPS}-")
  _assert_same_parameters(workdir, reference[0])


# -------------------------------------------------------------------------------- failed save


def test_failed_save_stops_the_run_and_keeps_the_last_good_checkpoint(reference, tmp_path):
  """The disk fills up while step 4 is saved (root ignores permissions, so the fault is injected
  by tests/fault_hooks/sitecustomize.py)."""
  workdir = str(tmp_path / "run")
  cmd = main_command(workdir, *FLAGS)
  pythonpath = os.pathsep.join(p for p in (FAULT_HOOKS, os.environ.get("PYTHONPATH")) if p)
  proc = _run(cmd, {"PYTHONPATH": pythonpath, "DFM_TEST_FAIL_SAVE_AT_STEP": "4"})
  check_row(
    "failed-save",
    cmd,
    proc.returncode,
    _error_line(proc.stderr),
    checkpoints=os.path.join(workdir, "checkpoints"),
  )
  assert _steps(workdir) == [2]
  _assert_same_parameters(workdir, reference[0], step=2)
  assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_a_disk_full_between_checkpoints_names_the_last_good_one(tmp_path):
  """A sample grid hits the full disk (injected by tests/fault_hooks/sitecustomize.py) while step
  4 is being saved: the save finishes and is named."""
  workdir = str(tmp_path / "run")
  cmd = main_command(workdir, *FLAGS, "--config.sample_every=4")
  pythonpath = os.pathsep.join(p for p in (FAULT_HOOKS, os.environ.get("PYTHONPATH")) if p)
  proc = _run(cmd, {"PYTHONPATH": pythonpath, "DFM_TEST_FULL_DISK_FOR_IMAGES": "1"})
  check_row("disk-full-images", cmd, proc.returncode, _error_line(proc.stderr), workdir=workdir)
  assert _steps(workdir) == [2, 4]
  assert read_checkpoint(workdir, 4)
  assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_a_real_full_disk_names_the_last_good_checkpoint(tmp_path):
  """The workdir on a 1.5 MB tmpfs: the first checkpoint fits, a later one does not (the
  fault-hook test above injects the error; this one fills a real file system)."""
  mount = tmp_path / "small_disk"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)])
  if done.returncode:
    pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
  try:
    workdir = str(mount / "run")
    cmd = main_command(workdir, *FLAGS)
    proc = _run(cmd)
    steps = _steps(workdir)
    assert steps, proc.stderr[-3000:]
    check_row(
      "disk-full",
      cmd,
      proc.returncode,
      _error_line(proc.stderr),
      step=steps[-1],
    )
    assert read_checkpoint(workdir, steps[-1])  # the named step is intact and readable
    assert not os.path.exists(os.path.join(workdir, ".lock"))
  finally:
    subprocess.run(["umount", str(mount)])


# ---------------------------------------------------------------------- bad configs, workdirs


@pytest.mark.parametrize(
  "case, overrides",
  [
    ("nan-learning-rate", ["--config.optim.learning_rate=nan"]),
    ("keep-checkpoints-zero", ["--config.keep_checkpoints=0"]),
    ("negative-learning-rate", ["--config.optim.learning_rate=-1"]),
    ("adam-b2-above-one", ["--config.optim.b2=1.5"]),
    ("negative-grad-clip", ["--config.optim.grad_clip=-1"]),
    ("profile-steps-reversed", ["--config.profile_steps=(20,10)"]),
    ("zero-width-model", ["--config.model.hidden_size=0"]),
    ("zero-depth-model", ["--config.model.depth=0"]),
    ("zero-stats-batches", ["--config.decomposition.stats_batches=0"]),
    ("one-eval-sample", ["--config.eval.num_samples=1"]),
    ("one-real-image", ["--config.eval.num_real=1"]),
    ("data-path-ignored", ["--config.data.path=/data/digits"]),
    ("unknown-field", ["--config.optim.learning_rat=0.001"]),
  ],
)
def test_bad_config_value_is_one_line_and_writes_nothing(tmp_path, case, overrides):
  workdir = str(tmp_path / "run")
  cmd = main_command(workdir, *overrides)
  proc = _run(cmd)
  check_row(case, cmd, proc.returncode, _error_line(proc.stderr))
  assert os.listdir(tmp_path) == []


def test_missing_autoencoder_weights_are_refused_before_training(tmp_path):
  weights = str(tmp_path / "no_such_weights")
  cmd = [
    sys.executable,
    "-m",
    "dfm_jax.main",
    f"--config={os.path.join(REPO, 'configs', 'latent_demo.py')}:runlocal",
    f"--workdir={tmp_path / 'run'}",
    f"--config.autoencoder.weights={weights}",
    "--config.data.source=synthetic_latents",  # no encoded latents needed
    "--config.data.path=",
  ]
  pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  proc = subprocess.run(  # from tmp_path: nothing of the checkout but the package
    cmd, cwd=tmp_path, env={**env(), "PYTHONPATH": pythonpath}, capture_output=True, text=True
  )
  check_row(
    "missing-autoencoder-weights", cmd, proc.returncode, _error_line(proc.stderr), path=weights
  )
  assert os.listdir(tmp_path) == []


VARIANT_CONFIG = """from dfm_jax.config_defaults import parse_variants


def get_config(arg="dfm"):
  return parse_variants(arg, ("fm",))
"""


@pytest.mark.parametrize(
  "case, text, variant",
  [
    ("missing-config", None, ""),
    ("config-syntax-error", "def get_config(:\n  return None\n", ""),
    ("config-raises", "def get_config():\n  return undefined_name\n", ""),
    ("unknown-variant", VARIANT_CONFIG, ":bogus"),
    ("config-returns-dict", "def get_config():\n  return {'total_steps': 1}\n", ""),
    ("config-without-get-config", "TOTAL_STEPS = 1\n", ""),
  ],
)
def test_bad_config_file_is_one_line_and_writes_nothing(tmp_path, case, text, variant):
  path = tmp_path / "config.py"
  if text is not None:
    path.write_text(text)
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "dfm_jax.main", f"--config={path}{variant}", f"--workdir={workdir}"]
  proc = _run(cmd)
  check_row(case, cmd, proc.returncode, _error_line(proc.stderr), path=path, file=path.name)
  assert not os.path.exists(workdir)


def test_empty_workdir_is_refused(tmp_path):
  cmd = [sys.executable, "-m", "dfm_jax.main", "--config=configs/default.py:runlocal", "--workdir="]
  before = sorted(os.listdir(REPO))
  proc = _run(cmd)
  check_row("workdir-empty", cmd, proc.returncode, _error_line(proc.stderr))
  assert sorted(os.listdir(REPO)) == before


def test_truncated_latent_shard_is_named_before_training(tmp_path):
  from tests.test_latent_shards import write_set  # pylint: disable=g-import-not-at-top

  path = tmp_path / "latents"
  meta, _ = write_set(str(path), np.zeros((12, 8, 8, 4), np.float32), np.arange(12) % 10, 4)
  shard = path / meta["shards"][1]["name"]
  shard.write_bytes(shard.read_bytes()[:100])
  workdir = str(tmp_path / "run")
  flags = ["--config.data.source=latents", f"--config.data.path={path}"]
  flags += ["--config.data.resolution=8", "--config.data.channels=4"]
  cmd = main_command(workdir, *FLAGS, *flags)
  proc = _run(cmd)
  check_row("truncated-latent-shard", cmd, proc.returncode, _error_line(proc.stderr), path=path)
  assert not os.path.exists(workdir)


def test_cloud_paths_are_checked_in_seconds(tmp_path):
  no_credentials = {  # whatever this machine has: no key file, no gcloud login, no GCE probe
    "GOOGLE_APPLICATION_CREDENTIALS": "",
    "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
    "NO_GCE_CHECK": "True",
    "STORAGE_EMULATOR_HOST": "",
  }
  cmd = main_command("gs://dfm-jax-no-such-bucket/run", *FLAGS)
  start = time.time()
  proc = _run(cmd, no_credentials)
  check_row(
    "gcs-no-credentials",
    cmd,
    proc.returncode,
    _error_line(proc.stderr),
    path="dfm-jax-no-such-bucket/run",
  )
  assert time.time() - start < 60
  cmd = [sys.executable, "-m", "dfm_jax.main", "--config=configs/imagenet512.py"]
  cmd.append(f"--workdir={tmp_path / 'run'}")
  proc = _run(cmd)
  check_row("placeholder-bucket", cmd, proc.returncode, _error_line(proc.stderr))
  assert not os.path.exists(tmp_path / "run")


def test_workdir_that_is_a_file_is_left_alone(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("not a workdir")
  cmd = main_command(str(path), *FLAGS)
  proc = _run(cmd)
  check_row("workdir-is-file", cmd, proc.returncode, _error_line(proc.stderr), path=path)
  assert path.read_text() == "not a workdir" and os.listdir(tmp_path) == ["notes.txt"]


# -------------------------------------------------------------------------------- sample mode


def test_sample_mode_fails_before_sampling_when_it_cannot_write(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  blocker = os.path.join(workdir, "samples")
  with open(blocker, "w") as f:
    f.write("in the way")
  cmd = main_command(workdir, *FLAGS, "--mode=sample")
  proc = _run(cmd)
  check_row("sample-unwritable", cmd, proc.returncode, _error_line(proc.stderr), workdir=workdir)
  assert "sampling:" not in proc.stderr  # no progress line: it failed before sampling
  with open(blocker) as f:
    assert f.read() == "in the way"


def test_a_second_sample_run_keeps_the_first(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  cmd = main_command(workdir, *FLAGS, "--mode=sample")
  assert _run(cmd).returncode == 0
  first = _snapshot(os.path.join(workdir, "samples"))
  proc = _run(cmd + ["--config.seed=5"])  # other samples, same checkpoint step
  line = _log_line(proc.stderr, "wrote ")
  check_row("second-sample-run", cmd, proc.returncode, line, workdir=workdir, step=STEPS)
  second = _snapshot(os.path.join(workdir, "samples"))
  assert {k: second[k] for k in first} == first  # the first run's files are untouched
  assert {k for k in second if k not in first} == {
    f"final_step{STEPS}_2.{ext}" for ext in ("png", "npz", "json")
  }


def test_eval_with_damaged_fdd_weights_fails_before_sampling(tmp_path):
  junk = tmp_path / "dinov2_vitl14_pretrain.pth"
  junk.write_bytes(bytes(range(256)) * 16)
  workdir = str(tmp_path / "run")
  cmd = main_command(workdir, *FLAGS, "--mode=eval", f"--config.eval.fdd_weights={junk}")
  proc = _run(cmd)
  check_row("eval-bad-fdd-weights", cmd, proc.returncode, _error_line(proc.stderr), path=junk)
  assert "sampling:" not in proc.stderr and not os.path.exists(workdir)


def test_sample_mode_without_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  cmd = main_command(workdir, *FLAGS, "--mode=sample")
  proc = _run(cmd)
  check_row(
    "sample-no-checkpoint",
    cmd,
    proc.returncode,
    _error_line(proc.stderr),
    checkpoints=os.path.join(workdir, "checkpoints"),
  )
  assert not os.path.exists(os.path.join(workdir, "samples"))


# ----------------------------------------------------------------------------- encode and fid


def _encode_command(out: str, *extra: str, config: str = "configs/default.py:runlocal"):
  return [sys.executable, "-m", "dfm_jax.encode", f"--config={config}", f"--out={out}", *extra]


def test_encode_bad_inputs_are_one_line(tmp_path):
  cmd = _encode_command(str(tmp_path / "out"), "--config.data.source=latents")
  proc = _run(cmd)
  check_row("encode-no-pixels", cmd, proc.returncode, _error_line(proc.stderr))

  path = tmp_path / "a_file"
  path.write_text("x")
  cmd = _encode_command(str(path))
  proc = _run(cmd)
  check_row("encode-out-is-file", cmd, proc.returncode, _error_line(proc.stderr), path=path)
  assert path.read_text() == "x"

  missing = tmp_path / "missing.py"
  cmd = _encode_command(str(tmp_path / "out"), config=str(missing))
  proc = _run(cmd)
  check_row("encode-missing-config", cmd, proc.returncode, _error_line(proc.stderr), path=missing)
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_fid_bad_inputs_are_one_line(tmp_path):
  good = tmp_path / "good.npz"
  np.savez(good, images=np.zeros((3, 8, 8, 3), np.uint8))
  missing = tmp_path / "nowhere"
  cmd = [sys.executable, "-m", "dfm_jax.fid", str(missing), str(good)]
  proc = _run(cmd)
  check_row("fid-missing-path", cmd, proc.returncode, _error_line(proc.stderr), path=missing)
  text = tmp_path / "notes.txt"
  text.write_text("not images")
  cmd = [sys.executable, "-m", "dfm_jax.fid", str(text), str(good)]
  proc = _run(cmd)
  check_row("fid-not-images", cmd, proc.returncode, _error_line(proc.stderr), path=text)
  folder = tmp_path / "float_tiffs"
  folder.mkdir()
  bright = folder / "bright.tif"
  Image.fromarray(np.full((8, 8), 200.0, np.float32), mode="F").save(bright)
  cmd = [sys.executable, "-m", "dfm_jax.fid", str(folder), str(good)]
  proc = _run(cmd)
  check_row(
    "fid-float-image-range",
    cmd,
    proc.returncode,
    _error_line(proc.stderr),
    path=folder,
    file=bright.name,
  )
