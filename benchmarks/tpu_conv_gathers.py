"""Which fsdp-split 1x1 convolution kernels XLA:TPU gathers as float32, against tpflax's estimate.

Run: python benchmarks/tpu_conv_gathers.py   (needs libtpu: pip install -e ".[tpu]"; about 2 minutes)
Writes benchmarks/results/tpu_conv_gathers.md. Each program is a chain of 1x1 convolutions over float32 kernels
(a batch of 8 images of ``--pixels`` x ``--pixels``), tpflax's ``model=`` plan and the adamw step of
``tpflax.make_train_step`` compiled for a v5e slice by the TPU compiler (no TPU used). Per kernel: its split, the
dtype the compiled program gathers it in, and the all-gather bytes compiled and estimated (kernels of one gathered
shape, which the compiled gathers do not tell apart, as a group)
(``tpflax.estimate(..., backend="tpu")``), in mixed precision (bfloat16 compute) and in float32. XLA:TPU converts a
kernel to bfloat16 before its gather unless the gather's layout is a bitcast of the convolution's
(``tpflax._src.tpu.conv_kernel_gathered_as_stored``; benchmarks/tpu_aot_notes.md, forty-second round).

Options: ``--mesh fsdp=4`` (default: fsdp=8, fsdp=4 and fsdp=2,model=4), ``--chain 32,32,48`` (the channel
widths; default: three chains of 16, 15 and 19 kernels), ``--pixels 2``, ``--dtype float32`` (the compute dtype;
default: both), ``--out -`` (print only).
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

import tpflax  # noqa: E402

OUT = Path(__file__).parent / "results" / "tpu_conv_gathers.md"
CHAINS = ((32, 32, 48, 48, 128, 272, 272, 64, 256, 64, 128, 12, 128, 40, 200, 8, 48),
          (128, 200, 96, 200, 128, 136, 128, 72, 72, 64, 72, 56, 56, 16, 24, 16),
          (24, 40, 24, 160, 24, 96, 320, 96, 144, 16, 144, 64, 192, 64, 384, 104, 8, 80, 264, 80))
MESHES = ("fsdp=8", "fsdp=4", "fsdp=2,model=4")


class Chain(nn.Module):
    """1x1 convolutions ``c0, c1, ...`` from ``widths[0]`` channels through the rest, each followed by a relu."""

    widths: tuple[int, ...]
    dtype: str = "bfloat16"

    @nn.compact
    def __call__(self, x):
        for i, c in enumerate(self.widths[1:]):
            x = nn.relu(nn.Conv(c, (1, 1), use_bias=False, dtype=jnp.dtype(self.dtype), name=f"c{i}")(x))
        return x


def _target(mesh: dict[str, int]) -> str:
    n = 1
    for size in mesh.values():
        n *= size
    return {4: "tpu-v5e:2x2", 8: "tpu-v5e:2x4"}[n]


def measure(widths: tuple[int, ...], mesh: dict[str, int], pixels: int, dtype: str) -> list[tuple]:
    """Per kernel: ``(name, (in, out), spec, compiled dtype, compiled bytes, estimated bytes)``."""
    net = Chain(widths, dtype)
    x = jax.ShapeDtypeStruct((8, pixels, pixels, widths[0]), jnp.float32)
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(v, mesh, model=net, sample=(x,))
    dev = tpflax.make_mesh(mesh, target=_target(mesh))
    loss = lambda out, *_: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, dev, optax.adamw(1e-3), sample=(x,), loss=loss), p, dev)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), loss=loss, backend="tpu",
                          target=_target(mesh))
    fsdp = [a for a in mesh if a.startswith("fsdp")]
    gathered = {}  # kernel -> (spec, its shape on one device after the gather: tensor splits only)
    for i in range(len(widths) - 1):
        spec = tuple(p.decisions[f"params/c{i}/kernel"].spec)
        local = list(p.decisions[f"params/c{i}/kernel"].shape)
        for d, e in enumerate(spec):
            for a in (e,) if isinstance(e, str) else (e or ()):
                local[d] //= 1 if a in fsdp else mesh[a]
        gathered[i] = spec, tuple(local)
    rows = []
    for i, (spec, local) in gathered.items():
        # the compiled gathers name no parameter: kernels of one gathered shape are compared together
        alike = [j for j, (_, other) in gathered.items() if other == local]
        compiled = [c for c in dr.collectives if c.kind == "all-gather" and c.shapes == (local,)
                    and set(c.axes or ()) & set(fsdp)]
        priced = [e for e in est.items if e.kind == "all-gather" and e.source in {f"params/c{j}/kernel" for j in alike}]
        name = f"c{i}" if len(alike) == 1 else f"c{i} (with {', '.join(f'c{j}' for j in alike if j != i)})"
        rows.append((name, local[-2:], spec, "/".join(sorted({c.dtypes[0] for c in compiled})) or "-",
                     sum(c.ring_bytes * c.count for c in compiled), sum(e.ring_bytes * e.count for e in priced)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mesh", nargs="*", default=list(MESHES))
    ap.add_argument("--chain", nargs="*", default=[",".join(map(str, c)) for c in CHAINS])
    ap.add_argument("--pixels", type=int, default=8)
    ap.add_argument("--dtype", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from tpu_compile import libtpu_missing, write_result

    if (why := libtpu_missing()):
        print(why)
        return 1
    t0, lines, n, exact = time.perf_counter(), [], 0, 0
    for compute in args.dtype:
        for label in args.mesh:
            mesh = {k: int(v) for k, v in (kv.split("=") for kv in label.split(","))}
            for chain in args.chain:
                for name, (cin, cout), spec, dt, got, want in measure(tuple(map(int, chain.split(","))), mesh,
                                                                      args.pixels, compute):
                    if not got and not want:
                        continue  # not split over fsdp: nothing gathered
                    n, exact = n + 1, exact + (got == want)
                    split = ", ".join(str(e) for e in spec[-2:])
                    lines.append(f"| {compute} | {label} | {name} | {cin} -> {cout} | ({split}) | {dt} | {got:,.0f} | "
                                 f"{want:,.0f} | {'yes' if got == want else 'no'} |")
                    print(lines[-1], flush=True)
    head = [
        "# Which 1x1 convolution kernels XLA:TPU gathers as float32", "",
        f"`python benchmarks/tpu_conv_gathers.py` (generated; {' and '.join(args.dtype)} compute over float32 kernels, "
        f"batch 8 at {args.pixels}x{args.pixels} pixels). Per fsdp-gathered kernel: its split (input, output features), the "
        "dtype the compiled program gathers it in, and the all-gather bytes per device compiled and estimated. "
        "Why: `benchmarks/tpu_aot_notes.md`, forty-second round.", "",
        f"Estimated exactly: {exact} of {n} kernels. {time.perf_counter() - t0:.0f} s.", "",
        "| compute | mesh | kernel | in -> out | split | gathered as | compiled B | estimated B | exact |",
        "|---|---|---|---|---|---|---|---|---|"]
    text = "\n".join(head + lines) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
