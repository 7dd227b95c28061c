"""A model of several stages has a residual width per stage (diffusers' UNet: levels 64 and 128 channels wide).

Tree-only, columns and rows are oriented by the residual width, the model's commonest norm width. In a UNet
that is the outer levels' 64: the 128-wide middle level's GEGLU projection ``ff/net_0/proj`` (128 -> 1024),
named like a row elsewhere (``proj``), was read by its name and left its block's ``net_2`` (512 -> 128)
unpaired, both kept whole: 1.06x the hand layout's flops on diffusers' UNet (benchmarks/probe_diffusers.py).
A block's stage is the module above it holding two norms or more of one width; that width joins the model's
for the block. An attention's own query and key norms are of its heads, not of a stage.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}


class GEGLU(nn.Module):
    inner: int

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate)


class FeedForward(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):  # diffusers' FlaxFeedForward: net_0 (GEGLU) then net_2
        return nn.Dense(self.width, name="net_2")(GEGLU(4 * self.width, name="net_0")(x))


class Einsum(nn.Module):
    shape: tuple

    @nn.compact
    def __call__(self, eq, x):
        return jnp.einsum(eq, x, self.param("w", nn.initializers.normal(), self.shape))


class Attention(nn.Module):
    width: int
    qk_norm: bool = False

    @nn.compact
    def __call__(self, x):  # Gemma 3 1B's layout: (heads, d, head_dim) einsum kernels, one key/value head,
        # query and key norms inside
        h, hd = self.width // 16, 16
        q = Einsum((h, self.width, hd), name="q_einsum")("btd,hdk->bthk", x)
        k, v = Einsum((2, 1, self.width, hd), name="kv_einsum")("btd,shdk->sbthk", x)  # one K/V head
        k, v = (jnp.broadcast_to(t, q.shape) for t in (k, v))
        if self.qk_norm:  # of the heads (16 wide): no stage's width
            q, k = nn.RMSNorm(name="_query_norm")(q), nn.RMSNorm(name="_key_norm")(k)
        w = jax.nn.softmax(jnp.einsum("bihk,bjhk->bhij", q, k), axis=-1)
        return Einsum((h, hd, self.width), name="attn_vec_einsum")("bihk,hkd->bid",
                                                                    jnp.einsum("bhij,bjhk->bihk", w, v))


class Block(nn.Module):
    width: int
    qk_norm: bool = False

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.width, self.qk_norm, name="attn")(nn.LayerNorm(name="norm1")(x))
        return x + FeedForward(self.width, name="ff")(nn.LayerNorm(name="norm2")(x))


class Levels(nn.Module):
    qk_norm: bool = False

    @nn.compact
    def __call__(self, x):
        x = Block(64, name="down_0")(x)
        x = Block(64, name="down_1")(x)
        x = Block(128, self.qk_norm, name="mid")(nn.Dense(128, name="widen")(x))
        x = Block(64, name="up_0")(nn.Dense(64, name="narrow")(x))
        return Block(64, name="up_1")(x)


def _plan(**kw):
    v = jax.eval_shape(Levels(**kw).init, jax.random.key(0), jnp.zeros((8, 16, 64)))
    return tpflax.plan(v, MESH).decisions


def test_each_stages_feed_forward_pairs_at_its_own_width():
    d = _plan()
    for block, w in (("down_0", 64), ("mid", 128), ("up_1", 64)):
        up, down = d[f"params/{block}/ff/net_0/proj/kernel"], d[f"params/{block}/ff/net_2/kernel"]
        assert (up.shape, down.shape) == ((w, 8 * w), (4 * w, w))
        assert (up.spec, down.spec) == (P(None, "model"), P("model", None)), block
        assert up.pair == down.pair is not None


def test_an_attentions_query_and_key_norms_are_no_stage_width():
    # the middle block's 16-wide query and key norms, two of one width, do not make 16 a residual width
    plain, normed = _plan(), _plan(qk_norm=True)
    assert plain["params/mid/attn/q_einsum/w"].spec == P("model", None, None)
    for n in ("attn/q_einsum/w", "attn/kv_einsum/w", "attn/attn_vec_einsum/w", "ff/net_0/proj/kernel",
              "ff/net_2/kernel"):
        path = f"params/mid/{n}"
        assert normed[path].spec == plain[path].spec, path


class Stage(nn.Module):
    """A block as jax-models writes it: ``stages00/{dwconv, norm, pwconv1, pwconv2}``."""

    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(nn.Conv(self.width, (7, 7), feature_group_count=self.width, name="dwconv")(x))
        return x + nn.Dense(self.width, name="pwconv2")(nn.gelu(nn.Dense(4 * self.width, name="pwconv1")(h)))


class ConvNeXt(nn.Module):
    @nn.compact
    def __call__(self, x):
        for s, (width, depth) in enumerate(((32, 1), (128, 2))):
            x = nn.Conv(width, (2, 2), strides=2, name=f"downsample_layers{s}0")(x)
            for i in range(depth):
                x = Stage(width, name=f"stages{s}{i}")(x)
        return nn.Dense(10, name="head")(nn.LayerNorm(name="norm")(x.mean((1, 2))))


def test_a_block_with_one_norm_adds_its_width():
    """Tree-only, the 32-wide first stage's MLP was oriented by the model's 128: ``pwconv1`` (32 -> 128) read as a
    row narrowing back to 128, ``pwconv2`` as its column: a feature-split residual stream, gathered at every
    norm (jax-models' ConvNeXt, data=2,model=4: 1.38x the collectives of the traced Megatron layout, for 0.67x
    its flops, the depthwise convs on split channels). A block's own norms, all of one width, give the block's
    residual width, and the tree plan is the traced one."""
    v = jax.eval_shape(ConvNeXt().init, jax.random.key(0), jnp.zeros((8, 32, 32, 3)))
    d = tpflax.plan(v, MESH).decisions
    for block in ("stages00", "stages10", "stages11"):
        assert tuple(d[f"params/{block}/pwconv1/kernel"].spec) == (None, "model"), block
        assert tuple(d[f"params/{block}/pwconv2/kernel"].spec) == ("model", None), block
