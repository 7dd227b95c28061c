"""How long a CPU dry run takes with its default options against XLA's default compile.

Run: python benchmarks/dry_run_speed.py [--repeat 3]
Writes benchmarks/results/dry_run_speed.md. Per zoo model and mesh: the median time of
``tpflax.dry_run`` with its CPU default (``dryrun.DEFAULT_COMPILER_OPTIONS``: LLVM's optimisations
skipped) and with ``compiler_options={}`` (XLA's defaults), the two alternated in one process so the
ratio is within one run, and whether every number the dry run reads (memory, collectives, FLOPs) is
the same both ways (it must be).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402

CASES = (("mlp", {"model": 8}), ("gpt2", {"data": 2, "model": 4}), ("llama", {"fsdp": 2, "model": 4}),
         ("llama-scan", {"data": 2, "model": 4}), ("moe", {"data": 2, "model": 4}), ("vit", {"model": 8}),
         ("cnn", {"data": 2, "model": 4}), ("lstm", {"model": 8}))


def numbers(dr: tpflax.DryRun) -> tuple:
    return dict(dr.memory), dr.collectives, dr.flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for name, shape in CASES:
        m = zoo.get(name)
        p = tpflax.plan(m.abstract_variables(), shape)
        mesh = tpflax.make_mesh(p.mesh)

        def step(m=m, p=p, mesh=mesh):
            # a fresh step each time: jax keeps a step's compile, and a repeated dry run of it compiles nothing
            return tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8)

        tpflax.dry_run(step(), p, mesh)  # imports warm
        fast, full, same = [], [], True
        for _ in range(args.repeat):
            a = tpflax.dry_run(step(), p, mesh)
            b = tpflax.dry_run(step(), p, mesh, compiler_options={})
            fast.append(a.compile_seconds)
            full.append(b.compile_seconds)
            same = same and numbers(a) == numbers(b)
        f, g = statistics.median(fast), statistics.median(full)
        rows.append((name, ",".join(f"{k}={v}" for k, v in shape.items()), f, g, f / g, same))
    lines = ["# dry_run() speed on CPU: LLVM's optimisations skipped (the default) vs XLA's defaults", "",
             f"`python benchmarks/dry_run_speed.py` (median of {args.repeat}, 8 CPU-emulated devices, "
             f"jax {jax.__version__}, adamw train step, batch of 8). Lowering + compile seconds "
             "(`DryRun.compile_seconds`); the two kinds alternate within one run, so the ratio is the "
             "figure to read: the times move with the machine's load.", "",
             "| model | mesh | default (s) | XLA defaults (s) | ratio | same numbers |",
             "|---|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {ms} | {f:.2f} | {g:.2f} | {r:.2f} | {'yes' if s else 'NO'} |"
              for n, ms, f, g, r, s in rows]
    out = Path(__file__).parent / "results" / "dry_run_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
