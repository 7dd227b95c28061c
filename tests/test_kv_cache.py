"""A decoding model's key/value cache is split like the batch and the heads its projections write.

Real flax modules with ``decode=True`` (linen ``MultiHeadDotProductAttention``, nnx
``MultiHeadAttention``), planned tree-only and from a traced decode step, and the decode
step compiled on the 8 CPU-emulated devices with the plan's shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import hlo

MESH = {"data": 2, "model": 4}
B, L, D, HEADS, VOCAB = 8, 32, 64, 8, 128


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D, name="embed")
        x = embed(ids)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, decode=True, name="attn")(x, x)
        x = x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(4 * D, name="up")(x)))
        return embed.attend(x)


@pytest.fixture(scope="module")
def linen_decoder():
    m = Decoder()
    variables = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((B, L), jnp.int32))
    return m, variables


def _cache_specs(plan, prefix=""):
    return {k: (d.spec, d.strategy) for k, d in plan.decisions.items() if "cache" in k.split("/")[-1]}


def test_linen_cache_follows_the_batch_and_the_key_value_heads_tree_only(linen_decoder):
    _, variables = linen_decoder
    plan = tpflax.plan(variables, MESH)
    assert plan.decisions["params/attn/key/kernel"].spec == P(None, "model", None)
    assert _cache_specs(plan) == {
        "cache/attn/cache_index": (P(), "replicate"),
        "cache/attn/cached_key": (P("data", None, "model", None), "heads"),
        "cache/attn/cached_value": (P("data", None, "model", None), "heads"),
    }
    assert "params/attn/key/kernel" in plan.decisions["cache/attn/cached_key"].reason


def test_a_traced_decode_step_keeps_its_pairs_through_the_cache_write(linen_decoder):
    """The decode step writes the new key into the cache with ``dynamic_update_slice``; the trace follows
    the heads through it, so the attention is still a heads pair (it was kept whole before)."""
    m, variables = linen_decoder
    step = lambda v, ids: m.apply(v, ids, mutable=["cache"])[0]  # noqa: E731
    plan = tpflax.plan(variables, MESH, model=step, sample=(jax.ShapeDtypeStruct((B, 1), jnp.int32),))
    for name in ("query", "key", "value"):
        assert plan.decisions[f"params/attn/{name}/kernel"].spec == P(None, "model", None), name
    assert plan.decisions["params/attn/out/kernel"].spec == P("model", None, None)
    assert plan.decisions["cache/attn/cached_value"].spec == P("data", None, "model", None)


def test_the_split_cache_compiles_a_decode_step_with_no_collective_for_it(linen_decoder):
    """Compiled: the cache split like the heads holds 1/8 of it per device, and the step moves no
    cache-sized data; kept whole (every other leaf as planned) XLA gathers the new keys and values into it."""
    m, variables = linen_decoder
    plan = tpflax.plan(variables, MESH)
    mesh = tpflax.make_mesh(MESH)
    whole = tpflax.plan(variables, MESH, rules=[(r"^cache/", "replicate")])
    ids = jax.ShapeDtypeStruct((B, 1), jnp.int32, sharding=tpflax.batch_sharding(mesh))

    def compiled(p):
        shardings = tpflax.shardings(p, mesh)
        args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), variables, shardings)
        step = jax.jit(lambda v, x: m.apply(v, x, mutable=["cache"]), out_shardings=(None, {"cache": shardings["cache"]}))
        return step.lower(args, ids).compile()

    split, kept = compiled(plan), compiled(whole)
    cache_bytes = 2 * B * L * D * 4  # cached_key + cached_value, f32
    arg = lambda c: c.memory_analysis().argument_size_in_bytes  # noqa: E731
    # exact: the two plans differ in the cache only, 1/8 of it per device against all of it
    assert arg(kept) - arg(split) == cache_bytes - cache_bytes // 8
    moved = lambda c: sum(x.total_ring_bytes for x in hlo.parse_collectives(c.as_text(), mesh))  # noqa: E731
    assert moved(split) < moved(kept)
    big = [x for x in hlo.parse_collectives(split.as_text(), mesh) if x.bytes >= cache_bytes // 16]
    assert not big, big


def test_nnx_cache_variables_follow_the_heads():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=True, rngs=rngs)

        def __call__(self, x):
            return self.attn(x)

    model = nnx.eval_shape(lambda: M(nnx.Rngs(0)))
    model.attn.init_cache((B, L, D))
    plan = tpflax.plan(nnx.state(model), {"fsdp": 2, "model": 4})
    assert plan.decisions["attn/cached_key"].spec == P("fsdp", None, "model", None)
    assert plan.decisions["attn/cached_value"].strategy == "heads"
    assert not plan.decisions["attn/cached_key"].trainable


def test_a_cache_whose_rows_do_not_divide_the_batch_axes_splits_its_heads_only():
    m = Decoder()
    variables = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((3, L), jnp.int32))
    plan = tpflax.plan(variables, MESH)
    assert plan.decisions["cache/attn/cached_key"].spec == P(None, None, "model", None)


def test_a_cache_planned_without_its_kernels_splits_over_the_batch():
    cache = {"cache": {"attn": {"cached_key": jax.ShapeDtypeStruct((B, L, HEADS, D // HEADS), jnp.bfloat16),
                                "cache_index": jax.ShapeDtypeStruct((), jnp.int32)}}}
    d = tpflax.plan(cache, MESH).decisions["cache/attn/cached_key"]
    assert (d.spec, d.strategy) == (P("data", None, None, None), "batch")


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, decode=True, name="attn")(x, x)
        return x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(4 * D, name="up")(x))), None


class ScanDecoder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D, name="embed")
        stack = nn.scan(ScanBlock, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True}, length=3)
        return embed.attend(stack(name="layers")(embed(ids), None)[0])


def test_a_scanned_stack_s_cache_keeps_its_layers_dim_whole_and_compiles_without_cache_collectives():
    m = ScanDecoder()
    variables = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((B, L), jnp.int32))
    assert variables["cache"]["layers"]["attn"]["cached_key"].shape == (3, B, L, HEADS, D // HEADS)
    plan = tpflax.plan(variables, MESH)
    d = plan.decisions["cache/layers/attn/cached_key"]
    assert (d.spec, d.layers_dim) == (P(None, "data", None, "model", None), 0)
    mesh = tpflax.make_mesh(MESH)
    shardings = tpflax.shardings(plan, mesh)
    args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), variables, shardings)
    ids = jax.ShapeDtypeStruct((B, 1), jnp.int32, sharding=tpflax.batch_sharding(mesh))
    step = jax.jit(lambda v, x: m.apply(v, x, mutable=["cache"]), out_shardings=(None, {"cache": shardings["cache"]}))
    compiled = step.lower(args, ids).compile()
    one_layer = 2 * B * L * D * 4 // 3  # a third of one layer's key + value cache
    assert not [c for c in hlo.parse_collectives(compiled.as_text(), mesh) if c.bytes >= one_layer // 8]


def test_a_multi_query_cache_follows_its_split_head_features():
    """One key/value head (MQA) whose kernel is split on its features: the cache's head_dim follows."""
    tree = {"params": {"attn": {"k_proj": {"kernel": jax.ShapeDtypeStruct((D, 16), jnp.float32)}}},
            "cache": {"attn": {"cached_key": jax.ShapeDtypeStruct((B, L, 1, 16), jnp.float32)}}}
    plan = tpflax.plan(tree, MESH, rules=[(r"k_proj/kernel$", P(None, "model"))])
    assert plan.decisions["cache/attn/cached_key"].spec == P("data", None, None, "model")


class IndexedCacheAttention(nn.Module):
    """A decode step that writes its cache with jnp's indexed update (``.at[:, i].set``: a scatter), as
    recurrentgemma's does, instead of ``dynamic_update_slice``."""

    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        q, k, v = (nn.DenseGeneral((HEADS, D // HEADS), name=n)(x) for n in ("query", "key", "value"))
        ck = self.variable("cache", "cached_key", jnp.zeros, (b, L, HEADS, D // HEADS), x.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (b, L, HEADS, D // HEADS), x.dtype)
        i = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        ck.value = ck.value.at[:, i.value].set(k[:, 0])
        cv.value = cv.value.at[:, i.value].set(v[:, 0])
        return nn.DenseGeneral(D, axis=(-2, -1), name="out")(nn.dot_product_attention(q, ck.value, cv.value))


class IndexedDecoder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D, name="embed")
        x = embed(ids)
        return embed.attend(x + IndexedCacheAttention(name="attn")(x))


def test_a_traced_decode_step_keeps_its_pairs_through_an_indexed_cache_write():
    m = IndexedDecoder()
    ids = jax.ShapeDtypeStruct((B, 1), jnp.int32)
    variables = jax.eval_shape(m.init, jax.random.key(0), ids)
    plan = tpflax.plan(variables, MESH, model=lambda v, x: m.apply(v, x, mutable=["cache"])[0], sample=(ids,))
    for name in ("query", "key", "value"):
        assert plan.decisions[f"params/attn/{name}/kernel"].spec == P(None, "model", None), name
    assert plan.decisions["params/attn/out/kernel"].spec == P("model", None, None)
    assert plan.decisions["cache/attn/cached_key"].spec == P("data", None, "model", None)
