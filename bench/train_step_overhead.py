"""Train-step cost of DFM against its flow-matching twin (same backbone, same token count).

  python bench/train_step_overhead.py                       # DiT-S and DiT-B, defaults below
  python bench/train_step_overhead.py --sizes B --resolution 64 --patch 2 --batch 16 --rounds 10
  python bench/train_step_overhead.py --breakdown   # also the model's forward and backward alone
  python bench/train_step_overhead.py --frames 8 --resolution 16 --patch 1 --sizes S  # video

Data: random "latent-like" [resolution, resolution, channels] arrays (default 32x32x4). DFM is a
2-stage Laplacian pyramid (resolution/2 with patch `--patch`, then resolution with twice that);
the twin (``config_defaults.flow_matching_twin``) is one stage with patch 2 x `--patch`, so both
see (resolution / (2 * patch))^2 tokens. With ``--frames T`` the data are latent clips
[T, resolution, resolution, channels], the pyramid halves space only and frames are patchified
independently with 3D RoPE (as configs/kinetics700.py): T times the tokens. Measured, per size: seconds per compiled train step
(``dfm_jax.train.compile_step``: forward, backward, AdamW, EMA), DFM and FM run alternately for
`--rounds` rounds and compared by the median of the per-round ratios; FLOPs per step from XLA's
cost analysis of each step lowered with its blocks unrolled (``common.step_flops``); parameter
counts. The paper reports +1.2% step time and +0.006% FLOPs for DiT-XL at 1024 tokens on GPU.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

import common
from dfm_jax import flow
from dfm_jax.config_defaults import base_config, flow_matching_twin


def make_configs(size: str, workdir: str, args) -> tuple:
  c = base_config()
  c.batch_size = args.batch
  c.model.size = size
  c.model.patch_size = args.patch
  c.decomposition.kind = "laplacian"
  c.decomposition.num_stages = 2
  c.flow.stage_probs = (0.9, 0.1)
  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)
  c.optim.warmup_steps = 10
  if args.frames:
    c.decomposition.halve_time = False
    c.model.pos_embed = "rope"
  dfm = common.latent_config(c, workdir, args.resolution, args.channels, frames=args.frames)
  return dfm, flow_matching_twin(dfm)


def model_parts(step: common.TrainStep) -> dict:
  """Blocking callables for the model alone: forward, and forward + backward of the DFM loss
  (the same loss as the train step), on the step's current parameters and batch."""
  exp = step.run.exp
  graphdef = nnx.split(nnx.merge(step.run.graphdef, step.run.abstract_state).model)[0]
  params = step.state["model"]
  stages = exp.decomposition.split(step.batch["image"])
  labels = step.batch["label"]
  key = jax.random.key(0)
  t = jnp.full((labels.shape[0], exp.decomposition.num_stages), 0.5, jnp.float32)

  @jax.jit
  def forward(params, stages, labels):
    return nnx.merge(graphdef, params)(stages, t, labels, jnp.zeros_like(labels))

  @jax.jit
  def grad(params, stages, labels):
    def loss(model):
      return flow.dfm_training_loss(
        lambda *a: model(*a), key, stages, labels, exp.flow, null_label=exp.null_label
      )[0]

    return nnx.grad(loss)(nnx.merge(graphdef, params))

  return {
    "forward": common.blocking(lambda: forward(params, stages, labels)),
    "forward+backward": common.blocking(lambda: grad(params, stages, labels)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="S,B", help="comma-separated DiT sizes (S, B, L, XL)")
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--channels", type=int, default=4)
  parser.add_argument("--patch", type=int, default=2, help="patch of DFM's coarse stage")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--frames", type=int, default=0, help="video clips of this many frames")
  parser.add_argument("--rounds", type=int, default=4, help="timed DFM/FM pairs per size")
  parser.add_argument(
    "--breakdown",
    action="store_true",
    help="also time the model's forward and forward+backward alone",
  )
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)

  report.say(common.machine_summary())
  tokens = (args.resolution // (2 * args.patch)) ** 2 * max(1, args.frames)
  clip = f"{args.frames}x" if args.frames else ""
  report.say(
    f"data {clip}{args.resolution}x{args.resolution}x{args.channels}, batch {args.batch}, "
    f"{tokens} tokens, {args.rounds} interleaved rounds after one warm-up step each"
  )
  rows, ratio_by_size, parts_rows = [], {}, []
  with tempfile.TemporaryDirectory() as workdir:
    for size in args.sizes.split(","):
      dfm_cfg, fm_cfg = make_configs(size, workdir, args)
      steps = common.build_train_steps({"dfm": dfm_cfg, "fm": fm_cfg})
      times = common.interleaved_times(steps, rounds=args.rounds, warmup=1)
      ratio, q25, q75 = common.paired_ratio(times["dfm"], times["fm"])
      ratio_by_size[size] = ratio
      dfm, fm = steps["dfm"], steps["fm"]
      temp = [x.compiled.memory_analysis().temp_size_in_bytes / 2**20 for x in (dfm, fm)]
      copies = [common.copied_bytes(x.compiled) / 2**20 for x in (dfm, fm)]
      state = common.leaf_bytes(fm.run.abstract_state) / 2**20
      rows.append(
        [
          f"DiT-{size}",
          f"{common.median(times['dfm']) * 1e3:.0f}",
          f"{common.median(times['fm']) * 1e3:.0f}",
          f"{ratio:.3f}",
          f"{q25:.3f}-{q75:.3f}",
          f"{min(times['dfm']) / min(times['fm']):.3f}",
          f"{dfm.flops / 1e9:.2f}",
          f"{fm.flops / 1e9:.2f}",
          f"{dfm.flops / fm.flops:.4f}",
          f"{dfm.num_params / 1e6:.2f}",
          f"{fm.num_params / 1e6:.2f}",
          f"{temp[0]:.0f}",
          f"{temp[1]:.0f}",
          f"{copies[0]:.0f}",
          f"{copies[1]:.0f}",
          f"{state:.0f}",
        ]
      )
      if args.breakdown:
        parts = {
          f"{method} {part}": fn
          for method, x in (("dfm", dfm), ("fm", fm))
          for part, fn in model_parts(x).items()
        }
        part_times = common.interleaved_times(parts, rounds=args.rounds, warmup=1)
        for part in ("forward", "forward+backward"):
          r = common.paired_ratio(part_times[f"dfm {part}"], part_times[f"fm {part}"])
          parts_rows.append(
            [
              f"DiT-{size}",
              part,
              f"{common.median(part_times[f'dfm {part}']) * 1e3:.0f}",
              f"{common.median(part_times[f'fm {part}']) * 1e3:.0f}",
              f"{r[0]:.3f}",
              f"{r[1]:.3f}-{r[2]:.3f}",
            ]
          )
        parts_rows.append(
          [f"DiT-{size}", "whole train step", rows[-1][1], rows[-1][2], rows[-1][3], rows[-1][4]]
        )
      del steps, dfm, fm
  report.table(
    "DFM vs flow-matching twin, one train step (ms: median; time ratio: median of per-round "
    "DFM/FM with its interquartile range; min ratio: fastest DFM / fastest FM; temp: XLA "
    "temporaries; copy: bytes of HLO copy instructions per step; state: FM train state)",
    [
      "model",
      "DFM ms",
      "FM ms",
      "time ratio",
      "IQR",
      "min ratio",
      "DFM GFLOP",
      "FM GFLOP",
      "FLOP ratio",
      "DFM Mparams",
      "FM Mparams",
      "DFM temp MiB",
      "FM temp MiB",
      "DFM copy MiB",
      "FM copy MiB",
      "FM state MiB",
    ],
    rows,
  )
  if parts_rows:
    report.table(
      "The model alone (jitted separately; the train step adds AdamW, EMA and "
      "the non-finite guard)",
      ["model", "part", "DFM ms", "FM ms", "time ratio", "IQR"],
      parts_rows,
    )
  headline = "B" if "B" in ratio_by_size else list(ratio_by_size)[-1]
  report.finish(f"DFM/FM train-step time ratio (DiT-{headline}): {ratio_by_size[headline]:.3f}")


if __name__ == "__main__":
  main()
