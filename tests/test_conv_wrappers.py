"""Convs wrapped in a module of their own (flaxdiff's ``ConvLayer``: ``conv1/conv``, ``conv2/conv``).

Each wrapper holds nothing but its conv, so tree-only the convs of one residual block sat in different
groups and no channel chain was found: every conv stayed whole (the UNet's tree plan held 2x the hand
layout's bytes and flops). A wrapper that holds only a conv is that conv, named by the wrapper, in the
wrapper's parent block. Top-level wrappers (the stem and the output conv) stay apart: the top chains
stages, not one block's layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import tpflax


class ConvLayer(nn.Module):
    features: int
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, (self.kernel, self.kernel), name="conv")(x)


class ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, temb):
        h = ConvLayer(self.features, name="conv1")(nn.swish(nn.GroupNorm(8, name="norm1")(x)))
        h = h + nn.Dense(self.features, name="temb_projection")(temb)[:, None, None, :]
        h = ConvLayer(self.features, name="conv2")(nn.swish(nn.GroupNorm(8, name="norm2")(h)))
        if x.shape[-1] != self.features:
            x = ConvLayer(self.features, kernel=1, name="residual_conv")(x)
        return x + h


class TinyUNet(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        temb = nn.Dense(32)(t)
        h = ConvLayer(64)(x)  # ConvLayer_0: the stem
        h = ResBlock(64, name="down_0_residual_0")(h, temb)
        h = ResBlock(128, name="up_0_residual_0")(h, temb)
        return ConvLayer(3)(h)  # ConvLayer_1: the output conv


def _variables():
    x, t = jnp.zeros((8, 16, 16, 3)), jnp.zeros((8, 16))
    return TinyUNet(), jax.eval_shape(TinyUNet().init, jax.random.key(0), x, t), (x, t)


def test_wrapped_convs_of_a_block_pair_tree_only():
    _, variables, _ = _variables()
    p = tpflax.plan(variables, {"data": 2, "model": 4})
    for block in ("down_0_residual_0", "up_0_residual_0"):
        assert p.decisions[f"params/{block}/conv1/conv/kernel"].spec == P(None, None, None, "model")
        assert p.decisions[f"params/{block}/conv1/conv/bias"].spec == P("model")
        assert p.decisions[f"params/{block}/conv2/conv/kernel"].spec == P(None, None, "model", None)
        assert p.decisions[f"params/{block}/conv2/conv/kernel"].strategy == "row"
    # the shortcut is named by its wrapper, so it is no link of the chain
    assert p.decisions["params/up_0_residual_0/residual_conv/conv/kernel"].pair is None
    # the stem and the output conv sit at the top: not paired by their order
    for name in ("ConvLayer_0", "ConvLayer_1"):
        assert p.decisions[f"params/{name}/conv/kernel"].pair is None


def test_wrapped_conv_pairs_divide_the_compiled_flops():
    model, variables, (x, t) = _variables()
    mesh = tpflax.make_mesh({"data": 2, "model": 4})

    def loss(v, x, t):
        return jnp.mean(model.apply(v, x, t) ** 2)

    def flops(p):
        opt = optax.adamw(1e-3)
        params = variables

        def step(v, s, x, t):
            g = jax.grad(loss)(v, x, t)
            u, s = opt.update(g, s, v)
            return optax.apply_updates(v, u), s

        state = jax.eval_shape(opt.init, params)
        return tpflax.dry_run(step, p, mesh, (params, state, x, t), optimizer=opt).flops

    tree = tpflax.plan(variables, mesh)
    whole = tpflax.plan(variables, mesh, rules=[(r".*", "replicate")])
    # the two ResBlocks' 3x3 convs are most of the step's flops; split 4 ways they take at most about a
    # third of the replicated step's (the stem, output conv, shortcut and norms stay whole: well under half)
    assert flops(tree) < 0.5 * flops(whole)
