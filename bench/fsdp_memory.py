"""Per-device memory of the compiled train step with FSDP over 8 devices against one device.

  python bench/fsdp_memory.py                   # DiT-S and DiT-B, batch 8, 32x32x4 latents
  python bench/fsdp_memory.py --sizes B,L,XL --resolution 64 --patch 1 --batch 16

Eight CPU devices are forced (XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX
is imported). For each DiT size the DFM train step (2-stage Laplacian, as in
train_step_overhead.py) is compiled, not run, through ``dfm_jax.train.compile_step`` on mesh
(data, fsdp, tensor) = (1, 8, 1) and on (1, 1, 1) over the first device only. Figures per device
from XLA's ``compiled.memory_analysis()``: arguments (train state + batch), outputs, aliased
(donated) bytes and temporaries. The train state (parameters, AdamW moments, EMA) per device is
the argument size minus the batch; it is cross-checked against the sum of the shard shapes the
sharding rules assign. Ideal FSDP(8) scaling of the state is 1/8 = 0.125; parameters the rules
leave replicated (vectors on non-'embed' axes, counters) raise it.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

import common  # noqa: E402
from dfm_jax.config_defaults import base_config  # noqa: E402

MIB = 2**20


def dfm_config(size: str, workdir: str, args, mesh_shape):
  c = base_config()
  c.batch_size = args.batch
  c.model.size = size
  c.model.patch_size = args.patch
  c.decomposition.num_stages = 2
  c.flow.stage_probs = (0.9, 0.1)
  c.sampler.steps_per_stage = (30, 10)
  c.sampler.thresholds = (0.7,)
  c.mesh.shape = mesh_shape
  return common.latent_config(c, workdir, args.resolution, args.channels)


def replicated_bytes(abstract_state) -> int:
  """Bytes of the state leaves that are not split over any mesh axis."""
  return sum(
    common.leaf_bytes(x)
    for x in jax.tree.leaves(abstract_state)
    if all(a is None for a in x.sharding.spec)
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="S,B")
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--channels", type=int, default=4)
  parser.add_argument("--patch", type=int, default=2, help="patch of DFM's coarse stage")
  parser.add_argument("--batch", type=int, default=8, help="global batch (a multiple of 8)")
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)

  devices = jax.devices()
  if len(devices) < 8:
    raise SystemExit(f"needs 8 devices, found {len(devices)}: set XLA_FLAGS before JAX loads")
  report.say(common.machine_summary())
  rows, state_ratio = [], {}
  with tempfile.TemporaryDirectory() as workdir:
    for size in args.sizes.split(","):
      configs = {
        "1 device": dfm_config(size, workdir, args, (1, 1, 1)),
        "FSDP 8": dfm_config(size, workdir, args, (1, 8, 1)),
      }
      steps = common.build_train_steps(
        configs, devices={"1 device": devices[:1], "FSDP 8": devices}, initialize=False
      )
      state = {}
      for name, step in steps.items():
        mem = step.compiled.memory_analysis()
        batch = common.per_device_bytes(step.batch)
        state[name] = mem.argument_size_in_bytes - batch
        from_rules = common.per_device_bytes(step.run.abstract_state)
        rows.append(
          [
            f"DiT-{size}",
            name,
            f"{mem.argument_size_in_bytes / MIB:.1f}",
            f"{mem.output_size_in_bytes / MIB:.1f}",
            f"{mem.alias_size_in_bytes / MIB:.1f}",
            f"{mem.temp_size_in_bytes / MIB:.1f}",
            f"{state[name] / MIB:.1f}",
            f"{from_rules / MIB:.1f}",
            f"{replicated_bytes(step.run.abstract_state) / MIB:.2f}"
            if step.run.mesh.size > 1
            else "",
          ]
        )
      state_ratio[size] = state["FSDP 8"] / state["1 device"]
      rows.append([f"DiT-{size}", "FSDP/1", "", "", "", "", f"{state_ratio[size]:.3f}", "", ""])
  report.table(
    f"Train-step memory per device (MiB), batch {args.batch}, {args.resolution}x"
    f"{args.resolution}x{args.channels} latents; state = arguments - batch; rules = shard "
    f"shapes from the sharding rules; replicated = state leaves split over no axis",
    [
      "model",
      "mesh",
      "arguments",
      "outputs",
      "aliased",
      "temporaries",
      "state",
      "state (rules)",
      "replicated",
    ],
    rows,
  )
  headline = "B" if "B" in state_ratio else list(state_ratio)[-1]
  report.finish(
    f"FSDP(8)/1-device parameter+optimizer memory per device (DiT-{headline}): "
    f"{state_ratio[headline]:.2f}"
  )


if __name__ == "__main__":
  main()
