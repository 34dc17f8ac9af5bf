"""The config schema: it names every field of every shipped config, the defaults pass it, and a
fuzzer draws values for every field (in range, out of range, wrong type, empty) and checks that
a config is either accepted or refused with one line per problem naming the field, never with
another exception. The fixed-seed slice here runs in the unit tier; a longer run:

  DFM_JAX_FUZZ_EXAMPLES=5000 python -m pytest tests/test_config_schema.py -k fuzz
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfm_jax import config_defaults, experiment
from dfm_jax import config_schema as S
from dfm_jax.config_defaults import base_config

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("dfm", "fm", "pyramidal", "cascade", "runlocal", "fm,runlocal")
EXAMPLES = int(os.environ.get("DFM_JAX_FUZZ_EXAMPLES", "300"))


def _shipped_configs():
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.stem == "__init__":
      continue
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in VARIANTS:
      try:
        yield f"{path.stem}:{variant}", module.get_config(variant)
      except ValueError:  # a variant the config does not offer
        continue


def test_the_schema_and_the_defaults_name_the_same_fields():
  defaults = set(S.leaves(base_config()))
  assert sorted(defaults - set(S.SCHEMA)) == [], "fields without a schema entry"
  assert sorted(set(S.SCHEMA) - defaults) == [], "schema entries without a default"


def test_every_shipped_config_is_covered_and_valid():
  seen = 0
  for name, config in _shipped_configs():
    seen += 1
    unknown = [f for f in S.leaves(config) if S.spec(f) is None]
    assert unknown == [], f"{name}: fields the schema lacks: {unknown}"
    assert S.validate(config) == [], name
  assert seen >= 20


def test_messages_name_the_field_and_the_range():
  c = base_config()
  c.optim.learning_rate = -1.0
  c.optim.b2 = 1.5
  c.optim.grad_clip = -1.0
  c.keep_checkpoints = 0
  c.profile_steps = (20, 10)
  c.model.hidden_size = 0
  c.eval.num_samples = 1
  assert S.validate(c) == [
    "eval.num_samples must be >= 2, got 1",
    "keep_checkpoints must be >= 1, got 0",
    "model.hidden_size must be >= 1, got 0",
    "optim.b2 must be in [0, 1), got 1.5",
    "optim.grad_clip must be >= 0, got -1.0",
    "optim.learning_rate must be > 0, got -1.0",
    "profile_steps must be () or (first, last) with first <= last, got (20, 10)",
  ]
  c = base_config()
  c.optim.learning_rate = math.nan
  c.sampler.thresholds = (0.5, 1.5)
  assert S.validate(c) == [
    "optim.learning_rate must be a finite number, got nan",
    "sampler.thresholds entries must be in [0, 1], got 1.5",
  ]


# ---------------------------------------------------------------------------------------------
# The fuzzer.


def _in_range(f: S.Field) -> st.SearchStrategy:
  if f.choices:
    return st.sampled_from(f.choices)
  if f.kind == S.INT:
    lo = int(f.lo) if f.lo is not None else -5
    return st.integers(lo, lo + 64)
  if f.kind == S.FLOAT:
    lo = f.lo if f.lo is not None else -10.0
    hi = f.hi if f.hi is not None else lo + 100.0
    return st.floats(lo, hi, exclude_min=f.lo_open, exclude_max=f.hi_open, allow_nan=False)
  if f.kind == S.BOOL:
    return st.booleans()
  if f.kind == S.STR:
    return st.text(max_size=8)
  if f.kind == S.TUPLE and f.item is not None:
    return st.lists(_in_range(f.item), max_size=4).map(tuple)
  return st.just(None)


def _out_of_range(f: S.Field) -> st.SearchStrategy:
  options = [st.just(None)] if not f.optional else []
  if f.kind in (S.INT, S.FLOAT) and f.lo is not None:
    options.append(st.just(f.lo if f.lo_open else f.lo - 1))
  if f.kind in (S.INT, S.FLOAT) and f.hi is not None:
    options.append(st.just(f.hi if f.hi_open else f.hi + 1))
  if f.kind == S.FLOAT:
    options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
  if f.choices:
    options.append(st.just("no-such-choice"))
  if f.kind == S.TUPLE and f.item is not None:
    options.append(_out_of_range(f.item).map(lambda v: (v,)))
  wrong = {S.INT: "3", S.FLOAT: "x", S.BOOL: "yes", S.STR: 3, S.TUPLE: 3}.get(f.kind)
  if wrong is not None:
    options.append(st.just(wrong))
  return st.one_of(options)


def _set(config, name: str, value) -> bool:
  """``config.<name> = value`` as a --config override would; False where ml_collections refuses
  the type (the command line's one-line exit 2, tests/test_reliability_cli.py)."""
  *blocks, leaf = name.split(".")
  for block in blocks:
    config = config[block]
  try:
    config[leaf] = value
  except (TypeError, ValueError):
    return False
  return True


@settings(
  max_examples=EXAMPLES,
  deadline=None,
  derandomize=True,  # the unit tier's fixed slice
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_fuzz_every_field_is_accepted_or_refused_in_one_line_per_problem(data):
  name = data.draw(st.sampled_from(sorted(S.SCHEMA)), label="field")
  f = S.SCHEMA[name]
  bad = data.draw(st.booleans(), label="out of range")
  value = data.draw(_out_of_range(f) if bad else _in_range(f), label="value")
  config = base_config()
  config.data.source = "mnist5k"
  if not _set(config, name, value):
    return
  expected = S.check_value(name, f, S.leaves(config)[name])
  try:
    experiment.from_config(config, num_devices=1, check_data=False)
  except ValueError as e:
    lines = str(e).splitlines()
    assert lines[0] == "invalid configuration:" or len(lines) == 1, lines
    assert all(line.startswith("  - ") for line in lines[1:]), lines
    if expected:
      assert f"  - {expected}" in lines, (expected, lines)
  else:
    assert expected is None, f"{name}={value!r} accepted: {expected}"


def test_a_config_lacking_fields_is_refused_by_name():
  c = config_defaults.base_config()
  del c.model["remat"]
  del c.eval["inception_batch"]
  (problem,) = S.validate(c)
  assert problem.startswith("the config lacks 2 field(s): ")
  assert "model.remat" in problem and "eval.inception_batch" in problem
  assert problem.endswith("; build it on dfm_jax.config_defaults.base_config()")


def test_a_saved_config_from_before_a_field_existed_gets_todays_default():
  """``config.json`` of an older run (here without ``eval.inception_batch`` and
  ``preemption_check_every``) rebuilds as a complete config that passes the schema."""
  saved = json.loads(json.dumps(config_defaults.base_config().to_dict()))
  saved["model"]["hidden_size"] = 96
  del saved["eval"]["inception_batch"], saved["preemption_check_every"]
  c = config_defaults.from_saved(saved)
  assert S.validate(c) == []
  assert c.model.hidden_size == 96 and c.eval.inception_batch == 50
  assert c.mesh.shape == (-1, 1, 1) and not c.distributed.initialize and c.init_from == ""
