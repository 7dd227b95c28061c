"""Root test set-up: 8 CPU-emulated devices before anything imports jax.

It lives at the root so that both ``tests/`` and the doctests in ``tpflax/``
(collected with ``--doctest-modules``) see the same devices.
"""

import os

# Every CPU compile of the tests skips LLVM's optimisations, as dry_run does on CPU: the HLO, and so the
# collectives, memory and FLOPs the tests read, are the same (tests/test_dryrun.py compares one step with XLA's
# default level, set explicitly), in about 6% less of the suite's time. Subprocesses inherit it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
