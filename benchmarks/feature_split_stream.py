"""How often XLA gathers a feature-split residual stream, against what the estimate counts.

Run: python benchmarks/feature_split_stream.py   (TPU rows need ``pip install -e ".[tpu]"``)
Writes benchmarks/results/feature_split_stream.md.

A lookup table whose rows do not divide the tensor axis may be split on its features; XLA then
keeps the residual stream feature-split through every block and gathers it for the kernels that
read it. The estimate (and the chooser) count ``1 + 2 per norm of the stream's width``, at least 5
(``tpflax._src.cost.price.stream_gathers``), fitted on XLA:CPU at the third-party benchmark's
8 x 32 tokens. This script compiles the adamw step of two small models with the table split
(a post-norm tagger and a pre-norm GQA block, float32) at several token counts, on XLA:CPU and,
where libtpu is installed, for a TPU v5e:2x4, and reports the stream gathers each compiler emits
(all-gathers over the tensor axis of a ``[batch, tokens, width]`` activation) next to the
estimate's count and its error on the step's collective bytes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpflax  # noqa: E402

OUT = Path(__file__).parent / "results" / "feature_split_stream.md"
MESH = {"data": 2, "model": 4}
D, VOCAB = 64, 1022  # 1022 rows: model=4 does not divide them, so the table splits its 64 features
TOKENS = (32, 64, 128, 512)


class PostNorm(nn.Module):
    """DistilBERT token classification's pattern: post-norm blocks, a 9-label head on every token."""

    @nn.compact
    def __call__(self, ids):
        x = nn.LayerNorm(name="embed_norm")(nn.Embed(VOCAB, D, name="table")(ids))
        for i in range(2):
            a = nn.Dense(D, name=f"attn_out_{i}")(nn.Dense(D, name=f"attn_value_{i}")(x))
            x = nn.LayerNorm(name=f"attn_norm_{i}")(x + a)
            m = nn.Dense(D, name=f"mlp_down_{i}")(nn.gelu(nn.Dense(4 * D, name=f"mlp_up_{i}")(x)))
            x = nn.LayerNorm(name=f"mlp_norm_{i}")(x + m)
        return nn.Dense(9, name="classifier")(x)


class PreNorm(nn.Module):
    """A Llama-style block: RMSNorm before attention (4 heads, 1 K/V head) and the MLP, an untied head."""

    @nn.compact
    def __call__(self, ids):
        b, t = ids.shape
        x = nn.Embed(VOCAB, D, name="table")(ids)
        h = nn.RMSNorm(name="attn_norm")(x)
        q = nn.Dense(D, use_bias=False, name="q_proj")(h).reshape(b, t, 4, D // 4)
        k, v = (jnp.repeat(nn.Dense(D // 4, use_bias=False, name=n)(h).reshape(b, t, 1, D // 4), 4, axis=2)
                for n in ("k_proj", "v_proj"))
        a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / (D // 4) ** 0.5, -1)
        x = x + nn.Dense(D, use_bias=False, name="o_proj")(jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, D))
        h = nn.RMSNorm(name="mlp_norm")(x)
        x = x + nn.Dense(D, use_bias=False, name="down_proj")(nn.gelu(nn.Dense(4 * D, use_bias=False, name="up_proj")(h)))
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


def measure(cls: type, tokens: int, target: str | None) -> dict:
    """Compile the split-table step and read the stream gathers and the collective bytes."""
    ids = (jax.ShapeDtypeStruct((8, tokens), jnp.int32),)
    v = jax.eval_shape(cls().init, jax.random.key(0), *ids)
    p = tpflax.plan(v, MESH, rules=[(r"table/embedding$", P(None, "model"))])
    mesh = tpflax.make_mesh(MESH, target=target) if target else tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(cls(), p, mesh, optax.adamw(1e-3), sample=ids, variables=v)
    dr = tpflax.dry_run(ts, p, mesh)
    local = (4, tokens, D)  # one data shard's stream, gathered whole over model
    gathers = [c for c in dr.collectives if c.kind == "all-gather" and c.shapes == (local,)]
    backend = "tpu" if target else "cpu"
    est = tpflax.estimate(p, optax.adamw(1e-3), ids, model=cls(), sample=ids, backend=backend)
    counted = sum(i.count for i in est.items if "stream behind" in i.why)
    return {"model": cls.__name__, "tokens": tokens, "compiler": "XLA:TPU v5e:2x4" if target else "XLA:CPU",
            "compiled": sum(c.count for c in gathers), "dtype": ",".join(sorted({c.dtypes[0] for c in gathers})),
            "counted": counted, "error": est.comm_total / dr.comm_total - 1}


def main() -> int:
    targets = [None] + (["tpu-v5e:2x4"] if importlib.util.find_spec("libtpu") else [])
    rows = [measure(cls, t, target) for target in targets for cls in (PostNorm, PreNorm) for t in TOKENS]
    lines = [
        "# A feature-split residual stream: gathers compiled vs counted", "",
        f"`python benchmarks/feature_split_stream.py`: two float32 models with a {VOCAB} x {D} table split on "
        f"its features over model (mesh {MESH}), the adamw step of `tpflax.make_train_step`, batch 8. "
        "**compiled**: all-gathers of the stream (`[4, tokens, 64]` over model) in the compiled program; "
        "**counted**: the estimate's stream gathers (1 + 2 per norm of the stream's width, at least 5); "
        "**error**: the estimate's collective bytes against the compiled program's, the whole step.", "",
        "| model | compiler | tokens | compiled | dtype | counted | error |", "|---|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['compiler']} | 8 x {r['tokens']} | {r['compiled']} | {r['dtype']} | {r['counted']} "
          f"| {r['error']:+.1%} |" for r in rows), "",
        "The count is a fit, not a model of XLA's choice. XLA:TPU gathers the stream as often as counted "
        "at every token count here, in bfloat16 (the estimate's TPU backend sizes it so). XLA:CPU gathers "
        "it fewer times at 8 x 32 tokens than from 8 x 64 on, and its count there differs from the "
        "count the rule was fitted on (DistilBERT token classification in the third-party benchmark, "
        "12 at 8 x 32): the rule stands for neither exactly. Which kernels read the split stream, and "
        "when XLA re-gathers it rather than keeping a gathered copy, is what a model of it would need.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
