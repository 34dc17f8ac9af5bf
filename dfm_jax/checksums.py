"""Checksums of arrays that do not depend on how the arrays are sharded (checkpoint integrity).

``array_checksums`` gives every leaf of a nested dict of arrays 64 bits computed from its global
contents, shape and dtype: every 32-bit word of the array is combined with its linear position,
passed through murmur3's (bijective) finaliser, and the results are summed modulo 2**32, twice
with different constants. Addition modulo 2**32 is associative and commutative, so the value
does not depend on the array's sharding, the mesh or the number of processes (a checkpoint
written on 8 devices verifies when restored on 1). Any change of a single word always changes
both sums; other damage goes unnoticed with probability ~2**-64. Large leaves are reduced on
device by one jitted function; small ones on the host from their shards with the same arithmetic
in numpy. On multi-process runs the partial sums are combined with ``process_allgather``, so
every process must call this for the same leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def leaf_name(path) -> str:
  def name(entry):
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))

  return "/".join(name(e) for e in path)


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words: shape ``x.shape`` (1-, 2- and 4-byte dtypes) or
  ``x.shape + (2,)`` (8-byte dtypes, PRNG keys: ``key_data``)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return _words(jax.random.key_data(x))
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return _words(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4 or size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return x.astype(jnp.uint32)  # sub-byte types: one value per word


_MIX = ((0x01000193, 0x9E3779B9), (0x2C1B3C6D, 0x7F4A7C15))  # (odd multiplier, odd step) pairs
_HOST_MAX_ELEMENTS = 1 << 16  # smaller leaves are checksummed on the host: no compilation


def _checksum_words(w: jax.Array) -> jax.Array:
  """uint32 [2]: for two (odd multiplier, odd step) pairs (m, g), the sum modulo 2**32 over
  words of ``fmix32(word * m + position * g)``. For a fixed position the summand is a bijection
  of the word, so changing any single word changes both sums."""
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  sums = []
  for mult, step in _MIX:
    h = _fmix32(w * jnp.uint32(mult) + index * jnp.uint32(step))
    sums.append(jnp.sum(h, dtype=jnp.uint32))
  return jnp.stack(sums)


@jax.jit
def _checksum_leaf(x: jax.Array) -> jax.Array:
  """uint32 [2] checksum of one array (compiled once per shape, dtype and sharding)."""
  return _checksum_words(_words(x))


def _host_value(x: jax.Array) -> np.ndarray:
  """The value of a small global array on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _np_fmix32(h: np.ndarray) -> np.ndarray:
  h ^= h >> np.uint32(16)
  h *= np.uint32(0x85EBCA6B)
  h ^= h >> np.uint32(13)
  h *= np.uint32(0xC2B2AE35)
  h ^= h >> np.uint32(16)
  return h


def _np_words(data: np.ndarray) -> np.ndarray | None:
  """numpy twin of ``_words`` for 1-, 2- and 4-byte dtypes (None for the others)."""
  if data.dtype == np.bool_:
    return data.astype(np.uint32)
  size = data.dtype.itemsize
  if size not in (1, 2, 4) or data.dtype.kind == "c":
    return None
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[size]
  data = data if data.flags.c_contiguous else data.copy()  # (ascontiguousarray makes 0-d 1-d)
  return data.view(unsigned).astype(np.uint32)


def _host_partial(
  words: np.ndarray, offsets: tuple[int, ...], global_shape: tuple[int, ...]
) -> np.ndarray:
  """uint32 [2]: ``_checksum_words`` restricted to the block ``words`` of a global array of
  ``global_shape`` starting at ``offsets`` (the sums over blocks add up to the whole)."""
  index = np.zeros(words.shape, np.uint64)
  stride = 1
  for axis in reversed(range(words.ndim)):
    n = words.shape[axis]
    pos = (np.arange(n, dtype=np.uint64) + np.uint64(offsets[axis])) * np.uint64(stride % 2**32)
    index = index + pos.reshape((n,) + (1,) * (words.ndim - axis - 1))
    stride *= global_shape[axis]
  index = (index % np.uint64(2**32)).astype(np.uint32)
  out = np.zeros(2, np.uint32)
  with np.errstate(over="ignore"):  # wrapping modulo 2**32 is the point (0-d arrays warn)
    for i, (mult, step) in enumerate(_MIX):
      h = np.atleast_1d(words * np.uint32(mult) + index * np.uint32(step))
      out[i] = np.sum(_np_fmix32(h), dtype=np.uint32)
  return out


def _checksum_on_host(x: jax.Array) -> np.ndarray | None:
  """``_checksum_leaf(x)`` computed from the shards this process holds (replica 0 of each), in
  numpy; None if the dtype is not handled here. On several processes, the partial sums are
  combined with ``process_allgather`` (every process must call this for the same leaves)."""
  key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  global_shape = x.shape + (jax.random.key_data(x).shape[x.ndim :] if key else ())
  total = np.zeros(2, np.uint32)
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    data = np.asarray(jax.random.key_data(shard.data) if key else shard.data)
    words = _np_words(data)
    if words is None:
      return None
    offsets = tuple(sl.start or 0 for sl in shard.index) + (0,) * (words.ndim - x.ndim)
    with np.errstate(over="ignore"):
      total += _host_partial(words, offsets, global_shape)
  if jax.process_count() > 1:
    parts = np.asarray(multihost_utils.process_allgather(total), np.uint32)
    with np.errstate(over="ignore"):
      total = np.sum(parts.reshape(-1, 2), axis=0, dtype=np.uint32)
  return total


def array_checksums(tree) -> dict[str, dict]:
  """{leaf name: {'shape', 'dtype', 'checksum'}} of a nested dict of arrays.

  ``checksum`` is 16 hex digits that depend only on the global values, shape and dtype (see the
  module docstring). Leaves of more than ``_HOST_MAX_ELEMENTS`` elements are reduced where they
  live by a jitted function (compiled once per distinct shape, dtype and sharding); smaller ones
  on the host from their shards, with the same arithmetic in numpy and no compilation.
  """
  named = [
    (leaf_name(p), leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf))
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]
  sums = []
  for _, leaf in named:
    value = _checksum_on_host(leaf) if leaf.size <= _HOST_MAX_ELEMENTS else None
    if value is None:
      # One leaf at a time: many reductions in flight at once can deadlock the in-process
      # collectives of XLA:CPU's (forced) multi-device runs.
      value = _host_value(jax.block_until_ready(_checksum_leaf(leaf)))
    sums.append(value)
  return {
    name: {
      "shape": list(leaf.shape),
      "dtype": str(leaf.dtype),
      "checksum": f"{int(s[0]):08x}{int(s[1]):08x}",
    }
    for (name, leaf), s in zip(named, sums)
  }
