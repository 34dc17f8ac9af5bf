"""What a results file records about the run that made it: the command, date, host,
accelerator, git commit and library versions (the benchmarks' ``--out`` and
``python -m dfm_jax.compile_check --json``)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import jax

REPO = Path(__file__).resolve().parents[1]


def machine_summary() -> str:
  """One line: CPU model, cores visible to this process, JAX version and devices."""
  model = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  devices = jax.devices()
  return (
    f"{model}, {cores} cores visible, jax {jax.__version__}, "
    f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"
  )


def provenance(argv: Sequence[str]) -> dict[str, Any]:
  """What a results file records about how it was made: the command, the time, the host and
  accelerator, the git commit and the library versions."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  versions = {}
  for name in ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = ""
  return {
    "command": " ".join(["python"] + [str(a) for a in argv]),
    "date": time.strftime("%Y-%m-%d", time.gmtime()),
    "host": machine_summary(),
    "accelerator": jax.devices()[0].device_kind,
    "commit": commit,
    "versions": versions,
  }
