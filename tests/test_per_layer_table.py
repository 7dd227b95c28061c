"""A table looked up by the token ids is a vocabulary table whatever its rank. Gemma 3n's per-layer inputs come
from a ``(vocab, layers, width)`` table indexed by the token ids: every layer gets its own small vector per token
(``gemma.gm.nn.gemma3n._modules.Embedder.encode_per_layer_input``). tpflax kept it whole as a "learned positional
table" in both the tree and the traced plan, where the hand layout splits its vocab like the token table's
(benchmarks/probe_gemma.py, gemma3n-e2b: 1.03-1.07x the hand layout's bytes per device). Split over its rows, the
lookup all-reduces the looked-up rows (all their layers) over the tensor axis, which the estimate must count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA, FAST_XLA
from jax.sharding import PartitionSpec as P

import tpflax

V, D, L, W, F = 512, 64, 3, 16, 256
MESH = {"data": 2, "model": 4}
IDS = jax.ShapeDtypeStruct((8, 16), jnp.int32)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, per_layer):
        h = nn.RMSNorm(name="norm")(x)
        x = x + nn.Dense(D, use_bias=False, name="down")(nn.gelu(nn.Dense(F, use_bias=False, name="up")(h)))
        g = nn.gelu(nn.Dense(W, use_bias=False, name="gate")(x)) * per_layer
        return x + nn.RMSNorm(name="post")(nn.Dense(D, use_bias=False, name="proj")(g))


def net(table: str):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(V, D, name="embed")
            per_layer = self.param(table, nn.initializers.normal(), (V, L, W))[ids]  # (b, t, layers, width)
            x = emb(ids)
            for i in range(L):
                x = Block(name=f"layer_{i}")(x, per_layer[..., i, :])
            return emb.attend(nn.RMSNorm(name="final_norm")(x))

    return Net()


def loss(logits, *_):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


@pytest.mark.parametrize("traced", [False, True], ids=["tree", "traced"])
def test_a_per_layer_table_splits_its_vocab_like_the_token_table(traced):
    m = net("per_layer_embedding")
    v = jax.eval_shape(m.init, jax.random.key(0), IDS)
    kw = {"model": m.apply, "sample": (IDS,)} if traced else {}
    p = tpflax.plan(v, MESH, batch=(IDS,), **kw)
    d = p.decisions["params/per_layer_embedding"]
    assert (d.spec, d.strategy) == (P("model", None, None), "vocab"), d.reason
    assert p.decisions["params/embed/embedding"].spec == P("model", None)
    names = {a.name for a in d.alternatives}
    assert names == {"vocab split", "replicate"}, names  # a 3-D table: no feature split, never tied


def test_a_traced_lookup_by_ids_is_a_vocabulary_table_whatever_its_name():
    # named for nothing: only the trace shows it is looked up by the token ids
    m = net("per_layer_w")
    v = jax.eval_shape(m.init, jax.random.key(0), IDS)
    assert tpflax.plan(v, MESH, batch=(IDS,)).decisions["params/per_layer_w"].spec == P(None, None, None)
    d = tpflax.plan(v, MESH, batch=(IDS,), model=m.apply, sample=(IDS,)).decisions["params/per_layer_w"]
    assert d.spec == P("model", None, None), d.reason


def _whole_and_never_offered_a_vocab_split(d):
    assert d.spec == P(None, None, None), d.reason
    assert "vocab split" not in {a.name for a in d.alternatives}, d.reason  # never offered, not just priced out


def test_a_three_d_table_of_other_rows_stays_whole_in_the_tree():
    # not as many rows as the token table: the tree cannot tell it is looked up by the ids
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    tree = {"params": {"embed": {"embedding": s(V, D)}, "per_layer_embedding": s(V + 4, L, W)}}
    d = tpflax.plan(tree, MESH).decisions["params/per_layer_embedding"]
    _whole_and_never_offered_a_vocab_split(d)


def test_the_split_tables_numbers_beat_it_whole_and_the_estimate_counts_its_lookup():
    m = net("per_layer_embedding")
    v = jax.eval_shape(m.init, jax.random.key(0), IDS)
    mesh = tpflax.make_mesh(MESH)
    p = tpflax.plan(v, MESH, batch=(IDS,), model=m.apply, sample=(IDS,))
    whole = tpflax.plan(v, MESH, batch=(IDS,), model=m.apply, sample=(IDS,),
                        rules=[(r"per_layer_embedding$", P(None, None, None))])
    got = {}
    for name, plan in (("split", p), ("whole", whole)):
        ts = tpflax.make_train_step(m, plan, mesh, optax.adamw(1e-3), sample=(IDS,), variables=v, loss=loss)
        dr = tpflax.dry_run(ts, plan, mesh, compiler_options=FAST_XLA)
        got[name] = (dr.memory["argument"] + (dr.memory["temp"] or 0), dr.comm_total, dr.flops, dr)
    # the table and its two adamw moments and gradient: 3/4 of 4 x 98 KiB off each device; its data-parallel
    # gradient all-reduce shrinks by 3/4 too, more than the lookup's all-reduce of the looked-up rows adds
    assert got["split"][0] < got["whole"][0] - 3 * V * L * W * 4
    assert got["split"][1] < got["whole"][1]
    assert got["split"][2] <= got["whole"][2]
    # XLA all-reduces the looked-up rows, every layer's slice: 4 examples x 16 tokens x 3 x 16 on each device
    dr = got["split"][3]
    assert any(c.kind == "all-reduce" and (4, 16, L, W) in c.shapes for c in dr.collectives), dr.collectives
    est = tpflax.estimate(p, optax.adamw(1e-3), (IDS,), model=m.apply, sample=(IDS,), loss=loss, backend="cpu")
    looks = [i for i in est.items if i.source == "params/per_layer_embedding" and "looked-up rows" in i.why]
    assert [(i.size, i.count) for i in looks] == [(4 * 16 * L * W * 4, 1)], looks
    assert est.comm_total == pytest.approx(dr.comm_total, rel=0.02), (est.comm_total, dr.comm_total)


def test_a_traced_three_d_table_looked_up_at_positions_stays_whole():
    # (positions, layers, width) indexed by arange: no model input reaches its indices, so no vocabulary
    class PosNet(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(V, D, name="embed")(ids)
            pos = self.param("per_layer_w", nn.initializers.normal(), (ids.shape[1], L, W))
            per_layer = pos[jnp.arange(ids.shape[1])]  # (t, layers, width)
            for i in range(L):
                x = Block(name=f"layer_{i}")(x, per_layer[None, :, i, :])
            return nn.Dense(V, use_bias=False, name="head")(x)

    m = PosNet()
    v = jax.eval_shape(m.init, jax.random.key(0), IDS)
    d = tpflax.plan(v, MESH, batch=(IDS,), model=m.apply, sample=(IDS,)).decisions["params/per_layer_w"]
    _whole_and_never_offered_a_vocab_split(d)


def test_the_estimate_counts_the_lookup_of_a_table_a_rule_splits_whatever_its_name():
    # a rule splits a table the tree takes for a dense kernel: the trace shows it looked up, and its lookup's
    # all-reduce is counted as the token table's would be (it was missed: 4% under the compiled collectives)
    m = net("per_layer_w")
    v = jax.eval_shape(m.init, jax.random.key(0), IDS)
    mesh = tpflax.make_mesh(MESH)
    p = tpflax.plan(v, MESH, rules=[(r"per_layer_w$", P("model", None, None))])
    assert p.decisions["params/per_layer_w"].kind != "embedding"
    est = tpflax.estimate(p, optax.adamw(1e-3), (IDS,), model=m.apply, sample=(IDS,), loss=loss, backend="cpu")
    looks = [i for i in est.items if i.source == "params/per_layer_w" and "looked-up rows" in i.why]
    assert [(i.size, i.count) for i in looks] == [(4 * 16 * L * W * 4, 1)], looks
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(IDS,), variables=v, loss=loss)
    compiled = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA).comm_total
    assert est.comm_total == pytest.approx(compiled, rel=0.02), (est.comm_total, compiled)
