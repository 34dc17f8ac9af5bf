"""launch/tpu_vm.sh against a stand-in ``gcloud`` on PATH (no network, no cloud).

The stand-in appends its arguments to a log and answers ``queued-resources describe`` with the
states the test asks for. The command ``launch`` sends to the workers is then run here in a fake
home, with a stand-in ``python3`` that records its arguments, so the archive, the install steps
and the quoting of the training command are checked as a worker would see them.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_vm.sh"

STAND_IN_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
  states = os.environ.get("GCLOUD_STATES", "ACTIVE").split(",")
  counter = os.environ["GCLOUD_LOG"] + ".describes"
  n = int(open(counter).read()) if os.path.exists(counter) else 0
  open(counter, "w").write(str(n + 1))
  print("state: " + states[min(n, len(states) - 1)])
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  shutil.copy(args[4], os.environ["GCLOUD_SHIPPED"])
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "GCLOUD_SSH_OUTPUT" in os.environ:
  print(os.environ["GCLOUD_SSH_OUTPUT"].replace(";", "\\n"))
"""

# On the worker: the system python3 (records), uv (records; `venv` makes a venv whose python
# records as venv-python) and the venv's python.
STAND_IN_PYTHON = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$WORKER_LOG"
"""
STAND_IN_UV = """#!/bin/sh
printf '%s\\n' "uv $*" >> "$WORKER_LOG"
if [ "$1" = venv ]; then
  for last; do :; done
  mkdir -p "$last/bin"
  printf 'export PATH="%s/bin:$PATH"\\n' "$last" > "$last/bin/activate"
  printf '#!/bin/sh\\nprintf "%%s\\\\n" "venv-python $*" >> "$WORKER_LOG"\\n' > "$last/bin/python"
  chmod +x "$last/bin/python"
fi
"""


@pytest.fixture
def cloud(tmp_path):
  """Runs the launcher with the stand-in gcloud; returns (run, recorded calls)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(STAND_IN_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  log = tmp_path / "gcloud.log"
  env = dict(
    os.environ,
    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    GCLOUD_LOG=str(log),
    GCLOUD_SHIPPED=str(tmp_path / "shipped.tar.gz"),
    POLL_SECONDS="0",
  )
  env.pop("RUNTIME_VERSION", None)
  env.pop("GCLOUD", None)

  def run(*args, states="ACTIVE", check=True, ssh_output=None):
    extra = {"GCLOUD_SSH_OUTPUT": ssh_output} if ssh_output is not None else {}
    result = subprocess.run(
      ["bash", str(SCRIPT), *args],
      env=dict(env, GCLOUD_STATES=states, **extra),
      capture_output=True,
      text=True,
      timeout=120,
    )
    if check:
      assert result.returncode == 0, result.stderr
    return result

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return run, calls


def _flags(argv):
  """--name=value flags of one call as a dict (bare flags map to True)."""
  out = {}
  for a in argv:
    if a.startswith("--"):
      name, _, value = a.partition("=")
      out[name] = value if value else True
  return out


def _positionals(argv):
  return [a for a in argv if not a.startswith("--")]


def test_create_queues_the_slice_and_waits_until_active(cloud):
  run, calls = cloud
  result = run(
    "create",
    "dfm512",
    "us-central2-b",
    "v4-32",
    "--spot",
    states="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
  )
  create, *describes = calls()
  assert _positionals(create) == ["compute", "tpus", "queued-resources", "create", "dfm512"]
  assert _flags(create) == {
    "--node-id": "dfm512",
    "--zone": "us-central2-b",
    "--accelerator-type": "v4-32",
    "--runtime-version": "tpu-ubuntu2204-base",
    "--spot": True,
  }
  assert len(describes) == 3
  for d in describes:
    assert _positionals(d) == ["compute", "tpus", "queued-resources", "describe", "dfm512"]
    assert _flags(d)["--zone"] == "us-central2-b"
  assert "dfm512: ACTIVE" in result.stdout


@pytest.mark.parametrize(
  "accelerator, runtime",
  [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_create_reserved_and_the_runtime_for_the_accelerator(cloud, accelerator, runtime):
  run, calls = cloud
  run("create", "r1", "us-east5-a", accelerator, "--reserved")
  flags = _flags(calls()[0])
  assert flags["--runtime-version"] == runtime
  assert flags["--reserved"] is True and "--spot" not in flags


def test_create_refuses_spot_with_reserved_and_stops_on_failure(cloud):
  run, calls = cloud
  result = run("create", "x", "z", "v4-8", "--spot", "--reserved", check=False)
  assert result.returncode != 0 and not calls()
  result = run("create", "x", "z", "v4-8", states="WAITING_FOR_RESOURCES,FAILED", check=False)
  assert result.returncode != 0
  assert "FAILED" in result.stderr and "delete x z" in result.stderr


def test_launch_ships_the_tree_and_starts_one_command_on_all_workers(cloud, tmp_path):
  run, calls = cloud
  overrides = [
    "--config.data.path=gs://bucket/in512_latents",
    "--config.sampler.cfg_scale=(1.5,1.0)",
  ]
  run(
    "launch", "dfm512", "us-central2-b", "configs/imagenet512.py", "gs://bucket/dfm512", *overrides
  )
  scp, ssh = calls()
  assert _positionals(scp)[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert _positionals(scp)[5] == "dfm512:dfm_jax_src.tar.gz"
  assert _flags(scp) == {"--zone": "us-central2-b", "--worker": "all"}
  with tarfile.open(tmp_path / "shipped.tar.gz") as tar:
    names = set(tar.getnames())
  for path in (
    "dfm_jax/__init__.py",
    "dfm_jax/main.py",
    "configs/imagenet512.py",
    "requirements.txt",
    "pyproject.toml",
  ):
    assert path in names
  assert not any(n.startswith(".git/") or "__pycache__" in n for n in names)

  assert _positionals(ssh) == ["compute", "tpus", "tpu-vm", "ssh", "dfm512"]
  flags = _flags(ssh)
  assert flags["--zone"] == "us-central2-b" and flags["--worker"] == "all"
  command = next(a for a in ssh if a.startswith("--command="))[len("--command=") :]

  # What a worker does with it: in a fake home holding the shipped archive.
  home = tmp_path / "home"
  home.mkdir()
  (home / "dfm_jax_src.tar.gz").write_bytes((tmp_path / "shipped.tar.gz").read_bytes())
  fake_bin = tmp_path / "worker_bin"
  fake_bin.mkdir()
  for name, text in (("python3", STAND_IN_PYTHON), ("uv", STAND_IN_UV)):
    (fake_bin / name).write_text(text)
    (fake_bin / name).chmod(0o755)
  worker_log = tmp_path / "worker.log"
  env = dict(
    os.environ,
    HOME=str(home),
    WORKER_LOG=str(worker_log),
    PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
  )
  worker = subprocess.run(
    ["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=120
  )
  assert worker.returncode == 0, worker.stderr
  assert (home / "dfm_jax" / "dfm_jax" / "main.py").is_file()
  for _ in range(100):  # the trainer runs in the background
    lines = worker_log.read_text().splitlines() if worker_log.exists() else []
    if any("dfm_jax.main" in line for line in lines):
      break
    time.sleep(0.05)
  version = next(
    line.split("==")[1].split()[0]
    for line in (ROOT / "requirements.txt").read_text().splitlines()
    if line.startswith("jax[")
  )
  venv = home / "dfm_jax_venv"
  assert lines[:3] == [
    "python3 -m pip install -q --user uv==0.13.9",
    f"uv venv -q --allow-existing --python 3.11 {venv}",
    f"uv pip install -q -r requirements.txt jax[tpu]=={version}",
  ]
  assert "uv pip install -q --no-deps -e ." in lines
  # The venv's python, one argument per item: the overrides' quoting survives the shell.
  train = ["-m", "dfm_jax.main", "--config=configs/imagenet512.py", "--workdir=gs://bucket/dfm512"]
  train += ["--config.distributed.initialize=True", *overrides]
  assert lines[-1] == " ".join(["venv-python", *train])
  assert (home / "dfm_jax_train.pid").read_text().strip().isdigit()
  assert (home / "dfm_jax_train.log").exists()


def test_stop_delete_kill_and_logs(cloud):
  run, calls = cloud
  for command in ("stop", "start", "delete", "kill"):
    run(command, "dfm512", "us-central2-b")
  run("logs", "dfm512", "us-central2-b", "3")
  stop, start, delete, kill, logs = calls()
  assert stop == ["compute", "tpus", "tpu-vm", "stop", "dfm512", "--zone=us-central2-b"]
  assert start == ["compute", "tpus", "tpu-vm", "start", "dfm512", "--zone=us-central2-b"]
  assert _positionals(delete) == ["compute", "tpus", "queued-resources", "delete", "dfm512"]
  assert _flags(delete) == {"--zone": "us-central2-b", "--force": True, "--quiet": True}
  assert _flags(kill)["--worker"] == "all" and "kill -TERM" in _flags(kill)["--command"]
  assert _flags(logs)["--worker"] == "3" and "dfm_jax_train.log" in _flags(logs)["--command"]


@pytest.mark.parametrize(
  "workers, outcome",
  [
    ("dfm_jax_status exit 0;dfm_jax_status exit 0", "finished"),
    ("dfm_jax_status exit 0;dfm_jax_status exit 1", "exited with 1"),
  ],
)
def test_watch_ends_when_every_worker_finished_and_fails_on_a_crash(cloud, workers, outcome):
  run, calls = cloud
  args = ("watch", "dfm", "z", "v4-16", "configs/default.py", "gs://b/run")
  result = run(*args, check=False, ssh_output=workers)
  assert outcome in result.stdout + result.stderr
  assert (result.returncode == 0) == (outcome == "finished")
  ssh = [c for c in calls() if c[2:4] == ["tpu-vm", "ssh"]]
  assert len(ssh) == 1 and _flags(ssh[0])["--worker"] == "all"


def test_encode_runs_the_encoder_on_every_worker_and_waits(cloud):
  run, calls = cloud
  result = run(
    "encode",
    "dfm512",
    "us-central2-b",
    "configs/imagenet512.py",
    "gs://b/in512_latents",
    "--config.encode.data.data_dir=gs://b/tfds",
    ssh_output="dfm_jax_status exit 0;dfm_jax_status exit 0",
  )
  assert "encoded: train with --config.data.path=gs://b/in512_latents" in result.stdout
  scp, start, status = calls()
  assert _positionals(scp)[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  command = _flags(start)["--command"]
  assert "dfm_jax.encode --config=configs/imagenet512.py --out=gs://b/in512_latents" in command
  assert "--config.distributed.initialize=True --config.encode.data.data_dir=gs://b/tfds" in command
  assert _flags(start)["--worker"] == _flags(status)["--worker"] == "all"
  failed = run(
    "encode", "n", "z", "c.py", "gs://b/o", check=False, ssh_output="dfm_jax_status exit 1"
  )
  assert failed.returncode == 1 and "run encode again to go on" in failed.stderr


def test_usage_errors_call_nothing(cloud):
  run, calls = cloud
  for args in [(), ("bogus",), ("launch", "only-a-name"), ("create", "n", "z")]:
    assert run(*args, check=False).returncode == 2
  assert not calls()


# An emulated cloud for `run`: one worker whose home is a folder, commands sent over "ssh" run
# there for real (the trainer is this machine's Python), and a spot preemption that kills the
# worker's processes and wipes its disk once the run has saved PREEMPT_AT_STEP.
EMULATED_GCLOUD = """#!{python}
import json, os, shutil, signal, subprocess, sys
args = sys.argv[1:]
root = os.environ["CLOUD_ROOT"]
home = os.path.join(root, "worker0")
with open(os.path.join(root, "calls.log"), "a") as f:
  f.write(json.dumps(args) + "\\n")
flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in args if a[:2] == "--")
state = os.path.join(root, "state")


def vm_gone():
  pidfile = os.path.join(home, "dfm_jax_train.pid")
  if os.path.exists(pidfile):
    try:
      os.killpg(os.getpgid(int(open(pidfile).read())), signal.SIGKILL)
    except ProcessLookupError:
      pass
  shutil.rmtree(home, ignore_errors=True)


def saved():
  d = os.path.join(os.environ["CLOUD_WORKDIR"], "checkpoints")
  return max([int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else [0])


what = args[2:4]
if what == ["queued-resources", "create"]:
  os.makedirs(home, exist_ok=True)
  open(state, "w").write("ACTIVE")
elif what == ["queued-resources", "describe"]:
  marker = os.path.join(root, "preempted")
  if not os.path.exists(marker) and saved() >= int(os.environ["PREEMPT_AT_STEP"]):
    vm_gone()
    open(marker, "w").write(str(saved()))
    open(state, "w").write("SUSPENDED")
  print("state: " + open(state).read())
elif what == ["queued-resources", "delete"]:
  vm_gone()
  os.remove(state)
elif what == ["tpu-vm", "scp"]:
  shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif what == ["tpu-vm", "ssh"]:
  env = dict(os.environ, HOME=home, PATH=os.environ["WORKER_PATH"])
  done = subprocess.run(["bash", "-c", flags["command"]], cwd=home, env=env, start_new_session=True)
  sys.exit(done.returncode)
"""

# uv's venv: this machine's Python (with the packages installed here); installs do nothing.
EMULATED_UV = """#!/bin/sh
if [ "$1" = venv ]; then
  for last; do :; done
  mkdir -p "$last/bin"
  printf 'export PATH="%s/bin:$PATH"\\n' "$last" > "$last/bin/activate"
  ln -sf {python} "$last/bin/python"
fi
"""


@pytest.mark.integration
def test_run_requeues_a_preempted_spot_slice_and_ends_equal_to_an_uninterrupted_run(tmp_path):
  from tests.train_utils import read_checkpoint, run_main  # pylint: disable=g-import-not-at-top

  steps = 24
  overrides = [f"--config.total_steps={steps}", "--config.checkpoint_every=2"]
  reference = tmp_path / "reference"
  run_main(str(reference), *overrides)

  bin_dir, worker_bin, root = tmp_path / "bin", tmp_path / "worker_bin", tmp_path / "cloud"
  for d in (bin_dir, worker_bin, root):
    d.mkdir()
  for folder, name, text in (
    (bin_dir, "gcloud", EMULATED_GCLOUD),
    (worker_bin, "uv", EMULATED_UV),
    (worker_bin, "python3", "#!/bin/sh\n"),  # the system Python's pip install of uv
  ):
    (folder / name).write_text(text.replace("{python}", sys.executable))
    (folder / name).chmod(0o755)
  bucket = tmp_path / "bucket" / "run"  # the gs:// workdir: it outlives the VMs
  env = dict(
    os.environ,
    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    WORKER_PATH=f"{worker_bin}{os.pathsep}{os.environ['PATH']}",
    CLOUD_ROOT=str(root),
    CLOUD_WORKDIR=str(bucket),
    PREEMPT_AT_STEP="4",
    POLL_SECONDS="0.3",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  env.pop("GCLOUD", None)
  result = subprocess.run(
    ["bash", str(SCRIPT), "run", "dfm", "us-central2-b", "v4-8", "configs/default.py:runlocal"]
    + [str(bucket), "--spot", *overrides, "--config.distributed.initialize=False"],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "(preempted): queueing it again (1)" in result.stdout
  assert "training finished on every worker of dfm" in result.stdout
  calls = [json.loads(line) for line in (root / "calls.log").read_text().splitlines()]
  creates = [c for c in calls if c[2:4] == ["queued-resources", "create"]]
  assert len(creates) == 2 and all("--spot" in c for c in creates)
  assert any(c[2:4] == ["queued-resources", "delete"] for c in calls)
  preempted_at = int((root / "preempted").read_text())
  assert 4 <= preempted_at < steps  # killed mid-run, after a save
  log = (root / "worker0" / "dfm_jax_train.log").read_text()
  assert "resuming from checkpoint at step" in log
  got, want = read_checkpoint(str(bucket), steps), read_checkpoint(str(reference), steps)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


STAND_IN_XPK = """#!{python}
import json, os, sys
args = sys.argv[1:]
script_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--script-dir="))
files = sorted(os.path.relpath(os.path.join(d, f), script_dir) for d, _, fs in os.walk(script_dir) for f in fs)
json.dump({{"args": args, "files": files}}, open(os.environ["XPK_LOG"], "w"))
"""


def test_xpk_workload_trains_across_slices_with_restarts(tmp_path):
  xpk = tmp_path / "xpk"
  xpk.write_text(STAND_IN_XPK.format(python=sys.executable))
  xpk.chmod(0o755)
  log = tmp_path / "xpk.json"
  result = subprocess.run(
    ["bash", str(ROOT / "launch" / "xpk.sh"), "c1", "dfm512", "v5p-256", "2"]
    + ["configs/imagenet512.py", "gs://b/run", "--config.sampler.cfg_scale=(1.5,1.0)"],
    env=dict(os.environ, XPK=str(xpk), XPK_LOG=str(log), SPOT="1"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  recorded = json.loads(log.read_text())
  args = recorded["args"]
  assert args[:2] == ["workload", "create"]
  flags = _flags(args)
  assert flags["--cluster"] == "c1" and flags["--workload"] == "dfm512"
  assert flags["--tpu-type"] == "v5p-256" and flags["--num-slices"] == "2"
  assert int(flags["--max-restarts"]) > 0 and flags["--restart-on-user-code-failure"] is True
  assert flags["--spot"] is True
  assert "dfm_jax/main.py" in recorded["files"] and "configs/imagenet512.py" in recorded["files"]
  command = flags["--command"]
  assert "pip install -q --no-deps -e ." in command
  train = command.split(" && ")[-1]
  assert shlex.split(train) == [
    "python",
    "-m",
    "dfm_jax.main",
    "--config=configs/imagenet512.py",
    "--workdir=gs://b/run",
    "--config.distributed.initialize=True",
    "--config.mesh.dcn_shape=(2,1,1)",
    "--config.sampler.cfg_scale=(1.5,1.0)",
  ]
  bad = subprocess.run(
    ["bash", str(ROOT / "launch" / "xpk.sh"), "c", "w", "v5p-8", "0", "c.py", "gs://b/r"],
    env=dict(os.environ, XPK=str(xpk), XPK_LOG=str(log)),
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 1 and "NUM_SLICES must be a positive integer" in bad.stderr
