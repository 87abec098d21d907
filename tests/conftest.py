"""Test-session setup: eight fake CPU devices so sharding tests run on any machine.

Tests that want one device pass `devices=jax.devices()[:1]` explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
