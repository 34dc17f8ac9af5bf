"""Compiles a config's real train step and sampler for a TPU topology on a machine without TPUs.

  python -m dfm_jax.compile_check --config=configs/imagenet512.py --topology=v5p-64 \
      [--mesh=dp,fsdp] [--config.batch_size=512 ...]

As MaxText's ``train_compile.py``: libtpu describes the topology's devices
(``jax.experimental.topologies.get_topology_desc``), the run is set up over those devices
(``train.setup``: the same mesh, abstract state and shardings as training) and the train step is
lowered exactly as the training loop lowers it (``train.lower_step``) with
``jax.ShapeDtypeStruct`` inputs carrying their shardings, then compiled by the TPU compiler. No
data is read and no array is allocated. The sampler (``generate.make_sample_fn``) is compiled at
``sampler.batch_size`` the same way.

Reported per device, from ``compiled.memory_analysis()``: arguments, outputs, aliased (donated)
bytes, temporaries and generated code; their total (arguments + outputs - aliased + temporaries +
code) is compared with the chip's HBM. A program that does not fit prints a ``DOES NOT FIT`` line
(also when the TPU compiler itself refuses it for lack of HBM) and the command exits with 1.

FLOPs per step come from XLA's cost analysis. XLA counts a loop body once, whatever its trip
count, and the DiT scans its blocks; the TPU compiler also unrolls short loops by itself, so the
compiled step's own count holds anywhere between one and all blocks (it is printed as "XLA's
count of the compiled step"). The reported figure is exact instead: XLA's count of the step with
``model.scan_unroll = depth`` (every block unrolled, as ``bench/common.py`` counts), lowered for
the global batch on the host CPU before partitioning (no compile), divided by the device count
(data parallelism and FSDP split all model work evenly; the elementwise optimizer update that
data parallelism repeats on every device is under 0.1% of it). ``--flops=compiled`` instead
compiles the unrolled step for the topology and takes the per-device count of that program
(exact per device, one more and slower compile).

Needs libtpu (``pip install -r requirements-tpu-compile.txt``); JAX itself stays on the CPU.
"""

from __future__ import annotations

import os

# Compile-only TPU devices need libtpu but no TPU: keep JAX's own backend on the CPU, stop
# libtpu from asking the (absent) GCE metadata server about the machine, and let it load while
# another process holds libtpu's lockfile (no chip is opened).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Sequence  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dfm_jax.errors import CompileCheckError
from dfm_jax.hardware import TPU_PEAK_TFLOPS  # noqa: E402

GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Topologies


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice as libtpu's topology description needs it, with the chip's figures."""

  name: str  # the accelerator type, e.g. "v5p-64" (v4 / v5p count TensorCores, 2 per chip)
  topology_name: str  # libtpu's, e.g. "v5:2x4x4"
  chip_config_name: str  # "megacore" (one JAX device per chip) or "default"
  chips_per_host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]  # torus wrap-around links per axis
  hbm_gib: float  # HBM per chip
  peak_tflops: float  # dense bf16 per chip

  @property
  def num_chips(self) -> int:
    return int(np.prod([int(v) for v in self.topology_name.split(":")[1].split("x")]))


# Chips -> slice shape. v4 / v5p slices are 3D (full cubes of 4x4x4 and up have wrap-around
# links), v5e / v6e slices 2D (a 16-chip axis wraps). As the Cloud TPU documentation lists them.
_CUBES = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
  4096: (16, 16, 16),
}
_PLANES = {
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}
# family: (libtpu prefix, chip config, TensorCores per chip in the name, HBM GiB, bf16 TFLOP/s)
# HBM from the Cloud TPU system-architecture pages (v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB;
# the check takes them as GiB, which is what the runtime's per-chip limit is close to).
_FAMILIES = {
  "v4": ("v4", "megacore", 2, 32.0, TPU_PEAK_TFLOPS["v4"]),
  "v5p": ("v5", "megacore", 2, 95.0, TPU_PEAK_TFLOPS["v5p"]),
  "v5e": ("v5e", "default", 1, 16.0, TPU_PEAK_TFLOPS["v5e"]),
  "v6e": ("v6e", "default", 1, 32.0, TPU_PEAK_TFLOPS["v6e"]),
}


def _topology_for(family: str, chips: int) -> Topology:
  prefix, chip_config, cores, hbm, peak = _FAMILIES[family]
  if family in ("v4", "v5p"):
    shape = _CUBES[chips]
    wrap = (chips >= 64,) * 3
    per_host = (2, 2, 1)
  else:
    shape = _PLANES[chips]
    wrap = (shape[0] == 16, shape[1] == 16, False)
    per_host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
  return Topology(
    f"{family}-{chips * cores}",
    f"{prefix}:{'x'.join(map(str, shape))}",
    chip_config,
    per_host,
    wrap,
    hbm,
    peak,
  )


TOPOLOGIES = {
  t.name: t
  for t in (
    [_topology_for(f, c) for f in ("v4", "v5p") for c in _CUBES]
    + [_topology_for(f, c) for f in ("v5e", "v6e") for c in _PLANES]
  )
}


def lookup_topology(name: str) -> Topology:
  if name not in TOPOLOGIES:
    families = {}
    for key in TOPOLOGIES:
      fam, n = key.split("-")
      families.setdefault(fam, []).append(n)
    known = "; ".join(f"{f}-{{{','.join(v)}}}" for f, v in families.items())
    raise CompileCheckError(f"unknown TPU topology {name!r}; known: {known}")
  return TOPOLOGIES[name]


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """Compile-only devices of ``num_slices`` slices of ``topology`` (needs libtpu, no TPU)."""
  if importlib.util.find_spec("libtpu") is None:
    raise CompileCheckError(
      "libtpu is not installed, so TPU programs cannot be compiled here: "
      "pip install -r requirements-tpu-compile.txt"
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    desc = topologies.get_topology_desc(
      topology_name=topology.topology_name,
      platform="tpu",
      chip_config_name=topology.chip_config_name,
      chips_per_host_bounds=topology.chips_per_host_bounds,
      num_slices=num_slices,
      wrap=topology.wrap,
    )
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CompileCheckError(
      f"libtpu could not describe {topology.name} ({topology.topology_name}): {first}"
    ) from e
  return list(desc.devices)


# ---------------------------------------------------------------------------------------------
# Runs over the topology's devices

MESHES = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1)}


def with_mesh(config: ml_collections.ConfigDict, mesh: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` on mesh ``dp`` (data parallel), ``fsdp`` or ``config`` (its own)."""
  config = copy.deepcopy(config)
  if mesh != "config":
    if mesh not in MESHES:
      raise CompileCheckError(f"unknown mesh {mesh!r}; choose from dp, fsdp, config")
    config.mesh.shape = MESHES[mesh]
  return config


def build_run(config: ml_collections.ConfigDict, devices):
  """``train.setup`` over ``devices``, reading no data. Per-stage standardisation is switched
  off: its statistics are constants of the step that change no shape, buffer or FLOP."""
  from dfm_jax import train  # pylint: disable=g-import-not-at-top

  config = copy.deepcopy(config)
  config.decomposition.standardize = False
  return train.setup(config, None, devices, check_data=False)


def batch_shapes(run) -> dict:
  """``{name: (shape, dtype)}`` of a global training batch as the input pipeline yields it."""
  b = int(run.config.batch_size)
  return {"image": ((b,) + tuple(run.exp.sample_shape), np.float32), "label": ((b,), np.int32)}


# ---------------------------------------------------------------------------------------------
# Compiling and measuring


@dataclasses.dataclass
class Memory:
  """Per-device bytes of a compiled program (``compiled.memory_analysis()``)."""

  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @classmethod
  def of(cls, compiled) -> "Memory":
    m = compiled.memory_analysis()
    return cls(
      int(m.argument_size_in_bytes),
      int(m.output_size_in_bytes),
      int(m.alias_size_in_bytes),
      int(m.temp_size_in_bytes),
      int(m.generated_code_size_in_bytes),
    )


@dataclasses.dataclass
class Result:
  """One compiled program on one mesh."""

  program: str  # "train step" | "sampler"
  mesh: str
  mesh_shape: tuple[int, int, int]
  batch: int  # global
  hbm_bytes: int
  memory: Memory | None = None
  error: str = ""  # the compiler's message when it refused the program
  flops: float = float("nan")  # per device per step, every block counted
  flops_compiled: float = float("nan")  # XLA's count of the compiled (scanned) step
  compile_s: float = 0.0

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.memory.total <= self.hbm_bytes

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["fits"] = self.fits
    d["total"] = self.memory.total if self.memory else None
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Result":
    """The inverse of :meth:`to_dict` (a ``--json`` file's results)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    r = cls(**{k: v for k, v in d.items() if k in fields})
    r.mesh_shape = tuple(r.mesh_shape)
    r.memory = Memory(**d["memory"]) if d["memory"] else None
    return r


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def _out_of_memory(e: Exception) -> str | None:
  """The compiler's one-line reason when ``e`` says the program does not fit in HBM."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  used = [ln for ln in lines if ln.startswith("Used ") or "out of memory" in ln.lower()]
  return (used[0] if used else lines[0])[:300]


def compile_train_step(run) -> jax.stages.Compiled:
  from dfm_jax import train  # pylint: disable=g-import-not-at-top

  lowered = train.lower_step(run, batch_shapes(run))
  with jax.set_mesh(run.mesh):
    return lowered.compile()


def compile_sampler(run, batch: int) -> jax.stages.Compiled:
  """``make_sample_fn`` for the weights the method samples with (``Method.sampling_state``: the
  EMA weights), compiled for ``batch`` labels.

  Key and labels get no sharding, as the eager arrays ``sample_images`` passes; the weights carry
  the run's shardings."""
  try:
    from dfm_jax.sampling import make_sample_fn  # pylint: disable=g-import-not-at-top
  except ImportError:  # before the sampling module replaced generate.py
    from dfm_jax.generate import make_sample_fn  # pylint: disable=g-import-not-at-top
  # sampler.auto_schedule only moves steps between stages: the same scan, the same program.
  cfg = dataclasses.replace(run.exp.sampler, auto_schedule=False)
  fn = make_sample_fn(run.ema_graphdef(), run.exp, cfg)
  key = jax.eval_shape(lambda: jax.random.key(0))
  labels = jax.ShapeDtypeStruct((batch,), np.int32)
  with jax.set_mesh(run.mesh):
    return fn.lower(run.exp.method.sampling_state(run.abstract_state), key, labels).compile()


def _dump(compiled, dump_dir: str | None, name: str) -> None:
  """Writes the optimised HLO of ``compiled`` (with its buffer assignment) for inspection."""
  if compiled is None or not dump_dir:
    return
  os.makedirs(dump_dir, exist_ok=True)
  with open(os.path.join(dump_dir, name + ".hlo.txt"), "w") as f:
    f.write(compiled.as_text())


def _measure(result: Result, compile_fn) -> jax.stages.Compiled | None:
  start = time.perf_counter()
  try:
    compiled = compile_fn()
  except Exception as e:  # pylint: disable=broad-except
    reason = _out_of_memory(e)
    if reason is None:
      raise
    result.error = reason
    return None
  finally:
    result.compile_s = time.perf_counter() - start
  result.memory = Memory.of(compiled)
  return compiled


def _unrolled(config: ml_collections.ConfigDict, depth: int) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  config.model.scan_unroll = depth
  return config


def step_flops(config: ml_collections.ConfigDict, depth: int) -> float:
  """XLA's FLOP count of one global train step with all ``depth`` blocks unrolled, from the
  step lowered on one host CPU device (before partitioning; nothing is compiled)."""
  from dfm_jax import train  # pylint: disable=g-import-not-at-top

  config = _unrolled(config, depth)
  config.mesh.shape = (1, 1, 1)
  run = build_run(config, jax.devices("cpu")[:1])
  return _flops(train.lower_step(run, batch_shapes(run)))


def check(
  config: ml_collections.ConfigDict,
  topology: Topology,
  meshes: Sequence[str],
  devices=None,
  sampler: bool = True,
  sample_batch: int = 0,
  flops: str = "lowered",
  dump_dir: str | None = None,
  log=print,
) -> list[Result]:
  """Compiles the train step (and the sampler) of ``config`` for ``topology`` on each mesh.

  ``flops``: ``lowered`` (the exact global count / devices), ``compiled`` (one more compile with
  every block unrolled) or ``none``. ``dump_dir``: also write each program's optimised HLO there.
  """
  if flops not in ("lowered", "compiled", "none"):
    raise CompileCheckError(f"--flops must be lowered, compiled or none, got {flops!r}")
  devices = devices if devices is not None else topology_devices(topology)
  hbm = int(topology.hbm_gib * GIB)
  results = []
  global_flops = None  # the same for every mesh
  for mesh_name in meshes:
    cfg = with_mesh(config, mesh_name)
    run = build_run(cfg, devices)
    shape = tuple(run.mesh.devices.shape)
    res = Result("train step", mesh_name, shape, int(cfg.batch_size), hbm)
    log(
      f"[{topology.name} {mesh_name} {shape}] compiling the train step "
      f"(global batch {cfg.batch_size}) ..."
    )
    compiled = _measure(res, lambda: compile_train_step(run))  # pylint: disable=cell-var-from-loop
    _dump(compiled, dump_dir, f"{topology.name}_{mesh_name}_train_step")
    depth = run.exp.model.depth
    if compiled is not None and flops != "none":
      res.flops_compiled = _flops(compiled)
    if flops == "lowered" or (compiled is not None and flops == "compiled"):
      if flops == "compiled":
        log(
          f"[{topology.name} {mesh_name} {shape}] compiling it with every block unrolled to "
          "count its FLOPs ..."
        )
        res.flops = _flops(compile_train_step(build_run(_unrolled(cfg, depth), devices)))
      else:
        if global_flops is None:
          global_flops = step_flops(cfg, depth)
        res.flops = global_flops / run.mesh.size
    results.append(res)
    log(format_result(res, topology))
    if sampler:
      b = int(sample_batch or cfg.sampler.batch_size)
      sres = Result("sampler", mesh_name, shape, b, hbm)
      log(f"[{topology.name} {mesh_name} {shape}] compiling the sampler (batch {b}) ...")
      _dump(
        _measure(sres, lambda: compile_sampler(run, b)),  # pylint: disable=cell-var-from-loop
        dump_dir,
        f"{topology.name}_{mesh_name}_sampler",
      )
      results.append(sres)
      log(format_result(sres, topology))
      from dfm_jax import sharding  # pylint: disable=g-import-not-at-top

      ways = sharding.batch_devices(run.mesh)
      if b % ways:
        # The batch sharding rule then leaves the batch unsplit: every device samples all of it.
        log(
          f"  note: the sampler batch {b} does not divide over the {ways} batch-sharding "
          f"devices, so each of them samples the whole batch; a multiple of {ways} "
          "(sampler.batch_size, --sample_batch) splits it"
        )
  return results


# ---------------------------------------------------------------------------------------------
# Output


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def format_result(r: Result, topology: Topology) -> str:
  head = (
    f"  {r.program}, mesh {r.mesh} {r.mesh_shape}, global batch {r.batch}, "
    f"compiled in {r.compile_s:.0f} s"
  )
  if r.memory is None:
    return (
      f"{head}\n  DOES NOT FIT: the TPU compiler ran out of HBM ({topology.hbm_gib:g} GiB "
      f"per chip): {r.error}"
    )
  m = r.memory
  lines = [
    head,
    f"  per device (GiB): arguments {_gib(m.arguments)}, outputs "
    f"{_gib(m.outputs)}, aliased {_gib(m.aliased)}, temporaries "
    f"{_gib(m.temporaries)}, generated code {_gib(m.code)}; total {_gib(m.total)} "
    f"of {topology.hbm_gib:g} ({100 * m.total / r.hbm_bytes:.0f}%)",
  ]
  if not np.isnan(r.flops):
    lines.append(
      f"  FLOPs per device per step: {r.flops / 1e9:.1f} GFLOP (XLA's count of the "
      f"compiled step: {r.flops_compiled / 1e9:.1f}); at the chip's peak "
      f"{topology.peak_tflops:g} TFLOP/s: {r.flops / topology.peak_tflops / 1e9:.1f} "
      "ms"
    )
  if not r.fits:
    lines.append(
      f"  DOES NOT FIT: {r.program} on {topology.name} mesh {r.mesh} needs "
      f"{_gib(m.total)} GiB per device, the chip has {topology.hbm_gib:g} GiB"
    )
  return "\n".join(lines)


SUMMARY_HEAD = (
  "| config | topology (chips) | mesh | program | global batch | args | temps | total | HBM "
  "| GFLOP/step/device | ms at peak | fits |\n"
  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def summary_table(results: Sequence[Result], topology: Topology, config_name: str) -> str:
  """Markdown rows (GiB per device; FLOPs with every block counted, and the step time they
  would take at the chip's dense bf16 peak), as docs/compile_check.md quotes them."""
  rows = []
  for r in results:
    m = r.memory
    counted = not np.isnan(r.flops)
    cells = [
      config_name,
      f"{topology.name} ({topology.num_chips})",
      f"{r.mesh} {'x'.join(map(str, r.mesh_shape))}",
      r.program,
      str(r.batch),
      _gib(m.arguments) if m else "-",
      _gib(m.temporaries) if m else "-",
      f"{_gib(m.total)} ({100 * m.total / r.hbm_bytes:.0f}%)" if m else "> HBM",
      f"{topology.hbm_gib:g}",
      f"{r.flops / 1e9:,.0f}" if counted else "",
      f"{r.flops / topology.peak_tflops / 1e9:.0f}" if counted else "",
      "yes" if r.fits else "**NO**",
    ]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join([SUMMARY_HEAD] + rows)


def summary_of_json(d: dict) -> str:
  """The table a ``--json`` file's run printed, from the file."""
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d["topology"].items()}
  results = [Result.from_dict(r) for r in d["results"]]
  return summary_table(results, Topology(**fields), d["config"])


def config_name(config_path: str, argv: Sequence[str]) -> str:
  """The config's label with the command line's config overrides: ``imagenet512
  model.remat_policy=none``."""
  overrides = []
  for i, a in enumerate(argv):
    if a.startswith("--config."):
      value = "" if "=" in a or i + 1 == len(argv) else "=" + argv[i + 1]
      overrides.append(a[len("--config.") :] + value)
  return " ".join([config_label(config_path)] + overrides)


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU accelerator type, e.g. v4-32, v5p-64, v5e-256.")
  flags.DEFINE_list(
    "mesh",
    ["dp", "fsdp"],
    "Meshes: dp = (-1, 1, 1), fsdp = (1, -1, 1), config = the config's mesh.shape.",
  )
  flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multislice over DCN).")
  flags.DEFINE_bool("sampler", True, "Also compile the sampler.")
  flags.DEFINE_integer("sample_batch", 0, "Sampler batch (0: the config's sampler.batch_size).")
  flags.DEFINE_enum(
    "flops",
    "lowered",
    ["lowered", "compiled", "none"],
    "FLOPs of the step with every block unrolled: lowered on the host (global "
    "count / devices), compiled for the topology (one more compile), or none.",
  )
  flags.DEFINE_string(
    "json", None, "Also write the results, with the command, host and versions, to this JSON file."
  )
  flags.DEFINE_string("dump_hlo", None, "Also write each compiled program's HLO to this folder.")
  flags.mark_flags_as_required(["config", "topology"])


def config_label(path: str) -> str:
  """``configs/imagenet512.py:fm`` -> ``imagenet512:fm``."""
  base = os.path.basename(path)
  stem, _, arg = base.partition(":")
  stem = os.path.splitext(stem)[0]
  return f"{stem}:{arg}" if arg else stem


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    print(f"compile_check: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  f = flags.FLAGS
  try:
    topology = lookup_topology(f.topology)
    for m in f.mesh:
      with_mesh(f.config, m)
    devices = topology_devices(topology, f.num_slices)
    if f.json:  # before the compiles, not after them
      from etils import epath  # pylint: disable=g-import-not-at-top

      from dfm_jax import storage  # pylint: disable=g-import-not-at-top

      storage.check_writable(epath.Path(f.json).parent, "--json results")
  except (CompileCheckError, OSError) as e:
    print(f"compile_check: {e}", file=sys.stderr)
    return 2
  name = config_name(config_flags.get_config_filename(f["config"]), sys.argv[1:])
  print(
    f"{topology.name}: {len(devices)} devices ({devices[0].device_kind}), libtpu topology "
    f"{topology.topology_name} x {f.num_slices} slice(s), {topology.hbm_gib:g} GiB HBM "
    f"per chip; jax {jax.__version__}",
    flush=True,
  )
  try:
    results = check(
      f.config,
      topology,
      f.mesh,
      devices,
      sampler=f.sampler,
      sample_batch=f.sample_batch,
      flops=f.flops,
      dump_dir=f.dump_hlo,
      log=lambda s: print(s, flush=True),
    )
  except (ValueError, CompileCheckError) as e:  # e.g. batch not divisible by the mesh
    print(f"compile_check: {e}", file=sys.stderr)
    return 2
  print("\n" + summary_table(results, topology, name))
  if f.json:
    from dfm_jax import provenance, storage  # pylint: disable=g-import-not-at-top

    command = ["-m", "dfm_jax.compile_check"] + sys.argv[1:]
    storage.write_json(
      f.json,
      {
        "provenance": provenance.provenance(command),
        "topology": dataclasses.asdict(topology),
        "config": name,
        "results": [r.to_dict() for r in results],
      },
    )
  bad = [r for r in results if not r.fits]
  for r in bad:
    print(f"DOES NOT FIT: {name} {r.program} on {topology.name} mesh {r.mesh}", flush=True)
  return 1 if bad else 0


def run():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  from dfm_jax import cli_errors  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(
    lambda argv: sys.exit(main(argv)),
    flags_parser=lambda argv: cli_errors.parse_flags(flags.FLAGS, argv),  # one line, exit 2
  )


if __name__ == "__main__":
  run()
