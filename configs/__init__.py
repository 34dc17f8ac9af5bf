"""The shipped configs (inside a wheel: ``dfm_jax.configs``); name one with ``--config=NAME``."""
