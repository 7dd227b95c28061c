"""Estimate.peak and the estimated collectives against the TPU compiler (no TPU needed).

Every zoo model at real width (Llama-2-7B, GPT-2, ViT-B/16, ResNet-18, the
Mixtral-like MoE) on three meshes of a v5e:2x4 topology, remat on and off
(each zoo config's ``remat``: ``nn.remat`` of every transformer block, of every
ResNet residual block), bf16 and f32. ``--compile`` resumes from the cache, so
the table lists the configs compiled so far.
The transformers are compiled with 2 layers of their real width and length
(a compile of a 2-layer 7B step takes 1-3 minutes on 2 busy cores); the
estimate is priced for the same config. Everything the estimate counts per layer
is linear in the layer count (saved activations, params, grads, optimizer
state) and the transient terms are per layer or per step, so the error at 2
layers is the error of the per-step terms plus that of one repeated layer.

    python benchmarks/tpu_aot.py --compile   # TPU compiles, cached in results/tpu_aot.jsonl
    python benchmarks/tpu_aot.py --cpu       # the same steps on 8 CPU devices (side-by-side table)
    python benchmarks/tpu_aot.py             # writes results/tpu_aot.md from the cache

Needs libtpu: ``pip install "jax[tpu]==<your jax>"`` (``tpflax[tpu]``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

HERE = Path(__file__).parent
CACHE = HERE / "results" / "tpu_aot.jsonl"
CPU_CACHE = HERE / "results" / "tpu_aot_cpu.jsonl"
# compiled HLO per config (gzip), so a parser fix re-reads the collectives without recompiling
HLO_DIR = HERE / "results" / "tpu_hlo"
OUT = HERE / "results" / "tpu_aot.md"
G = 2 ** 30

MODELS = {  # name: (zoo name, layer override, global batch)
    "llama-2-7b": ("llama-2-7b", 2, 8),
    "gpt2": ("gpt2-small", 2, 16),
    "vit-b16": ("vit-b16", 2, 256),  # 32 images per chip: a training batch
    "resnet18": ("resnet18", None, 256),
    "moe": ("moe", 2, 8),
}
# The conv net and the ViT also at 4 images per chip, a step of 50-450 MiB of which the TPU's
# on-chip memory holds a large share (a separate table; their key ends in ``|batch=32``).
SMALL_BATCH = {"vit-b16": 32, "resnet18": 32}
MESHES = ("fsdp=8", "data=2,fsdp=4", "fsdp=2,model=4")
TOPOLOGY = "v5e:2x4"
BIG_TOPOLOGY = "v5p:2x2x2"  # 8 chips of 95 GiB, for a config whose step does not fit a v5e


def grid(small: bool = False):
    """Configs ``(name, mesh, remat, dtype, global batch)`` in the order they are compiled (most
    informative first): the main grid, or with ``small`` the :data:`SMALL_BATCH` rows."""
    out = []
    for dtype in ("bf16", "f32"):
        for mesh in MESHES:
            if small:
                out += [(name, mesh, False, dtype, b) for name, b in SMALL_BATCH.items()]
                continue
            for name in MODELS:
                out.append((name, mesh, False, dtype, MODELS[name][2]))
            out += [(name, mesh, True, dtype, MODELS[name][2]) for name in MODELS]  # remat on: each block
    return out


def key(cfg) -> str:
    name, mesh, remat, dtype, batch = cfg
    k = f"{name}|{mesh}|remat={'on' if remat else 'off'}|{dtype}"
    return k if batch == MODELS[name][2] else f"{k}|batch={batch}"


def parse(k: str):
    """The config of a :func:`key`."""
    name, mesh, remat, dtype, *rest = k.split("|")
    batch = int(rest[0].split("=")[1]) if rest else MODELS[name][2]
    return name, mesh, remat == "remat=on", dtype, batch


def build(cfg):
    """(zoo model, plan, mesh shape dict, batch size) for one config."""
    import jax.numpy as jnp

    import tpflax
    from tpflax import zoo

    name, mesh, remat, dtype, batch = cfg
    zname, layers, _ = MODELS[name]
    kw = {} if layers is None else {"n_layers": layers}
    if dtype == "bf16":
        kw.update(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    if remat:
        kw.update(remat=True)
    m = zoo.get(zname, "real", **kw)
    shape = {k: int(v) for k, v in (x.split("=") for x in mesh.split(","))}
    return m, tpflax.plan(m.abstract_variables(), shape), shape, batch


def optimizer():
    import optax

    return optax.adamw(1e-4)


def load(path: Path) -> dict:
    """Cached rows by key; a row whose HLO is kept has its collectives re-read by today's parser.

    The HLO directory is not committed, so a re-reading that differs from the row's cached one is
    appended to the cache (a later row of a key replaces an earlier one): a checkout without the
    HLO regenerates the same table from the committed cache alone.
    """
    from tpu_compile import comm_of

    if not path.exists():
        return {}
    rows = {r["key"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}
    changed = []
    for k, r in rows.items():
        hlo = hlo_path(k, path == CPU_CACHE)
        if hlo.exists():  # else the row's own mark: its comm was read by today's parser when compiled
            mesh = {a: int(n) for a, n in (x.split("=") for x in k.split("|")[1].split(","))}
            with gzip.open(hlo, "rt") as f:
                text = f.read()
            read = {"comm": comm_of(text, mesh), "xla_remat": xla_remat(text), "reparsed": True}
            if any(r.get(f) != v for f, v in read.items()):
                r.update(read)
                changed.append(r)
    if changed:
        with path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in changed)
    return rows


def xla_remat(hlo: str) -> bool:
    """Whether XLA:TPU rematerialized values to fit the chip's HBM (its ``*.remat*`` fusions): the
    compiled peak is then bound by the chip, not by the program the estimate prices."""
    return re.search(r"%[\w.-]*\.remat\d*\b", hlo) is not None


def hlo_path(k: str, cpu: bool = False) -> Path:
    return HLO_DIR / (re.sub(r"[^\w.=,-]+", "_", k) + (".cpu" if cpu else "") + ".hlo.gz")


def _compile(cfg, cpu: bool, start: str = TOPOLOGY):
    """``(Compiled or None, topology, the v5e compile's row or None)``: the step of ``cfg`` compiled
    on CPU devices, or for :data:`TOPOLOGY`, or for :data:`BIG_TOPOLOGY` when XLA:TPU refuses it for
    a v5e's HBM or fits it only by rematerializing (:func:`xla_remat`): a step too large for 16 GB
    still has a compiled peak of its own program to hold the estimate to. ``start=BIG_TOPOLOGY``
    skips the v5e compile (a cached one already showed XLA remat)."""
    from tpu_compile import compile_step, tpu_mesh

    import tpflax

    m, p, shape, batch = build(cfg)
    tops = (None,) if cpu else (TOPOLOGY, BIG_TOPOLOGY)[(TOPOLOGY, BIG_TOPOLOGY).index(start):]
    small = None
    for topology in tops:
        mesh = tpflax.make_mesh(shape) if cpu else tpu_mesh(shape, topology)
        try:
            c = compile_step(tpflax.make_train_step(m, p, mesh, optimizer(), batch), mesh)
        except Exception as e:  # noqa: BLE001 - e.g. XLA:TPU refusing a step that does not fit HBM
            msg = str(e).splitlines()[0][:300]
            if topology == TOPOLOGY and "exceeds available HBM" in str(e):
                print(key(cfg), f"does not fit {TOPOLOGY} ({msg}); compiling for {BIG_TOPOLOGY}", flush=True)
                continue
            print(key(cfg), f"not compiled: {type(e).__name__}: {msg}", flush=True)
            break
        if topology == TOPOLOGY and xla_remat(c.hlo):
            small = _row(cfg, c, None)
            print(key(cfg), f"XLA remat on {TOPOLOGY} (peak {c.peak / G:.3f} GiB); compiling for {BIG_TOPOLOGY}",
                  flush=True)
            continue
        return c, topology, small
    return None, None, small


def _row(cfg, c, topology) -> dict:
    row = {"key": key(cfg), "argument": c.argument, "output": c.output, "temp": c.temp, "alias": c.alias,
           "peak": c.peak, "comm": c.comm, "flops": c.flops, "seconds": round(c.seconds, 1),
           "xla_remat": xla_remat(c.hlo)}
    if topology not in (None, TOPOLOGY):
        row["topology"] = topology
    return row


def compile_all(cpu: bool, only: str = "", redo: bool = False) -> None:
    path = CPU_CACHE if cpu else CACHE
    done = load(path)
    todo = [c for c in grid() + grid(small=True) if re.search(only, key(c))]
    if cpu:  # the side-by-side table: one mesh, bf16, remat off
        todo = [c for c in todo if c[1] == "fsdp=8" and c[3] == "bf16" and not c[2]]
    for cfg in todo:
        r = done.get(key(cfg))
        # a cached v5e compile that XLA fitted by rematerializing: only the big topology is missing
        start = BIG_TOPOLOGY if r and not redo and not cpu and r.get("xla_remat") and "topology" not in r else None
        if r and not redo and not start:
            continue
        c, topology, small = _compile(cfg, cpu, start or TOPOLOGY)
        if start:
            small = {k: v for k, v in r.items() if k not in ("reparsed", "v5e")}
        if c is None:
            continue
        row = {**_row(cfg, c, topology), "reparsed": True}  # read by today's parser (load() compares with it)
        if small:  # the v5e compile that rematerialized, kept next to the big topology's
            row["v5e"] = {k: small[k] for k in ("argument", "output", "temp", "alias", "peak", "comm", "seconds",
                                                "xla_remat")}
        HLO_DIR.mkdir(exist_ok=True)
        with gzip.open(hlo_path(key(cfg), cpu), "wt") as f:
            f.write(c.hlo)
        with path.open("a") as f:  # a later row of the same key replaces an earlier one (load)
            f.write(json.dumps(row) + "\n")
        print(key(cfg), f"peak {c.peak / G:.3f} GiB in {c.seconds:.0f}s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", default="", help="compile only configs whose key matches this regex")
    ap.add_argument("--redo", action="store_true", help="compile matching configs again even if cached")
    args = ap.parse_args()
    if args.compile or args.cpu:
        if args.cpu:
            os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
        compile_all(args.cpu, args.only, args.redo)
        return 0
    from tpu_aot_report import write_report

    write_report(OUT, load(CACHE), load(CPU_CACHE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
