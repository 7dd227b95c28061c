"""A learned latent array broadcast over the batch (Perceiver, DETR's object queries, Q-Former's query tokens).

``z = broadcast_to(latents, (batch, n, d))`` is made of a weight only, so the
trace used to read ``norm(z) @ w_q`` as a weight computed from weights, and
the queries' product with the keys as the use of a kernel made of ``latents``,
``w_q`` and the query bias: the bias became a column of the attention's pair,
and the estimate summed an input gradient for it that XLA never computes (+4.5%
of the compiled collectives at d=64, data=2,model=4). A weight-made value with
a dim no weight has is per example: it is the activation of such a product.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import tpflax

S = jax.ShapeDtypeStruct
MESH = {"data": 2, "model": 4}
SAMPLE = (S((8, 16, 24), jnp.float32),)  # 16 inputs of width 24, cross-attended by 8 latents of width 32


class Perceiver(nn.Module):
    @nn.compact
    def __call__(self, x):
        lat = self.param("latents", nn.initializers.normal(0.02), (8, 32))
        z = jnp.broadcast_to(lat, (x.shape[0], *lat.shape))
        z = z + nn.MultiHeadDotProductAttention(4, qkv_features=32, out_features=32, name="cross")(
            nn.LayerNorm()(z), nn.LayerNorm()(x))
        h = nn.LayerNorm()(z)
        z = z + nn.MultiHeadDotProductAttention(4, name="self")(h, h)
        return nn.Dense(10, name="head")(z.mean(axis=1))


def _loss(out, x):
    return jnp.mean(out ** 2)


def test_latent_queries_are_activations():
    model = Perceiver()
    variables = jax.eval_shape(model.init, jax.random.key(0), *SAMPLE)
    traced = tpflax.plan(variables, MESH, model=model, sample=SAMPLE)
    tree = tpflax.plan(variables, MESH)
    assert {p: tuple(d.spec) for p, d in traced.decisions.items()} == {p: tuple(d.spec) for p, d in tree.decisions.items()}
    bias = traced.decisions["params/cross/query/bias"]
    assert bias.role is None and bias.reason.startswith("bias (traced: added to the output of cross/query/kernel)")
    est = [tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=SAMPLE, loss=_loss, backend="cpu")
           for p in (traced, tree)]
    # same specs: the same collectives, to the byte (the tree's were the compiled ones in the probe)
    assert est[0].comm == est[1].comm
    assert not any("bias" in i.why for i in est[0].items if i.axes == ("model",))
