"""Estimate.peak of one model written four ways (nnx and linen, a layer loop and a scanned stack) and
as a plain function, against the peak the compiler reports.

Run: python benchmarks/nnx_estimate.py   (TPU rows need ``pip install -e ".[tpu]"``)
Writes benchmarks/results/nnx_estimate.md.

The estimate reads a model's saved activations from its layer calls: linen's are intercepted,
an nnx model's are recorded by wrapping its submodules' classes for the trace (copies called
inside ``nnx.scan`` placed at the stack's path), and a plain function's parameter contractions
stand for its layers. Each variant here is the same decoder (pre-norm attention and MLP blocks,
an untied head), so its estimate should not depend on how it is written; the compiled peak says
how close each is. Parameters are abstract (nothing is allocated); the TPU rows compile for a
v5e:2x4 slice with the TPU compiler, the CPU rows for 8 emulated CPU devices.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import tpflax  # noqa: E402

OUT = Path(__file__).parent / "results" / "nnx_estimate.md"
D, HEADS, F, VOCAB, LAYERS = 512, 8, 2048, 8192, 4
BATCH, SEQ = 8, 512
MESHES = ({"data": 2, "model": 4}, {"fsdp": 8})


def attend(q, k, v):
    """Causal softmax attention over (batch, seq, heads, head_dim)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1), v)


def split_heads(x):
    return x.reshape(*x.shape[:-1], HEADS, D // HEADS)


# --- nnx -------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.q, self.k, self.v, self.o = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
        self.up, self.down = nnx.Linear(D, F, rngs=rngs), nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        a = attend(split_heads(self.q(h)), split_heads(self.k(h)), split_heads(self.v(h)))
        x = x + self.o(a.reshape(x.shape))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxLoop(nnx.Module):
    def __init__(self, rngs):
        self.emb, self.head = nnx.Embed(VOCAB, D, rngs=rngs), nnx.Linear(D, VOCAB, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs) for _ in range(LAYERS)])

    def __call__(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class NnxScan(nnx.Module):
    def __init__(self, rngs):
        self.emb, self.head = nnx.Embed(VOCAB, D, rngs=rngs), nnx.Linear(D, VOCAB, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, h):
            return block(h)

        return self.head(run(self.blocks, self.emb(ids)))


# --- linen -----------------------------------------------------------------------------------


class LinenBlock(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (split_heads(nn.Dense(D, name=n)(h)) for n in ("q", "k", "v"))
        x = x + nn.Dense(D, name="o")(attend(q, k, v).reshape(x.shape))
        x = x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(F, name="up")(nn.LayerNorm(name="ln2")(x))))
        return (x, None) if self.scanned else x


class LinenLoop(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, D, name="emb")(ids)
        for i in range(LAYERS):
            h = LinenBlock(name=f"blocks_{i}")(h)
        return nn.Dense(VOCAB, name="head")(h)


class LinenScan(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, D, name="emb")(ids)
        stack = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        h, _ = stack(scanned=True, name="blocks")(h, None)
        return nn.Dense(VOCAB, name="head")(h)


# --- a plain function over the linen scan's parameters ---------------------------------------


def plain(variables, ids):
    p = variables["params"]

    def dense(w, x):
        return x @ w["kernel"] + w["bias"]

    def norm(w, x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * w["scale"] + w["bias"]

    def block(x, w):
        h = norm(w["ln1"], x)
        a = attend(*(split_heads(dense(w[n], h)) for n in ("q", "k", "v")))
        x = x + dense(w["o"], a.reshape(x.shape))
        return x + dense(w["down"], jax.nn.gelu(dense(w["up"], norm(w["ln2"], x)))), None

    h, _ = jax.lax.scan(block, p["emb"]["embedding"][ids], p["blocks"])
    return dense(p["head"], h)


def variants(ids):
    """``{name: (model, abstract variables or an nnx module, kwargs for plan)}``."""
    linen_scan = LinenScan()
    scan_vars = jax.eval_shape(linen_scan.init, jax.random.key(0), ids)
    linen_loop = LinenLoop()
    return {
        "nnx, layer loop": (nnx.eval_shape(lambda: NnxLoop(nnx.Rngs(0))), None),
        "nnx, nnx.scan": (nnx.eval_shape(lambda: NnxScan(nnx.Rngs(0))), None),
        "linen, layer loop": (linen_loop, jax.eval_shape(linen_loop.init, jax.random.key(0), ids)),
        "linen, nn.scan": (linen_scan, scan_vars),
        "plain function, lax.scan": (plain, scan_vars),
    }


def measure(name: str, model, variables, mesh_shape: dict, target: str | None) -> dict:
    ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    tree = model if variables is None else variables
    stacked = "blocks" if name.startswith("plain") else None
    p = tpflax.plan(tree, mesh_shape, model=model, sample=(ids,), stacked=stacked)
    tx = optax.adamw(1e-3)
    backend = "tpu" if target else "cpu"
    e = tpflax.estimate(p, tx, model=model, sample=(ids,), backend=backend)
    mesh = tpflax.make_mesh(mesh_shape, target=target) if target else tpflax.make_mesh(mesh_shape)
    ts = tpflax.make_train_step(model, p, mesh, tx, sample=(ids,), variables=variables)
    compiled = tpflax.dry_run(ts, p, mesh).memory["peak"]
    return {"model": name, "mesh": ",".join(f"{k}={v}" for k, v in mesh_shape.items()),
            "compiler": "XLA:TPU v5e:2x4" if target else "XLA:CPU", "activations": e.settings["activations"],
            "saved": e.per_device.activations, "estimate": e.peak, "compiled": compiled,
            "error": e.peak / compiled - 1}


def table(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    out = ["| model | mesh | compiler | activations from | saved activations | Estimate.peak | compiled peak "
           "| error |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['mesh']} | {r['compiler']} | {r['activations']} | {mib(r['saved'])} | "
            f"{mib(r['estimate'])} | {mib(r['compiled'])} | {r['error']:+.1%} |" for r in rows]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    targets = [None] + (["tpu-v5e:2x4"] if importlib.util.find_spec("libtpu") else [])
    ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    rows = [measure(name, model, variables, mesh, target) for target in targets for mesh in MESHES
            for name, (model, variables) in variants(ids).items()]
    text = table(rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.no_write:
        # the notes written by hand below the table ("## What it shows") are kept
        old = OUT.read_text() if OUT.exists() else ""
        notes = old[old.index("\n## "):] if "\n## " in old else ""
        OUT.write_text(f"# Estimate.peak of one decoder written five ways\n\n"
                       f"`python benchmarks/nnx_estimate.py` (3 min): d={D}, {HEADS} heads, ffn {F}, vocab {VOCAB}, "
                       f"{LAYERS} layers, batch {BATCH} x {SEQ} tokens, adamw, float32, abstract parameters. The "
                       f"TPU rows compile for a v5e:2x4 slice with the TPU compiler (libtpu), the CPU rows for 8 "
                       f"emulated CPU devices.\n\n{text}\n{notes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
