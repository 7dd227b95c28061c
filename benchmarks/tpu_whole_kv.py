"""A whole GQA key/value compiled for a TPU slice, against tpflax's TPU estimate.

Run: python benchmarks/tpu_whole_kv.py   (needs libtpu: pip install -e ".[tpu]"; about 2 minutes)
Prints one row per mesh, layer stack and key/value head count: the zoo Llama (2 layers, f32) with its key/value
kernels kept whole and every other kernel in tpflax's Megatron layout, its adamw step compiled for
``tpu-v5e:2x4``, and ``tpflax.estimate(..., target="tpu-v5e:2x4")``'s collective bytes over the compiled ones.
The observations are in benchmarks/tpu_aot_notes.md (twenty-ninth round).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402

TARGET = "tpu-v5e:2x4"
KV = r"attn/[kv]_proj/kernel$"


def main() -> None:
    print("| mesh | layers | K | compiled comm | estimate | ratio |\n|---|---|---:|---:|---:|---:|")
    for shape in ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4}):
        for scan in (False, True):
            for kv in (1, 2):
                m = zoo.get("llama", n_layers=2, scan_layers=scan, n_kv_heads=kv)
                p = tpflax.plan(m.abstract_variables(), shape, rules=[(KV, "replicate")])
                mesh = tpflax.make_mesh(p.mesh, target=TARGET)
                dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh)
                est = tpflax.estimate(p, optax.adamw(1e-3), 8, model=m, target=TARGET).comm_total
                label = ",".join(f"{k}={v}" for k, v in shape.items())
                print(f"| {label} | 2 {'scanned' if scan else 'unrolled'} | {kv} | {dr.comm_total:,.0f} | {est:,.0f} | "
                      f"{est / dr.comm_total:.3f} |", flush=True)


if __name__ == "__main__":
    main()
