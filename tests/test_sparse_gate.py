"""A statistic of a column's own output does not end its pair. Gemma 3n's sparse MLP layers keep the gate's
top 5% by a Gaussian cutoff, ``relu(gate - (mean(gate) + std(gate) * z))`` over the hidden dim: each shard of a
split hidden dim sums its part of the mean and variance and XLA all-reduces one value per row. The trace took
``gate - mean(gate)`` for a branch joining a stream (an operand lacking the gate's tag), so the variance's sum
over the hidden dim ended the pair: the gate kernel was kept whole and the down projection split on its output
as an unpaired column (gemma's Gemma3n-E2B shape, benchmarks/probe_gemma.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import tpflax


class SparseMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(256, use_bias=False, name="gate")(x)
        up = nn.Dense(256, use_bias=False, name="up")(x)
        cutoff = jnp.mean(gate, -1, keepdims=True) + jnp.std(gate, -1, keepdims=True) * 1.645
        h = nn.gelu(jax.nn.relu(gate - cutoff)) * up
        return nn.Dense(x.shape[-1], use_bias=False, name="down")(h)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + SparseMlp(name="mlp")(nn.RMSNorm(name="norm")(x))
        return nn.RMSNorm(name="final_norm")(x)  # a norm over the stream the branch joined: d stays whole


def test_a_sparse_gate_keeps_its_mlp_paired():
    x = jax.ShapeDtypeStruct((4, 8, 64), jnp.float32)
    net = Net()
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape)))
    p = tpflax.plan(params, {"data": 2, "model": 4}, model=net.apply, sample=(x,))
    specs = {k: p.decisions[f"params/mlp/{k}/kernel"].spec for k in ("gate", "up", "down")}
    assert specs == {"gate": P(None, "model"), "up": P(None, "model"), "down": P("model", None)}
    assert p.decisions["params/mlp/gate/kernel"].pair == p.decisions["params/mlp/down/kernel"].pair
