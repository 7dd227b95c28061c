"""A norm between a column and its row: NormFormer's MLP, Magneto's sub-LN, Mamba-2's gated RMSNorm, in linen.

NormFormer normalises the MLP hidden (``fc1 -> GELU -> LayerNorm(d_ff) -> fc2``); a sub-LN block (Magneto,
BitNet) also normalises the attention context before ``o_proj``; Mamba-2 normalises ``y * silu(z)`` over
d_inner before ``out_proj``. Megatron splits these blocks as usual (the column's output features, the row's
input features) and splits the inner norm's scale and bias with the column: the norm's statistics cost one
small all-reduce per row over the tensor axis. The trace had ended the column's chain at the norm, so fc1/fc2
(in_proj/out_proj) were kept whole on every model rank: tiny NormFormer, data=2 x model=4, 1.75x the hand
layout's bytes per device and 2.14x its flops (Mamba-2: 2.3x and 3.2x).

A norm straight into a kernel still ends a column that narrows (MLA's low-rank ``q_a -> norm -> q_b``,
tests/test_deepseek.py): its row would all-reduce the wide output of the up-projection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import FAST_XLA, newer_xla
from jax.sharding import PartitionSpec as P

import tpflax

D, H, HD, F, V = 64, 4, 16, 128, 128
IDS = (jax.ShapeDtypeStruct((8, 16), jnp.int32),)
MESH = {"data": 2, "model": 4}


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


class Attn(nn.Module):
    sub_ln: bool

    @nn.compact
    def __call__(self, x):
        b, s, _ = x.shape
        q, k, v = (nn.Dense(H * HD, name=f"{n}_proj")(x).reshape(b, s, H, HD) for n in "qkv")
        sc = jnp.einsum("bqhd,bkhd->bhqk", q, k) * HD ** -0.5
        sc = jnp.where(jnp.tril(jnp.ones((s, s), bool)), sc, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(sc, -1), v).reshape(b, s, H * HD)
        if self.sub_ln:
            o = nn.LayerNorm(name="inner_norm")(o)
        return nn.Dense(D, name="o_proj")(o)


class Block(nn.Module):
    sub_ln: bool
    rank: int = 0  # > 0: a low-rank MLP (a narrowing fc1) instead

    @nn.compact
    def __call__(self, x):
        x = x + Attn(self.sub_ln, name="attn")(nn.LayerNorm(name="ln1")(x))
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.LayerNorm(name="ffn_norm")(nn.gelu(nn.Dense(self.rank or F, name="fc1")(h)))
        return x + nn.Dense(D, name="fc2")(h)


class LM(nn.Module):
    sub_ln: bool = False
    rank: int = 0
    layers: int = 2

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        for i in range(self.layers):
            x = Block(self.sub_ln, self.rank, name=f"layers_{i}")(x)
        return nn.Dense(V, use_bias=False, name="head")(nn.LayerNorm(name="norm")(x))


class Mamba2(nn.Module):
    """in_proj -> [z | x], a causal mix over time, ``norm(y * silu(z))`` over d_inner -> out_proj."""

    @nn.compact
    def __call__(self, ids):
        u = nn.Embed(V, D, name="embed")(ids)
        for i in range(2):
            z, x = jnp.split(nn.Dense(2 * F, use_bias=False, name=f"in_proj_{i}")(RMSNorm(name=f"pre_{i}")(u)), 2, -1)
            a = jax.nn.sigmoid(self.param(f"A_log_{i}", nn.initializers.zeros, (F,)))
            y = jnp.cumsum(jax.nn.silu(x) * a, axis=1) / jnp.arange(1, u.shape[1] + 1)[None, :, None]
            y = RMSNorm(name=f"norm_{i}")(y * jax.nn.silu(z))
            u = u + nn.Dense(D, use_bias=False, name=f"out_proj_{i}")(y)
        return nn.Dense(V, use_bias=False, name="head")(RMSNorm(name="norm")(u))


def _loss(out, ids):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out[:, :-1]), ids[:, 1:, None], -1))


# Megatron: columns and their biases, rows, the inner norms' scale/bias with their column
HAND = [(r"(q_proj|k_proj|v_proj|fc1)/kernel$", P(None, "model")), (r"(q_proj|k_proj|v_proj|fc1)/bias$", P("model")),
        (r"(o_proj|fc2)/kernel$", P("model", None)),
        (r"(inner_norm|ffn_norm)/(scale|bias)$", P("model")), (r"in_proj_\d/kernel$", P(None, "model")),
        (r"out_proj_\d/kernel$", P("model", None)), (r"(norm_\d/scale|A_log_\d)$", P("model"))]


def _plans(m):
    v = jax.eval_shape(m.init, jax.random.key(0), *IDS)
    p = tpflax.plan(v, MESH, model=m, sample=IDS)
    # every leaf the hand rules do not name as the plan has it (embedding, head, pre-norms, row biases)
    rest = [(k[len("params/"):] + "$", d.spec) for k, d in p.decisions.items()]
    hand = tpflax.plan(v, MESH, rules=HAND + rest)
    return p, hand


def _specs(p):
    return {k: tuple(d.spec) for k, d in p.decisions.items()}


@pytest.mark.parametrize("sub_ln", [False, True], ids=["normformer", "sub_ln"])
def test_a_widening_column_pairs_through_its_norm(sub_ln):
    p, hand = _plans(LM(sub_ln))
    for i in range(2):
        fc1, fc2 = (p.decisions[f"params/layers_{i}/{n}/kernel"] for n in ("fc1", "fc2"))
        assert (tuple(fc1.spec), fc1.role, tuple(fc2.spec), fc2.role) == ((None, "model"), "column",
                                                                          ("model", None), "row"), fc1.reason
        assert fc1.pair == fc2.pair
    assert _specs(p) == _specs(hand)


def test_mamba2_gated_norm_pairs_in_and_out_proj():
    p, hand = _plans(Mamba2())
    assert p.decisions["params/in_proj_0/kernel"].role == "column"
    assert p.decisions["params/out_proj_0/kernel"].role == "row"
    assert tuple(p.decisions["params/norm_0/scale"].spec) == ("model",)
    assert _specs(p) == _specs(hand)


def test_a_narrowing_column_still_ends_at_its_norm():
    # a low-rank fc1 (d -> 16 -> d, MLA's shape): a row fc2 would all-reduce d per token to save nothing
    p, _ = _plans(LM(rank=16))
    assert tuple(p.decisions["params/layers_0/fc2/kernel"].spec) != ("model", None)
    assert p.decisions["params/layers_0/fc1/kernel"].role != "column"


@pytest.mark.slow
@newer_xla("arguments + temp 558,332 bytes and 5,031,686 FLOPs per device, against 0.10's 562,940 and 5,020,102 (the "
           "exact numbers of the hand layout this test holds the plan to)")
def test_normformer_compiles_like_megatron(devices):
    m = LM(layers=1)
    p, _ = _plans(m)
    mesh = tpflax.make_mesh(MESH)
    tx = optax.adamw(1e-3)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, tx, sample=IDS, loss=_loss), p, mesh,
                        compiler_options=FAST_XLA)
    # the hand layout's numbers (main kept fc1/fc2 whole: 893,692 B, 10.14 MFLOP per device, 384 B fewer
    # collectives: the norm statistics' all-reduces)
    assert (dr.memory["argument"] + (dr.memory["temp"] or 0), dr.flops) == (562940, 5020102.0)
    e = tpflax.estimate(p, tx, model=m, sample=IDS, loss=_loss, backend="cpu")
    # 0.8% under: the norms' statistics all-reduces (one f32 per row, 256 B each) are not priced
    assert abs(e.comm_total / dr.comm_total - 1) < 0.02, (e.comm, dr.comm())


class SRAttn(nn.Module):
    """SegFormer's spatial-reduction attention: a k2 s2 ``sr`` conv (D -> D, 4D contracted per output), a
    LayerNorm over its D channels, then the fused ``kv`` projection."""

    @nn.compact
    def __call__(self, img):
        x = nn.Conv(D, (2, 2), strides=2, name="embed")(img)
        b, hw = x.shape[0], x.shape[1]
        q = nn.Dense(D, name="query")(x.reshape(b, -1, D)).reshape(b, -1, H, HD)
        y = nn.LayerNorm(name="sr_norm")(nn.Conv(D, (2, 2), strides=2, name="sr")(x).reshape(b, -1, D))
        k, v = jnp.split(nn.Dense(2 * D, name="kv")(y), 2, -1)
        o = jax.nn.dot_product_attention(q, k.reshape(b, -1, H, HD), v.reshape(b, -1, H, HD))
        return nn.Dense(D, name="proj")(o.reshape(b, hw * hw, D))


def test_a_conv_that_does_not_widen_ends_at_its_norm():
    # main paired sr (column) with kv (row) through sr_norm, whose mean/variance reduce over sr's split channels:
    # XLA gathered the normalised channels for kv (SegFormer traced: 1.36x the hand's collectives, 100,608 B of
    # gathers against the estimate's 2,304). A conv's width is the input channels a group reads, as a dense's.
    img = (jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32),)
    m = SRAttn()
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), *img), MESH, model=m, sample=img)
    specs = {n: p.decisions[f"params/{n}/kernel"].spec for n in ("sr", "kv", "query", "proj")}
    assert specs == {"sr": P(None, None, None, None), "kv": P(None, "model"), "query": P(None, "model"),
                     "proj": P("model", None)}, specs  # kv pairs with proj as its column, sr with nothing
    assert "a norm over it feeds a kernel directly" in p.decisions["params/sr/kernel"].reason
    assert tuple(p.decisions["params/sr_norm/scale"].spec) == (None,)


class WideConv(nn.Module):
    """A U-Net-style pair: a 3x3 conv doubling the channels, a LayerNorm over them, a 3x3 conv back."""

    @nn.compact
    def __call__(self, img):
        h = nn.relu(nn.LayerNorm(name="ln")(nn.Conv(2 * D, (3, 3), name="up")(img)))
        return nn.Conv(D, (3, 3), name="down")(h)


def test_a_widening_kxk_conv_still_pairs_through_its_norm():
    # the width had counted the window (3x3 x 64 = 576 >= 128): up was taken for a conv that does not widen, its
    # column ended at ln and up/down were kept whole (3.94x the hand layout's compiled flops). 64 -> 128 widens.
    img = (jax.ShapeDtypeStruct((8, 8, 8, D), jnp.float32),)
    m = WideConv()
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), *img), MESH, model=m, sample=img)
    assert [p.spec(f"params/{n}/kernel") for n in ("up", "down")] == [P(None, None, None, "model"),
                                                                      P(None, None, "model", None)]
    assert p.spec("params/ln/scale") == P("model")
