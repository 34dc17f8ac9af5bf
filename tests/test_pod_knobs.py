"""Memory and speed knobs: the attention implementation, remat policies, activation sharding
constraints and gradient accumulation (on the CPU; the TPU kernel lowered for a TPU topology
through libtpu's compile-only devices when libtpu is installed)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax import attention, dit, experiment, sharding, train_state
from tests.train_utils import tiny_config

RULES = (("batch", ("data", "fsdp")), ("tokens", None), ("embed_act", None))


def _cfg(**kw):
  base = dict(stage_shapes=((8, 8, 3),), patch_size=2, hidden_size=32, depth=2, num_heads=4)
  base.update(num_classes=10, **kw)
  return dit.DiTConfig(**base)


@functools.cache
def _random_state():
  """The state of a ``_cfg()`` model with every parameter random (so the zero-initialised layers
  act); built under jit, much faster on a busy CPU than eager initialisation. The knobs tested
  here are static, so every variant shares this state."""

  @nnx.jit
  def make():
    model = dit.DFMDiT(_cfg(), rngs=nnx.Rngs(0))
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(
      model,
      jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.2 for k, x in zip(keys, leaves)]),
    )
    return model

  return nnx.state(make())


def _graphdef(cfg):
  return nnx.graphdef(nnx.eval_shape(lambda: dit.DFMDiT(cfg, rngs=nnx.Rngs(0))))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs):
  return nnx.merge(graphdef, state)(*inputs)


def _inputs(cfg, batch=2):
  keys = jax.random.split(jax.random.key(1), cfg.num_stages)
  stages = tuple(jax.random.normal(k, (batch,) + s) for k, s in zip(keys, cfg.stage_shapes))
  t = jnp.linspace(0.1, 0.9, batch * cfg.num_stages).reshape(batch, cfg.num_stages)
  return stages, t, jnp.arange(batch) % 10, jnp.zeros(batch, jnp.int32)


def _loss(model, inputs):
  return sum(jnp.mean(o**2) for o in model(*inputs))


# ----------------------------------------------------------------------------- attention


def test_attention_choice_is_validated():
  with pytest.raises(ValueError, match="attention must be one of"):
    _cfg(attention="flash")
  with pytest.raises(ValueError, match="splash attention needs head_dim a multiple of 128"):
    _cfg(attention="splash")
  with pytest.raises(ValueError, match="cuDNN attention needs model.dtype 'bfloat16'"):
    _cfg(attention="cudnn")
  with pytest.raises(ValueError, match="runs on gpu / cuda devices only, these are 'cpu'"):
    attention.check_attention_platform("cudnn", "cpu")
  config = tiny_config(model__attention="splash")
  with pytest.raises(ValueError, match="model.attention 'splash' runs on tpu devices only"):
    experiment.from_config(config, check_data=False, platform="cpu")
  # 'auto' picks the platform's kernel only where it applies.
  fits_splash = _cfg(stage_shapes=((8, 16, 1),), patch_size=1, hidden_size=256, num_heads=2)
  assert attention.resolve_attention(fits_splash, "tpu") == "splash"
  assert attention.resolve_attention(_cfg(), "tpu") == "xla"  # head_dim 8, 16 tokens
  assert attention.resolve_attention(_cfg(dtype="bfloat16"), "gpu") == "cudnn"
  assert attention.resolve_attention(_cfg(), "gpu") == "xla"  # float32
  assert attention.resolve_attention(fits_splash, "cpu") == "xla"
  assert attention.resolve_attention(_cfg()) == "xla"  # the default backend here: CPU


def test_auto_resolves_to_the_xla_path_on_cpu():
  """On a CPU 'auto' is the XLA path itself (so identical values); the kernels' values are
  checked against XLA below: splash in the interpreter, cuDNN on a GPU."""
  inputs, state = _inputs(_cfg()), _random_state()
  out_xla = _forward(_graphdef(_cfg(attention="xla")), state, inputs)
  out_auto = _forward(_graphdef(_cfg(attention="auto")), state, inputs)
  for a, b in zip(out_xla, out_auto):
    np.testing.assert_array_equal(a, b)


def test_splash_kernel_matches_xla_in_the_interpreter():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 128, 2, 128)) for i in range(3))
  out = attention.splash_attention(q, k, v, interpret=True)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs a GPU")
def test_cudnn_kernel_matches_xla_on_a_gpu():
  """The fused cuDNN attention against XLA's, in bfloat16, for the kernel and a whole model."""
  q, k, v = (
    jax.random.normal(jax.random.key(i), (2, 256, 4, 64)).astype(jnp.bfloat16) for i in range(3)
  )
  out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)
  cfg = _cfg(dtype="bfloat16", hidden_size=64, num_heads=2)  # head_dim 32
  model = dit.DFMDiT(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)  # random everywhere, so the zero-initialised heads act
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  nnx.update(
    model,
    jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.2 for k, x in zip(keys, leaves)]),
  )
  state = nnx.state(model)
  inputs = _inputs(cfg)
  fused = _forward(_graphdef(dataclasses.replace(cfg, attention="cudnn")), state, inputs)
  plain = _forward(_graphdef(dataclasses.replace(cfg, attention="xla")), state, inputs)
  for a, b in zip(fused, plain):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5e-2)


def test_splash_kernel_in_the_hlo_lowered_for_tpu():
  from dfm_jax import compile_check as cc  # pylint: disable=g-import-not-at-top

  devices = cc.topology_devices(cc.lookup_topology("v4-8"))  # 4 compile-only TPU devices
  mesh = sharding.make_mesh((4, 1, 1), devices)
  # 8x16 tokens (patch 1), head_dim 128: splash applies, and 'auto' picks it on TPU.
  cfg = _cfg(
    stage_shapes=((8, 16, 1),), patch_size=1, hidden_size=256, depth=1, num_heads=2,
    activation_rules=RULES,
  )  # fmt: skip
  batch = sharding.batch_sharding(mesh)

  def lowered_text(cfg):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: dit.DFMDiT(cfg, rngs=nnx.Rngs(0))))

    def forward(state, x, t, y):
      return nnx.merge(graphdef, state)((x,), t, y, jnp.zeros_like(y))[0]

    args = (
      jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)), state
      ),
      jax.ShapeDtypeStruct((8, 8, 16, 1), jnp.float32, sharding=batch),
      jax.ShapeDtypeStruct((8, 1), jnp.float32, sharding=batch),
      jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch),
    )
    with jax.set_mesh(mesh):
      return jax.jit(forward).lower(*args).as_text()

  text = lowered_text(cfg)
  assert "tpu_custom_call" in text  # the Pallas (Mosaic) kernel
  assert "sharding_constraint" in text or "@Sharding" in text
  assert "tpu_custom_call" not in lowered_text(dataclasses.replace(cfg, attention="xla"))


# ----------------------------------------------------------------------------- remat


def test_remat_alias_and_names():
  assert _cfg(remat=True).remat_policy == "full"
  assert _cfg(remat_policy="dots_saveable").remat
  assert not _cfg().remat and _cfg().remat_policy == "none"
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    _cfg(remat_policy="everything")
  assert (
    experiment.from_config(tiny_config(model__remat=True), check_data=False).model.remat_policy
    == "full"
  )


def test_remat_policies_give_equal_gradients_and_full_saves_memory():
  inputs, state = _inputs(_cfg()), _random_state()
  params, rest = nnx.split_state(state, nnx.Param, ...)

  def grad_fn(policy):
    # The blocks scanned one at a time, as on TPUs (CPUs and GPUs unroll them by default).
    graphdef = _graphdef(_cfg(remat_policy=policy, scan_unroll=1))
    loss = lambda params: _loss(nnx.merge(graphdef, params, rest), inputs)  # noqa: E731
    return jax.grad(loss)

  # The two whose memory is compared compiled alone; the other policies in one program.
  compiled = {p: jax.jit(grad_fn(p)).lower(params).compile() for p in ("none", "full")}
  temp = {p: c.memory_analysis().temp_size_in_bytes for p, c in compiled.items()}
  others = [p for p in dit.REMAT_POLICIES if p not in compiled]
  grads = dict(zip(others, jax.jit(lambda x: [grad_fn(p)(x) for p in others])(params)))
  grads.update({p: c(params) for p, c in compiled.items()})
  assert sorted(grads) == sorted(dit.REMAT_POLICIES)
  for policy, g in grads.items():
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=policy),
      g,
      grads["none"],
    )
  assert temp["full"] < temp["none"], temp


def test_bfloat16_residual_stream_is_close_to_float32_and_carried_in_bfloat16():
  inputs, state = _inputs(_cfg(dtype="bfloat16")), _random_state()
  with pytest.raises(ValueError, match="residual_dtype must be one of"):
    _cfg(residual_dtype="float16")
  out = {}
  for rdt in ("float32", "bfloat16"):
    cfg = _cfg(dtype="bfloat16", residual_dtype=rdt)
    out[rdt] = _forward(_graphdef(cfg), state, inputs)
    # The scan over the blocks carries the residual stream in that dtype.
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(_graphdef(cfg), s)(*x))(state, inputs)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    carry = scans[0].outvars[0].aval
    assert (carry.ndim, carry.dtype) == (3, jnp.dtype(rdt)), carry
  for a, b in zip(out["bfloat16"], out["float32"]):
    assert a.dtype == jnp.float32
    err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert 0 < err < 2e-2, err  # rounded, but to bfloat16's precision only
  cfg = experiment.from_config(tiny_config(model__residual_dtype="bfloat16"), check_data=False)
  assert cfg.model.residual_dtype == "bfloat16"


# ----------------------------------------------------------------------------- activations


def test_activation_constraint_under_a_mesh_keeps_values():
  assert len(jax.devices()) == 8
  graphdef = _graphdef(_cfg(activation_rules=RULES))
  state, inputs = _random_state(), _inputs(_cfg(), batch=8)
  reference = _forward(graphdef, state, inputs)  # no mesh: no constraint
  mesh = sharding.make_mesh((4, 2, 1))
  with jax.set_mesh(mesh):
    inputs = jax.device_put(inputs, sharding.batch_sharding(mesh))
    text = _forward.lower(graphdef, state, inputs).as_text()
    out = _forward(graphdef, state, inputs)
  assert "sharding_constraint" in text or "@Sharding" in text
  assert '{"data", "fsdp"}' in text or "devices=[8" in text  # batch split over data x fsdp
  assert out[0].sharding.spec[0] == ("data", "fsdp")
  for a, b in zip(out, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # A batch the mesh does not divide (a sampler batch, say) is left unconstrained.
  spec = sharding.activation_spec(dit.ACTIVATION_AXES, (6, 16, 32), RULES, mesh)
  assert spec == jax.sharding.PartitionSpec(jax.sharding.PartitionSpec.UNCONSTRAINED, None, None)


# ----------------------------------------------------------------------------- accumulation


def _step(state_and_def, exp, k, key, batch):
  graphdef, state = state_and_def
  fn = jax.jit(
    lambda s, b, key: train_state.train_step(
      graphdef, s, b, key, exp=exp, lr_schedule=lambda step: 0.0, grad_accum_steps=k
    )
  )
  return fn(state, batch, key)


def _setup(**extra):
  config = tiny_config(
    optim__warmup_steps=0, optim__grad_clip=0.0, flow__label_dropout=0.0, **extra
  )
  exp = experiment.from_config(config, check_data=False)

  @jax.jit
  def make():
    ts = train_state.create_train_state(exp, config.optim, config.total_steps, config.seed)
    # Perturb every parameter so the zero-initialised heads and gates pass gradients everywhere.
    leaves, tree = jax.tree.flatten(nnx.state(ts.model, nnx.Param))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    nnx.update(ts.model, jax.tree.unflatten(tree, noisy))
    return nnx.split(ts)[1]

  state = make()
  graphdef = nnx.graphdef(
    nnx.eval_shape(
      lambda: train_state.create_train_state(exp, config.optim, config.total_steps, config.seed)
    )
  )
  shape = (config.batch_size,) + exp.sample_shape
  batch = {
    "image": jax.random.normal(jax.random.key(4), shape),
    "label": jnp.arange(config.batch_size) % config.data.num_classes,
  }
  return config, exp, (graphdef, state), batch


def _model_params(state):
  return nnx.to_pure_dict(state["model"])


@pytest.mark.integration  # compiles whole train steps: ~40 s each on 2 busy cores
def test_grad_accumulation_equals_mean_of_microbatch_gradients():
  """k = 2: the one update equals AdamW applied to the mean of the gradients of the two strided
  microbatches (rows 0, 2, 4, ... with key fold_in(key, 0); rows 1, 3, ... with fold_in(key, 1)),
  each taken as the k = 1 step takes them; the reported loss is their mean."""
  config, exp, (graphdef, state), batch = _setup()
  key = jax.random.key(7)
  new, metrics = _step((graphdef, state), exp, 2, key, batch)
  method = exp.method

  @jax.jit
  def reference_update(state):
    ts = nnx.merge(graphdef, state)
    total, losses = None, []
    for i in range(2):
      mb = {n: v[i::2] for n, v in batch.items()}
      (loss, _), grads = nnx.value_and_grad(
        lambda m: method.loss(m, jax.random.fold_in(key, i), mb["image"], mb["label"]),
        has_aux=True,
      )(ts.model)
      losses.append(loss)
      total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    ts.optimizer.update(ts.model, jax.tree.map(lambda g: g / 2, total))
    return nnx.state(ts), sum(losses) / 2

  reference_state, reference_loss = reference_update(state)
  reference = _model_params(reference_state)
  np.testing.assert_allclose(metrics["loss"], reference_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    _model_params(new),
    reference,
  )
  assert int(new["optimizer"]["step"][...]) == 1  # one update


@pytest.mark.integration  # compiles whole train steps: ~40 s each on 2 busy cores
def test_grad_accumulation_equals_full_batch_for_a_deterministic_loss():
  """A loss that draws nothing (the network's output at fixed t = 0.5 against the batch, mean
  over the batch): k = 2 gives the k = 1 update on the full batch."""
  config, exp, (graphdef, state), batch = _setup()

  class Deterministic:
    def loss(self, model, key, data, labels, step=None):
      stages = exp.decomposition.split(data)
      t = jnp.full((data.shape[0], len(stages)), 0.5)
      out = model(tuple(0.5 * s for s in stages), t, labels, jnp.zeros_like(labels))
      loss = sum(jnp.mean((o - s) ** 2) for o, s in zip(out, stages))
      return loss, {"loss": loss}

  @dataclasses.dataclass(frozen=True)
  class DetExp(experiment.Experiment):
    @property
    def method(self):
      return Deterministic()

  det = DetExp(**{f.name: getattr(exp, f.name) for f in dataclasses.fields(exp)})
  key = jax.random.key(0)
  one, m1 = _step((graphdef, state), det, 1, key, batch)
  two, m2 = _step((graphdef, state), det, 2, key, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    _model_params(one),
    _model_params(two),
  )


def test_grad_accumulation_divisibility_is_validated():
  config = tiny_config(optim__grad_accum_steps=3)  # batch 8
  with pytest.raises(ValueError, match=r"batch_size 8 is not divisible by 3 microbatches"):
    experiment.from_config(config, check_data=False)
  config = tiny_config(optim__grad_accum_steps=2)
  with pytest.raises(ValueError, match=r"by 2 microbatches .* the 8 data-parallel devices"):
    experiment.from_config(config, num_devices=8, check_data=False)
  experiment.from_config(config, num_devices=4, check_data=False)
  with pytest.raises(ValueError, match="grad_accum_steps must be >= 1, got 0"):
    experiment.from_config(tiny_config(optim__grad_accum_steps=0), check_data=False)


def test_dcn_shape_needs_as_many_granules_and_dividing_axes():
  """mesh.dcn_shape: one process here is one granule, so two granules are refused by name."""
  devices = jax.devices()[:1]
  assert sharding.make_mesh((1, 1, 1), devices, dcn_shape=(1, 1, 1)).devices.size == 1
  with pytest.raises(ValueError, match=r"mesh.dcn_shape \(2, 1, 1\): the devices do not form"):
    sharding.make_mesh((2, 1, 1), jax.devices()[:2], dcn_shape=(2, 1, 1))
  with pytest.raises(ValueError, match=r"mesh.dcn_shape \(3, 1, 1\) does not divide"):
    sharding.make_mesh((2, 1, 1), devices, dcn_shape=(3, 1, 1))
