"""The command line as a user runs it: kill -9 during a save and SIGTERM with exact resume,
sample mode, fast failure on a bad config, and two processes agreeing with one."""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from tests.train_utils import REPO, env, main_command, read_checkpoint, run_main, tiny_flags

STEPS = 8
EXIT_PREEMPTED = 75

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  run_main(workdir, *tiny_flags(total_steps=STEPS))
  return workdir


def _checkpoint_dir(workdir):
  return os.path.join(workdir, "checkpoints")


def _saving_in_progress(workdir) -> bool:
  d = _checkpoint_dir(workdir)
  return os.path.isdir(d) and any("tmp" in name for name in os.listdir(d))


def _complete_steps(workdir) -> list[int]:
  d = _checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _kill_during_a_save(cmd, workdir) -> bool:
  """Starts a run and SIGKILLs it while an asynchronous save is in flight (after the first one
  completed); True when the kill landed during the save."""
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if _complete_steps(workdir) and _saving_in_progress(workdir):
      break
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return _saving_in_progress(workdir)


def test_sigkill_mid_save_then_sigterm_then_resume_is_bitwise_identical(reference_run, tmp_path):
  # 1. SIGKILL while an asynchronous checkpoint is being written; the save thread may finish
  # first, so start over in a fresh workdir until the kill lands mid-save.
  for attempt in range(5):
    workdir = str(tmp_path / f"attempt{attempt}")
    cmd = main_command(workdir, *tiny_flags(total_steps=STEPS))
    if _kill_during_a_save(cmd, workdir):
      break
  else:
    pytest.fail("five runs were never killed during a save")
  assert _complete_steps(workdir), "the run was killed before its first checkpoint"
  assert max(_complete_steps(workdir)) < STEPS

  # 2. Resume, then SIGTERM: the run saves at the step it reached and exits with the
  # "preempted, run again" code.
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  resumed_from = max(_complete_steps(workdir))
  for line in proc.stdout:
    if line.startswith("step "):
      proc.send_signal(signal.SIGTERM)
      break
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
  assert "SIGTERM: saved a checkpoint at step" in output
  assert "Traceback" not in output
  stopped_at = max(_complete_steps(workdir))
  assert resumed_from < stopped_at <= STEPS

  # 3. Finish: exactly the parameters, optimizer state and EMA of the uninterrupted run.
  run_main(workdir, *tiny_flags(total_steps=STEPS))
  got, want = read_checkpoint(workdir, STEPS), read_checkpoint(reference_run, STEPS)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  print(
    f"killed mid-save after {attempt + 1} run(s); resumed from {resumed_from}; "
    f"SIGTERM stop at {stopped_at}"
  )

  # 4. Running a finished job again trains nothing and leaves the checkpoints alone.
  steps_before = _complete_steps(workdir)
  proc = run_main(workdir, *tiny_flags(total_steps=STEPS))
  assert "nothing to train" in proc.stderr and "step " not in proc.stdout
  assert _complete_steps(workdir) == steps_before


def test_sample_mode_writes_grid_npz_and_metadata(reference_run):
  run_main(
    reference_run,
    *tiny_flags(
      total_steps=STEPS,
      sampler__num_samples=120,
      data__source="idx",
      data__path="/nonexistent/train-images-idx3-ubyte.gz",
    ),
    "--mode=sample",
  )
  base = os.path.join(reference_run, "samples", f"final_step{STEPS}")
  data = np.load(base + ".npz")
  assert data["images"].shape == (120, 32, 32, 1) and data["images"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], np.arange(120) % 10)
  assert data["images"].std() > 5, "samples are blank"
  # The grid shows the first 100 samples, one column per class: 10 x 10 tiles of 34 px + 2.
  with Image.open(base + ".png") as grid:
    assert grid.size == (10 * 34 + 2, 10 * 34 + 2)
    tile = np.asarray(grid.convert("L"))[2:34, 2:34]
  np.testing.assert_array_equal(tile, data["images"][0, ..., 0])
  with open(base + ".json") as f:
    meta = json.load(f)
  assert meta["step"] == STEPS and meta["num_samples"] == 120 and meta["grid_samples"] == 100
  assert meta["sampler"]["num_samples"] == 120


def test_bad_config_fails_before_training_with_one_message(tmp_path):
  proc = run_main(str(tmp_path), *tiny_flags(data__resolution=30), check=False)
  assert proc.returncode == 2
  assert "invalid configuration" in proc.stderr
  assert "cannot be split into 3 stages" in proc.stderr and "28, 32" in proc.stderr
  assert not os.path.exists(_checkpoint_dir(str(tmp_path)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir: str, logs, **flags) -> list[subprocess.Popen]:
  """The same training command as processes 0 and 1 of one run, 2 CPU devices each (gloo);
  their output goes to the files ``logs``."""
  port = _free_port()
  procs = []
  flags = {"mesh__shape": (1, 4, 1), **flags}
  for pid in range(2):
    args = tiny_flags(
      distributed__initialize=True,
      distributed__coordinator_address=f"127.0.0.1:{port}",
      distributed__num_processes=2,
      distributed__process_id=pid,
      **flags,
    )
    procs.append(
      subprocess.Popen(
        main_command(workdir, *args),
        cwd=REPO,
        env=env(2),
        stdout=open(logs[pid], "w"),  # pylint: disable=consider-using-with
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  return procs


def _wait_all(procs, logs) -> list[str]:
  for p in procs:
    p.wait(timeout=600)
  return [open(log).read() for log in logs]


def test_two_processes_agree_with_one(reference_run, tmp_path):
  """Two local processes x 2 CPU devices (gloo collectives) vs one process x 4 devices, with
  the data axis across the processes as across two slices (mesh.dcn_shape) and fsdp inside."""
  steps = 4
  mesh = dict(mesh__shape=(2, 2, 1))
  single = str(tmp_path / "single")
  run_main(single, *tiny_flags(total_steps=steps, **mesh), devices=4)
  multi = str(tmp_path / "multi")
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = _two_processes(multi, logs, total_steps=steps, mesh__dcn_shape=(2, 1, 1), **mesh)
  for p, out in zip(procs, _wait_all(procs, logs)):
    assert p.returncode == 0, out[-3000:]
  got, want = read_checkpoint(multi, steps), read_checkpoint(single, steps)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  """A preemption notice that reaches one host of a pod: both processes save the same step
  (a save is collective) and exit 75; running them again finishes equal to one process."""
  steps = 16
  flags = dict(total_steps=steps, checkpoint_every=1000, log_every=1, preemption_check_every=2)
  single = str(tmp_path / "single")
  run_main(single, *tiny_flags(mesh__shape=(1, 4, 1), **flags), devices=4)
  multi = str(tmp_path / "multi")
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = _two_processes(multi, logs, **flags)
  deadline = time.time() + 300
  while f"step 3/{steps}" not in logs[0].read_text():
    assert time.time() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only process 1 hears it
  outputs = _wait_all(procs, logs)
  for p, out in zip(procs, outputs):
    assert p.returncode == EXIT_PREEMPTED, out[-3000:]
  (saved,) = _complete_steps(multi)
  assert 3 <= saved < steps and saved % 2 == 0
  for out in outputs:
    assert f"SIGTERM: saved a checkpoint at step {saved}" in out
  procs = _two_processes(multi, logs, **flags)
  for p, out in zip(procs, _wait_all(procs, logs)):
    assert p.returncode == 0, out[-3000:]
    assert f"resuming from checkpoint at step {saved}" in out
  got, want = read_checkpoint(multi, steps), read_checkpoint(single, steps)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_eval_mode_writes_metrics_json(reference_run):
  proc = run_main(
    reference_run, *tiny_flags(total_steps=STEPS, sampler__cfg_scale=1.5), "--mode=eval"
  )
  folder = os.path.join(reference_run, "eval")
  (name,) = [n for n in os.listdir(folder) if n.endswith(".json")]
  assert name.startswith(f"step{STEPS}_cfg1.5_steps2-1-1")
  with open(os.path.join(folder, name)) as f:
    result = json.load(f)
  for key in ("fid", "kid", "classifier_accuracy", "classifier_fd"):
    assert np.isfinite(result[key]), key
  assert "is" in result and result["num_fake"] == 20 and result["num_real"] == 40
  assert result["fid"] > 0 and 0.0 <= result["classifier_accuracy"] <= 1.0
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == STEPS


def test_eval_kept_samples_score_without_the_run_as_in_one_pass(reference_run, tmp_path):
  """Sample on one machine (eval.save_samples, no metrics), score on another
  (eval.samples_from: no checkpoint, no config.json): the numbers equal one sample-and-score
  pass."""
  flags = [*tiny_flags(total_steps=STEPS, sampler__cfg_scale=2.0), "--mode=eval"]
  keep = ["--config.eval.metrics=()", "--config.eval.save_samples=True"]
  run_main(reference_run, *flags, *keep)
  folder = os.path.join(reference_run, "eval")
  (kept,) = [n for n in os.listdir(folder) if n.startswith("step8_cfg2_") and n.endswith(".npz")]
  assert not os.path.exists(os.path.join(folder, kept.replace(".samples.npz", ".json")))
  run_main(reference_run, *flags)
  with open(os.path.join(folder, kept.replace(".samples.npz", ".json"))) as f:
    one_pass = json.load(f)

  elsewhere = str(tmp_path / "elsewhere")
  run_main(elsewhere, *flags, f"--config.eval.samples_from={os.path.join(folder, kept)}")
  with open(os.path.join(elsewhere, "eval", kept.replace(".samples.npz", ".json"))) as f:
    scored = json.load(f)
  assert scored["step"] == STEPS and scored["sampler"]["cfg_scale"] == 2.0
  for key in ("fid", "kid", "classifier_fd", "classifier_accuracy"):
    assert np.isfinite(scored[key]), key
    np.testing.assert_allclose(scored[key], one_pass[key], rtol=1e-6, err_msg=key)


def test_compiled_programs_are_cached_on_disk_unless_turned_off(tmp_path):
  """The persistent compilation cache (storage.enable_compilation_cache) fills
  $DFM_JAX_CACHE/xla during a run; compilation_cache=False leaves it untouched."""
  for name, flags in (("on", []), ("off", ["--config.compilation_cache=False"])):
    cache = tmp_path / f"cache_{name}"
    proc = subprocess.run(
      main_command(str(tmp_path / name), *tiny_flags(total_steps=2), *flags),
      cwd=REPO,
      env={**env(), "DFM_JAX_CACHE": str(cache)},
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train step compiled in" in proc.stderr
    entries = list((cache / "xla").glob("*")) if (cache / "xla").exists() else []
    assert bool(entries) == (name == "on"), (name, entries)
