"""``compiled.tuple_values`` against XLA:TPU's buffer dump for steps with argmax, a scan and a sort (needs libtpu).

Run: python benchmarks/tpu_tuple_count.py     (seconds; no TPU used, compiled for tpu-v5e:2x4)

Per step, the count read from the optimized HLO beside the tuple index tables in the dump: the tuple-shaped values
of the default memory space's ``preallocated-temp`` allocation in ``*jit_step*-buffer-assignment.txt``, one per
distinct offset (a ``while`` loop's operand, the loop, its body's root and its body's and condition's parameters
share one). What it showed: ``benchmarks/tpu_aot_notes.md``, round 58, "Review fix: reducers and loops".
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile

if __name__ == "__main__":  # before the dump directory is made and jax starts: --help runs nothing
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
DUMP = tempfile.mkdtemp(prefix="tpu_tuple_count_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           f" --xla_dump_to={DUMP}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax._src.compiled import tuple_values  # noqa: E402


class Step(nn.Module):
    """A 1-layer MLP LM over a 1003-row table, with an argmax (a variadic reduce) and optionally a scan and a sort."""

    loops: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(1003, 128, name="embed")(ids)
        h = nn.Dense(512, name="up")(x)
        x = x + jnp.argmax(h, -1)[..., None].astype(x.dtype) * 1e-3
        if self.loops:
            x, _ = jax.lax.scan(lambda c, _: (c * 0.5 + jnp.tanh(c), None), x, None, length=3)
            x = x + jnp.sort(x, axis=-1)
        x = x + nn.Dense(128, name="down")(nn.gelu(h))
        return nn.Dense(1003, name="head")(x)


def dump_tables(before: set[str]) -> int:
    """Tuple index tables in the newest step dump's default-space temp allocation (distinct offsets)."""
    path = next(p for p in glob.glob(f"{DUMP}/*jit_step*after_optimizations-buffer-assignment.txt") if p not in before)
    offsets, on = set(), False
    for line in open(path):
        if line.startswith("allocation"):
            on = line.rstrip().endswith("preallocated-temp:") and "color" not in line
        elif on:
            m = re.search(r"offset=(\d+)\): \(", line)
            if m:
                offsets.add(m.group(1))
    return len(offsets)


def main() -> None:
    ids = (jax.ShapeDtypeStruct((8, 32), jnp.int32),)
    ms = {"fsdp": 2, "model": 4}
    mesh = tpflax.make_mesh(ms, target="tpu-v5e:2x4")
    for loops in (False, True):
        m = Step(loops)
        v = jax.eval_shape(m.init, jax.random.key(0), *ids)
        p = tpflax.plan(v, ms, batch=ids)
        before = set(glob.glob(f"{DUMP}/*jit_step*after_optimizations-buffer-assignment.txt"))
        dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=ids, variables=v), p, mesh,
                            keep_hlo=True)
        print(f"{'argmax, scan, sort' if loops else 'argmax':20s} tuple_values {tuple_values(dr.hlo_text):4d}  "
              f"dump tables {dump_tables(before):4d}", flush=True)
    shutil.rmtree(DUMP, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
