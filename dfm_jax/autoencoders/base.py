"""The `Autoencoder` base class, the registry, shared layers and the checked weight loader.

Every family (``taesd.py``, ``kl.py``) subclasses `Autoencoder`, implements `encode_raw` /
`decode_raw` (network only, traceable) and registers a builder ``f(weights_path, **options)``
in `AUTOENCODERS`. Weights are read as plain numpy arrays (`read_state_dict`: ``.safetensors``
through the `safetensors` numpy API, PyTorch files through the allow-list unpickler
`load_torch_file`), so loading never executes code from the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from dfm_jax.torch_pickle import load_torch_file
from dfm_jax.registry import Registry

AUTOENCODERS: Registry[Callable[..., "Autoencoder"]] = Registry("autoencoder")

# (file key, (path in our parameter tree, conversion kind)); kinds: "conv" (torch OIHW ->
# HWIO), "linear" (torch [out, in] or a 1x1 conv [out, in, 1, 1] -> [in, out]), "copy".
Layout = dict[str, tuple[tuple, str]]


class Autoencoder(nnx.Module):
  """An image autoencoder with an 8x (`downsample`) spatial reduction.

  Subclasses set `name`, `latent_channels`, `downsample`, `scale`, `shift` and implement
  `encode_raw` / `decode_raw`. The model-space latents are ``(raw - shift) * scale``.

  Use `encode` / `decode` from plain Python (each is an `nnx.jit` of the traced method);
  inside your own `nnx.jit` / `jax.jit` call `encode_traced` / `decode_traced`, e.g.
  ``graphdef, state = nnx.split(ae)`` and
  ``jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_traced(x))``.

  A video autoencoder also defines ``encode_video_traced`` (clips [B, T, H, W, 3] in [-1, 1]
  -> model latents [B, T', h, w, C]) and ``decode_video_traced`` (the inverse); `encode_clips`
  / `decode_clips` use them, and code clips frame by frame through an image autoencoder.
  """

  name: str = ""
  latent_channels: int = 0
  downsample: int = 8
  scale: float = 1.0
  shift: float = 0.0

  # Each family defines ``encode_raw(images [B, H, W, 3] in [-1, 1]) -> raw latents`` and
  # ``decode_raw(raw) -> images in [-1, 1]`` (unclipped); the methods below build on them.

  def encode_traced(self, images: jax.Array) -> jax.Array:
    """Traceable `encode`: float [B, H, W, 3] in [-1, 1] -> [B, H/8, W/8, C] model latents."""
    raw = self.encode_raw(jnp.asarray(images, jnp.float32))
    return (raw - self.shift) * self.scale

  def decode_traced(self, latents: jax.Array) -> jax.Array:
    """Traceable `decode`: [B, h, w, C] model latents -> float32 [B, 8h, 8w, 3] in [-1, 1]."""
    raw = jnp.asarray(latents, jnp.float32) / self.scale + self.shift
    return jnp.clip(self.decode_raw(raw), -1.0, 1.0)

  def encode(self, images: jax.Array) -> jax.Array:
    """Images float32 [B, H, W, 3] in [-1, 1] (H, W multiples of 8) -> latents [B, H/8, W/8, C].

    The latents are already in the model's space: ``(raw - shift) * scale``.
    """
    shape = tuple(np.shape(images))
    f = self.downsample
    if len(shape) != 4 or shape[-1] != 3 or shape[1] % f or shape[2] % f:
      raise ValueError(
        f"{self.name}: expected images [B, H, W, 3] with H and W multiples of "
        f"{self.downsample}, got shape {shape}"
      )
    return _jit_encode(self, images)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Latents [B, h, w, C] (model space) -> images float32 [B, 8h, 8w, 3] clipped to [-1, 1]."""
    shape = tuple(np.shape(latents))
    if len(shape) != 4 or shape[-1] != self.latent_channels:
      raise ValueError(
        f"{self.name}: expected latents [B, h, w, {self.latent_channels}], got shape {shape}"
      )
    return _jit_decode(self, latents)


@nnx.jit
def _jit_encode(ae: Autoencoder, images: jax.Array) -> jax.Array:
  return ae.encode_traced(images)


@nnx.jit
def _jit_decode(ae: Autoencoder, latents: jax.Array) -> jax.Array:
  return ae.decode_traced(latents)


# ----------------------------------------------------------------------------------------------
# Clips: a video autoencoder encodes them itself, an image autoencoder frame by frame.


def encodes_clips(ae) -> bool:
  """Whether `ae` is a video autoencoder (has ``encode_video_traced`` / ``decode_video_traced``)."""
  return hasattr(ae, "encode_video_traced")


def _per_frame(fn, x: jax.Array) -> jax.Array:
  """`fn` on [B * T, ...] with the frames of x [B, T, ...] folded into the batch."""
  b, t = x.shape[:2]
  y = fn(x.reshape((b * t,) + x.shape[2:]))
  return y.reshape((b, t) + y.shape[1:])


def encode_clips(ae, clips: jax.Array) -> jax.Array:
  """Traceable: clips float [B, T, H, W, 3] in [-1, 1] -> model latents [B, T', h, w, C].

  A video autoencoder's ``encode_video_traced`` (T' as it compresses time), else the image
  autoencoder's ``encode_traced`` on every frame (T' = T).
  """
  if encodes_clips(ae):
    return ae.encode_video_traced(clips)
  return _per_frame(ae.encode_traced, clips)


def decode_clips(ae, latents: jax.Array) -> jax.Array:
  """Traceable: model latents [B, T', h, w, C] -> clips float32 [B, T, H, W, 3] in [-1, 1]
  (``decode_video_traced``, else ``decode_traced`` on every frame: T = T')."""
  if encodes_clips(ae):
    return ae.decode_video_traced(latents)
  return _per_frame(ae.decode_traced, latents)


# ----------------------------------------------------------------------------------------------
# Shared layers (NHWC).


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over NHWC inputs (two-pass variance in float32).

  Args:
    num_groups: groups the channels are split into.
    num_channels: C, a multiple of `num_groups`.
    eps: added to the variance.
  """

  def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
    self.num_groups, self.eps = num_groups, eps
    self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, self.num_groups, c // self.num_groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    centred = g - mean
    var = jnp.square(centred).mean(axis=(1, 3), keepdims=True)
    y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return y * self.scale[...] + self.bias[...]


def conv(
  n_in: int,
  n_out: int,
  kernel: int = 3,
  *,
  stride: int = 1,
  pad: tuple[int, int] = (1, 1),
  bias: bool = True,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """A torch-style Conv2d in NHWC: explicit padding ``pad`` = (before, after) on H and W."""
  return nnx.Conv(
    n_in, n_out, (kernel, kernel), strides=stride, padding=(pad, pad), use_bias=bias, rngs=rngs
  )


def upsample_nearest2x(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour (torch ``interpolate(mode='nearest')``)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


# ----------------------------------------------------------------------------------------------
# Reading and checking weights.


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} from a ``.safetensors`` file or a PyTorch file (zip / legacy / TorchScript).

  Neither reader executes code from the file.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"autoencoder weights not found: {path}")
  with open(path, "rb") as f:
    head = f.read(16)
  if path.suffix == ".safetensors" or (len(head) > 9 and head[8:10] == b'{"'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    return dict(load_file(str(path)))
  return load_torch_file(path)


def torch_style_layout(
  module: nnx.Module, prefix: str = "", drop: tuple[str, ...] = ("layers",)
) -> Layout:
  """PyTorch-style key -> (our path, kind) for every parameter of `module`.

  The key joins the path with dots, leaving out the attribute names in `drop` (our
  `nnx.List` of a torch ``nn.Sequential``), and names ``kernel`` / ``scale`` ``weight``.
  """
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  layout = {}
  for path, value in flat.items():
    *parents, leaf = path
    kind = "copy"
    if leaf == "kernel":
      kind = "conv" if len(value.shape) == 4 else "linear"
    name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    key = ".".join([str(p) for p in parents if p not in drop] + [name])
    layout[prefix + key] = (tuple(path), kind)
  return layout


def _to_ours(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":  # torch [out, in, kh, kw] -> [kh, kw, in, out]
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
  if kind == "linear":  # torch [out, in] (or [out, in, 1, 1] / [out, in, 1]) -> [in, out]
    if array.ndim in (3, 4) and set(array.shape[2:]) == {1}:  # 1x1 conv or conv1d weights
      array = array.reshape(array.shape[:2])
    return array.T if array.ndim == 2 else array
  return array


def _torch_shape(shape: tuple, kind: str) -> tuple:
  if kind == "conv" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "linear" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _natural(key: str):
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _summary(keys: list[str], limit: int = 8) -> str:
  if not keys:
    return "none"
  more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def random_weights(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """A concrete copy of `model` (may be abstract) with numpy-drawn weights (no XLA compile).

  Kernels [..., in, out] are N(0, 1 / fan_in), biases 0, norm scales 1: for shape tests and
  smoke runs only.
  """
  graphdef, state = nnx.split(model)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  rng = np.random.default_rng(seed)
  for path, value in flat.items():
    shape = tuple(value.shape)
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      flat[path] = jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(fan_in))
    elif path[-1] == "scale":
      flat[path] = jnp.ones(shape, jnp.float32)
    else:
      flat[path] = jnp.zeros(shape, jnp.float32)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)


def load_into(
  model: nnx.Module,
  state_dict: Mapping[str, np.ndarray],
  layout: Layout,
  *,
  what: str,
  source: str = "",
  ignored: Callable[[str], bool] = lambda k: False,
) -> nnx.Module:
  """Copy `state_dict` into `model` (which may be abstract, from `nnx.eval_shape`).

  Every tensor is converted to float32 (fp16 / bf16 files are computed in float32).

  Args:
    model: the module to fill; its parameter paths are the first items of `layout`'s values.
    state_dict: {file key: array in torch layout}.
    layout: {file key: (our path, kind)} (see `torch_style_layout`).
    what: architecture description for the error message.
    source: file name for the error message.
    ignored: file keys that may be present but are not used (e.g. training-only tensors).

  Returns:
    A new concrete module holding the weights.

  Raises:
    ValueError: ONE error when the file does not fit the architecture, naming the first
      tensor whose shape differs (file shape and expected shape, torch layout) and the
      missing and unexpected keys.
  """
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  flat = traverse_util.flatten_dict(pure)
  missing = sorted(set(layout) - set(state_dict), key=_natural)
  unexpected = sorted((k for k in set(state_dict) - set(layout) if not ignored(k)), key=_natural)
  mismatch = None
  values = {}
  for key in sorted(set(layout) & set(state_dict), key=_natural):
    path, kind = layout[key]
    value = np.asarray(state_dict[key])
    ours = _to_ours(value, kind)
    want = tuple(flat[path].shape)
    if ours.shape != want:
      if mismatch is None:
        mismatch = (
          f"tensor {key!r} has shape {tuple(value.shape)} in the file, "
          f"expected {_torch_shape(want, kind)}"
        )
      continue
    values[path] = ours
  if mismatch or missing or unexpected:
    where = f" ({source})" if source else ""
    first = mismatch or "no shape mismatch"
    raise ValueError(
      f"weights{where} do not fit {what}: {first}; missing keys "
      f"[{_summary(missing)}]; unexpected keys [{_summary(unexpected)}]"
    )
  for path, value in values.items():
    flat[path] = jnp.asarray(value.astype(np.float32))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  return nnx.merge(graphdef, state)
