"""Compile time with and without the persistent compilation cache, side by side.

Runs a config's training for one step, then its sample mode, each twice in fresh processes that
share a new, empty ``$DFM_JAX_CACHE``: the first run compiles, the second loads the compiled
programs (dfm_jax/storage.py). Prints the train step's compile time (from the training log) and
each process's wall time, cold and warm, and their ratios.

  python bench/compile_cache.py --config=configs/default.py
  python bench/compile_cache.py --config=configs/imagenet512.py:runlocal   # on an accelerator
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import common  # bench/ helpers; also puts the repository on the import path


def run(args: list[str], cache: str) -> tuple[float, float | None, str]:
  """(wall seconds, the logged train-step compile seconds or None, stderr)."""
  start = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-m", "dfm_jax.main", *args],
    cwd=common.REPO,
    env={**os.environ, "DFM_JAX_CACHE": cache},
    capture_output=True,
    text=True,
  )
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
  found = re.search(r"train step compiled in ([\d.]+) s", proc.stderr)
  return wall, float(found.group(1)) if found else None, proc.stderr


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--samples", type=int, default=16, help="images of the sample run")
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)
  report.say(common.machine_summary())
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    base = [f"--config={args.config}", f"--workdir={os.path.join(tmp, 'run')}"]
    train = base + ["--config.total_steps=1", "--config.sample_every=1000000"]
    sample = base + [
      "--mode=sample",
      f"--config.sampler.num_samples={args.samples}",
      f"--config.sampler.batch_size={args.samples}",
    ]
    rows = []
    for name, flags in (("train (1 step)", train), ("sample", sample)):
      cold = run(flags, cache)
      if name.startswith("train"):  # the warm run resumes: train one more step
        flags = flags[:-2] + ["--config.total_steps=2", "--config.sample_every=1000000"]
      warm = run(flags, cache)
      rows.append((name, cold, warm))
  table = [
    [
      name,
      f"{cold[0]:.1f}",
      f"{warm[0]:.1f}",
      f"{cold[0] / warm[0]:.2f}x",
      f"{cold[1]:.1f} / {warm[1]:.1f}" if cold[1] is not None else "-",
    ]
    for name, cold, warm in rows
  ]
  report.table(
    f"{args.config}: cold = empty cache, warm = the same programs cached",
    ["run", "wall cold (s)", "wall warm (s)", "ratio", "train-step compile cold / warm (s)"],
    table,
  )
  total = sum(r[1][0] for r in rows) / sum(r[2][0] for r in rows)
  report.finish(f"cold / warm wall time, train and sample runs together: {total:.2f}x")


if __name__ == "__main__":
  main()
