"""Real-size train steps compiled by the TPU compiler for TPU pods, on a machine without TPUs.

For each case the script plans a zoo model at real size, builds the standard
train step (forward, backward, adamw) with abstract sharded arguments on
``tpflax.make_mesh(shape, target=...)`` (libtpu's compile-only devices), and
compiles it with ``tpflax.dry_run``: nothing is allocated and nothing runs. It
records the compile time, XLA:TPU's memory per device (peak and breakdown), the
fit verdict against the preset's HBM, the collectives and the FLOPs.

Needs libtpu: ``pip install "tpflax[tpu]"``.
Run:  python benchmarks/tpu_pod.py [--cases 7b-scan,70b-scan] [--out PATH]
Writes benchmarks/results/tpu_pod.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402

# label: (zoo name, config overrides, mesh, target, global batch[, gather_fsdp])
CASES = {
    "7b": ("llama-2-7b", {}, {"fsdp": 32, "model": 8}, "tpu-v5e:16x16", 32),
    "7b-scan": ("llama-2-7b-scan", {}, {"fsdp": 32, "model": 8}, "tpu-v5e:16x16", 32),
    "70b-scan": ("llama-70b", {"scan_layers": True, "remat": True, "dtype": jnp.bfloat16},
                 {"fsdp": 32, "model": 8}, "tpu-v5e:16x16", 32),
    # 70B widths, 8 of the 80 layers: what the scanned stack costs per layer
    "70b-scan-8l": ("llama-70b", {"scan_layers": True, "remat": True, "dtype": jnp.bfloat16, "n_layers": 8},
                    {"fsdp": 32, "model": 8}, "tpu-v5e:16x16", 32),
    # make_train_step's fsdp gather constrains whole stacked (scanned) weights, i.e. all 80
    # layers at once; without it GSPMD places the scanned weights itself
    "70b-scan-nogather": ("llama-70b", {"scan_layers": True, "remat": True, "dtype": jnp.bfloat16},
                          {"fsdp": 32, "model": 8}, "tpu-v5e:16x16", 32, False),
    # issue 12's cheap reproduction: 70B widths, 4 layers, 256 tokens (temp 2.8 GiB before the
    # per-layer gather inside the scan, 523 MiB after; about 95 s to compile)
    "70b-scan-4l-short": ("llama-70b", {"scan_layers": True, "remat": True, "dtype": jnp.bfloat16, "n_layers": 4,
                                        "seq_len": 256}, {"fsdp": 32, "model": 8}, "tpu-v5e:16x16", 32),
    "70b-scan-v5p": ("llama-70b", {"scan_layers": True, "remat": True, "dtype": jnp.bfloat16},
                     {"fsdp": 16, "model": 8}, "tpu-v5p:4x4x8", 64),
}


def run(label: str) -> dict:
    name, overrides, mesh_sizes, target, batch, *gather = CASES[label]
    model = zoo.get(name, **overrides)
    t0 = time.perf_counter()
    p = tpflax.plan(model.abstract_variables(), mesh_sizes)
    mesh = tpflax.make_mesh(mesh_sizes, target=target)
    ts = tpflax.make_train_step(model, p, mesh, optax.adamw(1e-4), batch, gather_fsdp=all(gather))
    dr = tpflax.dry_run(ts, p, mesh)
    total = time.perf_counter() - t0
    params = sum(d.bytes for d in p.decisions.values())
    return {"label": label, "model": name, "overrides": {**overrides, **({"gather_fsdp": False} if gather else {})}, "target": target, "mesh": str(p.mesh),
            "batch": batch, "params_bytes": params, "dr": dr, "seconds": total}


def fmt_case(r: dict) -> str:
    from tpflax import fmt_bytes as fb

    dr = r["dr"]
    m = dr.memory

    def b(k):
        return fb(m[k]) if m.get(k) is not None else "-"

    extra = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in r["overrides"].items()) or "as in the zoo"
    verdict = dr.fit.line() if dr.fit is not None else "no verdict"
    comm = fb(dr.comm_total) if dr.collectives else "-"
    flops = f"{dr.flops:.3g}" if dr.flops else "-"
    return (f"| {r['model']} ({extra}) | {fb(r['params_bytes'])} | {r['target']} | {r['mesh']} | {r['batch']} | "
            f"{dr.compile_seconds:.0f} s | {b('argument')} | {b('output')} | {b('temp')} | {b('alias')} | "
            f"**{b('peak')}** | {verdict} | {comm} | {flops} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="7b-scan,70b-scan")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tpu_pod.md"))
    args = ap.parse_args()
    rows = []
    for label in args.cases.split(","):
        r = run(label)
        print(fmt_case(r), flush=True)
        for w in r["dr"].warnings:
            print("  note:", w, flush=True)
        rows.append(r)
    lines = [
        "# Real-size train steps compiled by the TPU compiler (no TPU attached)",
        "",
        "`python benchmarks/tpu_pod.py` on a 2-core machine shared with other jobs (compile times are",
        "wall time under that load). Each row: plan, `make_mesh(shape, target=...)` over libtpu's",
        "compile-only devices, `make_train_step` (adamw) on abstract sharded arguments, `dry_run`. Memory",
        "is XLA:TPU's per device; the peak is the larger of `argument + output + temp - alias` and its",
        "`peak_memory_in_bytes` (tpflax/_src/compiled.py); the verdict holds the peak against the preset's",
        "HBM per device. A program XLA:TPU refuses for lack of HBM has only the compiler's total (no",
        "breakdown). Parameters are f32; `dtype` is the compute dtype.",
        "",
        "| model | params (total) | target | mesh | batch | compile | argument | output | temp | alias | peak |"
        " fit | collective bytes/step | flops/device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[fmt_case(r) for r in rows],
        "",
    ]
    notes = sorted({w for r in rows for w in r["dr"].warnings})
    lines += [f"- note: {w}" for w in notes]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
