"""Flow matching, the paper's baseline: one stage, logit-normal timesteps, Euler/Heun sampling.

It is DFM with a single stage (where Algorithm 1 and the stage schedule reduce exactly to plain
flow matching, which the tests check), so it shares that code; the configs' ``:fm`` twins select
it with the same backbone, token count and sampling steps.
"""

from __future__ import annotations

from dfm_jax.methods.base import METHODS
from dfm_jax.methods.dfm import DecomposableFlowMatching


@METHODS.register("fm")
class FlowMatching(DecomposableFlowMatching):
  """Plain flow matching on the whole sample."""

  @classmethod
  def check_config(cls, config) -> list[str]:
    if int(config.decomposition.num_stages) != 1:
      return [
        f"method 'fm' trains one stage, but decomposition.num_stages is "
        f"{config.decomposition.num_stages} (use the config's ':fm' twin)"
      ]
    return []
