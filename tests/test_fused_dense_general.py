"""A fused q/k/v DenseGeneral kernel ``(d, 3, heads, head_dim)``, as MaxText's GPT-3 decoder writes it.

``nn.DenseGeneral(features=(3, heads, head_dim))`` makes one kernel whose projections' count is its second dim.
Tree-only, it was taken for a conv window (4-D, not named like attention's stacks), kept whole, and its output
projection left without a partner: MaxText's gpt3 with ``use_annotations=False`` was 1.45x the bytes and 1.38x
the collectives of MaxText's own layout (``benchmarks/results/probe_maxtext.md``). It is now a column split on
its heads, paired with the output projection, as the traced plan splits it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _util import specs
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}
D, H, HD, F = 64, 4, 16, 256


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="pre_norm")(x)
        qkv = nn.DenseGeneral((3, H, HD), name="qkv_proj")(h)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / HD ** 0.5)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        h = nn.LayerNorm(name="mlp_norm")(x)
        return x + nn.Dense(D, name="wo")(nn.gelu(nn.Dense(F, name="wi")(h))), None


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        # scanned with the layers dim second, as MaxText's param_scan_axis=1
        stack = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=2)
        return stack(name="layers")(x, None)[0]


X = jax.ShapeDtypeStruct((8, 16, D), jnp.float32)
WANT = {"qkv_proj/kernel": P(None, None, None, "model", None), "qkv_proj/bias": P(None, None, "model", None),
        "out/kernel": P("model", None, None, None), "wi/kernel": P(None, None, "model"),
        "wo/kernel": P("model", None, None)}


@pytest.fixture(scope="module")
def params():
    return jax.eval_shape(Decoder().init, jax.random.key(0), X)


def test_a_fused_dense_general_kernel_is_a_heads_column_tree_only(params):
    p = tpflax.plan(params, MESH)
    assert specs(p, WANT) == WANT
    assert "fused (d, 3, heads, head_dim)" in p.decisions["params/layers/qkv_proj/kernel"].reason


def test_the_traced_plan_splits_it_alike(params):
    m = Decoder()
    p = tpflax.plan(params, MESH, model=lambda v, x: m.apply(v, x), sample=(X,))
    assert specs(p, WANT) == WANT
