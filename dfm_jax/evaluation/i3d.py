"""I3D (Inception-v1 inflated to 3D, Carreira & Zisserman 2017) in Flax NNX, for FVD.

The network is the PyTorch I3D of ``piergiaj/pytorch-i3d`` as shipped in the ``cd-fvd`` package
(``cdfvd/third_party/i3d/pytorch_i3d.py``) and used by cd-fvd, TATS and others for FVD; its
weights are the Kinetics-400 state dict ``i3d_pretrained_400.pt`` (a plain ``torch.save`` state
dict with keys such as ``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b1b.bn.running_var`` and
``logits.conv3d.bias``; a ``module.`` prefix is accepted). `load_i3d` reads that file with the
code-free reader ``torch_pickle.load_torch_file``. The StyleGAN-V TorchScript export
``i3d_torchscript.pt`` has its own internal layout and is not supported.

FVD conventions of the reference (cd-fvd ``cdfvd.fvd.get_i3d_logits`` and
``third_party/i3d/utils.py:preprocess_i3d``):

* videos are uint8 ``[N, T, H, W, 3]`` with T = 16 frames (FVD-16; any T >= 9 runs);
* every frame is resized to 224 x 224 with bilinear interpolation, ``align_corners=False`` and
  no antialiasing (``F.interpolate``), then scaled to [-1, 1] by ``2 x / 255 - 1``;
* the features are the **400 Kinetics logits** before the softmax (the network's output: average
  pool [2, 7, 7] over the Mixed_5c map, the 1x1x1 logits conv, then the mean over the remaining
  time steps), not the 1024-d pool features (available as ``output='pool'``);
* FVD is the Frechet distance of Gaussians fitted to the logits of real and generated videos
  (cd-fvd uses 2048 generated videos). cd-fvd's covariance divides by N, `fvd_from_features` by
  N - 1 (``metrics.feature_statistics``): the FVD differs by a factor of about 1 + 1/N.

Layout here is channels-last: activations ``[B, T, H, W, C]``, conv kernels ``[kT, kH, kW, I, O]``.
Batch norm uses the running statistics (eps 1e-5, as cd-fvd's ``BatchNorm3d``). All convolutions
and max pools use TensorFlow 'SAME' padding, which is what the reference's dynamic padding
computes; its max pools pad with zeros, which equals -inf padding here because every pooled
input follows a ReLU.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm_jax.evaluation.metrics import feature_statistics, frechet_distance
from dfm_jax.torch_pickle import load_torch_file

__all__ = [
  "InceptionI3d",
  "load_i3d",
  "i3d_params_from_torch",
  "preprocess",
  "i3d_features",
  "fvd_from_features",
  "ENDPOINTS",
  "NUM_CLASSES",
  "FEATURE_DIM",
  "RESOLUTION",
  "NUM_FRAMES",
]

NUM_CLASSES = 400
FEATURE_DIM = 1024  # pool features
RESOLUTION = 224
NUM_FRAMES = 16
BN_EPS = 1e-5

# (name, input channels, branch widths [b0, b1a, b1b, b2a, b2b, b3b]), in network order.
_MIXED = {
  "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
  "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
  "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
  "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
  "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
  "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
  "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
  "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
  "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
# Max pools (window, strides) that precede a block.
_POOLS = {
  "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
  "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
  "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
  "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
ENDPOINTS = (
  "Conv3d_1a_7x7",
  "MaxPool3d_2a_3x3",
  "Conv3d_2b_1x1",
  "Conv3d_2c_3x3",
  "MaxPool3d_3a_3x3",
  "Mixed_3b",
  "Mixed_3c",
  "MaxPool3d_4a_3x3",
  "Mixed_4b",
  "Mixed_4c",
  "Mixed_4d",
  "Mixed_4e",
  "Mixed_4f",
  "MaxPool3d_5a_2x2",
  "Mixed_5b",
  "Mixed_5c",
)


def max_pool_same(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...]) -> jax.Array:
  """TF-'SAME' max pool of ``x`` [B, T, H, W, C] over (T, H, W); output ``ceil(size / stride)``."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), "SAME")


class Unit3D(nnx.Module):
  """Conv3d (no bias unless asked, 'SAME') -> BatchNorm (running stats) -> optional ReLU."""

  def __init__(
    self,
    cin: int,
    cout: int,
    kernel=(1, 1, 1),
    strides=(1, 1, 1),
    *,
    batch_norm: bool = True,
    bias: bool = False,
    relu: bool = True,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      cin, cout, tuple(kernel), strides=tuple(strides), padding="SAME", use_bias=bias, rngs=rngs
    )
    self.bn = (
      nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs)
      if batch_norm
      else None
    )
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, H, W, cin] -> [B, T', H', W', cout]."""
    x = self.conv(x)
    if self.bn is not None:
      x = self.bn(x)
    return jax.nn.relu(x) if self.relu else x


class InceptionModule(nnx.Module):
  """Four branches: 1x1x1; 1x1x1 -> 3x3x3; 1x1x1 -> 3x3x3; 3x3x3 max pool -> 1x1x1."""

  def __init__(self, cin: int, widths: tuple[int, ...], *, rngs: nnx.Rngs):
    w0, w1a, w1b, w2a, w2b, w3b = widths
    self.b0 = Unit3D(cin, w0, rngs=rngs)
    self.b1a = Unit3D(cin, w1a, rngs=rngs)
    self.b1b = Unit3D(w1a, w1b, (3, 3, 3), rngs=rngs)
    self.b2a = Unit3D(cin, w2a, rngs=rngs)
    self.b2b = Unit3D(w2a, w2b, (3, 3, 3), rngs=rngs)
    self.b3b = Unit3D(cin, w3b, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, H, W, cin] -> [B, T, H, W, w0 + w1b + w2b + w3b]."""
    pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
    return jnp.concatenate(
      [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], axis=-1
    )


class InceptionI3d(nnx.Module):
  """Inception-v1 I3D with 400 Kinetics logits; attribute names follow the PyTorch state dict."""

  def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3, *, rngs: nnx.Rngs):
    self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
    self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
    self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
    for name, (cin, widths) in _MIXED.items():
      setattr(self, name, InceptionModule(cin, widths, rngs=rngs))
    self.logits = Unit3D(1024, num_classes, batch_norm=False, bias=True, relu=False, rngs=rngs)

  def pre_pool(self, x: jax.Array, endpoint: str = "Mixed_5c") -> jax.Array:
    """x [B, T, H, W, 3] in [-1, 1] -> the map after block `endpoint` (one of `ENDPOINTS`).

    The default Mixed_5c map is [B, ceil(T/8), ceil(H/32), ceil(W/32), 1024].
    """
    if endpoint not in ENDPOINTS:
      raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
    for name in ENDPOINTS[: ENDPOINTS.index(endpoint) + 1]:
      x = max_pool_same(x, *_POOLS[name]) if name in _POOLS else getattr(self, name)(x)
    return x

  def __call__(self, x: jax.Array, output: str = "logits") -> jax.Array:
    """x [B, T, H, W, 3] in [-1, 1] (T >= 9, H, W >= 193) -> logits [B, 400] or pool [B, 1024].

    ``output='logits'``: the reference's ``forward`` (average pool [2, 7, 7] stride 1, the logits
    conv, mean over time); ``'pool'``: the average-pooled 1024-d features averaged over the
    remaining positions (``extract_features`` then the time mean); ``'pre_pool'``: the Mixed_5c
    map [B, T', H', W', 1024] (any input size).
    """
    x = self.pre_pool(x)
    if output == "pre_pool":
      return x
    if x.shape[1] < 2 or x.shape[2] < 7 or x.shape[3] < 7:
      raise ValueError(
        f"I3D needs T >= 9 frames and H, W >= 193 pixels for its [2, 7, 7] "
        f"average pool; the Mixed_5c map is {x.shape[1:4]}"
      )
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 7, 7, 1), (1,) * 5, "VALID") / 98.0
    if output == "pool":
      return x.mean(axis=(1, 2, 3))
    if output != "logits":
      raise ValueError(f"output must be 'logits', 'pool' or 'pre_pool', got {output!r}")
    # The logits conv is linear, so pooling its output equals the reference's time mean.
    return self.logits(x).mean(axis=(1, 2, 3))


def _torch_name(path: tuple[str, ...]) -> str:
  """NNX parameter path -> PyTorch state-dict key."""
  *module, kind = path
  if module[-1] == "conv":
    return ".".join(module[:-1] + ["conv3d", {"kernel": "weight", "bias": "bias"}[kind]])
  bn = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[kind]
  return ".".join(module[:-1] + ["bn", bn])


def _fill_state(state: nnx.State, state_dict: dict[str, np.ndarray]) -> None:
  """Replaces every leaf of an I3D `state` (concrete or abstract) by its state-dict array."""
  sd = {
    k.removeprefix("module."): v
    for k, v in state_dict.items()
    if not k.endswith("num_batches_tracked")
  }
  missing, shapes, used = [], [], set()

  def convert(path, leaf):
    names = tuple(str(p.key) for p in path)
    key = _torch_name(names)
    if key not in sd:
      missing.append(key)
      return leaf
    used.add(key)
    value = np.asarray(sd[key], np.float32)
    if names[-1] == "kernel":
      value = value.transpose(2, 3, 4, 1, 0)  # [O, I, kT, kH, kW] -> [kT, kH, kW, I, O]
    if value.shape != tuple(leaf.shape):
      shapes.append(f"{key}: {value.shape} vs {tuple(leaf.shape)}")
      return leaf
    return jnp.asarray(value)

  pure = jax.tree_util.tree_map_with_path(convert, nnx.to_pure_dict(state))
  unexpected = sorted(set(sd) - used)
  if missing or unexpected or shapes:
    raise ValueError(
      "not a cd-fvd/pytorch-i3d InceptionI3d(400) state dict (i3d_pretrained_400.pt layout): "
      f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
      f"shape mismatches {shapes[:5]}"
    )
  nnx.replace_by_pure_dict(state, pure)


def i3d_params_from_torch(state_dict: dict[str, np.ndarray], model: InceptionI3d) -> None:
  """Copies a PyTorch I3D state dict (``{key: array}``) into `model` in place.

  Raises ValueError listing missing, unexpected or mis-shaped keys.
  """
  state = nnx.state(model)
  _fill_state(state, state_dict)
  nnx.update(model, state)


def load_i3d(path: str | os.PathLike, num_classes: int = NUM_CLASSES) -> InceptionI3d:
  """The I3D with the weights of a PyTorch state-dict file (e.g. ``i3d_pretrained_400.pt``).

  The file is read without executing code (``torch_pickle.load_torch_file``); the model is
  built abstractly (no random initialisation) and filled from the file.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionI3d(num_classes, rngs=nnx.Rngs(0))))
  _fill_state(state, load_torch_file(path))
  return nnx.merge(graphdef, state)


def preprocess(videos: jax.Array, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> jax.Array:
  """uint8 (or float in [0, 255]) ``[B, T, H, W, C]`` -> float32 ``[B, T, *size, 3]`` in [-1, 1].

  Bilinear resize with half-pixel centres and no antialiasing (PyTorch ``F.interpolate(...,
  mode='bilinear', align_corners=False)``), then ``2 x / 255 - 1``. Grey videos (C = 1) are
  repeated to RGB.
  """
  x = jnp.asarray(videos, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  b, t, h, w, c = x.shape
  if (h, w) != tuple(size):
    x = jax.image.resize(x, (b, t, *size, c), method="bilinear", antialias=False)
  return 2.0 * x / 255.0 - 1.0


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _features(graphdef, state, videos, output: str, size: tuple[int, int]) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return model(preprocess(videos, size), output=output)


def i3d_features(
  model: InceptionI3d,
  videos: np.ndarray,
  batch_size: int = 8,
  output: str = "logits",
  size: tuple[int, int] = (RESOLUTION, RESOLUTION),
) -> np.ndarray:
  """FVD features of ``videos`` uint8 [N, T, H, W, C] (C in 1, 3).

  Returns:
    float32 [N, 400] logits (``output='logits'``, the FVD convention) or [N, 1024] ('pool').
    The tail batch is zero-padded so one compiled program serves all batches.
  """
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
    raise ValueError(f"expected videos [N, T, H, W, C] with C in (1, 3), got {videos.shape}")
  graphdef, state = nnx.split(model)
  outs = []
  for start in range(0, len(videos), batch_size):
    chunk = videos[start : start + batch_size]
    pad = np.zeros((batch_size - len(chunk), *videos.shape[1:]), videos.dtype)
    out = _features(graphdef, state, np.concatenate([chunk, pad]), output, tuple(size))
    outs.append(np.asarray(out)[: len(chunk)])
  dim = NUM_CLASSES if output == "logits" else FEATURE_DIM
  return np.concatenate(outs) if outs else np.zeros((0, dim), np.float32)


def fvd_from_features(fake_feats: np.ndarray, real_feats: np.ndarray) -> float:
  """Frechet video distance between I3D features ``fake_feats`` [N, D] and ``real_feats`` [M, D].

  Gaussian fits with unbiased covariances (`metrics.feature_statistics`); N, M >= 2.
  """
  mu_f, sigma_f = feature_statistics(fake_feats)
  mu_r, sigma_r = feature_statistics(real_feats)
  return frechet_distance(mu_f, sigma_f, mu_r, sigma_r)
