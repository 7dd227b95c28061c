"""Which fsdp row shards XLA:TPU pads and reduce-scatters, and what the padding moves, against tpflax's estimate.

Run: python benchmarks/tpu_padded_rows.py   (needs libtpu: pip install -e ".[tpu]"; about 4 minutes)
Writes benchmarks/results/tpu_padded_rows.md. For each lane width and parameter dtype, one program of embedding
tables whose rows split over fsdp into shards of ``s`` rows (not all whole 8-row tiles), each looked up and
summed, a replicated head, the adamw step of ``tpflax.make_train_step`` compiled for ``tpu-v5e:2x4`` (no TPU
used). Per table: how the compiled program reduces its gradient (all-reduced whole, or reduce-scattered at ``P``
rows a shard); per program: the reduce-scatter, collective-permute and all-reduce bytes compiled and estimated
(``tpflax.estimate(..., backend="tpu")``). What the rules are: benchmarks/tpu_aot_notes.md (forty-first round),
``tpflax._src.tpu.scattered_rows`` and ``whole_tiles``.

Options: ``--mesh fsdp=4,model=2`` (the fsdp axis is the one the tables split over; default: fsdp=8,
fsdp=4,model=2 and fsdp=2,model=4), ``--width 256``, ``--shards 9 11 21``, ``--dtype bfloat16``, ``--out -``
(print only).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpflax  # noqa: E402

TARGET = "tpu-v5e:2x4"
OUT = Path(__file__).parent / "results" / "tpu_padded_rows.md"
WIDTHS = (64, 128, 256, 384, 512)
SHARDS = (5, 6, 9, 10, 11, 13, 17, 21, 22, 25, 33, 50, 125)
MESHES = ("fsdp=8", "fsdp=4,model=2", "fsdp=2,model=4")
KINDS = ("reduce-scatter", "collective-permute", "all-reduce")


class Tables(nn.Module):
    """``(rows, width)`` tables of one dtype, each looked up and summed over its features."""

    rows: tuple[int, ...]
    width: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, ids):
        h = sum(nn.Embed(r, self.width, param_dtype=jnp.dtype(self.dtype), name=f"t{r}")(ids % r).sum(-1, keepdims=True)
                for r in self.rows)
        return nn.Dense(64, name="head")(h)


def measure(width: int, shards: tuple[int, ...], mesh: dict[str, int], dtype: str) -> tuple[dict, dict, dict]:
    """``({shard rows: "whole" or padded rows}, compiled bytes by kind, estimated bytes by kind)``."""
    n = mesh["fsdp"]
    net, ids = Tables(tuple(n * s for s in shards), width, dtype), jax.ShapeDtypeStruct((8, 32), jnp.int32)
    v = jax.eval_shape(net.init, jax.random.key(0), ids)
    p = tpflax.plan(v, mesh, rules=[(r"t\d+/embedding", P("fsdp", None)), ("head", "replicate")])
    tmesh = tpflax.make_mesh(mesh, target=TARGET)
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, tmesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, tmesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(ids,), loss=loss, backend="tpu", target=TARGET)
    how = {}
    mine = [(c.kind, shape[0]) for c in dr.collectives for shape in c.shapes if len(shape) == 2 and shape[1] == width]
    for kind, rows in mine:
        if kind == "all-reduce" and rows % n == 0 and rows // n in shards:
            how[rows // n] = "whole"
    for rows in sorted((r for k, r in mine if k == "reduce-scatter"), reverse=True):
        # the padded shards, largest first: each is the largest shard not yet placed that it can hold
        s = max((s for s in shards if s <= rows and s not in how), default=None)
        if s is not None:
            how[s] = rows
    comm, got = dr.comm(), est.comm
    return how, {k: sum(comm.get(k, {}).values()) for k in KINDS}, {k: sum(got.get(k, {}).values()) for k in KINDS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mesh", nargs="*", default=list(MESHES))
    ap.add_argument("--width", type=int, nargs="*", default=list(WIDTHS))
    ap.add_argument("--shards", type=int, nargs="*", default=list(SHARDS))
    ap.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from tpu_compile import libtpu_missing, write_result

    if (why := libtpu_missing()):
        print(why)
        return 1
    t0 = time.perf_counter()
    lines = ["| mesh | width | dtype | all-reduced whole (shard rows) | reduce-scattered (rows -> padded) | "
             "reduce-scatter B (est. / compiled) | collective-permute B | all-reduce B |",
             "|---|---|---|---|---|---|---|---|"]
    for label in args.mesh:
        mesh = {k: int(v) for k, v in (kv.split("=") for kv in label.split(","))}
        for dtype in args.dtype:
            for width in args.width:
                how, comp, est = measure(width, tuple(sorted(set(args.shards))), mesh, dtype)
                whole = ", ".join(str(s) for s in sorted(how) if how[s] == "whole")
                scat = ", ".join(f"{s} -> {how[s]}" if how[s] != s else f"{s}" for s in sorted(how) if how[s] != "whole")
                cells = [f"{est[k]:.0f} / {comp[k]:.0f}" for k in KINDS]
                lines.append(f"| {label} | {width} | {dtype} | {whole} | {scat} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    text = "\n".join([
        "# fsdp row shards XLA:TPU pads, against the estimate", "",
        f"`python benchmarks/tpu_padded_rows.py` (generated). Tables of `n s` rows split over the n fsdp devices "
        f"into `s`-row shards, each looked up and summed, a replicated head; the adamw step compiled for `{TARGET}` "
        "by the TPU compiler. The all-reduce bytes include the replicated head's and the loss's (the estimate "
        "leaves out the loss scalar's few bytes); the estimate prices what `tpflax._src.tpu.scattered_rows` and "
        "`whole_tiles` say (benchmarks/tpu_aot_notes.md, forty-first round). "
        f"{time.perf_counter() - t0:.0f} s.", "", *lines, ""])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
