"""How long estimate(model=) takes: traced afresh vs served its traces again (tpflax._src.model_cache).

Run: python benchmarks/estimate_speed.py [--repeat 5]
Writes benchmarks/results/estimate_speed.md. Per zoo model and mesh: the median time of an estimate
whose traces are all made anew (the cache emptied before each call: what every call cost before the
cache) and of a repeated call (a loop over meshes or candidates), their ratio within this run, and
whether the two estimates are identical (every field of the Estimate; they must be).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402
from tpflax._src import model_cache as cache  # noqa: E402

CASES = (("mlp", {"model": 8}), ("gpt2", {"model": 8}), ("llama", {"data": 2, "model": 4}),
         ("moe", {"data": 2, "model": 4}), ("lstm", {"model": 8}), ("llama-scan", {"model": 8}),
         ("nnx-mlp", {"model": 8}))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def identical(a, b) -> bool:
    return all(getattr(a, f.name) == getattr(b, f.name) and repr(getattr(a, f.name)) == repr(getattr(b, f.name))
               for f in dataclasses.fields(a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    opt = optax.adamw(1e-3)
    rows = []
    for name, mesh in CASES:
        m = zoo.get(name)
        p = tpflax.plan(m.abstract_variables(), mesh, fsdp_min_bytes=1024)
        batch = jax.eval_shape(lambda m=m: m.make_batch(0, 8))

        def run(p=p, batch=batch, m=m):
            return tpflax.estimate(p, opt, batch, model=m, backend="cpu")

        cache.clear()
        run()  # jax's own caches and imports warm, as in a loop's second call
        fresh, cached, same = [], [], True
        for _ in range(args.repeat):
            cache.clear()
            ms, want = timed(run)
            fresh.append(ms)
            ms, got = timed(run)
            cached.append(ms)
            same = same and identical(got, want)
        f, c = statistics.median(fresh), statistics.median(cached)
        rows.append((name, ",".join(f"{k}={v}" for k, v in mesh.items()), f, c, f / c, same))
    lines = ["# estimate() speed: traces kept vs traced afresh", "",
             f"`python benchmarks/estimate_speed.py` (median of {args.repeat}, 8 CPU-emulated devices, "
             f"jax {jax.__version__}, adamw, batch of 8, backend='cpu'). *Afresh*: the trace cache emptied "
             "before the call (every call before the cache); *kept*: the same call again. Times vary with "
             "the machine's load; the ratio is within one run.", "",
             "| model | mesh | afresh (ms) | kept (ms) | ratio | identical |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {ms} | {f:.1f} | {c:.1f} | {r:.0f}x | {'yes' if s else 'NO'} |"
              for n, ms, f, c, r, s in rows]
    out = Path(__file__).parent / "results" / "estimate_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
