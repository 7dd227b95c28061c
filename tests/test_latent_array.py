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


class CrossAttend2D(nn.Module):
    """Attention written with 2-D kernels: q reads the latents (32 wide), k and v the inputs (24 wide)."""

    @nn.compact
    def __call__(self, z, x):
        b, n, m = z.shape[0], z.shape[1], x.shape[1]
        q = nn.Dense(32, name="q")(z).reshape(b, n, 4, 8)
        k = nn.Dense(32, name="k")(x).reshape(b, m, 4, 8)
        v = nn.Dense(32, name="v")(x).reshape(b, m, 4, 8)
        p = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k), -1)
        return nn.Dense(32, name="o")(jnp.einsum("bhnm,bmhd->bnhd", p, v).reshape(b, n, 32))


class Perceiver2D(nn.Module):
    @nn.compact
    def __call__(self, x):
        lat = self.param("latents", nn.initializers.normal(0.02), (8, 32))
        z = jnp.broadcast_to(lat, (x.shape[0], *lat.shape))
        z = z + CrossAttend2D(name="cross")(nn.LayerNorm()(z), nn.LayerNorm()(x))
        h = nn.LayerNorm()(z)
        return z + CrossAttend2D(name="self")(h, h)


def test_tree_reads_cross_attention_keys_of_another_width_as_stored():
    """k, v ``(24, 32)``: the norms' width 32 on their output side once made them kernels stored (out, in),
    and their square q and o flipped with them (q split on its input, o on its output, k and v whole: 1.49x
    the hand layout's compiled collectives at d=64). Beside a q reading the residual as stored with the same
    output width, they are stored (in, out): Megatron's column -> row."""
    variables = jax.eval_shape(Perceiver2D().init, jax.random.key(0), *SAMPLE)
    d = tpflax.plan(variables, MESH).decisions
    for name in ("q", "k", "v"):
        assert tuple(d[f"params/cross/{name}/kernel"].spec) == (None, "model"), name
        assert tuple(d[f"params/self/{name}/kernel"].spec) == (None, "model"), name
    assert tuple(d["params/cross/o/kernel"].spec) == ("model", None)


class _TorchDense(nn.Module):
    """A kernel stored (out, in), as a tree converted from PyTorch keeps it."""

    features: int

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.normal(), (self.features, x.shape[-1])).T


class _TorchGQABlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        d, hd = x.shape[-1], 16
        h = nn.RMSNorm(name="input_layernorm")(x)
        q = _TorchDense(d, name="q_proj")(h).reshape(*x.shape[:2], -1, hd)
        k = _TorchDense(hd, name="k_proj")(h).reshape(*x.shape[:2], 1, hd)  # one kv head: (16, d) stored
        v = _TorchDense(hd, name="v_proj")(h).reshape(*x.shape[:2], 1, hd)
        s = jax.nn.softmax(jnp.einsum("bqhd,bkgd->bhqk", q, k), -1)
        x = x + _TorchDense(d, name="o_proj")(jnp.einsum("bhqk,bkgd->bqhd", s, v).reshape(x.shape))
        h = nn.RMSNorm(name="post_attention_layernorm")(x)
        return x + _TorchDense(d, name="down_proj")(nn.silu(_TorchDense(256, name="gate_proj")(h))
                                                      * _TorchDense(256, name="up_proj")(h))


def test_a_tree_stored_out_in_keeps_its_mlp_oriented_beside_a_gqa_key():
    # k_proj (16, 64) beside q_proj (64, 64) looks like a Perceiver's k/v reading a narrower input, but the
    # block's down_proj (64, 256) says the tree is stored (out, in): gate/up split their 256 outputs (dim 0)
    x = (jax.ShapeDtypeStruct((8, 16, 64), "float32"),)
    tree = jax.eval_shape(_TorchGQABlock().init, jax.random.key(0), *x)
    p = tpflax.plan(tree, {"data": 2, "model": 4})
    spec = {k.split("/")[-2]: str(d.spec) for k, d in p.decisions.items() if k.endswith("kernel")}
    assert spec["gate_proj"] == spec["up_proj"] == "P('model', None)", spec
    assert spec["down_proj"] == "P(None, 'model')", spec
    assert spec["k_proj"] != "P(None, 'model')", spec  # never its input (the residual) split


class MAPHead(nn.Module):
    """big_vision's multihead attention pooling: a learnt probe ``(1, 1, d)`` tiled over the batch
    (``jnp.tile``, as big_vision and clip-jax write it) or broadcast (``jnp.broadcast_to``) queries the tokens."""

    tile: bool

    @nn.compact
    def __call__(self, x):
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, d))
        probe = jnp.tile(probe, (b, 1, 1)) if self.tile else jnp.broadcast_to(probe, (b, 1, d))
        x = nn.MultiHeadDotProductAttention(4, name="attention")(probe, x)
        return nn.Dense(10, name="head")(x[:, 0])


class PooledEncoder(nn.Module):
    tile: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="embed")(x)
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(4, name="self")(h, h)
        return MAPHead(self.tile, name="MAPHead_0")(nn.LayerNorm()(x))


def test_a_probe_tiled_or_broadcast_over_the_batch_queries_as_an_activation():
    """The probe's queries are a value of weights alone, but one per example: the trace read the scores'
    contraction of the keys with them as a kernel (``probe @ w_q``) reading the key projection, and paired
    ``key`` -> ``query`` on the head dim (clip-jax's SigLIP: the head's partial scores summed over model,
    1.01x the tree plan's collectives). Like a latent array broadcast over a new batch dim, a probe grown from
    size 1 over the batch is per example: the attention pairs by heads, as the tree pairs it."""
    for tile in (True, False):
        model = PooledEncoder(tile)
        variables = jax.eval_shape(model.init, jax.random.key(0), *SAMPLE)
        traced = tpflax.plan(variables, MESH, model=model, sample=SAMPLE)
        tree = tpflax.plan(variables, MESH)
        for name in ("query", "key", "value", "out"):
            path = f"params/MAPHead_0/attention/{name}/kernel"
            assert tuple(traced.decisions[path].spec) == tuple(tree.decisions[path].spec), (tile, name)
        assert tuple(traced.decisions["params/MAPHead_0/attention/query/kernel"].spec) == (None, "model", None)
