"""Helpers shared by the training tests: the default config's ``runlocal`` variant (tiny sizes,
seconds per run), the command line and checkpoint readers."""

import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIG = "configs/default.py:runlocal"


def tiny_flags(**extra) -> list[str]:
  """``--config.FIELD=VALUE`` flags for ``extra`` (dots as ``__``) on top of runlocal."""
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in extra.items()]


def config_file(name: str, arg: str, **extra):
  """``configs/<name>``'s ``get_config(arg)`` as a ConfigDict, plus ``extra`` fields (dots as
  ``__``), in-process."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  module = importlib.import_module(name.removesuffix(".py"))
  c = module.get_config(arg)
  for key, value in extra.items():
    node = c
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_config(**extra):
  """The default config's runlocal variant as a ConfigDict (plus ``extra``), in-process."""
  return config_file("default.py", "runlocal", **extra)


def main_command(workdir: str, *args: str) -> list[str]:
  return [sys.executable, "-m", "dfm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", *args]


def env(devices: int = 1) -> dict:
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  return e


def run_main(workdir: str, *args: str, devices: int = 1, check: bool = True):
  proc = subprocess.run(
    main_command(workdir, *args),
    cwd=REPO,
    env=env(devices),
    capture_output=True,
    text=True,
    timeout=600,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def read_checkpoint(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
  """The saved train state of a run as flat numpy arrays (latest step by default)."""
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  step = steps[-1] if step is None else step
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  # Restore as host numpy arrays: the saving run may have used other devices or processes.
  args = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
    checkpointer.metadata(path).item_metadata.tree,
  )
  tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
    else:
      flat[prefix] = np.asarray(node)

  walk("", tree)
  return flat
