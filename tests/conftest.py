"""Test-session set-up: 8 simulated CPU devices, float32 everywhere.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
Single-device tests simply use jax.devices()[0]; sharding tests build meshes over all 8.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
