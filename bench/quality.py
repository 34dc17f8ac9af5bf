"""Quality at equal compute: DFM against its flow-matching twin, as a convergence curve.

Trains both variants of a config (same backbone, token count, batch, seed and steps), evaluates
each at several training budgets (FID and, for 28x28-class data, the classifier Frechet distance
and accuracy) at cfg 1.0 and a higher cfg, then sweeps DFM's threshold tau and its step split at
the largest budget. Budgets resume the same run (the learning rate is constant after warm-up), so
the curve costs one run per variant. Writes `results.json`, `fid_vs_steps.png` (needs
matplotlib) and `samples_side_by_side.png` into the workdir.

  python bench/quality.py --config=configs/fashion_mnist.py --workdir=workdirs/quality \
      --budgets=1000,2000,4000 --eval-samples=500 --set eval.num_real=1000

Re-running the same command resumes: finished budgets are not retrained, and evaluations whose
results are already in `<workdir>/<variant>/eval/` (same step, sample count and sampler settings)
are read back, so the sweep points that equal the config's defaults cost nothing.

The last line is the headline: FID of both at the largest budget, cfg 1.0.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import common  # bench/ helpers; also puts the repository on the import path

REPO = str(common.REPO)


OVERRIDES: list[str] = []  # extra --config.FIELD=VALUE flags for every run (see --set)


def main_cmd(config: str, variant: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "dfm_jax.main", f"--config={config}:{variant}",
          f"--workdir={workdir}", *OVERRIDES, *flags]


def run(cmd: list[str]) -> str:
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return proc.stdout


def sampler_settings(sampler) -> dict:
  """The compared sampler settings of a config's or an eval result's ``sampler`` block."""
  return {"cfg_scale": float(sampler["cfg_scale"]),
          "thresholds": tuple(float(v) for v in sampler["thresholds"]),
          "steps_per_stage": tuple(int(v) for v in sampler["steps_per_stage"])}


@functools.lru_cache(maxsize=None)
def sampler_defaults(config: str, variant: str) -> dict:
  """The config file's sampler settings."""
  return sampler_settings(common.load_config(config, variant).sampler)


def cached_eval(workdir: str, step: int, eval_samples: int, settings: dict) -> dict | None:
  """A finished `--mode=eval` result in `workdir/eval/` for exactly these settings, if any: a
  re-run of the benchmark resumes instead of repeating evaluations."""
  for path in sorted(glob.glob(os.path.join(workdir, "eval", "*.json"))):
    with open(path) as f:
      r = json.load(f)
    if (r["step"] == step and r["num_fake"] == eval_samples
        and sampler_settings(r["sampler"]) == settings):
      return r
  return None


def evaluate(config: str, variant: str, workdir: str, step: int, eval_samples: int,
             **overrides) -> dict:
  """FID (and classifier scores) of the checkpoint at `step` with the config's sampler settings
  updated by `overrides` (cfg_scale=..., thresholds=(...), steps_per_stage=(...))."""
  settings = dict(sampler_defaults(config, variant), **overrides)
  hit = cached_eval(workdir, step, eval_samples, settings)
  if hit is not None:
    return hit
  flags = [f"--config.eval.num_samples={eval_samples}", f"--config.sampler.checkpoint_step={step}"]
  for k, v in settings.items():
    flags.append(f"--config.sampler.{k}={v if not isinstance(v, tuple) else tuple_flag(v)}")
  out = run(main_cmd(config, variant, workdir, "--mode=eval", *flags))
  return json.loads(out.strip().splitlines()[-1])


def tuple_flag(values: tuple) -> str:
  if not values:
    return "()"
  return "(" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + ",)"


def plot(results: dict, path: str) -> None:
  """FID (and the classifier FD when measured) against training steps: DFM blue, FM red,
  cfg 1.0 solid, the higher cfg dashed."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib not installed: skipping the plot", file=sys.stderr)
    return
  metrics = [("fid", "FID (Inception)")]
  if all(r.get("classifier_fd") is not None for r in results["curve"]):
    metrics.append(("classifier_fd", "classifier Frechet distance"))
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
  cfgs = sorted({r["cfg"] for r in results["curve"]})
  for ax, (key, label) in zip(axes[0], metrics):
    for variant, color, marker in (("dfm", "tab:blue", "o"), ("fm", "tab:red", "s")):
      for cfg, style in zip(cfgs, ("-", "--", ":")):
        rows = [r for r in results["curve"] if r["variant"] == variant and r["cfg"] == cfg]
        ax.plot([r["steps"] for r in rows], [r[key] for r in rows], style, color=color,
                marker=marker, label=f"{variant.upper()}, cfg {cfg:g}")
    ax.set_xlabel("training steps")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def side_by_side(workdir: str, step: int, path: str) -> None:
  tiles = []
  for variant in ("dfm", "fm"):
    grid = os.path.join(workdir, variant, "samples", f"final_step{step}.png")
    tiles.append(np.asarray(Image.open(grid).convert("RGB")))
  h = max(t.shape[0] for t in tiles)
  tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 8), (0, 0)), constant_values=255) for t in tiles]
  Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--workdir", default="workdirs/quality")
  parser.add_argument("--budgets", default="2000,5000,10000,20000")
  parser.add_argument("--eval-samples", type=int, default=5000)
  parser.add_argument("--high-cfg", type=float, default=2.0)
  parser.add_argument("--taus", default="0.5;0.7;0.9",
                      help="';'-separated thresholds, each a ','-separated list (S - 1 values)")
  parser.add_argument("--splits", default="20+20;30+10;35+5",
                      help="';'-separated steps per stage, e.g. 30+10")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config override applied to every run, e.g. model.depth=4")
  args = parser.parse_args()
  OVERRIDES.extend(f"--config.{kv}" for kv in args.set)
  budgets = [int(b) for b in args.budgets.split(",")]
  results = {"config": args.config, "curve": [], "tau_sweep": [], "split_sweep": []}
  for variant in ("dfm", "fm"):
    workdir = os.path.join(args.workdir, variant)
    for steps in budgets:
      # (a finished budget is a no-op: training stops at once when the checkpoint is past it)
      run(main_cmd(args.config, variant, workdir, f"--config.total_steps={steps}",
                   f"--config.checkpoint_every={min(budgets)}",
                   f"--config.sample_every={max(budgets)}"))
      for cfg in (1.0, args.high_cfg):
        r = evaluate(args.config, variant, workdir, steps, args.eval_samples, cfg_scale=cfg)
        row = {"variant": variant, "steps": steps, "cfg": cfg, "fid": r["fid"],
               "classifier_fd": r.get("classifier_fd"),
               "classifier_accuracy": r.get("classifier_accuracy")}
        results["curve"].append(row)
        print(json.dumps(row), flush=True)
    run(main_cmd(args.config, variant, workdir, "--mode=sample",
                 f"--config.total_steps={budgets[-1]}"))
  dfm_dir = os.path.join(args.workdir, "dfm")
  for tau in args.taus.split(";"):
    r = evaluate(args.config, "dfm", dfm_dir, budgets[-1], args.eval_samples, cfg_scale=1.0,
                 thresholds=tuple(float(v) for v in tau.split(",")))
    results["tau_sweep"].append({"tau": tau, "fid": r["fid"],
                                 "classifier_fd": r.get("classifier_fd")})
  for split in args.splits.split(";"):
    r = evaluate(args.config, "dfm", dfm_dir, budgets[-1], args.eval_samples, cfg_scale=1.0,
                 steps_per_stage=tuple(int(v) for v in split.split("+")))
    results["split_sweep"].append({"steps_per_stage": split, "fid": r["fid"],
                                   "classifier_fd": r.get("classifier_fd")})
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot(results, os.path.join(args.workdir, "fid_vs_steps.png"))
  side_by_side(args.workdir, budgets[-1], os.path.join(args.workdir, "samples_side_by_side.png"))
  last = {r["variant"]: r["fid"] for r in results["curve"]
          if r["steps"] == budgets[-1] and r["cfg"] == 1.0}
  print(f"FID at {budgets[-1]} steps, cfg 1.0: DFM {last['dfm']:.2f} vs FM {last['fm']:.2f}")


if __name__ == "__main__":
  main()
