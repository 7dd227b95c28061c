"""Root test set-up: 8 CPU-emulated devices before anything imports jax.

It lives at the root so that both ``tests/`` and the doctests in ``tpflax/``
(collected with ``--doctest-modules``) see the same devices.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
