"""Test-session setup: eight fake CPU devices so sharding tests run on any machine, and a
session-wide import cache.

Tests that want one device pass `devices=jax.devices()[:1]` explicitly.

Imported checkpoints are cached (`lm.convert.cache`) in a temporary folder that this run's
processes (pytest-xdist workers inherit it, CLI subprocesses too) share and the process that
made it removes at exit: each real checkpoint is converted once per run, and the small GGUF
files tests write never reach the user's ~/.cache/lm.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "LM_IMPORT_CACHE" not in os.environ:
    os.environ["LM_IMPORT_CACHE"] = tempfile.mkdtemp(prefix="lm-test-imports-")
    atexit.register(shutil.rmtree, os.environ["LM_IMPORT_CACHE"], ignore_errors=True)
