"""How long dataflow-aware planning takes on real-size models (abstract: nothing is allocated).

Run: python benchmarks/trace_speed.py [--repeat 3]
Writes benchmarks/results/trace_speed.md. Target (issue 5): trace + analysis of
the real-size Llama-2-7B under 5 s. Also the zoo's largest conv model (ResNet-18
at 224x224) and the nn.scan Llama-2-7B. Each row splits the time into

* trace: ``jax.make_jaxpr`` of the forward pass on ``jax.ShapeDtypeStruct`` inputs,
* analysis: walking the jaxpr (uses, tags, edges, escapes),
* full plan: ``tpflax.plan(..., model=)`` end to end (trace + analysis + proposals
  + the tree heuristics for the rest and for the disagreement list),

and sets the full traced plan beside the tree-only plan of the same tree as a
ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import tpflax
from tpflax import zoo
from tpflax._src.trace import dataflow as trace

MESH = {"data": 16, "fsdp": 16, "model": 8}  # a 2048-chip abstract mesh
MODELS = ("llama-2-7b", "llama-2-7b-scan", "resnet18")


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(first call, median of the calls after it, result): jax caches make later traces cheaper."""
    times, out = [], None
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for name in MODELS:
        m = zoo.get(name)
        tree = m.abstract_variables()
        sample = m.sample_inputs(1)
        c_trace, t_trace, (closed, paths, _) = timed(
            lambda m=m, t=tree, s=sample: trace.trace_jaxpr(m, s, t), args.repeat)
        c_analyze, t_analyze, flow = timed(lambda c=closed, p=paths: trace.analyze(c, p), args.repeat)
        _, t_plan, plan = timed(lambda m=m, t=tree: tpflax.plan(t, MESH, model=m), args.repeat)
        _, t_tree, _ = timed(lambda t=tree: tpflax.plan(t, MESH), args.repeat)
        traced = sum(d.source == "trace" for d in plan.decisions.values())
        rows.append((name, m.param_count(), len(paths), flow.n_eqns, len(flow.uses), len(flow.edges),
                     c_trace + c_analyze, t_trace, t_analyze, t_plan, t_tree, traced, len(plan.pairs),
                     len(plan.disagreements)))
        print(f"{name:16s} cold trace+analysis {c_trace + c_analyze:6.2f} s  warm: trace {t_trace:6.2f} s  "
              f"analysis {t_analyze:6.2f} s  full plan {t_plan:6.2f} s "
              f"(tree-only {t_tree * 1e3:6.1f} ms)  eqns {flow.n_eqns}  uses {len(flow.uses)}  "
              f"edges {len(flow.edges)}  pairs {len(plan.pairs)}  disagreements {len(plan.disagreements)}",
              flush=True)
    lines = [
        "# Dataflow-aware planning speed (issue 5)",
        "",
        "`python benchmarks/trace_speed.py --repeat 3` (medians; 2 CPU cores shared with other jobs; "
        f"mesh {MESH}; batch 1, full context length; abstract values only).",
        "",
        "| model | params | leaves | jaxpr eqns | uses | edges | cold trace+analysis s | trace s "
        "| analysis s | full traced plan s | tree-only plan ms | traced / tree-only | leaves decided by "
        "the trace | pairs | disagreements |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, n, leaves, eqns, uses, edges, cold, tt, ta, tp, tr, traced, pairs, dis) in rows:
        lines.append(f"| {name} | {n / 1e6:,.1f}M | {leaves} | {eqns} | {uses} | {edges} | {cold:.2f} | "
                     f"{tt:.2f} | {ta:.3f} | {tp:.2f} | {tr * 1e3:.1f} | {tp / tr:.0f}x | {traced} | "
                     f"{pairs} | {dis} |")
    lines += ["", "Cold: the first call in a fresh process (the number a CLI user sees). The other "
              "columns are medians of the following calls. Target: trace + analysis of Llama-2-7B "
              "under 5 s."]
    out = Path(__file__).parent / "results" / "trace_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
