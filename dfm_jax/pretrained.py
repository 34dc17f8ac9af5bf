"""Trained models from Python: load a run or a published model, sample, publish.

    from dfm_jax.pretrained import Generator

    gen = Generator.load("workdirs/default")            # a run's workdir: its newest intact
                                                        # checkpoint (or step=N); local or gs://
    out = gen.sample(labels=[0, 1, 2, 3], steps_per_stage=(20, 10, 10), cfg_scale=1.5, seed=0)
    out.images     # uint8 [N, H, W, C] (videos [N, T, H, W, C]; latents decoded to pixels)
    out.previews   # uint8 [S, N, H, W, C]: the sample as it stood when each stage finished
    gen.publish("published/default")                   # EMA weights, config and a model card
    gen.push_to_hub("OWNER/REPO")                       # the same on the Hub -> hf://OWNER/REPO@COMMIT

    gen = Generator.load("published/default")           # a published folder: local, gs://, or
    gen = Generator.load("hf://OWNER/REPO@REVISION")    # a Hub repository at a pinned revision
    gen = Generator.load("digits")                      # the model shipped in the package

A published folder holds ``weights.safetensors`` (the weights the sampler uses: the EMA model,
for the cascade also its low-resolution model), ``config.json`` (the run's config),
``stage_stats.json`` when the run standardised its stages, and ``README.md`` (a model card).
:meth:`Generator.push_to_hub` uploads it to the Hugging Face Hub and returns its pinned name.

Time convention of the sampler: t = 0 is noise, t = 1 is data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
from etils import epath

from dfm_jax import config_defaults, sampling, storage
from dfm_jax.run import STAGE_STATS_FILE, Run, setup

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"

# Models inside the package (dfm_jax/models/NAME): name -> sha256 of its weights, checked on
# load. "digits": configs/default.py trained for 2,000 steps (its model card has the numbers).
SHIPPED = {"digits": "7a0f19b5e96c89120c3655d0d3a811ae6ca8524ee847b61413c301c23120e5ba"}


def shipped_model(name: str) -> str:
  """The folder of the model shipped as ``name`` (see `SHIPPED`), after checking its weights'
  sha256; ValueError when it is damaged."""
  folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", name)
  with open(os.path.join(folder, WEIGHTS_FILE), "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
  if got != SHIPPED[name]:
    raise ValueError(f"the shipped model {folder} is damaged (sha256 {got[:12]}...): reinstall")
  return folder


@dataclasses.dataclass(frozen=True)
class Samples:
  """What :meth:`Generator.sample` returns.

  Attributes:
    images: uint8 ``[N, H, W, C]`` (videos ``[N, T, H, W, C]``), decoded to pixels for latents.
    labels: int32 ``[N]``.
    previews: uint8 ``[S, N, ...]``: each sample as it stood when stage s finished (stage
      order, coarse to fine; the last equals ``images``), or None when not asked for.
    data: float32 ``[N, ...]``: the samples in the data space (pixels in [-1, 1], or latents).
  """

  images: np.ndarray
  labels: np.ndarray
  previews: np.ndarray | None
  data: np.ndarray


class Generator:
  """A trained model and its config, ready to sample (see the module docstring)."""

  def __init__(self, run: Run, weights, step: int | None):
    self.run, self.weights, self.step = run, weights, step
    self._sample_fns: dict = {}

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.run.config

  # ------------------------------------------------------------------------------------ load

  @classmethod
  def load(cls, source: str, step: int = -1) -> Generator:
    """A run's workdir (its newest intact checkpoint, or ``step``) or a published folder, local,
    ``gs://`` or ``hf://OWNER/REPO@REVISION``, or the name of a model shipped in the package
    (`SHIPPED`: ``"digits"``); FileNotFoundError when it is none of these."""
    if source in SHIPPED and not os.path.exists(source):
      source = shipped_model(source)
    if source.startswith(storage.HUB):
      source = storage.local_copy(source, "source")
    folder = epath.Path(source)
    if not (folder / CONFIG_FILE).exists():
      raise FileNotFoundError(
        f"{source}: no {CONFIG_FILE}; not a run's workdir or a published model"
      )
    config, published_step = _saved_config(folder)
    if (folder / WEIGHTS_FILE).exists():
      return cls._from_published(config, str(folder), published_step)
    run, weights, saved_step = sampling.restore_ema(config, str(folder), step)
    return cls(run, weights, saved_step)

  @classmethod
  def _from_published(cls, config, folder: str, step: int | None) -> Generator:
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top

    run = setup(config, folder, check_data=False)
    abstract = run.exp.method.sampling_state(run.abstract_state)
    with (epath.Path(folder) / WEIGHTS_FILE).open("rb") as f:
      arrays = st.load(f.read())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [_key(path) for path, _ in leaves]
    missing = sorted(set(names) - set(arrays))
    if missing or len(arrays) != len(names):
      extra = sorted(set(arrays) - set(names))
      raise ValueError(
        f"{folder}/{WEIGHTS_FILE} does not fit its config.json's model: missing "
        f"{missing[:3]}, unexpected {extra[:3]}"
      )
    values = []
    for (path, leaf), name in zip(leaves, names):
      value = arrays[name]
      if value.shape != tuple(leaf.shape):
        raise ValueError(
          f"{folder}/{WEIGHTS_FILE}: {name} has shape {value.shape}, the model {tuple(leaf.shape)}"
        )
      values.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
    return cls(run, jax.tree_util.tree_unflatten(treedef, values), step)

  # ---------------------------------------------------------------------------------- sample

  def sample(
    self,
    labels=None,
    num: int | None = None,
    *,
    steps_per_stage: tuple[int, ...] | None = None,
    thresholds: tuple[float, ...] | None = None,
    cfg_scale: float | tuple[float, ...] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    previews: bool = True,
  ) -> Samples:
    """Samples one item per label (``labels``: ints ``[N]``; default ``num`` items cycling
    through the classes, ``num`` defaulting to one per class). ``steps_per_stage``,
    ``thresholds`` and ``cfg_scale`` (one scale, or one per stage) override the config's
    sampler; the same seed gives the same samples."""
    classes = int(self.config.data.num_classes)
    if labels is None:
      labels = sampling.class_cycle_labels(num if num is not None else classes, classes)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= classes:
      raise ValueError(f"labels must be class indices in [0, {classes}), got {labels.tolist()}")
    cfg = self.run.exp.sampler
    changes = {
      k: v
      for k, v in (
        ("steps_per_stage", steps_per_stage),
        ("thresholds", thresholds),
        ("cfg_scale", cfg_scale),
      )
      if v is not None
    }
    if changes:
      cfg = dataclasses.replace(cfg, auto_schedule=False, **changes)
    key = (cfg, previews)
    if key not in self._sample_fns:
      self._sample_fns[key] = sampling.make_sample_fn(
        self.run.ema_graphdef(), self.run.exp, cfg, previews=previews
      )
    sample_fn = self._sample_fns[key]
    batch = int(batch_size or min(len(labels), int(self.config.sampler.batch_size)))
    with jax.set_mesh(self.run.mesh):
      out = sampling.generate(sample_fn, self.weights, jax.random.key(seed), labels, batch)
    data = out["images"]
    images = sampling.to_display(data, self.config)
    shown = None
    if previews:
      pv = out["previews"]  # [S, N, ...]
      flat = sampling.to_display(pv.reshape((-1,) + pv.shape[2:]), self.config)
      shown = flat.reshape(pv.shape[:2] + flat.shape[1:])
    return Samples(images=images, labels=labels, previews=shown, data=data)

  # --------------------------------------------------------------------------------- publish

  def publish(self, folder: str, notes: str = "") -> str:
    """Writes the sampling weights, the config and a model card (ending with ``notes``:
    results, data licence, ...) to ``folder`` (local or ``gs://``); returns it. Loading it back
    gives the same samples."""
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top

    out = epath.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_flatten_with_path(self.weights)[0]
    arrays = {_key(path): _host(leaf) for path, leaf in leaves}
    data = st.save(arrays, metadata={"format": "dfm_jax", "step": str(self.step)})
    with storage.atomic_path(out / WEIGHTS_FILE) as tmp:
      tmp.write_bytes(data)
    config = json.loads(json.dumps(self.config.to_dict(), default=str))
    storage.write_json(out / CONFIG_FILE, {**config, "published_step": self.step})
    stats = self.run.exp.decomposition.stats
    if stats is not None:
      storage.write_json(out / STAGE_STATS_FILE, stats.to_dict())
    card = _model_card(self, len(arrays), sum(a.size for a in arrays.values()))
    (out / CARD_FILE).write_text(card + (f"\n{notes.strip()}\n" if notes.strip() else ""))
    return str(out)

  def push_to_hub(self, repo_id: str, notes: str = "", private: bool = False) -> str:
    """Publishes to the Hugging Face Hub repository ``repo_id`` (created if needed; your
    ``huggingface-cli login`` token) and returns ``hf://REPO_ID@COMMIT``, the pinned name
    :meth:`load` takes."""
    import tempfile  # pylint: disable=g-import-not-at-top

    import huggingface_hub  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as folder:
      self.publish(folder, notes)
      api = huggingface_hub.HfApi()
      api.create_repo(repo_id, private=private, exist_ok=True)
      commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=f"dfm_jax model, training step {self.step}",
      )
    return f"{storage.HUB}{repo_id}@{commit.oid}"


def _key(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def _host(leaf) -> np.ndarray:
  value = np.asarray(jax.device_get(leaf))
  return value.astype(np.float32) if value.dtype.name == "bfloat16" else value


def _saved_config(folder: epath.Path) -> tuple[ml_collections.ConfigDict, int | None]:
  """The run's config (``config.json``) for this machine: all its devices data-parallel, one
  process; and the step a published model was taken from (None for a workdir)."""
  saved = json.loads((folder / CONFIG_FILE).read_text())
  step = saved.pop("published_step", None)
  return config_defaults.from_saved(saved), step


def _model_card(gen: Generator, tensors: int, parameters: int) -> str:
  c = gen.config
  changed = config_defaults.differences(c)
  lines = [
    f"# dfm_jax model: {c.method} on {c.data.source}",
    "",
    f"A class-conditional {'video' if int(c.data.frames) else 'image'} generator trained "
    f"with dfm_jax ({c.method}; {c.decomposition.num_stages} stages of a {c.decomposition.kind} "
    f"decomposition), {c.data.num_classes} classes, samples of "
    f"{c.data.resolution}x{c.data.resolution}x{c.data.channels}"
    + (f" latents decoded by {c.autoencoder.kind}" if c.autoencoder.get("kind") else " pixels")
    + f". Published from training step {gen.step}: {tensors} tensors, {parameters:,} values.",
    "",
    "```python",
    "from dfm_jax.pretrained import Generator",
    'gen = Generator.load("THIS_FOLDER_OR_hf://OWNER/REPO@REVISION")',
    "out = gen.sample(num=16, seed=0)   # out.images: uint8 [16, H, W, C]",
    "```",
    "",
    "Config fields that differ from dfm_jax's defaults (the full config: `config.json`):",
    "",
    *[f"    {line}" for line in changed],
    "",
    "The licence of these weights is the publisher's to state, and that of the training data",
    "applies to them.",
    "",
  ]
  return "\n".join(lines)


__all__ = ["Generator", "Samples", "WEIGHTS_FILE"]
