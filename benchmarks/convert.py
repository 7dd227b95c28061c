"""Benchmark the converter on an 8-device CPU mesh.

1. ``tpflax.shard`` throughput against a plain ``jax.device_put`` of the same
   ``NamedSharding`` tree (target >= 0.95x), from host numpy and from arrays on
   one device. Interleaved repeats in one process; the ratio of medians.
2. Peak process memory (``ru_maxrss``) of ``tpflax.init_sharded`` against
   ``jax.device_put(init(...))`` for a Llama-style zoo model of ~1 GB, each in a
   fresh subprocess (CPU devices live in host RAM, so RSS is device memory).
   Reported as the peak minus the RSS after jax and the mesh are up.

usage: python benchmarks/convert.py [--repeats 31] [--write benchmarks/results/convert.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# ~1.07 GB of float32 parameters: 267M. 8 heads, d_ff 4096 and vocab 32000 all divide model=8.
BIG = dict(vocab=32000, d_model=1024, n_heads=8, n_kv_heads=8, head_dim=128, d_ff=4096, n_layers=12,
           seq_len=16)
# ~270 MB for the throughput runs (same shapes, fewer layers) so repeats stay quick.
MID = dict(BIG, n_layers=2)
MEM_MESH = {"model": 8}
PUT_MESH = {"fsdp": 2, "model": 4}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_child(mode: str) -> dict:
    """Run in a fresh process: build the ~1 GB model one way and report memory."""
    import jax
    import jax.numpy as jnp

    import tpflax
    from tpflax import zoo

    m = zoo.get("llama", **BIG)
    x = jnp.zeros((1, m.config.seq_len), jnp.int32)
    mesh = tpflax.make_mesh(MEM_MESH)
    plan = tpflax.plan(m.abstract_variables(), MEM_MESH)
    jax.block_until_ready(jax.jit(lambda a: a + 1)(jnp.ones(8)))  # backend up
    base = rss_bytes()
    t0 = time.perf_counter()
    if mode == "init_sharded":
        v = tpflax.init_sharded(m.module.init, plan, mesh, jax.random.key(0), x)
    elif mode == "init_sharded_one_program":
        v = tpflax.init_sharded(m.module.init, plan, mesh, jax.random.key(0), x, chunk_bytes=None)
    else:
        full = jax.jit(m.module.init)(jax.random.key(0), x)
        v = jax.device_put(full, tpflax.shardings(plan, mesh))
        jax.block_until_ready(v)
        del full
    jax.block_until_ready(v)
    seconds = time.perf_counter() - t0
    held = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(v) for s in leaf.addressable_shards)
    return {"mode": mode, "model_bytes": plan.total_bytes, "base_rss": base, "peak_rss": peak_bytes(),
            "peak_over_base": peak_bytes() - base, "device_bytes_held": held, "seconds": seconds,
            "per_device_bytes": plan.bytes_per_device}


def run_memory() -> list[dict]:
    out = []
    for mode in ("init_sharded", "init_sharded_one_program", "device_put_init"):
        res = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True,
                             text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def run_throughput(repeats: int) -> list[dict]:
    import jax
    import numpy as np

    import tpflax
    from tpflax import zoo

    m = zoo.get("llama", **MID)
    host = jax.device_get(m.init(0))
    plan = tpflax.plan(host, PUT_MESH)
    mesh = tpflax.make_mesh(PUT_MESH)
    shardings = tpflax.shardings(plan, mesh)
    nbytes = plan.total_bytes
    results = []
    for source in ("host numpy", "device 0"):
        tree = host if source == "host numpy" else jax.device_put(host, jax.devices()[0])
        jax.block_until_ready(tree)

        def plain(tree=tree):
            return jax.device_put(tree, shardings)

        def ours(tree=tree):
            return tpflax.shard(tree, plan, mesh)

        times = {"device_put": [], "shard": []}
        for fn in (plain, ours):  # warm-up: first transfers allocate pools
            jax.block_until_ready(fn())
        pair = (("device_put", plain), ("shard", ours))
        for r in range(repeats):
            for name, fn in (pair if r % 2 == 0 else pair[::-1]):  # interleaved, order alternated
                t0 = time.perf_counter()
                out = fn()
                jax.block_until_ready(out)
                times[name].append(time.perf_counter() - t0)
                del out
        med = {k: statistics.median(v) for k, v in times.items()}
        # Same bytes moved, same layout: check it, so the timing compares like with like.
        a, b = plain(), ours()
        assert all(x.sharding == y.sharding and np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                                   strict=True))
        results.append({"source": source, "bytes": nbytes, "leaves": len(plan.decisions),
                        "repeats": repeats, "device_put_s": med["device_put"], "shard_s": med["shard"],
                        "device_put_gbps": nbytes / med["device_put"] / 1e9,
                        "shard_gbps": nbytes / med["shard"] / 1e9,
                        "ratio": med["device_put"] / med["shard"],
                        "best_ratio": min(times["device_put"]) / min(times["shard"])})
    return results


def fmt_mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def render(put: list[dict], mem: list[dict], repeats: int) -> str:
    lines = ["# Converter benchmark", "",
             f"`python benchmarks/convert.py --repeats {repeats}` on {platform.machine()}, "
             f"{os.cpu_count()} cores, 8 CPU-emulated devices, jax "
             f"{__import__('jax').__version__}.", "",
             f"## shard throughput vs plain jax.device_put ({PUT_MESH}, same NamedShardings)", "",
             "Ratio = device_put median time / shard median time (>= 0.95 is the target; "
             "shard also validates the tree against the plan and never aliases the caller's buffers).",
             "Medians of interleaved repeats (order alternated); best-of ratio beside it, since other "
             "processes on a shared 2-core machine add noise of tens of ms.",
             "", "| source | tree | leaves | device_put | shard | ratio (median) | ratio (best) |",
             "|---|---|---|---|---|---|---|"]
    for r in put:
        lines.append(f"| {r['source']} | {fmt_mb(r['bytes'])} | {r['leaves']} | "
                     f"{r['device_put_s'] * 1e3:.1f} ms ({r['device_put_gbps']:.2f} GB/s) | "
                     f"{r['shard_s'] * 1e3:.1f} ms ({r['shard_gbps']:.2f} GB/s) | {r['ratio']:.3f}x | "
                     f"{r['best_ratio']:.3f}x |")
    model = mem[0]["model_bytes"]
    lines += ["", f"## Peak memory: init_sharded vs device_put(init()) (Llama {BIG}, {MEM_MESH})", "",
              f"Model size M = {fmt_mb(model)}. Each run in a fresh subprocess; peak = ru_maxrss "
              "minus RSS once jax and the mesh are up.", "",
              "| method | peak over base | x M | bytes held on devices | time |", "|---|---|---|---|---|"]
    for r in mem:
        lines.append(f"| {r['mode']} | {fmt_mb(r['peak_over_base'])} | "
                     f"{r['peak_over_base'] / model:.2f} | {fmt_mb(r['device_bytes_held'])} | "
                     f"{r['seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--write", default=None, help="also write the markdown table here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(memory_child(args.child)))
        return
    mem = run_memory()
    put = run_throughput(args.repeats)
    text = render(put, mem, args.repeats)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
