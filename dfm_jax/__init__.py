"""dfm_jax: Decomposable Flow Matching in JAX / Flax NNX.

Time convention everywhere: ``x_t = t * x1 + (1 - t) * x0`` with ``x0 ~ N(0, I)`` noise and
``x1`` data, so **t = 0 is noise and t = 1 is data**; the velocity target is ``x1 - x0``.
"""

__version__ = "0.1.0"
