"""A feed-forward whose input projection sits alone in a numbered wrapper: diffusers' GEGLU, in linen.

Diffusers ports PyTorch's ``nn.Sequential`` feed-forward: ``ff/net_0`` is a GEGLU module holding one
Dense, ``proj`` ``(d, 2f)`` (its output cut into a value and a gate), ``ff/net_2`` the ``(f, d)`` Dense
back. The tree heuristics pair layers within a block and pool unpaired ones upwards, but never out of a
numbered module (a layer of a stack), so ``proj`` never met ``net_2``; and its generic name ``proj``
(an output projection in ViT's ``attn/proj``) read it as a row. Both kernels stayed whole on every
model rank: tiny FlaxUNet2DConditionModel, fsdp=2 x model=4, 1.025x the hand layout's bytes per device.
The traced plan already paired them; the tree now does too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import tpflax

D, F = 256, 1024
X = (jax.ShapeDtypeStruct((8, 64, D), jnp.float32),)
MESH = {"data": 2, "model": 4}
PROJ = "blocks_0/ff/net_0/proj/kernel"
DOWN = "blocks_0/ff/net_2/kernel"


class GEGLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * F, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="net_2")(GEGLU(name="net_0")(x))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(D, name="mix")(nn.LayerNorm(name="norm1")(x))
        return x + FeedForward(name="ff")(nn.LayerNorm(name="norm2")(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="blocks_1")(Block(name="blocks_0")(x))


def _params():
    return jax.eval_shape(Net().init, jax.random.PRNGKey(0), *X)["params"]


def test_tree_pairs_the_wrapped_projection_with_its_row():
    plan = tpflax.plan(_params(), MESH)
    proj, down = plan.decisions[PROJ], plan.decisions[DOWN]
    assert (proj.spec, proj.strategy) == (P(None, "model"), "column"), proj.reason
    assert (down.spec, down.strategy) == (P("model", None), "row"), down.reason
    assert plan.decisions["blocks_0/ff/net_0/proj/bias"].spec == P("model")
    assert "fused" in proj.reason and "net_0/proj" in down.reason


def test_tree_agrees_with_the_trace():
    net = Net()
    traced = tpflax.plan(_params(), MESH, model=lambda p, x: net.apply({"params": p}, x), sample=X)
    tree = tpflax.plan(_params(), MESH)
    for path in (PROJ, DOWN):
        want = traced.decisions[path]
        assert tree.decisions[path].spec == want.spec, want.reason
