"""A scanned stack planned as its layers unrolled: the GQA key/value choice, compiled.

Run: python benchmarks/scan_pricing.py
Writes benchmarks/results/scan_pricing.md. The zoo Llama (2 key/value heads, fewer than model=4) with L
layers, unrolled and under ``nn.scan``, tree-only plans on data=2,model=4: the chooser's pick for the key/value
kernels, and the adamw step of both candidate layouts (K/V replicated on every tensor rank; K/V split on their
head_dim) compiled on 8 CPU-emulated devices. Inside the scan's loop XLA:CPU all-reduces a whole key/value's
input gradient, so keeping them whole moves more there than unrolled. **score** is the chooser's own step time on the compiled
numbers (tpu-v5e preset: flops / peak + argument bytes / HBM bandwidth + collective bytes / ICI bandwidth);
lower is better. The ratios compare the two layouts of one model within one run.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402

MESH = {"data": 2, "model": 4}
KV = r"attn/[kv]_proj/kernel$"


def compiled(m, p) -> tuple[int, float, float]:
    """Argument bytes per device, collective bytes per step, flops per device of ``p``'s adamw step."""
    mesh = tpflax.make_mesh(p.mesh)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh)
    return dr.memory["argument"], dr.comm_total, dr.flops


def main() -> None:
    hw = tpflax.get_hardware("tpu-v5e")
    rows = []
    for layers, scan in ((8, False), (8, True), (32, True)):
        m = zoo.get("llama", n_layers=layers, scan_layers=scan)
        v = m.abstract_variables()
        p = tpflax.plan(v, MESH)
        k = next(d for path, d in p.decisions.items() if path.endswith("attn/k_proj/kernel"))
        split = next(a for a in k.alternatives if a.name.endswith("head_dim split"))
        whole = next(a for a in k.alternatives if a.name.endswith("K/V replicated"))
        layouts = {"K/V replicated": tpflax.plan(v, MESH, rules=[(KV, whole.spec)]),
                   "K/V head_dim split": tpflax.plan(v, MESH, rules=[(KV, split.spec)])}
        got = {name: compiled(m, q) for name, q in layouts.items()}
        score = {name: n[2] / hw.peak_flops + n[0] / hw.hbm_bandwidth + n[1] / hw.fast_bandwidth
                 for name, n in got.items()}
        picked = next(a.name for a in k.alternatives if a.chosen)
        a, b = got["K/V replicated"], got["K/V head_dim split"]
        rows.append((f"{layers} {'scanned' if scan else 'unrolled'}", picked, a, b,
                     score["K/V head_dim split"] / score["K/V replicated"]))
        print(rows[-1], flush=True)
    lines = ["# A scanned stack priced as its layers unrolled: the GQA key/value choice, compiled", "",
             __doc__.split("\n\n", 1)[1].strip(), "",
             "| llama layers | chooser's pick | K/V replicated: bytes / comm / flops | head_dim split: bytes / comm / "
             "flops | split / replicated: bytes, comm, flops | score split / replicated |",
             "|---|---|---|---|---|---:|"]
    for name, picked, a, b, r in rows:
        lines.append(f"| {name} | {picked} | {a[0]:,} / {a[1]:,.0f} / {a[2]:.4g} | {b[0]:,} / {b[1]:,.0f} / "
                     f"{b[2]:.4g} | {b[0] / a[0]:.3f}, {b[1] / a[1]:.3f}, {b[2] / a[2]:.3f} | {r:.3f} |")
    out = Path(__file__).parent / "results" / "scan_pricing.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
