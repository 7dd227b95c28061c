"""Self- and cross-attention of one block (diffusers' ``attn1`` and ``attn2``): layers alike in their kernels,
not in the tokens they read.

The cost model prices repeated layers once per class of alike leaves (``cost/leaves.py`` ``merge``). A plain
function's trace records no layer activations, only its contractions, and the class key did not read those:
``attn1/to_k`` (reading the image's 64 tokens) and ``attn2/to_k`` (the text context's 4) have the same
``(64, 64)`` kernel and the same layer group ``attn*/to_k``, so the cross-attention's key and value were
priced at the self-attention's tokens. On diffusers' UNet that put the hand layout's estimate 10% over its
compiled collectives once its attention pairs were found (benchmarks/probe_diffusers.py).

Tree-only, the ``to_`` of diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out_0``) reads as the
layer-kind affix it is, so the attention's kernels pair by heads as ``q``/``k``/``v`` and ``out`` do. The
trace loses the pair where the heads fold into the batch; the estimate prices such a pair, found by names
and no traced edge, as XLA compiles it: the row's partial outputs summed, the column's output and the row's
input gradient gathered. Unpaired, ``to_out_0`` was priced as a lone row (its input gathered, nothing summed),
0.80x the compiled collectives once the classes above were right.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax._src.cost.leaves import merge
from tpflax._src.cost.workload import prepare

C, H = 64, 8
X = (jax.ShapeDtypeStruct((8, 64, C), jnp.float32), jax.ShapeDtypeStruct((8, 4, C), jnp.float32))
MESH = {"data": 2, "model": 4}


class Attention(nn.Module):
    """diffusers' FlaxAttention: 2-D kernels, the heads folded into the batch around the scores."""

    @nn.compact
    def __call__(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        q, k, v = (nn.Dense(C, use_bias=False, name=n)(y) for n, y in (("to_q", x), ("to_k", ctx), ("to_v", ctx)))

        def heads(t):
            b, s, _ = t.shape
            return t.reshape(b, s, H, C // H).transpose(0, 2, 1, 3).reshape(b * H, s, C // H)

        w = jax.nn.softmax(jnp.einsum("bid,bjd->bij", heads(q), heads(k)) / (C // H) ** 0.5, axis=-1)
        a = jnp.einsum("bij,bjd->bid", w, heads(v))
        a = a.reshape(x.shape[0], H, -1, C // H).transpose(0, 2, 1, 3).reshape(x.shape)
        return nn.Dense(C, name="to_out_0")(a)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):
        x = x + Attention(name="attn1")(nn.LayerNorm(name="norm1")(x))
        return x + Attention(name="attn2")(nn.LayerNorm(name="norm2")(x), ctx)


@functools.cache
def _setup():
    """The block's variables (one init compile per process: every test reads them, none changes them) and its
    apply as a plain function."""
    m = Block()
    v = jax.jit(m.init)(jax.random.key(0), *(jnp.zeros(s.shape) for s in X))
    return v, (lambda v, x, ctx: m.apply(v, x, ctx))


def _loss(out, x, ctx):
    return (out ** 2).mean()


HAND = [(r"to_[qkv]/kernel$", P(None, "model")), (r"to_out_0/kernel$", P("model", None)), (r".*", P())]


def test_to_prefixed_attention_kernels_pair_by_heads_tree_only():
    v, _ = _setup()
    d = tpflax.plan(jax.eval_shape(lambda: v), MESH, batch=X).decisions
    for a in ("attn1", "attn2"):
        assert [d[f"params/{a}/to_{n}/kernel"].spec for n in ("q", "k", "v", "out_0")] == \
            [P(None, "model")] * 3 + [P("model", None)], a
        assert d[f"params/{a}/to_q/kernel"].pair == d[f"params/{a}/to_out_0/kernel"].pair is not None


def test_layers_alike_but_for_the_tokens_they_read_are_priced_apart():
    v, fn = _setup()
    p = tpflax.plan(v, MESH, rules=HAND)
    w = prepare(p, optax.adamw(1e-3), model=fn, sample=X, loss=_loss, backend="cpu")
    assert not w.activations  # a plain function: its contractions are all the trace has
    lv = merge(p.decisions, w.activations, w.opt, w.saved, w.frozen_inputs, w.no_grad)
    for n in ("to_k", "to_v"):  # the context's 4 tokens against the image's 64
        assert lv.rep_of[f"params/attn2/{n}/kernel"] == f"params/attn2/{n}/kernel"
        assert lv.rep_of[f"params/attn1/{n}/kernel"] == f"params/attn1/{n}/kernel"
    # the queries, both reading the image's tokens, stay one class
    assert lv.rep_of["params/attn2/to_q/kernel"] == "params/attn1/to_q/kernel"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tree", "hand"])
def test_the_estimate_prices_the_cross_attention_at_the_contexts_tokens(how):
    # the estimate against the compiled adamw step; it leaves out only the loss's 4-byte scalar, so 2% is
    # slack for XLA's fusion choices, not for a modelling error: priced at the image's tokens, the
    # cross-attention's key and value gathers put the estimate at 1.10x
    v, fn = _setup()
    p = tpflax.plan(v, MESH, **({"batch": X} if how == "tree" else {"rules": HAND}))
    mesh = tpflax.make_mesh(MESH)
    step = tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=X, loss=_loss)
    dr = tpflax.dry_run(step, p, mesh, compiler_options={"xla_backend_optimization_level": 0})
    est = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=X, loss=_loss, backend="cpu")
    assert abs(est.comm_total / dr.comm_total - 1) < 0.02, (est.comm_total, dr.comm_total)
