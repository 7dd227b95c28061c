"""Tree-only plans that must not split a stream no partner sums: convs and projections paired by name order.

The tree has no dataflow: it pairs a block's layers by widths and names. Three shapes of linen models
made it pair layers that do not feed each other, so a split output met whole kernels and XLA gathered
it at every use (benchmarks/linen_probe.py, compiled adamw step, data=2 x model=4): a Conformer's
convolution module (``depthwise_conv`` taken before ``pointwise_conv1``, which feeds it: 2.0x the hand
layout's collectives), a U-Net's transposed convs (``ConvTranspose_0 -> ConvTranspose_1``, each feeding
a skip concat: 1.39x) and DiT's final layer (``final_ada``'s shift/scale taken for a fused column of
``final_linear``, which reads the modulated stream: 1.57x). Specs are asserted exactly; the Conformer
block's compiled step is held against the hand layout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import specs
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}
B, S, D, F, V = 8, 16, 64, 256, 512


def sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)




# -- a Conformer block: feed-forward, then the convolution module with its GLU ----------

class ConvModule(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.glu(nn.Conv(2 * D, (1,), name="pointwise_conv1")(y), axis=-1)  # D -> 2D, halved by the GLU
        y = nn.Conv(D, (7,), padding="SAME", feature_group_count=D, name="depthwise_conv")(y)
        return nn.Conv(D, (1,), name="pointwise_conv2")(nn.swish(y))


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="w2")(nn.swish(nn.Dense(F, name="w1")(nn.LayerNorm()(x))))


class ConvGlu(nn.Module):
    @nn.compact
    def __call__(self, feats):
        x = nn.Dense(D, name="input_proj")(feats)
        for i in range(2):
            x = x + FeedForward(name=f"ff_{i}")(x)
            x = x + ConvModule(name=f"conv_{i}")(x)
        return nn.Dense(V, name="ctc_head")(nn.LayerNorm(name="final_norm")(x))


SAMPLE = (sds(B, S, 80),)
HAND = [(r"w1/kernel", P(None, "model")), (r"w1/bias", P("model")), (r"w2/kernel", P("model", None)),
        (r"ctc_head/kernel", P(None, "model")), (r"ctc_head/bias", P("model")), (r".*", P())]
CONV_SPECS = {"conv_0/pointwise_conv1/kernel": P(None, None, None), "conv_0/depthwise_conv/kernel": P(None, None, None),
              "conv_0/depthwise_conv/bias": P(None), "conv_0/pointwise_conv2/kernel": P(None, None, None),
              "ff_0/w1/kernel": P(None, "model"), "ff_0/w2/kernel": P("model", None),
              "ctc_head/kernel": P(None, "model"), "ctc_head/bias": P("model")}


def xent(logits, *_):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


@pytest.fixture(scope="module")
def conv_glu():
    m = ConvGlu()
    return m, jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)


def test_depthwise_conv_is_no_link_of_a_channel_chain(conv_glu):
    """Taken in name order, ``depthwise_conv`` (64 channels) chained into ``pointwise_conv1`` (64 inputs):
    a channel split whose output met the whole ``pointwise_conv2``. A depthwise conv mixes no channels,
    so it is no link; ``pointwise_conv1`` (64 -> 128) and ``pointwise_conv2`` (64 -> 64) do not chain,
    and the module stays whole. ``ctc_head`` widens the residual width: the output head, vocab-split."""
    _, v = conv_glu
    p = tpflax.plan(v, MESH)
    assert specs(p, CONV_SPECS) == CONV_SPECS
    assert "depthwise conv" in p.decisions["params/conv_0/depthwise_conv/kernel"].reason
    assert "output head: 'ctc_head'" in p.decisions["params/ctc_head/kernel"].reason


@pytest.fixture(scope="module")
def mesh(devices):
    return tpflax.make_mesh(MESH)


def _comm(model, plan, mesh):
    ts = tpflax.make_train_step(model.apply, plan, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=xent)
    dr = tpflax.dry_run(ts, plan, mesh, compiler_options={"xla_backend_optimization_level": 0})
    return dr.comm_total, dr.memory["argument"] + (dr.memory["temp"] or 0), dr.flops


def test_conv_glu_tree_plan_compiles_within_the_hand_layout(conv_glu, mesh):
    """The tree plan is the hand layout here, so XLA compiles the same step: collective bytes, bytes and
    flops per device no more than the hand's (+1 byte for rounding). The old chain's channel split cost
    the probe's Conformer 2.0x the hand's collectives."""
    m, v = conv_glu
    tree = _comm(m, tpflax.plan(v, MESH, batch=SAMPLE), mesh)
    hand = _comm(m, tpflax.plan(v, MESH, batch=SAMPLE, rules=HAND), mesh)
    for name, got, want in zip(("collective bytes", "bytes/device", "flops/device"), tree, hand, strict=True):
        assert got <= want + 1, (name, tree, hand)


# -- a U-Net's decoder: transposed convs each feed a skip concat ---------------------------

class UNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        skips = []
        for c in (64, 128):
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            skips.append(x)
            x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(256, (3, 3), name="mid")(x))
        for c, s in zip((128, 64), reversed(skips), strict=True):
            x = nn.ConvTranspose(c, (2, 2), strides=(2, 2))(x)
            x = nn.relu(nn.Conv(c, (3, 3))(jnp.concatenate([x, s], -1)))
        return nn.Conv(3, (1, 1), name="out")(x)


def test_transposed_convs_are_no_links_of_a_channel_chain():
    """``ConvTranspose_0`` (256 -> 128) and ``ConvTranspose_1`` (128 -> 64) chain by name and width, but
    each feeds a skip concat and the next is fed by a conv: like a downsampler, an upsampler is no link.
    The encoder's conv pairs, which do feed each other, still split."""
    v = jax.eval_shape(UNet().init, jax.random.key(0), sds(2, 16, 16, 3))
    p = tpflax.plan(v, MESH)
    want = {"ConvTranspose_0/kernel": P(None, None, None, None), "ConvTranspose_1/kernel": P(None, None, None, None),
            "Conv_0/kernel": P(None, None, None, "model"), "Conv_1/kernel": P(None, None, "model", None)}
    assert specs(p, want) == want
    assert "transposed (upsampling) conv" in p.decisions["params/ConvTranspose_0/kernel"].reason


# -- DiT's final layer: adaLN shift/scale, then a projection of the modulated stream ---------

class FinalLayer(nn.Module):
    @nn.compact
    def __call__(self, x, c):
        shift, scale = jnp.split(nn.Dense(2 * D, name="final_ada")(nn.silu(c)), 2, axis=-1)
        y = nn.LayerNorm(name="norm")(x) * (1 + scale[:, None]) + shift[:, None]
        return nn.Dense(D, name="final_linear")(y)  # (D, D): 4x4 patches of 4 channels, by chance D wide


def test_square_row_that_may_read_the_stream_keeps_its_pair_whole():
    """``final_ada`` (64 -> 128) looks like a fused column of two 64-wide pieces and ``final_linear``
    (64 -> 64) like its row, but a square row as wide as the residual stream that no name calls a row may
    read the stream itself (here it does): the pair is recorded and kept whole, with the reason."""
    v = jax.eval_shape(FinalLayer().init, jax.random.key(0), sds(2, 16, D), sds(2, D))
    p = tpflax.plan(v, MESH)
    want = {"final_ada/kernel": P(None, None), "final_ada/bias": P(None), "final_linear/kernel": P(None, None)}
    assert specs(p, want) == want
    assert "may read the stream" in p.decisions["params/final_linear/kernel"].reason
    assert [q.sharded for q in p.pairs] == [False]
