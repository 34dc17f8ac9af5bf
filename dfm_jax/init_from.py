"""Starting a run from another run's weights (``config.init_from``): plain fine-tuning, or a
pretrained single-stage (flow matching) model fine-tuned into DFM (paper section 4.5, appendix E).

Source: a workdir (its newest intact checkpoint, found, verified and, if damaged, quarantined
exactly as a resume would) or one step directory ``WORKDIR/checkpoints/STEP`` (verified against
its checksums; a damaged step is an error). The source's ``config.json`` rebuilds its model.

What is copied: the source's EMA weights initialise both the new parameters and the new EMA.
The EMA is the source's released model (what its sampling and evaluation use); its raw
parameters are the noisier last iterate. The optimizer state and the step start fresh (step 0,
warm-up again), as in the paper's fine-tuning runs. The run only uses ``init_from`` when its
own workdir has no checkpoint: a restarted fine-tuning run resumes from its own checkpoints.

Stage mapping (each target stage takes one source stage, or is new):

- same stages (shapes and patches): every tensor copies (FM -> FM, DFM -> DFM);
- one source stage -> S stages: the transformer blocks and the label embedding copy; the
  coarsest target stage whose size ``[(T,) H, W]`` and patch equal the source's takes its
  patch embedding, timestep embedder and head (``model.stage_upsample = (2, 1)`` makes the
  coarse stage fit a pretrained model on the full-size sample, as in the paper); the other
  stages are new and output exactly zero at the start: their patch embedding and the last layer
  of their timestep embedder are zero (the first layer keeps its fresh initialisation, else
  neither layer would ever get a gradient) and their head is zero (adaLN-Zero, as always).
  Every row of the stage-index embedding gets the source's row (zero if the source has none),
  so the conditioning is the source's whatever the stage index.
- the per-stage data statistics (preconditioning) of mapped stages come from the source, the
  network having been trained with that input scaling; new stages keep the estimated ones.

Invariant: the target's velocity for a mapped stage equals the source's on the same input,
time and label, whatever the new stages' inputs and times (t = 0 noise, t = 1 data) -- adding
an exact zero changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from dfm_jax import checkpoint, config_defaults, dit
from dfm_jax.errors import InitFromMismatchError
from dfm_jax.run import Run, setup

STAGE_MODULES = ("embedders", "time_embedders", "heads")
CACHES = ("rope_cos", "rope_sin", "pos")  # derived from the config, never copied
STATS = ("data_mean", "data_std")
# Fields that change the function without changing any tensor's shape.
FUNCTION_FIELDS = ("num_heads", "pos_embed", "precondition", "time_scale", "freq_dim")


@dataclasses.dataclass
class Source:
  """A resolved, validated source: its run, the step to load and the tensor plan."""

  path: str
  run: Run
  step: int | None  # None: the newest intact step
  stage_of: tuple[int | None, ...]  # per target stage: the source stage it takes, or None
  plan: dict[str, Callable]  # target tensor name -> fn(source flat dict, target leaf)


def resolve(path: str) -> tuple[str, int | None]:
  """``(source workdir, step or None)`` of a workdir, its ``checkpoints/`` or a step folder."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"config.init_from={path} does not exist")
  if (p / "checkpoints").is_dir():
    return str(p), None
  if p.name == "checkpoints" and p.is_dir():
    return str(p.parent), None
  if p.name.isdigit() and p.parent.name == "checkpoints" and p.is_dir():
    return str(p.parent.parent), int(p.name)
  raise FileNotFoundError(
    f"config.init_from={path} is neither a workdir with a checkpoints/ folder nor a checkpoint "
    "step folder WORKDIR/checkpoints/STEP"
  )


def source_config(workdir: str, target: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The source run's ``config.json`` with the target's mesh (the source is restored onto this
  run's devices)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
      f"config.init_from: {path} is missing, so the source model cannot be rebuilt"
    )
  return config_defaults.from_saved(json.loads(path.read_text()), target)


def prepare(path: str, run: Run) -> Source:
  """Resolves ``path``, rebuilds the source model and checks that it maps onto ``run``'s;
  reads no arrays. Raises ``InitFromMismatchError`` naming the tensors that differ."""
  workdir, step = resolve(path)
  config = source_config(workdir, run.config)
  try:
    src_run = setup(config, workdir, check_data=False)
  except ValueError as e:
    raise ValueError(f"config.init_from={path}: cannot rebuild its model: {e}") from e
  src_cfg, dst_cfg = src_run.exp.model, run.exp.model
  problems = [
    f"model {f} {getattr(src_cfg, f)!r} vs {getattr(dst_cfg, f)!r}"
    for f in FUNCTION_FIELDS
    if getattr(src_cfg, f) != getattr(dst_cfg, f)
  ]
  stage_of = stage_map(src_cfg, dst_cfg, problems)
  plan = {}
  if stage_of is not None:
    plan = tensor_plan(
      shapes(abstract_model(src_run, "ema")),
      shapes(abstract_model(run, "model")),
      stage_of,
      problems,
    )
  if problems:
    shown = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
    raise InitFromMismatchError(
      f"config.init_from={path}: its model (source) does not fit this one (model): {shown}"
    )
  return Source(path, src_run, step, stage_of, plan)


def abstract_model(run: Run, which: str) -> dict:
  return nnx.to_pure_dict(run.abstract_state[which])


def stage_map(src: dit.DiTConfig, dst: dit.DiTConfig, problems: list[str]):
  """Per target stage, the source stage whose modules it takes (None: a new stage)."""
  src_grid, src_patches = dit.token_layout(src.stage_shapes, src.patch_size)
  dst_grid, dst_patches = dit.token_layout(dst.stage_shapes, dst.patch_size)
  src_layout = list(zip(src.stage_shapes, src_patches))
  dst_layout = list(zip(dst.stage_shapes, dst_patches))
  describe = lambda layout: ", ".join(f"{s} patch {p}" for s, p in layout)
  if src_grid != dst_grid:
    problems.append(f"token grid {src_grid} vs {dst_grid}")
    return None
  # Channels are left to the tensor checks, which name the tensors they change.
  src_layout = [(shape[:-1], p) for shape, p in src_layout]
  dst_layout = [(shape[:-1], p) for shape, p in dst_layout]
  if src_layout == dst_layout:
    return tuple(range(len(dst_layout)))
  if len(src_layout) == 1:
    for s, layout in enumerate(dst_layout):
      if layout == src_layout[0]:
        return tuple(0 if i == s else None for i in range(len(dst_layout)))
  problems.append(
    f"stages ({describe(src_layout)}) vs ({describe(dst_layout)}): a one-stage source needs a "
    "stage of the same size and patch (model.stage_upsample can enlarge a coarse stage); a "
    "multi-stage source needs the same stages"
  )
  return None


def shapes(tree) -> dict[str, tuple[int, ...]]:
  return {name: tuple(leaf.shape) for name, leaf in flatten(tree).items()}


def flatten(tree) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a nested dict."""
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _zero_at_start(rest: str, module: str) -> bool:
  """Whether a new stage's tensor starts at zero (the module's output layer)."""
  return module != "time_embedders" or rest.startswith("fc2/")


def tensor_plan(src: dict, dst: dict, stage_of, problems: list[str]) -> dict[str, Callable]:
  """Target tensor name -> ``fn(source flat dict, target leaf) -> value``; every shape that
  differs, target tensor without a source and unused source tensor is added to ``problems``."""
  plan, used = {}, set()

  def take(name, dst_name):
    if name not in src:
      problems.append(f"{dst_name} {dst[dst_name]} has no source tensor {name}")
    elif src[name] != dst[dst_name]:
      problems.append(f"{dst_name} source {src[name]} vs model {dst[dst_name]}")
    used.add(name)
    # a copy: the model and the EMA must not share (donated) buffers
    plan[dst_name] = lambda s, d, name=name: jnp.copy(s[name])

  mapped = [s for s in stage_of if s is not None]
  for name in dst:
    parts = name.split("/")
    if parts[0] in CACHES:
      plan[name] = lambda s, d: d
    elif parts[0] in STAGE_MODULES:
      module, stage, rest = parts[0], int(parts[1]), "/".join(parts[2:])
      if stage_of[stage] is not None:
        take(f"{module}/{stage_of[stage]}/{rest}", name)
      elif _zero_at_start(rest, module):
        plan[name] = lambda s, d: jnp.zeros_like(d)
      else:
        plan[name] = lambda s, d: d
    elif parts[0] in STATS:
      used.add(name)
      plan[name] = lambda s, d, name=name: d.at[
        np.asarray([i for i, j in enumerate(stage_of) if j is not None])
      ].set(s[name][np.asarray(mapped)])
    elif name == "stage_embed/embedding":
      if name not in src:
        plan[name] = lambda s, d: jnp.zeros_like(d)
        continue
      used.add(name)
      if src[name][1:] != dst[name][1:]:
        problems.append(f"{name} source {src[name]} vs model {dst[name]}")
      rows = np.asarray([j if j is not None else mapped[0] for j in stage_of])
      plan[name] = lambda s, d, name=name: s[name][rows]
    else:
      take(name, name)
  unused = sorted(n for n in src if n not in used and n.split("/")[0] not in CACHES + STAGE_MODULES)
  problems += [f"{n} {src[n]} is not in this model" for n in unused]
  return plan


def load(source: Source) -> dict:
  """The source's EMA weights as a flat {name: array} dict, verified against its checksums."""
  src_run = source.run
  ckpt = checkpoint.Checkpointer(src_run.checkpoint_dir, keep=1 << 30, async_save=False)
  try:
    if source.step is None:
      step, state = ckpt.restore_latest(src_run.abstract_state)
      if state is None:
        raise FileNotFoundError(
          f"config.init_from={source.path}: no intact checkpoint in {src_run.checkpoint_dir}"
        )
    else:
      step, state = source.step, ckpt.restore(source.step, src_run.abstract_state)
  finally:
    ckpt.close()
  logging.info("initialising from the EMA weights of %s, step %d", src_run.checkpoint_dir, step)
  return flatten(nnx.to_pure_dict(state["ema"]))


def apply(source: Source, run: Run, state: nnx.State) -> nnx.State:
  """``state`` (a fresh train state) with its model and EMA (and snapshot, when the method keeps
  one) set from the source's EMA."""
  src = load(source)
  pure = nnx.to_pure_dict(state)
  for which in [w for w in ("model", "ema", "snapshot") if w in pure]:
    flat = flatten(pure[which])
    values = {name: source.plan[name](src, leaf) for name, leaf in flat.items()}
    pure[which] = jax.tree_util.tree_map_with_path(
      lambda p, _: values["/".join(str(getattr(k, "key", k)) for k in p)], pure[which]
    )
  nnx.replace_by_pure_dict(state, pure)
  new = [s for s, j in enumerate(source.stage_of) if j is None]
  logging.info(
    "stages %s take source stages %s%s; optimizer and step start fresh",
    [s for s, j in enumerate(source.stage_of) if j is not None],
    [j for j in source.stage_of if j is not None],
    f", new stages {new} start at zero" if new else "",
  )
  return jax.device_put(state, run.shardings)
