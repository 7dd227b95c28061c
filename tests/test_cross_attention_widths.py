"""A cross-attention whose context width equals its head_dim (a U-Net's text cross-attention: image
features 128 wide, 4 heads of 32, text 32 wide): the residual width misplaced d in the 3-D kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import tpflax

C, CTX, H, HD = 128, 32, 4, 32
X = (jax.ShapeDtypeStruct((8, 16, C), jnp.float32), jax.ShapeDtypeStruct((8, 8, CTX), jnp.float32))


class CrossBlock(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):
        proj = lambda n: nn.DenseGeneral((H, HD), use_bias=False, name=n)  # noqa: E731
        q, k, v = proj("to_q")(nn.RMSNorm()(x)), proj("to_k")(ctx), proj("to_v")(ctx)
        a = nn.dot_product_attention(q, k, v)
        x = x + nn.DenseGeneral(C, axis=(-2, -1), use_bias=False, name="to_out_0")(a)
        return x


class Narrow(nn.Module):
    """Another level of the model, 32 wide (a U-Net's first level): its norms make 32 the commonest width."""

    @nn.compact
    def __call__(self, y):
        for j in range(2):
            y = nn.gelu(nn.RMSNorm(name=f"norm_{j}")(y))
        return y


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):
        for i in range(3):
            ctx = Narrow(name=f"narrow_{i}")(ctx)
        for i in range(2):
            x = CrossBlock(name=f"attention_{i}")(x, ctx)
        return x


def test_cross_attention_kernels_are_oriented_by_their_heads():
    # flaxdiff's Unet, tree-only, data=2,model=4: q (128, 4, 32) read as (heads=128, head_dim, d) and split
    # on its 128 "heads", out (4, 32, 128) as (heads, d, head_dim): the tree plan cost 2.3x the hand layout's
    # collectives and 1.8x its bytes, worse than replicated on collectives
    mesh = {"data": 2, "model": 4}
    v = jax.eval_shape(Net().init, jax.random.key(0), *X)
    plan = tpflax.plan(v, mesh, batch=X)
    d = plan.decisions
    for i in range(2):
        a = f"params/attention_{i}/"
        assert [tuple(d[a + n + "/kernel"].spec) for n in ("to_q", "to_k", "to_v", "to_out_0")] == \
            [(None, "model", None)] * 3 + [("model", None, None)]
