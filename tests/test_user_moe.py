"""Blocks written in Python loops as users write them (not the zoo's): a layer named with its index
inside the name (``layers_0_attn``) is one layer, not an ``nn.scan`` stack."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import tpflax


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = (nn.Dense(d, use_bias=False, name=n)(x).reshape(b, t, 4, d // 4)
                   for n in ("q_proj", "k_proj", "v_proj"))
        return nn.Dense(d, use_bias=False, name="o_proj")(nn.dot_product_attention(q, k, v).reshape(b, t, d))


class Loop(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):  # four square (d, d) kernels under a name holding "layers" and an index
            x = x + Attn(name=f"layers_{i}_attn")(x)
        return x


def test_a_layer_named_with_its_index_inside_is_not_a_stack():
    # read as an nn.scan stack of 64 layers of (64,) leaves, the tree plan replicated the attention
    # ("small parameter") and the estimate of a rules plan counted each pair's all-reduces 64 times
    params = jax.eval_shape(lambda: Loop().init(jax.random.key(0), jnp.zeros((2, 8, 64))))
    mesh = {"data": 2, "model": 4}
    p = tpflax.plan(params, mesh)
    for i in range(2):
        a = f"params/layers_{i}_attn"
        assert {k: p.decisions[f"{a}/{k}/kernel"].spec for k in ("q_proj", "k_proj", "v_proj", "o_proj")} == {
            "q_proj": P(None, "model"), "k_proj": P(None, "model"), "v_proj": P(None, "model"),
            "o_proj": P("model", None)}
    forced = tpflax.plan(params, mesh, rules=[(r"o_proj", P("model", None)), (r".*", P(None, "model"))])
    assert [d.layers_dim for d in p.decisions.values()] == [None] * 8
    assert [d.layers_dim for d in forced.decisions.values()] == [None] * 8

