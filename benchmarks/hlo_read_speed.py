"""How long ``dry_run`` takes to read a compiled module (collectives and FLOPs) beside compiling it.

Run: python benchmarks/hlo_read_speed.py [--repeat 3] [--layers 4,12,24]
Writes benchmarks/results/hlo_read_speed.md.

After XLA compiles a step, :func:`tpflax.dry_run` reads the module's text twice: its collectives
(``parse_collectives``) and its matmul FLOPs with and without the loops' trip counts (``dot_flop_counts``).
Each row compiles the zoo's tiny Llama, its layers unrolled, for ``data=2,model=4`` on 8 CPU-emulated devices
(adamw, batch 8), then times that reading from scratch (the module-text caches cleared; median of
``--repeat``) and sets it beside the compile's own seconds from the same run: the ratio is the figure to read.
Reading is linear in the module's size when the ratio stays flat as the layers grow.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402
from tpflax._src.hlo import loops, text  # noqa: E402
from tpflax._src.hlo.collectives import parse_collectives  # noqa: E402
from tpflax._src.hlo.flops import dot_flop_counts  # noqa: E402

MESH = {"data": 2, "model": 4}


def read(hlo: str, mesh) -> float:
    """Seconds to read the module's collectives and FLOPs with nothing cached."""
    text._scan.cache_clear()
    if hasattr(loops, "text_multipliers"):  # absent before round 47: the script also measures the older code
        loops.text_multipliers.cache_clear()
    t0 = time.perf_counter()
    parse_collectives(hlo, mesh, num_devices=mesh.devices.size)
    dot_flop_counts(hlo)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", default="4,12,24")
    args = ap.parse_args()
    mesh = tpflax.make_mesh(MESH)
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        m = zoo.get("llama", n_layers=n)
        p = tpflax.plan(m.abstract_variables(), MESH)
        dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh, keep_hlo=True)
        hlo = dr.hlo_text
        secs = statistics.median(read(hlo, mesh) for _ in range(args.repeat))
        rows.append((n, hlo.count("\n"), len(dr.collectives), dr.compile_seconds, secs))
        print(f"{n:3d} layers: {rows[-1][1]:7d} lines, {rows[-1][2]:5d} collectives, compile {dr.compile_seconds:6.2f} s, "
              f"read {secs:6.3f} s, ratio {secs / dr.compile_seconds:.3f}", flush=True)
    lines = ["# Reading a compiled module: dry_run's collectives and FLOPs beside the compile", "",
             f"`python benchmarks/hlo_read_speed.py` (median of {args.repeat}, jax {jax.__version__}, zoo llama with "
             "its layers unrolled, data=2,model=4 on 8 CPU-emulated devices, adamw, batch 8). The ratio (read / "
             "compile) is measured within one run; the seconds move with the machine's load.", "",
             "| layers | HLO lines | collectives | compile (s) | read (s) | read / compile |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {ln:,} | {c:,} | {cs:.2f} | {r:.3f} | {r / cs:.3f} |" for n, ln, c, cs, r in rows]
    out = Path(__file__).parent / "results" / "hlo_read_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
