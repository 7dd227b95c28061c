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


class NarrowStreamLM(nn.Module):
    """A 128-wide LM whose 1003-row token table does not divide model=4: split on its features, it leaves
    a residual stream 32 wide per device, which XLA:TPU pads to 128 lanes."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(1003, 128, name="embed")(ids)
        for i in range(2):
            h = nn.RMSNorm(name=f"norm_{i}")(x)
            x = x + nn.Dense(128, name=f"down_{i}")(nn.gelu(nn.Dense(512, name=f"up_{i}")(h)))
        return nn.Dense(1003, name="head")(nn.RMSNorm(name="norm_f")(x))


FSDP_TP = {"fsdp": 2, "model": 4}
LM_IDS = (jax.ShapeDtypeStruct((8, 32), jnp.int32),)
LM_TABLE = "params/embed/embedding"


def test_lane_split_activations_are_priced_padded_on_tiling_hardware():
    # a 128-wide activation split over model=4 keeps 32 of each 128-lane tile: on a TPU preset its all-gather
    # is priced at the whole tiles (4x), on a GPU preset as before; a split into whole tiles pads nothing
    from tpflax._src.cost.price import ActComm, Context, price
    from tpflax._src.hardware import get_hardware
    from tpflax._src.mesh import mesh_shape

    def gathered(width, hardware, lanes=True):
        ctx = Context(mesh_shape({"data": 2, "model": 4}), get_hardware(hardware), tokens=1024)
        return dict(price((), (ActComm("all-gather", "model", width, 1, "stream", lanes=lanes),), ctx).comm)["model"]

    assert gathered(128, "tpu-v5e") == 4 * gathered(128, "tpu-v5e", lanes=False) == 4 * gathered(128, "a100")
    assert gathered(512, "tpu-v5e") == gathered(512, "tpu-v5e", lanes=False)
    assert gathered(128, "a100") == gathered(128, "a100", lanes=False)


def test_token_table_stays_whole_where_its_feature_split_stream_would_pad():
    # on the default TPU preset the table is kept whole over model (fsdp splits it); priced unpadded it was split
    # on its features (a Mamba-2 LM likewise: 1.92x the bytes of the table kept whole compiled for v5e:2x4,
    # where XLA:CPU's were 0.83x). A GPU preset tiles nothing: the feature split stays
    v = jax.eval_shape(NarrowStreamLM().init, jax.random.key(0), *LM_IDS)
    assert tuple(tpflax.plan(v, FSDP_TP, batch=LM_IDS).decisions[LM_TABLE].spec) == (None, "fsdp")
    assert tuple(tpflax.plan(v, FSDP_TP, batch=LM_IDS, hardware="a100").decisions[LM_TABLE].spec) == (None, "model")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install "tpflax[tpu]")')
def test_feature_split_table_costs_tpu_memory():
    # the premise of the padded price, compiled for v5e:2x4: the table split on its features (the rest as
    # planned) takes more bytes per device than the plan's whole table (measured 5.89 MB against 4.98 MB;
    # XLA:CPU: 4.82 MB against 5.97 MB, which is why the unpadded price split it)
    import re

    m = NarrowStreamLM()
    v = jax.eval_shape(m.init, jax.random.key(0), *LM_IDS)
    chosen = tpflax.plan(v, FSDP_TP, batch=LM_IDS)
    split = tpflax.plan(v, FSDP_TP, rules=[("^" + re.escape(k) + "$", P(None, "model") if k == LM_TABLE else d.spec)
                                           for k, d in chosen.decisions.items()])
    mesh = tpflax.make_mesh(FSDP_TP, target="tpu-v5e:2x4")

    def held(p):
        dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=LM_IDS, variables=v), p, mesh)
        return dr.memory["argument"] + dr.memory["temp"]

    assert held(split) > 1.1 * held(chosen)
