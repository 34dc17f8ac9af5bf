"""The framework's overhead: dfm_jax's train step against a minimal plain-JAX DiT of the same size.

    python bench/overhead.py [--config=default] [--rounds=30]

The plain step is what a researcher would write by hand for the config's flow-matching twin: a
patch embedding, ``depth`` adaLN-Zero blocks (attention and MLP, the same width, heads and MLP
ratio), a linear head, the flow-matching velocity loss at a logit-normal t, AdamW with gradient
clipping and an EMA of the weights, in one jitted function (donated state, no sharding, no
preconditioning, no checks). Both run on the same devices in alternating rounds; the ratios of
the per-round times are printed: dfm_jax FM / plain and dfm_jax DFM / plain (same tokens and
width), the bound on what the framework costs per step.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common  # bench/ helpers; also puts the repository on the import path


def _dense(key, n_in: int, n_out: int, scale: float = 1.0):
  w = jax.random.normal(key, (n_in, n_out), jnp.float32) * scale / math.sqrt(n_in)
  return {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}


def _apply(p, x):
  return x @ p["w"] + p["b"]


def init_plain_dit(
  key, *, patch_dim: int, tokens: int, width: int, depth: int, mlp: float, classes: int
):
  keys = iter(jax.random.split(key, 8 + 6 * depth))
  hidden = int(width * mlp)
  params = {
    "embed": _dense(next(keys), patch_dim, width),
    "pos": jax.random.normal(next(keys), (tokens, width), jnp.float32) * 0.02,
    "t1": _dense(next(keys), 256, width),
    "t2": _dense(next(keys), width, width),
    "label": jax.random.normal(next(keys), (classes + 1, width), jnp.float32) * 0.02,
    "final_ada": _dense(next(keys), width, 2 * width, 0.0),
    "head": _dense(next(keys), width, patch_dim, 0.0),
    "blocks": [],
  }
  for _ in range(depth):
    params["blocks"].append(
      {
        "ada": _dense(next(keys), width, 6 * width, 0.0),
        "qkv": _dense(next(keys), width, 3 * width),
        "proj": _dense(next(keys), width, width),
        "fc1": _dense(next(keys), width, hidden),
        "fc2": _dense(next(keys), hidden, width),
      }
    )
  return params


def _norm(x):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def plain_dit(params, x, t, label, heads: int):
  """``x [B, N, P]`` patches, ``t [B]`` (0 noise, 1 data), ``label [B]`` -> velocity ``[B, N, P]``."""
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(128) / 128)
  emb = jnp.concatenate(
    [jnp.cos(1000 * t[:, None] * freqs), jnp.sin(1000 * t[:, None] * freqs)], -1
  )
  c = _apply(params["t2"], jax.nn.silu(_apply(params["t1"], emb))) + params["label"][label]
  h = _apply(params["embed"], x) + params["pos"]
  b, n, d = h.shape
  for blk in params["blocks"]:
    s1, g1, a1, s2, g2, a2 = jnp.split(_apply(blk["ada"], jax.nn.silu(c))[:, None], 6, -1)
    y = _norm(h) * (1 + g1) + s1
    q, k, v = jnp.split(_apply(blk["qkv"], y).reshape(b, n, 3 * heads, d // heads), 3, axis=2)
    att = jax.nn.dot_product_attention(q, k, v).reshape(b, n, d)
    h = h + a1 * _apply(blk["proj"], att)
    y = _norm(h) * (1 + g2) + s2
    h = h + a2 * _apply(blk["fc2"], jax.nn.gelu(_apply(blk["fc1"], y)))
  shift, scale = jnp.split(_apply(params["final_ada"], jax.nn.silu(c))[:, None], 2, -1)
  return _apply(params["head"], _norm(h) * (1 + scale) + shift)


def make_plain_step(config, model):
  heads, patch = model.num_heads, model.patch_size
  ((size, _, channels),) = model.stage_shapes
  tx = optax.chain(
    optax.clip_by_global_norm(config.optim.grad_clip),
    optax.adamw(
      config.optim.learning_rate,
      config.optim.b1,
      config.optim.b2,
      weight_decay=config.optim.weight_decay,
    ),
  )
  params = init_plain_dit(
    jax.random.key(0),
    patch_dim=patch * patch * channels,
    tokens=model.num_tokens,
    width=model.hidden_size,
    depth=model.depth,
    mlp=model.mlp_ratio,
    classes=config.data.num_classes,
  )
  state = {
    "params": params,
    "ema": params,
    "opt": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
  }
  # Every leaf its own buffer (the EMA starts as the parameters; zeros may share one): donated.
  state = jax.tree.map(lambda a: jnp.array(a, copy=True), state)
  decay = config.optim.ema_decay

  def patchify(img):
    b = img.shape[0]
    g = size // patch
    return (
      img.reshape(b, g, patch, g, patch, channels)
      .transpose(0, 1, 3, 2, 4, 5)
      .reshape(b, g * g, patch * patch * channels)
    )

  def step(state, batch):
    key = jax.random.fold_in(jax.random.key(1), state["step"])
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = patchify(batch["image"])
    x0 = jax.random.normal(k1, x1.shape)
    t = jax.nn.sigmoid(jax.random.normal(k2, (x1.shape[0],)))
    label = jnp.where(
      jax.random.uniform(k3, batch["label"].shape) < 0.1, config.data.num_classes, batch["label"]
    )
    xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0

    def loss_fn(p):
      return jnp.mean((plain_dit(p, xt, t, label, heads) - (x1 - x0)) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
    return {"params": params, "ema": ema, "opt": opt, "step": state["step"] + 1}, loss

  step = jax.jit(step, donate_argnums=0)
  return step, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="default")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument(
    "--set", action="append", default=[], help="FIELD=VALUE for both dfm_jax configs (repeatable)"
  )
  common.add_out_flag(parser)
  args = parser.parse_args()
  report = common.Report(args.out)
  from dfm_jax import experiment  # pylint: disable=g-import-not-at-top

  configs = {
    "dfm_jax FM": common.load_config(args.config, "fm"),
    "dfm_jax DFM": common.load_config(args.config, "dfm"),
  }
  for c in configs.values():
    c.mesh.shape = (1, 1, 1)
    for item in args.set:
      field, value = item.split("=", 1)
      *parents, leaf = field.split(".")
      node = c
      for name in parents:
        node = node[name]
      node[leaf] = type(node[leaf])(json.loads(value)) if node[leaf] is not None else value
  devices = jax.devices()[:1]
  steps = common.build_train_steps(configs, devices=devices, count_flops=False)
  fm = configs["dfm_jax FM"]
  model = experiment.from_config(fm, 1, check_data=False).model
  plain_step, plain_state = make_plain_step(fm, model)
  batch = {k: jnp.asarray(v) for k, v in common.random_batch(fm).items()}
  holder = {"state": plain_state}

  def plain():
    holder["state"], loss = plain_step(holder["state"], batch)
    jax.block_until_ready(loss)

  fns = {**steps, "plain JAX": plain}
  times = common.interleaved_times(fns, rounds=args.rounds, warmup=3)
  plain_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(plain_state["params"]))
  rows = [
    [name, f"{1e3 * common.median(t):.1f}", f"{common.paired_ratio(t, times['plain JAX'])[0]:.3f}"]
    for name, t in times.items()
  ]
  report.say(common.machine_summary())
  report.say(
    f"{args.config}: batch {fm.batch_size}, {model.num_tokens} tokens, width "
    f"{model.hidden_size}, depth {model.depth}; parameters: dfm_jax FM "
    f"{steps['dfm_jax FM'].num_params:,}, plain {plain_params:,}"
  )
  report.table(
    "ms per train step (median) and per-round ratio to plain JAX", ["step", "ms", "/ plain"], rows
  )
  ratios = []
  for name in steps:
    q50, q25, q75 = common.paired_ratio(times[name], times["plain JAX"])
    ratios.append(f"{name} / plain JAX: {q50:.3f} (interquartile {q25:.3f}-{q75:.3f})")
  report.finish("; ".join(ratios))


if __name__ == "__main__":
  main()
