"""A residual stream kept split on its features, compiled by the TPU compiler (v5e:2x4).

A lookup table split on its features (its rows do not divide the tensor axis) leaves the stream
feature-split through every block; XLA:TPU gathers it for the kernels that read it whole, forward
once per norm and backward again for each kernel's transposes (``cost.stream.tpu_stream_gathers``).
"""

from __future__ import annotations

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax

DP_TP = {"data": 2, "model": 4}
IDS = (jax.ShapeDtypeStruct((8, 128), jnp.int32),)


class PostNormTagger(nn.Module):
    """DistilBERT's token tagger in small: an untied 1022-row table (model=4 does not divide its rows),
    post-norm blocks with separate q, k and v kernels, a 9-label classifier on every token."""

    d: int = 64
    heads: int = 4

    @nn.compact
    def __call__(self, ids):
        x = nn.LayerNorm(name="embed_norm")(nn.Embed(1022, self.d, name="word_embeddings")(ids))
        b, t, hd = *ids.shape, self.d // self.heads
        for i in range(2):
            q, k, v = (nn.Dense(self.d, name=f"{n}_{i}")(x).reshape(b, t, self.heads, hd) for n in "qkv")
            a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / hd ** 0.5, -1)
            o = nn.Dense(self.d, name=f"out_{i}")(jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, -1))
            x = nn.LayerNorm(name=f"attn_norm_{i}")(x + o)
            m = nn.Dense(self.d, name=f"down_{i}")(nn.gelu(nn.Dense(4 * self.d, name=f"up_{i}")(x)))
            x = nn.LayerNorm(name=f"mlp_norm_{i}")(x + m)
        return nn.Dense(9, name="classifier")(x)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install "tpflax[tpu]")')
def test_each_split_kernel_regathers_the_feature_split_stream_on_tpu():
    # Megatron pairs (q, k, v and up columns; out and down rows) on a feature-split stream: XLA:TPU
    # gathers the stream once per norm forward (5) and again for each kernel's transposes backward (12),
    # where XLA:CPU gathers twice per norm (11, cost.price.stream_gathers): that count was -12% here and
    # -11% on the published-width DistilBERT (benchmarks/third_party_tpu.py distilbert-tok)
    m = PostNormTagger()
    v = jax.eval_shape(m.init, jax.random.key(0), *IDS)
    rules = [(r"word_embeddings/embedding$", P(None, "model")), (r"/(q|k|v|up)_\d/kernel$", P(None, "model")),
             (r"/(q|k|v|up)_\d/bias$", P("model")), (r"/(out|down)_\d/kernel$", P("model", None))]
    p = tpflax.plan(v, DP_TP, rules=rules)
    est = tpflax.estimate(p, optax.adamw(1e-3), IDS, model=m, sample=IDS, backend="tpu")
    stream = [i for i in est.items if "feature-split residual stream" in i.why]
    assert [i.count for i in stream] == [5 + 2 * 6], stream
    mesh = tpflax.make_mesh(DP_TP, target="tpu-v5e:2x4")
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=IDS, variables=v)
    dr = tpflax.dry_run(ts, p, mesh)
    gathers = [c for c in dr.collectives if c.kind == "all-gather" and c.shapes == ((4, 128, 64),)]
    assert len(gathers) >= 5 + 2 * 6 and all(c.dtypes == ("bf16",) for c in gathers), gathers
    assert est.comm_total == pytest.approx(dr.comm_total, rel=0.10), (est.comm_total, dr.comm_total)
