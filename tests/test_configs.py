"""Every shipped config validates, and each flow-matching, Pyramidal Flow and cascade twin
matches its DFM config's backbone, tokens and sampling steps."""

import importlib.util
import os

import pytest

from dfm_jax import config_defaults, dit, experiment
from dfm_jax.autoencoders import kl

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
CASES = [
  ("default.py", "dfm"),
  ("fashion_mnist.py", "dfm"),
  ("imagenet512.py", "dfm"),
  ("imagenet1024.py", "dfm"),
  ("imagenet1024.py", "three"),
  ("moving_digits.py", "dfm"),
  ("kinetics700.py", "dfm"),
]


def load(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIG_DIR, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tokens(exp: experiment.Experiment) -> int:
  grid, _ = dit.token_layout(exp.model.stage_shapes, exp.model.patch_size)
  n = 1
  for g in grid:
    n *= g
  return n


@pytest.mark.parametrize("name,arg", CASES)
def test_config_validates_and_twin_has_equal_compute(name, arg):
  dfm = experiment.from_config(load(name, arg), num_devices=1, check_data=False)
  fm = experiment.from_config(load(name, "fm"), num_devices=1, check_data=False)
  assert len(fm.model.stage_shapes) == 1 and len(dfm.model.stage_shapes) > 1
  assert tokens(dfm) == tokens(fm)
  for field in ("hidden_size", "depth", "num_heads", "mlp_ratio"):
    assert getattr(dfm.model, field) == getattr(fm.model, field), field
  assert sum(dfm.sampler.steps_per_stage) == sum(fm.sampler.steps_per_stage)
  assert dfm.sample_shape == fm.sample_shape
  # the same training budget: batch, steps, optimizer, precision
  c_dfm, c_fm = load(name, arg), load(name, "fm")
  for field in ("batch_size", "total_steps", "optim", "model.dtype", "model.precondition"):
    a, b = c_dfm, c_fm
    for part in field.split("."):
      a, b = a[part], b[part]
    assert a == b, field


@pytest.mark.parametrize("name,arg", CASES)
def test_pyramidal_twin_has_equal_compute(name, arg):
  dfm = experiment.from_config(load(name, arg), num_devices=1, check_data=False)
  twin_arg = "pyramidal" if arg == "dfm" else f"{arg},pyramidal"
  pyr = experiment.from_config(load(name, twin_arg), num_devices=1, check_data=False)
  assert pyr.method_name == "pyramidal_flow"
  assert len(pyr.model.stage_shapes) == len(dfm.model.stage_shapes)
  assert tokens(dfm) == tokens(pyr)
  for field in ("hidden_size", "depth", "num_heads", "mlp_ratio"):
    assert getattr(dfm.model, field) == getattr(pyr.model, field), field
  assert sum(dfm.sampler.steps_per_stage) == sum(pyr.sampler.steps_per_stage)
  assert max(pyr.sampler.steps_per_stage) - min(pyr.sampler.steps_per_stage) <= 1
  assert dfm.sample_shape == pyr.sample_shape


def test_fm_and_pyramidal_variants_are_exclusive():
  with pytest.raises(ValueError, match="'fm' and 'pyramidal' are alternatives"):
    load("fashion_mnist.py", "fm,pyramidal")


@pytest.mark.parametrize("name,arg", CASES)
def test_cascade_twin_matches_backbone_tokens_and_steps(name, arg):
  dfm = experiment.from_config(load(name, arg), num_devices=1, check_data=False)
  twin = "cascade" if arg == "dfm" else f"{arg},cascade"
  cas = experiment.from_config(load(name, twin), num_devices=1, check_data=False)
  assert cas.method_name == "cascade" and cas.model.cond_image
  assert cas.model.stage_shapes == (dfm.model.stage_shapes[0], dfm.model.stage_shapes[-1])
  assert tokens(dfm) == tokens(cas)  # per model; the conditioned one adds as many again
  for field in ("hidden_size", "depth", "num_heads", "mlp_ratio"):
    assert getattr(dfm.model, field) == getattr(cas.model, field), field
  assert sum(dfm.sampler.steps_per_stage) == sum(cas.sampler.steps_per_stage)
  assert dfm.sample_shape == cas.sample_shape
  assert cas.method_options.switch_step == round(0.8 * load(name, twin).total_steps)


def test_unknown_config_argument_is_named():
  with pytest.raises(ValueError, match=r"unknown config variant\(s\) \['flow'\]"):
    load("fashion_mnist.py", "flow")


@pytest.mark.parametrize(
  "name",
  [
    "default.py",
    "fashion_mnist.py",
    "imagenet512.py",
    "imagenet1024.py",
    "moving_digits.py",
    "kinetics700.py",
  ],
)
def test_runlocal_variant_is_tiny_and_keeps_the_stages(name):
  full = experiment.from_config(load(name, "dfm"), num_devices=1, check_data=False)
  for arg in ("runlocal", "fm,runlocal", "pyramidal,runlocal", "cascade,runlocal"):
    small = experiment.from_config(load(name, arg), num_devices=1, check_data=False)
    assert small.model.depth == 1 and small.model.hidden_size == 32
    if arg == "runlocal":  # the stages and each frame's token grid; long clips fewer frames
      assert len(small.model.stage_shapes) == len(full.model.stage_shapes)
      assert small.model.num_tokens <= max(full.model.num_tokens, config_defaults.RUNLOCAL_TOKENS)
      for a, b in zip(small.model.stage_shapes, full.model.stage_shapes):
        assert a[-3:] == b[-3:] and len(a) == len(b) and a[:-3] <= b[:-3]
  assert load(name, "fm,runlocal").method == "fm"
  assert load(name, "pyramidal,runlocal").method == "pyramidal_flow"
  assert load(name, "cascade,runlocal").method == "cascade"


@pytest.mark.parametrize("arg", ["dfm", "halve_time", "fm"])
def test_kinetics700_trains_on_what_its_encode_block_makes(arg):
  """Frame-by-frame encoding keeps the frame count and divides the resolution by 8, and the
  evaluation reference clips are taken like the encoded ones."""
  c = load("kinetics700.py", arg)
  pixels, ref = c.encode.data, c.eval.reference
  assert pixels.source == "video_folder" and c.data.source == "latents"
  assert pixels.frames == c.data.frames == ref.frames
  assert pixels.frame_stride == ref.frame_stride
  assert pixels.resolution // 8 == c.data.resolution and pixels.resolution == ref.resolution
  assert kl.PRESETS[c.autoencoder.kind].latent_channels == c.data.channels
  exp = experiment.from_config(c, num_devices=1, check_data=False)
  assert exp.sample_shape == (c.data.frames, 64, 64, 16)


def test_latents_without_a_path_are_one_problem_named_whole(tmp_path):
  """A data block that fails its own checks is not read again for the latents' shape, and a
  problem that quotes a path keeps its quotes."""
  c = load("default.py", "dfm")
  c.data.source = "latents"
  c.data.path = ""
  with pytest.raises(ValueError) as e:
    experiment.from_config(c, num_devices=1)
  assert str(e.value) == "invalid configuration:\n  - data.path: is empty; it must name a file"
  c.data.path = str(tmp_path)
  with pytest.raises(ValueError) as e:
    experiment.from_config(c, num_devices=1)
  assert str(e.value).splitlines()[1] == (
    f"  - data.path: {str(tmp_path)!r} is neither an .npz file nor a latent shard folder "
    "(no metadata.json; an unfinished encoding writes it last)"
  )
  c = load("default.py", "dfm")
  c.sampler.solver = "rk9"
  with pytest.raises(ValueError, match=r"got 'rk9'$"):
    experiment.from_config(c, num_devices=1, check_data=False)


def test_sample_and_eval_counts_must_be_positive():
  """Refused with the config, before --mode=sample or eval restores a checkpoint (a zero used
  to surface after it, as numpy's "need at least one array to concatenate")."""
  c = load("default.py", "dfm")
  c.sampler.num_samples = 0
  c.eval.batch_size = -2
  with pytest.raises(ValueError) as e:
    experiment.from_config(c, num_devices=1, check_data=False)
  assert str(e.value).splitlines()[1:] == [
    "  - eval.batch_size must be >= 1, got -2",
    "  - sampler.num_samples must be >= 1, got 0",
  ]
