"""Sampler settings without training: the project's sampler driven by the exact optimal velocity
of a training subset (dfm_jax/oracle.py), for a config's decomposition.

Every row samples the same labels from the same noise seed with one schedule and reports what
the sampler alone loses: the variance kept in each band of the config's decomposition (1 =
exact), the RMS distance of each sample to its nearest data point (0 = on the data), the
classifier Frechet distance against the oracle's own data set (configs with
``eval.classifier``) and, with ``--fid``, the Inception FID against it. The exact ODE would score
1, 0 and 0. Rows (a flow-matching row and DFM rows, raw and with standardised bands):

- ``fm``: the config's ``:fm`` twin, one stage, all steps;
- ``dfm``: the config's steps per stage and thresholds (hand-set);
- ``dfm_auto``: dfm_jax.stage_schedule.auto_schedule on the bands' std (the same total steps);
- ``dfm_std`` / ``dfm_std_auto``: the same with ``decomposition.standardize``;
- ``--schedules=30+10@0.7,35+5@0.8``: extra DFM rows (steps per stage @ thresholds).

Only training data is used: the oracle's data set and every reference are the first
``--num-data`` images of the training split (seed 0), so the settings chosen here are chosen
without evaluation data.

  python bench/oracle.py --config=configs/fashion_mnist.py --num-data=2000 --samples=1000 \
      --out=docs/oracle_fashion_mnist.json
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

import numpy as np

import common  # bench/ helpers; also puts the repository on the import path

from dfm_jax import data as data_lib  # noqa: E402
from dfm_jax import decompose, experiment, oracle, sampler as sampler_lib  # noqa: E402
from dfm_jax import stage_schedule  # noqa: E402
from dfm_jax.evaluation import classifier as classifier_lib  # noqa: E402
from dfm_jax.evaluation import fid_features  # noqa: E402


def parse_schedule(text: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """``'30+10@0.7'`` -> ((30, 10), (0.7,)); ``'40'`` -> ((40,), ())."""
  steps, _, th = text.partition("@")
  return (
    tuple(int(v) for v in steps.split("+")),
    tuple(float(v) for v in th.split("/")) if th else (),
  )


def schedule_label(steps, thresholds) -> str:
  label = "+".join(str(n) for n in steps)
  return label + ("@" + "/".join(f"{v:g}" for v in thresholds) if thresholds else "")


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def table(results: list[dict]) -> str:
  """The results as a Markdown table (what docs/benchmarks.md quotes)."""
  has_fd = any("classifier_fd" in r for r in results)
  has_fid = any("fid" in r for r in results)
  headers = ["row", "schedule", "variance kept per band", "nearest RMS"]
  headers += ["classifier FD"] if has_fd else []
  headers += ["FID"] if has_fid else []
  lines = []
  for r in results:
    line = [r["row"], r["schedule"], " / ".join(f"{v:.3f}" for v in r["variance_kept"])]
    line.append(f"{r['nearest_rms']:.4f}")
    line += [f"{r['classifier_fd']:.2f}"] if has_fd else []
    line += [f"{r['fid']:.2f}"] if has_fid else []
    lines.append(line)
  return common.format_table(headers, lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--num-data", type=int, default=2000, help="training images in the oracle")
  parser.add_argument("--samples", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rows", default="fm,dfm,dfm_auto,dfm_std,dfm_std_auto")
  parser.add_argument("--schedules", default="", help="extra DFM rows, e.g. 30+10@0.7,35+5@0.8")
  parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale of every row")
  parser.add_argument("--fid", action="store_true", help="also Inception FID (slow on a CPU)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--out", default="", help="results JSON (with provenance)")
  args = parser.parse_args()

  def config(variant: str):
    c = common.load_config(args.config, variant)
    for kv in args.set:
      key, value = kv.split("=", 1)
      node = c
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      try:  # numbers, tuples, booleans as Python literals; anything else as a string
        node[leaf] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        node[leaf] = value
    return c

  base = config("dfm")
  exp = experiment.from_config(base)
  real_u8, real_labels = data_lib.load_images(base.data, args.num_data, seed=0)
  real = real_u8.astype(np.float32) / 127.5 - 1.0
  raw_dec = exp.decomposition.with_stats(None)
  stats = decompose.estimate_stats(raw_dec, [real])
  std_dec = raw_dec.with_stats(stats)
  total = sum(base.sampler.steps_per_stage)
  num_classes = int(base.data.num_classes)
  labels = np.arange(args.samples) % max(num_classes, 1) if num_classes else None
  null_label = num_classes
  print(common.machine_summary(), file=sys.stderr)
  print(f"band std (raw): {np.round(stats.std, 4).tolist()}", file=sys.stderr)

  rows = []  # (name, decomposition, steps, thresholds)
  wanted = args.rows.split(",") if args.rows else []
  if "fm" in wanted:
    fm_exp = experiment.from_config(config("fm"))
    fm_steps = tuple(config("fm").sampler.steps_per_stage)
    rows.append(("fm", fm_exp.decomposition, fm_steps, ()))
  hand = (tuple(base.sampler.steps_per_stage), tuple(base.sampler.thresholds))
  for name, dec, model_std in (("dfm", raw_dec, stats.std), ("dfm_std", std_dec, None)):
    stds = model_std if model_std is not None else (1.0,) * dec.num_stages
    if name in wanted:
      rows.append((name, dec, *hand))
    if name + "_auto" in wanted:
      rows.append((name + "_auto", dec, *stage_schedule.auto_schedule(stds, total)))
  for text in filter(None, args.schedules.split(",")):
    rows.append(("dfm", raw_dec, *parse_schedule(text)))

  clf = None
  if base.eval.get("classifier", ""):
    n = data_lib.dataset_size(base.data)
    train_u8, train_labels = data_lib.load_images(base.data, n, seed=0)
    clf = classifier_lib.get_classifier(base.eval.classifier, train_u8, train_labels)

  results = []
  if clf is not None or args.fid:
    # The floor: what the exact ODE gives, a uniform draw of data points of each sample's class.
    pick = np.random.default_rng(args.seed)
    draw = np.asarray(
      [pick.choice(np.flatnonzero(real_labels == c)) for c in labels]
      if labels is not None
      else pick.integers(0, len(real), args.samples)
    )
    floor = {"row": "exact (data points drawn)", "schedule": "-", "standardized": False}
    floor["variance_kept"] = oracle.band_variance_kept(raw_dec, real[draw], real)
    floor["nearest_rms"] = 0.0
    if clf is not None:
      floor["classifier_fd"] = classifier_lib.classifier_frechet_distance(
        clf, real_u8[draw], real_u8
      )
    if args.fid:
      floor["fid"] = fid_features.compute_metrics(real_u8[draw], real_u8)["fid"]
    results.append(floor)
  for name, dec, steps, thresholds in rows:
    start = time.time()
    cfg = sampler_lib.SamplerConfig(
      steps_per_stage=steps, thresholds=thresholds, cfg_scale=args.cfg
    )
    out = oracle.sample(
      dec, real, real_labels if num_classes else None, cfg,
      labels if labels is not None else np.full(args.samples, null_label),
      null_label=null_label, seed=args.seed,
    )  # fmt: skip
    fake_u8 = to_uint8(out.images)
    row = {
      "row": name,
      "schedule": schedule_label(steps, thresholds),
      "standardized": dec.stats is not None,
      "variance_kept": oracle.band_variance_kept(raw_dec, out.images, real),
      "gaussian_variance_kept": (
        stage_schedule.gaussian_variance_kept(
          (1.0,) * dec.num_stages if dec.stats is not None else stats.std, steps, thresholds
        ).tolist()
        if dec.num_stages == raw_dec.num_stages
        else None
      ),
      "nearest_rms": float(np.mean(oracle.nearest_distance(out.images, real))),
    }
    if clf is not None:
      row["classifier_fd"] = classifier_lib.classifier_frechet_distance(clf, fake_u8, real_u8)
      row["classifier_accuracy"] = clf.accuracy(fake_u8, labels) if labels is not None else None
    if args.fid:
      row["fid"] = fid_features.compute_metrics(fake_u8, real_u8)["fid"]
    row["seconds"] = round(time.time() - start, 1)
    results.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)

  print(table(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(
        {
          "provenance": common.provenance(sys.argv),
          "band_std": list(stats.std),
          # Per band: the fraction of the main stage's logit-normal training times at which
          # the band is being resolved (dfm_jax.stage_schedule.training_fraction_in_range),
          # raw and standardised (multiply by the stage's p_q for its share of all samples).
          "training_fraction_in_range": {
            "raw": [
              stage_schedule.training_fraction_in_range(s, base.flow.main_loc, base.flow.main_scale)
              for s in stats.std
            ],
            "standardized": stage_schedule.training_fraction_in_range(
              1.0, base.flow.main_loc, base.flow.main_scale
            ),
          },
          "num_data": args.num_data,
          "samples": args.samples,
          "rows": results,
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  main()
