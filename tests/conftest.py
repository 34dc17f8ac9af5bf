"""Test setup: 8 forced host devices so multi-device code runs on one CPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so CI results do not depend on luck.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")
