"""Training methods: a training objective and its sampler, registered by name in
:data:`METHODS` and chosen by ``config.method``.

- ``dfm``: Decomposable Flow Matching (Algorithm 1 of the paper and its stage-scheduled sampler).
- ``fm``: plain flow matching, the paper's baseline: the same model and code with one stage.
- ``pyramidal_flow``: Pyramidal Flow (Jin et al. 2024), one model over K time windows, each at
  its own pyramid level.
- ``cascade``: the paper's cascade baseline: a low-resolution model, then a full-resolution one
  initialised from it and conditioned on its upsampled samples.
"""

from dfm_jax.methods import cascade, dfm, fm, pyramidal_flow  # noqa: F401  (registers the methods)
from dfm_jax.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
