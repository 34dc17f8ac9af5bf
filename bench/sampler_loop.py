"""The compiled sampling loop against the sum of the bare model forwards it makes.

  python bench/sampler_loop.py                    # configs/default.py model, batch 16
  python bench/sampler_loop.py --batch 100 --rounds 5

The model of configs/default.py (3-stage DFM, width 128, depth 4, 64 tokens; freshly
initialised weights, which cost the same as trained ones) samples with
``dfm_jax.sampling.make_sample_fn``: one jitted ``lax.scan`` over all steps, with classifier-free
guidance as a doubled batch inside a ``lax.cond`` on the steps where it applies. Variants: the
config's own sampler, guidance `--cfg-scale` (1.5) on the guidance interval `--interval`, and no
guidance.

Baseline: a jitted single model forward at the same batch B (and at 2B, the guided batch), timed
as a Python loop of N calls. Reported per variant: loop time; ratio loop / (nfe x forward(B))
with nfe the sampler's own count (a guided pass counts 2); and the ratio against the exact mix
of passes, (steps - guided) x forward(B) + guided x forward(2B). All callables alternate within
each round; ratios are per-round medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import common
from dfm_jax import sampling, train


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="default", help="a file in configs/, without .py")
  parser.add_argument("--batch", type=int, default=16, help="samples per sampler call")
  parser.add_argument("--cfg-scale", type=float, default=1.5, help="guidance of variant 2")
  parser.add_argument("--interval", default="0.2,0.8", help="guidance interval of variant 2")
  parser.add_argument("--rounds", type=int, default=5)
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)

  report.say(common.machine_summary())
  config = common.load_config(args.config)
  with tempfile.TemporaryDirectory() as workdir:
    run = train.setup(config, workdir, jax.devices()[:1])
  model_state = run.exp.method.sampling_state(jax.block_until_ready(train.init_state(run)))
  graphdef, exp = run.ema_graphdef(), run.exp
  base = exp.sampler
  lo, hi = (float(v) for v in args.interval.split(","))
  variants = {
    f"config: cfg {base.cfg_scale:g}, interval {base.guidance_interval}": base,
    f"cfg {args.cfg_scale:g}, interval ({lo:g}, {hi:g})": dataclasses.replace(
      base, cfg_scale=args.cfg_scale, guidance_interval=(lo, hi)
    ),
    "no guidance (cfg 1)": dataclasses.replace(base, cfg_scale=1.0),
  }
  if base.cfg_scale == 1.0:
    raise SystemExit(
      f"configs/{args.config}.py samples without guidance; pick a config with "
      f"sampler.cfg_scale != 1"
    )
  labels = jnp.asarray(sampling.class_cycle_labels(args.batch, config.data.num_classes))
  key = jax.random.key(0)
  fns, nfe = {}, {}
  for name, cfg in variants.items():
    sample_fn = sampling.make_sample_fn(graphdef, exp, cfg)
    fns[name] = common.blocking(lambda f=sample_fn: f(model_state, key, labels)["images"])
    nfe[name] = int(sample_fn(model_state, key, labels)["nfe"])  # also compiles it

  forward = jax.jit(lambda state, x, t, y, s: nnx.merge(graphdef, state)(x, t, y, s))
  num_stages = exp.decomposition.num_stages
  calls = nfe["no guidance (cfg 1)"]

  def forward_loop(batch):
    rng = np.random.default_rng(0)
    x = tuple(
      jnp.asarray(rng.standard_normal((batch,) + s, np.float32)) for s in exp.model.stage_shapes
    )
    t = jnp.full((batch, num_stages), 0.5, jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    s = jnp.zeros((batch,), jnp.int32)

    def loop():
      out = None
      for _ in range(calls):
        out = forward(model_state, x, t, y, s)
      return out

    return common.blocking(loop)

  fns["forward B"] = forward_loop(args.batch)
  fns["forward 2B"] = forward_loop(2 * args.batch)
  times = common.interleaved_times(fns, rounds=args.rounds, warmup=1)
  per_b = np.asarray(times["forward B"]) / calls
  per_2b = np.asarray(times["forward 2B"]) / calls
  rows, headline = [], None
  for name, cfg in variants.items():
    passes = cfg.num_steps * (2 if cfg.solver == "heun" else 1)
    guided = nfe[name] - passes
    loop = np.asarray(times[name])
    ratio = common.paired_ratio(loop, nfe[name] * per_b)
    exact = common.paired_ratio(loop, (passes - guided) * per_b + guided * per_2b)
    rows.append(
      [
        name,
        cfg.num_steps,
        nfe[name],
        guided,
        f"{common.median(loop) * 1e3:.0f}",
        f"{ratio[0]:.3f} ({ratio[1]:.3f}-{ratio[2]:.3f})",
        f"{exact[0]:.3f} ({exact[1]:.3f}-{exact[2]:.3f})",
      ]
    )
    headline = headline or (name, ratio[0])
  report.say(
    f"forward at B={args.batch}: {common.median(per_b) * 1e3:.2f} ms, at 2B: "
    f"{common.median(per_2b) * 1e3:.2f} ms (loops of {calls} calls)"
  )
  report.table(
    f"Sampling loop vs bare forwards, configs/{args.config}.py model, batch {args.batch}, "
    f"steps {base.steps_per_stage}, thresholds {base.thresholds}, {base.solver}",
    [
      "sampler",
      "steps",
      "nfe",
      "guided passes",
      "loop ms",
      "loop / (nfe x fwd B) (IQR)",
      "loop / exact mix (IQR)",
    ],
    rows,
  )
  report.finish(f"sampling loop / (nfe x forward) ({headline[0]}): {headline[1]:.3f}")


if __name__ == "__main__":
  main()
