"""The config schema: every field's type and range, declared once, and the one validator.

`config_defaults.base_config` gives every field its default; `SCHEMA` here gives every field its
type and range (tests/test_config_schema.py checks that the two name the same fields, so a new
field cannot skip its check). `validate` checks a whole config against it before anything else
looks at the values; the checks between fields (a tuple per stage, a batch the mesh divides,
a method's own constraints) stay with the code that owns them (`experiment.from_config`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable
from dfm_jax.errors import InvalidConfigError

INT, FLOAT, BOOL, STR, TUPLE, ANY = "int", "float", "bool", "str", "tuple", "any"


@dataclasses.dataclass(frozen=True)
class Field:
  """One field: its type, and for numbers a range; for text a set of choices; for tuples the
  spec of every item. ``check`` is an extra rule returning a problem or None."""

  kind: str
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple[str, ...] | None = None
  item: "Field | None" = None
  optional: bool = False  # None allowed
  check: Callable[[Any], str | None] | None = None


def count(lo: int = 1) -> Field:
  return Field(INT, lo=lo)


def number(lo=None, hi=None, lo_open=False, hi_open=False, optional=False) -> Field:
  return Field(FLOAT, lo, hi, lo_open, hi_open, optional=optional)


def choice(*options: str) -> Field:
  return Field(STR, choices=options)


def items(item: Field, optional: bool = False, check=None) -> Field:
  return Field(TUPLE, item=item, optional=optional, check=check)


TEXT, FLAG = Field(STR), Field(BOOL)
OPTIONAL_TEXT = Field(STR, optional=True)
PROBABILITY = number(0.0, 1.0)
FRACTION = number(0.0, 1.0, hi_open=True)  # [0, 1)
POSITIVE = number(0.0, lo_open=True)


def _profile_steps(value) -> str | None:
  if len(value) not in (0, 2) or (len(value) == 2 and value[0] > value[1]):
    return f"must be () or (first, last) with first <= last, got {tuple(value)}"
  return None


def _three_axes(value) -> str | None:
  return (
    None if len(value) == 3 else f"must have 3 entries (data, fsdp, tensor), got {tuple(value)}"
  )


def _pair_or_pairs(value) -> str | None:
  """sampler.guidance_interval: one (lo, hi) pair, or one pair per stage (checked by the
  sampler against the stage count)."""
  pairs = value if value and isinstance(value[0], (tuple, list)) else (value,)
  for pair in pairs:
    if len(pair) != 2 or not all(_is_number(v) for v in pair):
      return f"must be a (lo, hi) pair of numbers or one pair per stage, got {value!r}"
  return None


def _scale_or_scales(value) -> str | None:
  """sampler.cfg_scale: one number, or one per stage."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  if not values or not all(_is_number(v) for v in values):
    return f"must be a number or a tuple with one number per stage, got {value!r}"
  return None


DATA = {
  "source": TEXT,  # a name in dfm_jax.data.SOURCES, checked by the data block
  "tfds_name": TEXT,
  "split": TEXT,
  "data_dir": OPTIONAL_TEXT,
  "path": TEXT,
  "label_path": TEXT,
  "image_key": TEXT,
  "label_key": TEXT,
  "resolution": count(),
  "channels": count(),
  "crop": choice("pad", "center"),
  "random_flip": FLAG,
  "skip_corrupt": FLAG,
  "num_workers": count(0),
  "num_classes": count(),
  "latent_scale": POSITIVE,
  "frames": count(0),
  "frame_stride": count(),
  "num_videos": count(),
  "num_digits": count(),
  "synthetic_examples": count(),
}

SCHEMA: dict[str, Field] = {
  "method": choice("dfm", "fm", "pyramidal_flow", "cascade"),
  "seed": Field(INT),
  "total_steps": count(),
  "batch_size": count(),
  "log_every": count(),
  "checkpoint_every": count(),
  "sample_every": count(),
  "keep_checkpoints": count(),  # 0 would delete every checkpoint
  "num_grid_samples": count(),
  "stop_on_nonfinite": FLAG,
  "preemption_check_every": count(),
  "compilation_cache": FLAG,
  "profile_steps": items(count(0), check=_profile_steps),
  "init_from": TEXT,
  **{f"data.{k}": v for k, v in DATA.items()},
  "decomposition.kind": TEXT,  # a name in decompose.DECOMPOSITIONS, checked with the others
  "decomposition.num_stages": count(),
  "decomposition.halve_time": FLAG,
  "decomposition.level_gaps": items(count()),
  "decomposition.standardize": FLAG,
  "decomposition.stats_batches": count(),
  "model.size": choice("custom", "S", "B", "L", "XL"),
  "model.hidden_size": count(),
  "model.depth": count(),
  "model.num_heads": count(),
  "model.mlp_ratio": POSITIVE,
  "model.patch_size": count(),
  "model.stage_upsample": items(count()),
  "model.pos_embed": choice("rope", "sincos"),
  "model.stage_index_embed": FLAG,
  "model.dtype": choice("float32", "bfloat16"),
  "model.residual_dtype": choice("float32", "bfloat16"),
  "model.remat_policy": TEXT,  # a name in dit.REMAT_POLICIES, checked by DiTConfig
  "model.remat": FLAG,
  "model.attention": choice("auto", "xla", "cudnn", "splash"),
  "model.scan_unroll": count(0),
  "model.precondition": FLAG,
  "model.loss_weighting": choice("edm", "velocity"),
  "flow.stage_probs": items(PROBABILITY),
  "flow.final_stage_probs": items(PROBABILITY, optional=True),
  "flow.main_loc": number(),
  "flow.main_scale": POSITIVE,
  "flow.early_loc": number(),
  "flow.early_scale": POSITIVE,
  "flow.per_sample_stage": FLAG,
  "flow.stage_weights": items(number(0.0), optional=True),
  "flow.label_dropout": FRACTION,
  "optim.learning_rate": POSITIVE,
  "optim.warmup_steps": count(0),
  "optim.schedule": choice("constant", "cosine"),
  "optim.b1": FRACTION,
  "optim.b2": FRACTION,
  "optim.eps": POSITIVE,
  "optim.weight_decay": number(0.0),
  "optim.grad_clip": number(0.0),  # 0: no clipping
  "optim.ema_decay": FRACTION,
  "optim.grad_accum_steps": count(),
  "sampler.steps_per_stage": items(count()),
  "sampler.thresholds": items(PROBABILITY),
  "sampler.solver": choice("euler", "heun"),
  "sampler.cfg_scale": Field(ANY, check=_scale_or_scales),
  "sampler.guidance_interval": Field(ANY, check=_pair_or_pairs),
  "sampler.heun_final_euler": FLAG,
  "sampler.auto_schedule": FLAG,
  "sampler.num_samples": count(),
  "sampler.batch_size": count(),
  "sampler.checkpoint_step": count(-1),  # -1: the latest
  "cascade.low_res_fraction": number(0.0, 1.0, lo_open=True, hi_open=True),
  "cascade.cond_loc": number(),
  "cascade.cond_scale": POSITIVE,
  "cascade.sample_noise": FRACTION,
  # Frechet distances need a covariance: two images at least.
  "eval.num_samples": count(2),
  "eval.batch_size": count(),
  "eval.num_real": count(2),
  "eval.real_split": TEXT,
  "eval.classifier": TEXT,
  "eval.metrics": items(TEXT),
  "eval.fdd_weights": TEXT,
  "eval.inception_batch": count(),
  "eval.frame_fid_frames": count(0),
  "eval.i3d_weights": TEXT,
  "eval.i3d_batch": count(),
  **{f"eval.reference.{k}": v for k, v in DATA.items()},
  "eval.every": count(0),
  "eval.train_num_samples": count(2),
  "eval.save_samples": FLAG,
  "eval.samples_from": TEXT,
  "autoencoder.kind": TEXT,
  "autoencoder.weights": TEXT,
  "autoencoder.scale": number(0.0, lo_open=True, optional=True),
  "autoencoder.shift": number(optional=True),
  "autoencoder.batch_size": count(),
  "mesh.shape": items(count(-1)),
  "mesh.dcn_shape": items(count(), check=_three_axes),
  "mesh.axis_rules": Field(TUPLE),
  "distributed.initialize": FLAG,
  "distributed.coordinator_address": TEXT,
  "distributed.num_processes": count(0),
  "distributed.process_id": count(-1),
}
# Optional blocks some configs add: their fields follow the block they copy.
ALIASES = {"encode.data.": "data."}


def spec(name: str) -> Field | None:
  """The field spec of a dotted name (aliases resolved); None for a field the schema lacks."""
  for prefix, target in ALIASES.items():
    if name.startswith(prefix):
      name = target + name[len(prefix) :]
  return SCHEMA.get(name)


def leaves(config, prefix: str = "") -> dict[str, Any]:
  """Dotted name -> value of every leaf field of a ConfigDict (or dict)."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(f: Field) -> str:
  lo = None if f.lo is None else f"{'>' if f.lo_open else '>='} {f.lo:g}"
  hi = None if f.hi is None else f"{'<' if f.hi_open else '<='} {f.hi:g}"
  if lo and hi:
    return f"in {'(' if f.lo_open else '['}{f.lo:g}, {f.hi:g}{')' if f.hi_open else ']'}"
  return lo or hi or ""


def check_value(name: str, f: Field, value) -> str | None:
  """The problem with ``value`` for field ``name``, or None."""
  if value is None:
    return None if f.optional else f"{name} must be set, got None"
  if f.kind == INT and (not isinstance(value, int) or isinstance(value, bool)):
    return f"{name} must be an integer, got {value!r}"
  if f.kind == FLOAT and not _is_number(value):
    return f"{name} must be a number, got {value!r}"
  if f.kind == FLOAT and not math.isfinite(value):
    return f"{name} must be a finite number, got {value}"
  if f.kind == BOOL and not isinstance(value, bool):
    return f"{name} must be True or False, got {value!r}"
  if f.kind == STR and not isinstance(value, str):
    return f"{name} must be a string, got {value!r}"
  if f.kind == TUPLE and not isinstance(value, (tuple, list)):
    return f"{name} must be a tuple, got {value!r}"
  if f.kind in (INT, FLOAT):
    below = f.lo is not None and (value <= f.lo if f.lo_open else value < f.lo)
    above = f.hi is not None and (value >= f.hi if f.hi_open else value > f.hi)
    if below or above:
      return f"{name} must be {_range_text(f)}, got {value}"
  if f.choices is not None and value not in f.choices:
    return f"{name} must be one of {', '.join(map(repr, f.choices))}, got {value!r}"
  if f.item is not None:
    for v in value:
      problem = check_value(f"{name} entries", f.item, v)
      if problem:
        return problem
  if f.check is not None:
    problem = f.check(value)
    if problem:
      return f"{name} {problem}"
  return None


def check(config) -> None:
  """Raises InvalidConfigError naming every field of ``config`` out of its type or range."""
  problems = validate(config)
  if problems:
    raise InvalidConfigError(problems)


def validate(config) -> list[str]:
  """One problem line for every field of ``config`` whose value is out of its type or range,
  and one naming the schema's fields ``config`` lacks (configs start from
  ``config_defaults.base_config()``, so the code reads every field without a second default)."""
  present = leaves(config)
  absent = [name for name in SCHEMA if name not in present]
  problems = []
  if absent:
    problems.append(
      f"the config lacks {len(absent)} field(s): {', '.join(absent[:6])}"
      + (", ..." if len(absent) > 6 else "")
      + "; build it on dfm_jax.config_defaults.base_config()"
    )
  for name, value in present.items():
    f = spec(name)
    if f is not None:
      problem = check_value(name, f, value)
      if problem:
        problems.append(problem)
  return problems
