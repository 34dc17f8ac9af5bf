"""Quality at equal compute: DFM against flow matching, with and without preconditioning.

Every row is a method (DFM or its flow-matching twin: same backbone, token count, batch and
steps) with config overrides; every (row, seed) is trained once to ``--steps`` and evaluated at
each ``--cfgs`` scale with ``--eval-samples`` samples (Inception FID and KID and, for 28x28-class
data, the classifier's Frechet distance and accuracy). The table reports the mean and, with
several seeds, the spread (half the max - min range) per row. Nothing is tuned on the evaluation:
reference statistics come from the training split.

  python bench/quality.py --config=configs/fashion_mnist.py --workdir=workdirs/quality \
      --steps=2000 --eval-samples=1000 --cfgs=1.0,1.5 --seeds=0,1

Resumable per run: training checkpoints every 250 steps and resumes, a finished (row, seed)
training is a no-op, and evaluations already in
``<workdir>/<row>/seed<k>/eval/`` with the same step, sample count and sampler settings are read
back. ``results.json`` is rewritten after every evaluation, so a partial run still reports. Rows
run in the order below (the headline pair first), and ``--rows`` picks a subset.

On an accelerator without the metric weights, ``--phase=generate`` trains and keeps the samples
(``eval/<tag>.samples.npz``); ``--phase=score`` then scores them elsewhere without the checkpoints.
``--jobs`` runs several (row, seed) trainings side by side (one accelerator can hold many of
these small models).

Writes ``results.json``, ``table.md``, ``table3.md`` (the paper's Table 3 layout: methods x cfg) and
``quality.png`` (needs matplotlib) into the workdir;
the last stdout lines are the headline: each row's FID over flow matching's, one line per cfg scale.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import subprocess
import sys

import numpy as np

import common  # bench/ helpers; also puts the repository on the import path

REPO = str(common.REPO)

# Training FLOPs per step relative to flow matching, from XLA's count of the lowered train step
# (bench/common.step_flops) on configs/fashion_mnist.py: FM 21.68 GFLOP, DFM 21.74, Pyramidal
# Flow 21.68 (same 64 tokens). The cascade's step holds both models under one lax.cond; XLA
# charges the larger (full-resolution, 64 + 64 conditioning tokens) 46.45 GFLOP; the
# low-resolution phase (80% of steps) runs FM's 64 tokens. Charged in full:
# (0.8 * 21.68 + 0.2 * 46.45) / 21.68 = 1.2285, so the cascade gets 1 / 1.2285 of the steps.
CASCADE_COST = 1.2285

# Variants whose rows were measured with preconditioning on (the base config's setting; the
# Pyramidal Flow twin turns it off itself): every row of these but "config" runs with
# model.precondition=True unless its overrides say otherwise, whatever a config's default.
PRECONDITIONED_VARIANTS = ("dfm", "fm", "cascade")

# (name, config variant, overrides, training FLOPs per step relative to FM). The first two are
# the headline pair and get every seed of --seeds; the other rows the first seed, the methods
# comparison (pyramidal, cascade) and the configs' DFM (p_q 0.7) every seed too.
ROWS = [
  ("fm", "fm", {}, 1.0),
  ("dfm_pq0.9", "dfm", {"flow.stage_probs": (0.9, 0.1)}, 1.0),
  ("dfm_pq0.7", "dfm", {"flow.stage_probs": (0.7, 0.3)}, 1.0),
  ("fm_noprecond", "fm", {"model.precondition": False}, 1.0),
  (
    "dfm_pq0.9_noprecond",
    "dfm",
    {"flow.stage_probs": (0.9, 0.1), "model.precondition": False},
    1.0,
  ),
  ("pyramidal", "pyramidal", {}, 1.0),
  ("cascade", "cascade", {}, CASCADE_COST),
  # Feeding the fine stage at small budgets: a p_q schedule (0.9 -> 0.5 over training), and
  # twice the fine stage's loss weight at the paper's p_q.
  (
    "dfm_pq0.9to0.5",
    "dfm",
    {"flow.stage_probs": (0.9, 0.1), "flow.final_stage_probs": (0.5, 0.5)},
    1.0,
  ),
  ("dfm_pq0.9_w2", "dfm", {"flow.stage_probs": (0.9, 0.1), "flow.stage_weights": (1.0, 2.0)}, 1.0),
  # Issue: what hides DFM's advantage (docs/benchmarks.md section 5, "Hypotheses").
  (
    "dfm_pq0.7_std",
    "dfm",
    {"flow.stage_probs": (0.7, 0.3), "decomposition.standardize": True},
    1.0,
  ),
  ("fm_std", "fm", {"decomposition.standardize": True}, 1.0),
  (
    "dfm_pq0.7_vel",
    "dfm",
    {"flow.stage_probs": (0.7, 0.3), "model.loss_weighting": "velocity"},
    1.0,
  ),
  ("fm_vel", "fm", {"model.loss_weighting": "velocity"}, 1.0),
  # DFM against the best flow-matching row (no preconditioning), at the configs' p_q.
  (
    "dfm_pq0.7_noprecond",
    "dfm",
    {"flow.stage_probs": (0.7, 0.3), "model.precondition": False},
    1.0,
  ),
  # The config's own DFM, unchanged (not in the default --rows): e.g. the README's default run.
  ("config", "dfm", {}, 1.0),
]
# Sampler rows: a trained row sampled another way (no training of their own): name ->
# (the trained row, sampler overrides for its evaluations).
SAMPLER_ROWS = {
  "dfm_pq0.7_std+auto": ("dfm_pq0.7_std", {"sampler.auto_schedule": True}),
  "dfm_pq0.7_vel+auto": ("dfm_pq0.7_vel", {"sampler.auto_schedule": True}),
}
HEADLINE = ("dfm_pq0.9", "fm")
# p_q 0.7: the configs' value; the p_q schedule and the fine-stage weight: rows that feed the starved fine stage
ALL_SEEDS = HEADLINE + ("dfm_pq0.7", "pyramidal", "cascade", "dfm_pq0.9to0.5", "dfm_pq0.9_w2")
ALL_SEEDS += ("dfm_pq0.7_std", "fm_vel", "dfm_pq0.7_vel", "config") + tuple(SAMPLER_ROWS)
ALL_SEEDS += ("fm_noprecond", "dfm_pq0.7_noprecond")
# Fine-tuning: an FM model trained for FT_BASE of --steps, then the rest spent on plain FM
# fine-tuning or on DFM fine-tuning (the coarse stage at the pretrained patch size, upsampled x2
# as in the paper), both through --config.init_from.
FT_BASE = 0.75
FINETUNE = [
  ("ft_base_fm", "fm", {}),
  ("ft_fm", "fm", {"init_from": "{base}"}),
  (
    "ft_dfm",
    "dfm",
    {"flow.stage_probs": (0.9, 0.1), "model.stage_upsample": (2, 1), "init_from": "{base}"},
  ),
  # The new fine stage as the main stage in 70% of the updates (it starts untrained; the
  # pretrained coarse stage needs little).
  (
    "ft_dfm_pq0.3",
    "dfm",
    {"flow.stage_probs": (0.3, 0.7), "model.stage_upsample": (2, 1), "init_from": "{base}"},
  ),
  # ... then handing the updates back to the coarse stage (p_q 0.3/0.7 -> 0.7/0.3).
  (
    "ft_dfm_pq0.3to0.7",
    "dfm",
    {
      "flow.stage_probs": (0.3, 0.7),
      "flow.final_stage_probs": (0.7, 0.3),
      "model.stage_upsample": (2, 1),
      "init_from": "{base}",
    },
  ),
]
METRICS = ("fid", "kid", "classifier_fd", "classifier_accuracy")
# Video configs (configs/moving_digits.py): frame FID, per-frame digit accuracy and motion.
VIDEO_METRICS = ("frame_fid", "frame_kid", "frame_accuracy", "speed_ratio", "roughness_ratio")


def flag(key: str, value) -> str:
  if isinstance(value, tuple):
    value = "(" + ",".join(str(v) for v in value) + ",)"
  return f"--config.{key}={value}"


def main_cmd(config: str, variant: str, workdir: str, overrides: dict, *flags: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "dfm_jax.main",
    f"--config={config}:{variant}",
    f"--workdir={workdir}",
    *(flag(k, v) for k, v in overrides.items()),
    *flags,
  ]


def run(cmd: list[str]) -> str:
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return proc.stdout


def num_scored(path: str, r: dict) -> int | None:
  """How many samples an evaluation scored: its image FID's count, else (videos) the kept
  samples' (``eval.save_samples``, which every run here sets)."""
  if "num_fake" in r:
    return r["num_fake"]
  kept = path[: -len(".json")] + ".samples.npz"
  if not os.path.exists(kept):
    return None
  with np.load(kept) as z:
    return len(z["labels"])


def cached_eval(
  workdir: str, step: int, eval_samples: int, cfg: float, auto: bool = False
) -> dict | None:
  for path in sorted(glob.glob(os.path.join(workdir, "eval", "*.json"))):
    with open(path) as f:
      r = json.load(f)
    scale = np.ravel(r["sampler"]["cfg_scale"]).tolist()
    # a generate-only eval holds no metrics
    scored = r.get("fid") is not None or r.get("frame_fid") is not None
    same_sampler = bool(r["sampler"].get("auto_schedule", False)) == auto
    same_eval = r["step"] == step and num_scored(path, r) == eval_samples and scale == [cfg]
    if same_eval and same_sampler and scored:
      return r
  return None


def summarise(rows: list[dict]) -> list[dict]:
  """Mean and spread (half of max - min) over seeds for each (row, cfg)."""
  out = []
  names = [r[0] for r in ROWS + FINETUNE] + list(SAMPLER_ROWS)
  rank = {name: i for i, name in enumerate(names)}
  for key in sorted({(r["row"], r["cfg"]) for r in rows}, key=lambda k: (k[1], rank.get(k[0]))):
    group = [r for r in rows if (r["row"], r["cfg"]) == key]
    entry = {"row": key[0], "cfg": key[1], "seeds": [r["seed"] for r in group]}
    entry["steps"] = group[0].get("steps")
    for m in METRICS + VIDEO_METRICS:
      values = [r[m] for r in group if r.get(m) is not None]
      if values:
        entry[m] = float(np.mean(values))
        entry[m + "_spread"] = float((max(values) - min(values)) / 2)
    out.append(entry)
  return out


def table(summary: list[dict]) -> str:
  if any("frame_fid" in e or "frame_accuracy" in e for e in summary):
    return video_table(summary)
  lines = [
    "| row | steps | cfg | seeds | FID | KID x1e3 | classifier FD | class accuracy |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]

  for e in summary:
    lines.append(
      f"| {e['row']} | {e.get('steps') or '-'} | {e['cfg']:g} | {len(e['seeds'])} | "
      f"{cell(e, 'fid')} | "
      f"{cell(e, 'kid', 1e3, '{:.2f}')} | {cell(e, 'classifier_fd')} | "
      f"{cell(e, 'classifier_accuracy', 100, '{:.1f}')}% |"
    )
  return "\n".join(lines)


def cell(e: dict, m: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
  """``mean +- spread`` of metric ``m`` in a summary entry ("-" when it was not measured)."""
  if m not in e:
    return "-"
  s = fmt.format(e[m] * scale)
  if len(e["seeds"]) > 1:
    s += " +- " + fmt.format(e[m + "_spread"] * scale)
  return s


def video_table(summary: list[dict]) -> str:
  lines = [
    "| row | steps | cfg | seeds | frame FID | frame KID x1e3 | frame accuracy | speed ratio "
    "| roughness ratio |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for e in summary:
    lines.append(
      f"| {e['row']} | {e.get('steps') or '-'} | {e['cfg']:g} | {len(e['seeds'])} | "
      f"{cell(e, 'frame_fid')} | {cell(e, 'frame_kid', 1e3, '{:.2f}')} | "
      f"{cell(e, 'frame_accuracy', 100, '{:.1f}')}% | {cell(e, 'speed_ratio', 1, '{:.2f}')} | "
      f"{cell(e, 'roughness_ratio', 1, '{:.2f}')} |"
    )
  return "\n".join(lines)


# The paper's Table 3 layout: one row per method (DFM at both p_q), one column per cfg scale.
TABLE3_ROWS = ("fm", "cascade", "pyramidal", "dfm_pq0.9", "dfm_pq0.7")


def table3(summary: list[dict]) -> str:
  """Methods x cfg scales, each cell 'FID / classifier FD / accuracy' (mean +- spread)."""
  cfgs = sorted({e["cfg"] for e in summary})
  lines = [
    "| method | steps | seeds | " + " | ".join(f"cfg {c:g}" for c in cfgs) + " |",
    "|---|---:|---:|" + "---|" * len(cfgs),
  ]

  def cell(e):
    if e is None or "fid" not in e:
      return "-"
    parts = []
    for m, scale, fmt in (("fid", 1, "{:.1f}"), ("classifier_fd", 1, "{:.1f}")):
      s = fmt.format(e[m] * scale) if m in e else "-"
      if m in e and len(e["seeds"]) > 1:
        s += " +- " + fmt.format(e[m + "_spread"] * scale)
      parts.append(s)
    if "classifier_accuracy" in e:
      parts.append(f"{100 * e['classifier_accuracy']:.1f}%")
    return " / ".join(parts)

  for name in TABLE3_ROWS:
    entries = {e["cfg"]: e for e in summary if e["row"] == name}
    if not entries:
      continue
    first = next(iter(entries.values()))
    seeds = "/".join(str(len(entries[c]["seeds"])) if c in entries else "0" for c in cfgs)
    lines.append(
      f"| {name} | {first.get('steps') or '-'} | {seeds} | "
      + " | ".join(cell(entries.get(c)) for c in cfgs)
      + " |"
    )
  return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib not installed: skipping the plot", file=sys.stderr)
    return
  cfgs = sorted({e["cfg"] for e in summary})
  names = [r[0] for r in ROWS + FINETUNE] + list(SAMPLER_ROWS)
  names = [n for n in names if any(e["row"] == n for e in summary)]
  metrics = [m for m in ("fid", "classifier_fd") if any(m in e for e in summary)]
  if not metrics:  # nothing scored yet
    return
  fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
  width = 0.8 / len(cfgs)
  for ax, m in zip(axes[0], metrics):
    for i, cfg in enumerate(cfgs):
      vals = [
        next((e.get(m, np.nan) for e in summary if e["row"] == n and e["cfg"] == cfg), np.nan)
        for n in names
      ]
      errs = [
        next((e.get(m + "_spread", 0) for e in summary if e["row"] == n and e["cfg"] == cfg), 0)
        for n in names
      ]
      ax.bar(np.arange(len(names)) + i * width, vals, width, yerr=errs, label=f"cfg {cfg:g}")
    ax.set_xticks(np.arange(len(names)) + width * (len(cfgs) - 1) / 2, names, rotation=20)
    ax.set_ylabel({"fid": "FID (Inception)", "classifier_fd": "classifier Frechet distance"}[m])
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def eval_flags(phase: str, workdir: str, steps: int, eval_samples: int, cfg: float) -> list[str]:
  """``--mode=eval`` flags of one phase: sample and score (all), sample only and keep the
  samples (generate), or score the kept samples without the checkpoint (score)."""
  flags = ["--mode=eval", f"--config.eval.num_samples={eval_samples}"]
  flags.append(f"--config.sampler.cfg_scale={cfg}")
  if phase in ("all", "generate"):  # keep the samples (a few MB): re-scoring needs no retraining
    flags.append("--config.eval.save_samples=True")
  if phase == "generate":
    return flags + ["--config.eval.metrics=()"]
  if phase == "score":
    saved = glob.glob(os.path.join(workdir, "eval", f"step{steps}_cfg{cfg:g}_*.samples.npz"))
    if not saved:
      raise FileNotFoundError(f"no saved samples for cfg {cfg:g} in {workdir}/eval")
    return flags + [f"--config.eval.samples_from={saved[0]}"]
  return flags


def row_steps(args, name: str) -> int:
  """Training steps of a row at equal compute (``--steps`` of flow matching)."""
  cost = {r[0]: r[3] for r in ROWS}.get(name, 1.0)
  if name.startswith("ft_"):
    base = round(args.steps * FT_BASE)
    return base if name == "ft_base_fm" else args.steps - base
  return round(args.steps / cost)


def run_one(args, name: str, variant: str, overrides: dict, seed: int, extra: dict) -> list[dict]:
  """Trains (row, seed) unless only scoring, then evaluates it at every cfg scale."""
  trained, sampler_ov = SAMPLER_ROWS.get(name, (name, {}))
  workdir = os.path.join(args.workdir, trained, f"seed{seed}")
  base = os.path.join(args.workdir, "ft_base_fm", f"seed{seed}")
  ov = {k: (v.format(base=base) if isinstance(v, str) else v) for k, v in overrides.items()}
  if trained != "config" and variant in PRECONDITIONED_VARIANTS:
    ov = {"model.precondition": True, **ov}
  variant += ",runlocal" if args.runlocal else ""
  ov = dict(ov, seed=seed, **extra)
  steps = row_steps(args, name)
  if args.phase in ("all", "generate") and trained == name:
    run(
      main_cmd(
        args.config,
        variant,
        workdir,
        ov,
        f"--config.total_steps={steps}",
        f"--config.checkpoint_every={min(steps, 250)}",
        f"--config.sample_every={steps}",
      )
    )
  rows = []
  for cfg in [float(v) for v in args.cfgs.split(",")]:
    auto = bool(sampler_ov.get("sampler.auto_schedule", False))
    r = cached_eval(workdir, steps, args.eval_samples, cfg, auto)
    if r is None and args.phase == "report":
      continue
    if r is None and args.phase == "generate":
      if glob.glob(os.path.join(workdir, "eval", f"step{steps}_cfg{cfg:g}_*.samples.npz")):
        continue
    if r is None:
      flags = eval_flags(args.phase, workdir, steps, args.eval_samples, cfg)
      flags += [flag(k, v) for k, v in sampler_ov.items()]
      out = run(main_cmd(args.config, variant, workdir, ov, *flags))
      r = json.loads(out.strip().splitlines()[-1])
    if args.phase == "generate":
      continue
    row = {"row": name, "seed": seed, "cfg": cfg, "steps": steps}
    row.update({m: r[m] for m in METRICS + VIDEO_METRICS if r.get(m) is not None})
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def run_finetune(args, seed: int, extra: dict) -> list[dict]:
  """The FM base, then plain and DFM fine-tuning from it (side by side)."""
  rows = run_one(args, *FINETUNE[0], seed, extra)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for future in [pool.submit(run_one, args, *item, seed, extra) for item in FINETUNE[1:]]:
      rows += future.result()
  return rows


def write_results(args, rows: list[dict]) -> list[dict]:
  summary = summarise(rows)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(
      {
        "provenance": common.provenance(sys.argv),
        "config": args.config,
        "steps": args.steps,
        "eval_samples": args.eval_samples,
        "overrides": dict(kv.split("=", 1) for kv in args.set),
        "runs": rows,
        "summary": summary,
      },
      f,
      indent=2,
    )
  with open(os.path.join(args.workdir, "table.md"), "w") as f:
    f.write(table(summary) + "\n")
  with open(os.path.join(args.workdir, "table3.md"), "w") as f:
    f.write("FID / classifier FD / class accuracy (mean +- spread over seeds)\n\n")
    f.write(table3(summary) + "\n")
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--workdir", default="workdirs/quality")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--eval-samples", type=int, default=1000)
  parser.add_argument("--cfgs", default="1.0,1.5")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument(
    "--rows",
    default=",".join(r[0] for r in ROWS if r[0] != "config") + ",finetune",
    help="rows to run; 'finetune' is the FM base with plain and DFM fine-tuning from it; "
    "'config' is the config's DFM as it is",
  )
  parser.add_argument(
    "--phase",
    choices=("all", "generate", "score", "report"),
    default="all",
    help="all: train, sample and score; generate: train and keep the samples (on an "
    "accelerator); score: score the kept samples (where the metric weights are); report: "
    "tabulate the evaluations already in the workdir",
  )
  parser.add_argument("--jobs", type=int, default=1, help="(row, seed) runs in parallel")
  parser.add_argument(
    "--runlocal", action="store_true", help="the configs' runlocal variant (a seconds-long check)"
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="a config override applied to every run, e.g. eval.num_real=1000",
  )
  args = parser.parse_args()
  extra = dict(kv.split("=", 1) for kv in args.set)
  seeds = [int(v) for v in args.seeds.split(",")]
  wanted = args.rows.split(",")
  trained_rows = {r[0]: r for r in ROWS}
  sampler_rows = [(name,) + trained_rows[base][1:] for name, (base, _) in SAMPLER_ROWS.items()]
  plan = [
    (name, variant, overrides, seed)
    for name, variant, overrides, _ in ROWS + sampler_rows
    if name in wanted
    for seed in (seeds if name in ALL_SEEDS else seeds[:1])
  ]
  # Seed 0 of every row before the extra seeds.
  plan.sort(key=lambda p: (p[3] != seeds[0],))
  finetune = "finetune" in wanted
  rows: list[dict] = []
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    futures = [pool.submit(run_finetune, args, seed, extra) for seed in seeds] if finetune else []
    futures += [pool.submit(run_one, args, *item, extra) for item in plan]
    for future in concurrent.futures.as_completed(futures):
      rows.extend(future.result())
      if rows:
        write_results(args, rows)
  if args.phase == "generate":
    print(f"samples kept under {args.workdir}/<row>/seed<k>/eval/")
    return
  plan += [(r[0], r[1], r[2], seed) for seed in seeds for r in FINETUNE] if finetune else []
  order = {(p[0], p[3]): i for i, p in enumerate(plan)}
  rows.sort(key=lambda r: (order[(r["row"], r["seed"])], r["cfg"]))
  summary = write_results(args, rows)
  plot(summary, os.path.join(args.workdir, "quality.png"))
  print(table(summary))
  print(table3(summary))
  main_metric = "frame_fid" if any("frame_fid" in e for e in summary) else "fid"
  for cfg in sorted({e["cfg"] for e in summary}):
    fid = {e["row"]: e.get(main_metric) for e in summary if e["cfg"] == cfg}
    if fid.get("fm"):
      ratios = ", ".join(f"{n} {v / fid['fm']:.3f}" for n, v in fid.items() if v and n != "fm")
      print(f"{main_metric} / flow matching's at equal compute, cfg {cfg:g}: {ratios}")


if __name__ == "__main__":
  main()
