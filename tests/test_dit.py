"""The DFM DiT: shapes, zero-initialised heads, token geometry, and S = 1 against a plain DiT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm_jax import dit, positions


def _cfg(stage_shapes, **kw):
  base = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
  base.update(kw)
  return dit.DiTConfig(stage_shapes=stage_shapes, **base)


def _randomise(model, seed=0):
  """Replaces every parameter by random values so zero-initialised layers do something."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [jax.random.normal(k, x.shape) * 0.2 for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))


def _inputs(cfg, batch=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), cfg.num_stages)
  stages = tuple(jax.random.normal(k, (batch,) + s) for k, s in zip(keys, cfg.stage_shapes))
  t = jnp.linspace(0.1, 0.9, batch * cfg.num_stages).reshape(batch, cfg.num_stages)
  return stages, t, jnp.arange(batch) % 10, jnp.zeros(batch, jnp.int32)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_stage_outputs_shapes_and_zero_at_init(pos_embed):
  cfg = _cfg(((8, 8, 3), (16, 16, 3), (32, 32, 3)), pos_embed=pos_embed)
  model = dit.DFMDiT(cfg, rngs=nnx.Rngs(0))
  out = model(*_inputs(cfg))
  assert [o.shape for o in out] == [(2, 8, 8, 3), (2, 16, 16, 3), (2, 32, 32, 3)]
  for o in out:
    assert o.dtype == jnp.float32
    np.testing.assert_array_equal(o, 0.0)
  _randomise(model)
  out = model(*_inputs(cfg))
  assert all(float(jnp.abs(o).mean()) > 0 for o in out)


def test_equal_token_counts_and_patch_sizes():
  grid, patches = dit.token_layout(((16, 16, 16), (32, 32, 16)), 1)
  assert grid == (16, 16) and patches == ((1, 1), (2, 2))  # the paper's 32 + 64 latent pyramid
  grid, patches = dit.token_layout(((8, 8, 3), (8, 8, 9), (16, 16, 9)), 2)  # Haar stages
  assert grid == (4, 4) and patches == ((2, 2), (2, 2), (4, 4))
  grid, patches = dit.token_layout(((2, 4, 4, 3), (4, 8, 8, 3)), 2)  # video halving time
  assert grid == (2, 2, 2) and patches == ((1, 2, 2), (2, 4, 4))


def test_impossible_patch_geometry_errors():
  with pytest.raises(ValueError, match="cannot be cut into 4x4 patches"):
    _cfg(((2, 2, 3), (4, 4, 3)), patch_size=4)
  with pytest.raises(ValueError, match="same token grid"):
    _cfg(((8, 8, 3), (10, 10, 3)), patch_size=2)


def test_patchify_round_trip_and_conv_equivalence():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  tokens = dit.patchify(x, (2, 2))
  assert tokens.shape == (2, 24, 12)
  np.testing.assert_array_equal(dit.unpatchify(tokens, (4, 6), (2, 2), 3), x)
  w = jax.random.normal(jax.random.key(1), (2, 2, 3, 5))
  conv = jax.lax.conv_general_dilated(
    x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(tokens @ w.reshape(12, 5), conv.reshape(2, 24, 5), atol=1e-5)


def _reference_dit(model, x, t, y):
  """An independent single-stage DiT forward (conv patch embed, explicit softmax attention)."""
  p = nnx.state(model, nnx.Param)
  c_cfg = model.cfg
  d, heads, ps = c_cfg.hidden_size, c_cfg.num_heads, c_cfg.patch_size
  ln = lambda h: (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
  dense = lambda h, q: h @ q["kernel"][...] + q["bias"][...]
  b, hh, ww, ch = x.shape
  w = p["embedders"][0]["kernel"][...].reshape(ps, ps, ch, d)
  tok = jax.lax.conv_general_dilated(
    x, w, (ps, ps), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  tok = tok.reshape(b, -1, d) + p["embedders"][0]["bias"][...]
  gh, gw = hh // ps, ww // ps
  tok = tok + positions.sincos_embedding(d, (gh, gw))[None]
  half = 128
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  args = (t * 1000.0)[:, None] * freqs[None]
  temb = jnp.concatenate([np.cos(args), np.sin(args)], -1)
  te = p["time_embedders"][0]
  c = dense(jax.nn.silu(dense(temb, te["fc1"])), te["fc2"])
  c = c + p["label_embed"]["embedding"][...][y]
  for i in range(c_cfg.depth):
    blk = jax.tree.map(lambda v: v[...][i], p["blocks"])  # parameters are stacked over depth
    mods = jnp.split(dense(jax.nn.silu(c), blk["ada"]), 6, -1)
    h = ln(tok) * (1 + mods[1][:, None]) + mods[0][:, None]
    qkv = dense(h, blk["attn"]["qkv"]).reshape(b, -1, 3, heads, d // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, -1, d)
    tok = tok + mods[2][:, None] * dense(o, blk["attn"]["proj"])
    h = ln(tok) * (1 + mods[4][:, None]) + mods[3][:, None]
    m = dense(jax.nn.gelu(dense(h, blk["mlp"]["fc1"]), approximate=True), blk["mlp"]["fc2"])
    tok = tok + mods[5][:, None] * m
  hd = p["heads"][0]
  shift, scale = jnp.split(dense(jax.nn.silu(c), hd["ada"]), 2, -1)
  out = dense(ln(tok) * (1 + scale[:, None]) + shift[:, None], hd["linear"])
  out = out.reshape(b, gh, gw, ps, ps, ch).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, hh, ww, ch)


def test_single_stage_is_a_plain_dit():
  cfg = _cfg(((8, 8, 3),), pos_embed="sincos", stage_index_embed=False)
  model = dit.DFMDiT(cfg, rngs=nnx.Rngs(0))
  _randomise(model, seed=3)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  t = jnp.array([0.2, 0.7])
  y = jnp.array([3, 10])  # 10 is the null class
  (out,) = model((x,), t[:, None], y)
  np.testing.assert_allclose(out, _reference_dit(model, x, t, y), rtol=2e-4, atol=2e-4)


def test_model_closed_over_by_an_outer_scan_and_cond():
  """The sampler calls the model inside lax.scan and lax.cond with variables from the outer jit."""
  cfg = _cfg(((8, 8, 3), (16, 16, 3)), remat=True)
  model = dit.DFMDiT(cfg, rngs=nnx.Rngs(0))
  _randomise(model)
  stages, t, y, s = _inputs(cfg)
  graphdef, state = nnx.split(model)

  @jax.jit
  def twice(state):
    m = nnx.merge(graphdef, state)

    def body(carry, _):
      out = jax.lax.cond(carry[0, 0, 0, 0] > -1e9, lambda: m(stages, t, y, s)[0], lambda: carry)
      return out, None

    return jax.lax.scan(body, jnp.zeros_like(stages[0]), None, length=2)[0]

  np.testing.assert_allclose(twice(state), model(stages, t, y, s)[0], rtol=1e-5, atol=1e-5)


def test_unrolled_scan_is_equal_and_counts_every_block():
  shapes = ((8, 8, 3), (16, 16, 3))
  stages, t, y, s = _inputs(_cfg(shapes))

  def build(depth, unroll):
    model = dit.DFMDiT(_cfg(shapes, depth=depth, scan_unroll=unroll), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st: nnx.merge(graphdef, st)(stages, t, y, s)[1])
    return fn, state, fn.lower(state).cost_analysis()["flops"]

  scanned, state, flops_scanned = build(4, 1)
  unrolled, _, flops_unrolled = build(4, 4)
  np.testing.assert_allclose(unrolled(state), scanned(state), rtol=1e-5, atol=1e-6)
  one_block = build(2, 2)[2] - build(1, 1)[2]
  assert one_block > 0
  np.testing.assert_allclose(flops_unrolled, build(1, 1)[2] + 3 * one_block, rtol=1e-6)
  assert flops_scanned < flops_unrolled - 2 * one_block  # XLA counts the loop body once
  with pytest.raises(ValueError, match="scan_unroll"):
    _cfg(shapes, depth=4, scan_unroll=3)
  with pytest.raises(ValueError, match="scan_unroll"):
    _cfg(shapes, depth=4, scan_unroll=-1)
  # 0 = auto: the whole depth on GPUs and CPUs, a scan of one block on TPUs (here: the CPU's).
  auto = _cfg(shapes, depth=4, scan_unroll=0)
  assert [dit.scan_unroll(auto, p) for p in ("gpu", "cuda", "tpu", "cpu")] == [4, 4, 1, 4]
  assert dit.scan_unroll(auto) == 4 and dit.scan_unroll(_cfg(shapes, depth=4, scan_unroll=2)) == 2
  np.testing.assert_allclose(build(4, 0)[2], flops_unrolled, rtol=1e-6)


def test_video_rope_3d_and_jit_grad():
  cfg = _cfg(((4, 4, 4, 2), (4, 8, 8, 2)), pos_embed="rope")
  model = dit.DFMDiT(cfg, rngs=nnx.Rngs(0))
  _randomise(model)
  stages, t, y, s = _inputs(cfg)

  @nnx.jit
  def loss(m, stages):
    return sum(jnp.mean(o**2) for o in m(stages, t, y, s))

  grads = nnx.grad(loss)(model, stages)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]
  assert all(np.isfinite(norms)) and sum(norms) > 0
  assert model.grid == (4, 2, 2)


def test_bf16_compute_matches_float32():
  shapes = ((8, 8, 3), (16, 16, 3))
  m32 = dit.DFMDiT(_cfg(shapes), rngs=nnx.Rngs(0))
  m16 = dit.DFMDiT(_cfg(shapes, dtype="bfloat16", remat=True), rngs=nnx.Rngs(0))
  _randomise(m32)
  _randomise(m16)
  for leaf in jax.tree.leaves(nnx.state(m16, nnx.Param)):
    assert leaf.dtype == jnp.float32
  args = _inputs(m32.cfg)
  for a, b in zip(m32(*args), m16(*args)):
    assert b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert rel < 0.05


def test_logical_axis_names_on_every_parameter():
  model = dit.DFMDiT(_cfg(((8, 8, 3), (16, 16, 3))), rngs=nnx.Rngs(0))
  names = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var[...].ndim, path
    names.update(a for a in axes if a)
  assert {"embed", "mlp", "heads", "vocab"} <= names


def test_parameter_summary_counts():
  model = dit.DFMDiT(_cfg(((8, 8, 3), (16, 16, 3))), rngs=nnx.Rngs(0))
  text = dit.parameter_summary(model)
  assert "blocks" in text and "heads" in text
  assert f"{dit.count_parameters(model):,}" in text


def test_data_stats_are_saved_state_but_not_parameters():
  model = dit.DFMDiT(_cfg(((8, 8, 3), (16, 16, 3)), precondition=True), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.data_mean[...], [0.0, 0.0])
  np.testing.assert_array_equal(model.data_std[...], [1.0, 1.0])
  model.set_data_stats([0.5, -0.1], (0.3, 0.2))
  pure = nnx.to_pure_dict(nnx.state(model))  # what a checkpoint holds
  np.testing.assert_allclose(pure["data_mean"], [0.5, -0.1])
  np.testing.assert_allclose(pure["data_std"], [0.3, 0.2])
  assert "data_mean" not in nnx.state(model, nnx.Param)
  assert set(nnx.to_pure_dict(nnx.state(model, dit.DataStats))) == {"data_mean", "data_std"}
  # Gradients (and so the optimizer and the EMA, which use nnx.Param) leave them alone.
  stages, t, y, s = _inputs(model.cfg)
  grads = nnx.grad(lambda m: sum(jnp.sum(o) for o in m(stages, t, y, s)))(model)
  assert "data_mean" not in grads and "data_std" not in grads
  clone = nnx.clone(model)
  np.testing.assert_allclose(clone.data_std[...], [0.3, 0.2])
  with pytest.raises(ValueError, match="one mean and one std per stage"):
    model.set_data_stats([0.0], [1.0])
  with pytest.raises(ValueError, match="std > 0"):
    model.set_data_stats([0.0, 0.0], [1.0, 0.0])
  with pytest.raises(ValueError, match="finite"):
    model.set_data_stats([0.0, float("nan")], [1.0, 1.0])


def test_loss_weights_and_precondition_switch():
  shapes = ((8, 8, 3), (16, 16, 3))
  off = dit.DFMDiT(_cfg(shapes), rngs=nnx.Rngs(0))
  on = dit.DFMDiT(_cfg(shapes, precondition=True), rngs=nnx.Rngs(0))
  on.set_data_stats([0.0, 0.0], [0.5, 0.25])
  t = jnp.array([[0.0, 0.0], [0.5, 0.2], [1.0, 1.0]])
  np.testing.assert_array_equal(off.loss_weights(t), 1.0)
  expected = (t**2 * jnp.array([0.25, 0.0625]) + (1 - t) ** 2) / jnp.array([0.25, 0.0625])
  np.testing.assert_allclose(on.loss_weights(t), expected, rtol=1e-6)
  _randomise(off)
  _randomise(on)
  stages, t, y, s = _inputs(off.cfg)
  # Same parameters: with preconditioning off the call is the raw network.
  for a, b in zip(off(stages, t, y, s), on.network(stages, t, y, s)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(
    float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(off(stages, t, y, s), on(stages, t, y, s))
  )


def test_model_parts_are_named_in_traces():
  """Profiler traces group ops by these scopes (jax.named_scope in DFMDiT.network)."""
  cfg = dit.DiTConfig(
    stage_shapes=((8, 8, 1), (16, 16, 1)),
    patch_size=1,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=10,
  )
  graphdef, state = nnx.split(dit.DFMDiT(cfg, rngs=nnx.Rngs(0)))
  lowered = jax.jit(lambda st, x, t, y, s: nnx.merge(graphdef, st)(x, t, y, s)).lower(
    state,
    (jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 16, 16, 1))),
    jnp.zeros((2, 2)),
    jnp.zeros((2,), jnp.int32),
    jnp.zeros((2,), jnp.int32),
  )
  text = lowered.as_text(debug_info=True)
  for scope in ("patch_embed", "conditioning", "dit_block", "stage_heads"):
    assert scope in text, scope
