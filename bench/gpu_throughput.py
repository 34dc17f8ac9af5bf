"""Training throughput and model FLOP utilisation of DFM and its flow-matching twin on one GPU.

  python bench/gpu_throughput.py --out gpu_throughput.json           # on a GPU (H100 peak)
  python bench/gpu_throughput.py --quick                             # tiny check, any CPU

Models: DiT-B/2 and DiT-XL/2 (`--sizes`) at 256 and 1024 tokens (`--tokens`), bfloat16 compute
(`--dtype`) with float32 parameters, 1000 classes, 16-channel random latents. DFM is the paper's
2-stage pyramid: latents of side R = 2 sqrt(tokens) (32 or 64), a coarse R/2 stage with patch 1
and the full R stage with patch 2; the FM twin is a DiT with patch 2 on the R x R latents. Each
train step is ``dfm_jax.train.compile_step`` (forward, backward, AdamW, EMA). DFM and FM steps
alternate for `--rounds` rounds after `--warmup` steps each; a batch that does not fit is halved
until it does (the batch used is reported).

Per row: median step time, images/s, FLOPs per step from XLA's cost analysis of the step
(lowered with the blocks unrolled, see ``common.step_flops``) and from the analytic count
3 x forward (matmuls 2 x tokens x (4 + 2 x mlp_ratio) x D^2 per block, attention
4 x tokens^2 x D per block, patch embeddings and heads), and the FLOP
utilisation = FLOPs / step time / (`--peak-tflops`, default 989: H100 SXM dense bf16). With
`--remat` XLA's count includes the recomputation, the analytic one does not.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile

import jax

import common
from dfm_jax.config_defaults import base_config, flow_matching_twin
from dfm_jax.dit import REMAT_POLICIES

TINY = (64, 2, 2)  # hidden, depth, heads of the --quick model


def make_configs(size: str, tokens: int, batch: int, workdir: str, args) -> dict:
  side = 2 * math.isqrt(tokens)
  if (side // 2) ** 2 != tokens:
    raise ValueError(f"tokens must be a square number, got {tokens}")
  c = base_config()
  c.batch_size = batch
  if size == "tiny":
    c.model.size = "custom"
    c.model.hidden_size, c.model.depth, c.model.num_heads = TINY
  else:
    c.model.size = size
  c.model.patch_size = 1
  c.model.dtype = args.dtype
  c.model.residual_dtype = args.residual_dtype
  c.model.scan_unroll = args.scan_unroll
  c.model.remat = args.remat  # the config's alias: True with policy 'none' means 'full'
  c.model.remat_policy = args.remat_policy
  c.decomposition.num_stages = 2
  c.flow.stage_probs = (0.9, 0.1)
  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)
  dfm = common.latent_config(c, workdir, side, args.channels)
  dfm.data.num_classes = 1000
  both = {"DFM": dfm, "FM": flow_matching_twin(dfm)}
  return {name: both[name] for name in args.methods.split(",")}


def analytic_flops(config) -> float:
  """Training FLOPs per step: 3 x the forward's matmul and attention FLOPs."""
  from dfm_jax import experiment  # pylint: disable=g-import-not-at-top

  model = experiment.from_config(config, 1, check_data=False).model
  return config.batch_size * model.train_flops_per_sample()


def is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure_pair(size: str, tokens: int, batch: int, workdir: str, args):
  """Times DFM and FM at the largest batch <= ``batch`` that fits; returns (batch, rows)."""
  while batch >= 1:
    steps = None
    try:
      configs = make_configs(size, tokens, batch, workdir, args)
      steps = common.build_train_steps(configs, count_flops=not args.skip_xla_flops)
      times = common.interleaved_times(steps, rounds=args.rounds, warmup=args.warmup)
      if args.profile:  # two more steps of each method, traced (a Perfetto JSON beside XPlane)
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
          for step in list(steps.values()) * 2:
            step()
      rows = {}
      for name, step in steps.items():
        model = step.run.exp.model  # the DiTConfig as built (aliases resolved)
        mem = step.compiled.memory_analysis()
        rows[name] = dict(
          model=f"DiT-{size}/2",
          tokens=tokens,
          method=name,
          batch=batch,
          residual=model.residual_dtype,
          remat=model.remat_policy,
          scan_unroll=model.scan_unroll,
          step_ms=common.median(times[name]) * 1e3,
          images_per_s=batch / common.median(times[name]),
          xla_tflop=step.flops / 1e12,
          analytic_tflop=analytic_flops(configs[name]) / 1e12,
          params_m=step.num_params / 1e6,
          temp_gib=(mem.temp_size_in_bytes / 2**30) if mem is not None else float("nan"),
        )
      if len(rows) == 2:
        rows["DFM"]["dfm_fm_time"] = common.paired_ratio(times["DFM"], times["FM"])[0]
      return batch, list(rows.values())
    except Exception as err:  # pylint: disable=broad-except
      if not is_oom(err):
        raise
      print(f"DiT-{size}/2 {tokens} tokens: batch {batch} does not fit, halving", flush=True)
      batch //= 2
    finally:
      del steps
      gc.collect()
  return 0, []


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="B,XL", help="DiT sizes (S, B, L, XL; tiny = --quick)")
  parser.add_argument("--tokens", default="256,1024", help="token counts (square numbers)")
  parser.add_argument("--batch", type=int, default=32, help="global batch to try first")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--channels", type=int, default=16, help="latent channels")
  parser.add_argument(
    "--residual-dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="the residual stream's dtype (model.residual_dtype)",
  )
  parser.add_argument(
    "--scan-unroll",
    type=int,
    default=0,
    help="blocks per scan iteration (model.scan_unroll; 0: auto, all of them on GPUs)",
  )
  parser.add_argument("--remat", action="store_true", help="rematerialise each block (full)")
  parser.add_argument(
    "--remat-policy", default="none", choices=REMAT_POLICIES, help="model.remat_policy"
  )
  parser.add_argument(
    "--methods",
    default="DFM,FM",
    help="DFM,FM times both alternately (and reports their ratio); one of them alone leaves "
    "room for a larger batch",
  )
  parser.add_argument("--rounds", type=int, default=10, help="timed steps per method")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=989.0,
    help="peak FLOP/s of one device in TFLOP/s (H100 SXM dense bf16: 989)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny model, 16 and 64 tokens, batch 4, 2 rounds: checks the script",
  )
  parser.add_argument(
    "--skip-xla-flops",
    action="store_true",
    help="skip XLA's FLOP count (lowering the unrolled step; it comes back empty on GPUs)",
  )
  parser.add_argument(
    "--profile", default="", help="trace two extra steps per method into this folder"
  )
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)
  if not args.methods or not set(args.methods.split(",")) <= {"DFM", "FM"}:
    parser.error(f"--methods takes DFM, FM or DFM,FM, got {args.methods!r}")
  if args.quick:
    args.sizes, args.tokens, args.batch, args.rounds, args.warmup = "tiny", "16,64", 4, 2, 1

  report.say(common.machine_summary())
  report.say(
    f"dtype {args.dtype}, residual {args.residual_dtype}, remat {args.remat_policy}, "
    f"{os.environ.get('XLA_FLAGS', 'no XLA_FLAGS')}, peak {args.peak_tflops:g} TFLOP/s, "
    f"{args.rounds} timed steps per method after {args.warmup} warm-up steps"
  )
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for size in args.sizes.split(","):
      for tokens in (int(t) for t in args.tokens.split(",")):
        _, rows = measure_pair(size, tokens, args.batch, workdir, args)
        results += rows
  peak = args.peak_tflops
  for r in results:
    r["mfu_xla"] = r["xla_tflop"] / (r["step_ms"] / 1e3) / peak
    r["mfu_analytic"] = r["analytic_tflop"] / (r["step_ms"] / 1e3) / peak
  table = [
    [
      r["model"],
      r["tokens"],
      r["method"],
      r["batch"],
      r["residual"],
      r["remat"],
      f"{r['step_ms']:.1f}",
      f"{r['images_per_s']:.1f}",
      r["xla_tflop"] * 1e3,
      r["analytic_tflop"] * 1e3,
      100 * r["mfu_xla"],
      100 * r["mfu_analytic"],
      f"{r['params_m']:.1f}",
      f"{r['temp_gib']:.2f}",
      f"{r['dfm_fm_time']:.3f}" if "dfm_fm_time" in r else "",
    ]
    for r in results
  ]
  report.table(
    f"Training throughput, {jax.devices()[0].device_kind}, {args.dtype}",
    [
      "model",
      "tokens",
      "method",
      "batch",
      "residual",
      "remat",
      "step ms",
      "images/s",
      "XLA GFLOP/step",
      "analytic GFLOP/step",
      "MFU % (XLA)",
      "MFU % (analytic)",
      "Mparams",
      "temp GiB",
      "DFM/FM time",
    ],
    table,
  )
  report.records.update(args=vars(args), rows=results)
  if not results:
    raise SystemExit("no configuration fitted in memory")
  last = results[-1]
  report.finish(
    f"{last['method']} {last['model']} {last['tokens']} tokens: "
    f"{last['images_per_s']:.1f} images/s, MFU {100 * last['mfu_analytic']:.3g}% "
    f"(analytic FLOPs, peak {peak:g} TFLOP/s)"
  )


if __name__ == "__main__":
  main()
