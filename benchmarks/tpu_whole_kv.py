"""A whole GQA key/value compiled for a TPU slice, against tpflax's TPU estimate.

Run: python benchmarks/tpu_whole_kv.py [--wide]   (needs libtpu: pip install -e ".[tpu]"; about 2 minutes)
Prints one row per mesh, layer stack and key/value head count: the zoo Llama (2 layers, f32) with its key/value
kernels kept whole and every other kernel in tpflax's Megatron layout, its adamw step compiled for
``tpu-v5e:2x4``, and ``tpflax.estimate(..., target="tpu-v5e:2x4")``'s collective bytes over the compiled ones.
``--wide``: at a published width instead (d_model 2048, 16 query heads and 2 key/value heads of 128, d_ff 5632,
a 32000 vocabulary, 8 x 512 tokens), data=2,model=4 only, each collective kind beside the estimate's.
The observations are in benchmarks/tpu_aot_notes.md (twenty-ninth round).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402

TARGET = "tpu-v5e:2x4"
KV = r"attn/[kv]_proj/kernel$"


WIDE = {"d_model": 2048, "n_heads": 16, "head_dim": 128, "d_ff": 5632, "vocab": 32000, "seq_len": 512}


def main() -> None:
    wide = "--wide" in sys.argv[1:]
    print("| mesh | layers | K | compiled comm | estimate | ratio |\n|---|---|---:|---:|---:|---:|")
    for shape in ({"data": 2, "model": 4},) if wide else ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4}):
        for scan in (False, True):
            for kv in (2,) if wide else (1, 2):
                m = zoo.get("llama", n_layers=2, scan_layers=scan, n_kv_heads=kv, **(WIDE if wide else {}))
                p = tpflax.plan(m.abstract_variables(), shape, rules=[(KV, "replicate")])
                mesh = tpflax.make_mesh(p.mesh, target=TARGET)
                dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh)
                est = tpflax.estimate(p, optax.adamw(1e-3), 8, model=m, target=TARGET)
                label = ",".join(f"{k}={v}" for k, v in shape.items())
                print(f"| {label} | 2 {'scanned' if scan else 'unrolled'} | {kv} | {dr.comm_total:,.0f} | "
                      f"{est.comm_total:,.0f} | {est.comm_total / dr.comm_total:.3f} |", flush=True)
                if wide:
                    got = dr.comm()
                    for kind in sorted(set(got) | set(est.comm)):
                        for axis in sorted(set(got.get(kind, {})) | set(est.comm.get(kind, {}))):
                            print(f"|   {kind} over {axis} | | | {got.get(kind, {}).get(axis, 0):,.0f} | "
                                  f"{est.comm.get(kind, {}).get(axis, 0):,.0f} | |", flush=True)


if __name__ == "__main__":
    main()
