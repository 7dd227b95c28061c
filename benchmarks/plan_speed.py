"""How long planning takes: Llama-2-7B, a 70B-shaped tree, and growth with leaf count.

Run: python benchmarks/plan_speed.py [--repeat 7]
Writes benchmarks/results/plan_speed.md. Target (issue 2): 70B-shaped tree under
100 ms, time linear in the number of leaves. Planning is pure: trees are
jax.ShapeDtypeStruct, nothing is allocated.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import jax

import tpflax
from tpflax import zoo

MESH = {"data": 16, "fsdp": 16, "model": 8}  # a 2048-chip abstract mesh


def median_ms(fn, repeat: int) -> float:
    fn()  # warm caches (regex compilation, imports)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def llama_like(n_layers: int) -> dict:
    """A Llama-70B-shaped tree with ``n_layers`` layers, built directly (no eval_shape)."""
    S = jax.ShapeDtypeStruct
    d, h, kv, hd, f, v = 8192, 64, 8, 128, 28672, 32000
    bf = "bfloat16"
    layers = {}
    for i in range(n_layers):
        layers[f"layers_{i}"] = {
            "attention_norm": {"scale": S((d,), bf)}, "ffn_norm": {"scale": S((d,), bf)},
            "attn": {"q_proj": {"kernel": S((d, h, hd), bf)}, "k_proj": {"kernel": S((d, kv, hd), bf)},
                     "v_proj": {"kernel": S((d, kv, hd), bf)}, "o_proj": {"kernel": S((h, hd, d), bf)}},
            "mlp": {"gate_proj": {"kernel": S((d, f), bf)}, "up_proj": {"kernel": S((d, f), bf)},
                    "down_proj": {"kernel": S((f, d), bf)}}}
    return {"params": {"embed": {"embedding": S((v, d), bf)}, **layers, "norm": {"scale": S((d,), bf)},
                       "lm_head": {"kernel": S((d, v), bf)}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    rows = []
    for name in ("llama-2-7b", "llama-70b"):
        tree = zoo.get(name).abstract_variables()
        n = len(jax.tree_util.tree_leaves(tree))
        ms = median_ms(lambda t=tree: tpflax.plan(t, MESH), args.repeat)
        rows.append((name, n, ms))
    growth = []
    for layers in (20, 80, 320, 1280):
        tree = llama_like(layers)
        n = len(jax.tree_util.tree_leaves(tree))
        ms = median_ms(lambda t=tree: tpflax.plan(t, MESH), max(3, args.repeat // 2))
        gc.disable()  # Python's cyclic GC scans every live object: it alone grows superlinearly
        try:
            ms_nogc = median_ms(lambda t=tree: tpflax.plan(t, MESH), max(3, args.repeat // 2))
        finally:
            gc.enable()
        growth.append((layers, n, ms, ms_nogc))
    lines = ["# Planner speed", "",
             f"`python benchmarks/plan_speed.py` (median of {args.repeat}, abstract mesh {MESH}).", "",
             "| tree | leaves | plan time (ms) | us per leaf |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {k} | {ms:.1f} | {1e3 * ms / k:.1f} |" for n, k, ms in rows]
    lines += ["", "Growth with leaf count (Llama-70B-shaped layers):", "",
              "| layers | leaves | plan time (ms) | us per leaf | us per leaf, gc off |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {la} | {k} | {ms:.1f} | {1e3 * ms / k:.1f} | {1e3 * ng / k:.1f} |"
              for la, k, ms, ng in growth]
    ratio = max(ms / k for _, k, ms, _ in growth) / min(ms / k for _, k, ms, _ in growth)
    ratio_nogc = max(ng / k for _, k, _, ng in growth) / min(ng / k for _, k, _, ng in growth)
    lines += ["", f"Time per leaf varies by {ratio:.2f}x from {growth[0][1]} to {growth[-1][1]} leaves, "
              f"{ratio_nogc:.2f}x with Python's cyclic GC off "
              f"({'linear' if ratio_nogc < 1.3 else 'NOT linear'}: a linear planner keeps this near 1; "
              "the gap between the columns is the interpreter's GC walking a larger heap).",
              f"70B-shaped tree: {rows[1][2]:.1f} ms (target < 100 ms: "
              f"{'met' if rows[1][2] < 100 else 'MISSED'})."]
    text = "\n".join(lines) + "\n"
    out = Path(__file__).parent / "results" / "plan_speed.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
