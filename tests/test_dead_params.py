"""Parameters no output depends on (a decoder's cross-attention run without an encoder, as
``FlaxBartForCausalLM`` runs BART's decoder): XLA compiles no collective for them, and the estimate
counts none."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA, newer_xla

import tpflax
from tpflax._src.trace.dataflow import dataflow

D, H, V = 32, 4, 64
MESH = {"data": 2, "model": 4}


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):
        q, k, v = (nn.DenseGeneral((H, D // H), name=n)(y) for n, y in (("q", x), ("k", ctx), ("v", ctx)))
        a = nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(D // H))
        return nn.DenseGeneral(D, axis=(-2, -1), name="o")(jnp.einsum("bhqk,bkhd->bqhd", a, v))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, enc=None):
        y = nn.LayerNorm(name="ln1")(x)
        x = x + Attn(name="self_attn")(y, y)
        if enc is not None:  # BART's decoder layer: cross-attention only with encoder states
            x = x + Attn(name="cross_attn")(nn.LayerNorm(name="ln2")(x), enc)
        h = nn.Dense(4 * D, name="fc1")(nn.LayerNorm(name="ln3")(x))
        return x + nn.Dense(D, name="fc2")(nn.gelu(h))


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, ids, enc=None):
        emb = nn.Embed(V, D, name="embed")
        x = emb(ids)
        for i in range(2):
            x = Block(name=f"layers_{i}")(x, enc)
        return emb.attend(nn.LayerNorm(name="ln_f")(x))


def _setup():
    m = Decoder()
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    enc = jax.ShapeDtypeStruct((8, 16, D), jnp.float32)
    variables = jax.eval_shape(m.init, jax.random.key(0), ids, enc)  # cross-attention initialised, as BART's

    def fn(v, ids):
        return m.apply(v, ids)  # run as a causal LM alone: no encoder

    return variables, fn, (ids,)


def _loss(logits, ids):  # every position's logits (a next-token slice adds a small sum the estimate prices apart)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()


def test_the_trace_finds_the_parameters_no_output_depends_on():
    variables, fn, sample = _setup()
    flow = dataflow(fn, sample, variables)
    # the cross-attention and the norm before it, in both layers; nothing else
    want = {f"params/layers_{i}/{leaf}" for i in range(2) for leaf in
            [f"cross_attn/{k}/{w}" for k in "qkvo" for w in ("kernel", "bias")] + ["ln2/scale", "ln2/bias"]}
    assert flow.dead == want


@newer_xla("two (4, 16) float32 all-reduces over model more, of a LayerNorm's row statistics (768 bytes): compiled\n"
           "204,868 bytes, the estimate 204,096 as on 0.10 (204,100 compiled there)")
def test_the_estimate_counts_no_collective_for_unused_parameters():
    variables, fn, sample = _setup()
    p = tpflax.plan(variables, MESH, model=fn, sample=sample)
    assert [w for w in p.warnings if "no output of the traced forward pass depends on" in w] == [
        "20 leaves no output of the traced forward pass depends on (params/layers_0/cross_attn/k/bias, "
        "params/layers_0/cross_attn/k/kernel, params/layers_0/cross_attn/o/bias, ...): their gradients are zeros "
        "and they move no data; planned from the tree alone. Drop them from the tree, or leave them out of "
        "training (trainable=)"]
    # the planned layout of the unused cross-attention splits it like the used one: memory only
    assert p.decisions["params/layers_0/cross_attn/q/kernel"].spec == p.decisions["params/layers_0/self_attn/q/kernel"].spec
    mesh, tx = tpflax.make_mesh(MESH), optax.adamw(1e-3)
    dr = tpflax.dry_run(tpflax.make_train_step(fn, p, mesh, tx, sample=sample, loss=_loss), p, mesh,
                        compiler_options=COMM_XLA)
    e = tpflax.estimate(p, tx, model=fn, sample=sample, loss=_loss, backend="cpu")
    # counted before: the cross-attention's gradient sums over data and its pair's sums over model (+35% on
    # FlaxBartForCausalLM); now the collectives XLA compiles, the loss scalar aside
    assert e.comm_total == pytest.approx(dr.comm_total, abs=4), (e.comm, dr.comm_total)
    # the memory still holds the unused parameters and their optimizer state
    both = tpflax.estimate(p, tx, model=m_both, sample=sample, loss=_loss, backend="cpu")
    assert e.per_device.params == both.per_device.params and e.per_device.opt_state == both.per_device.opt_state
    assert e.comm_total < both.comm_total


def m_both(v, ids):
    return Decoder().apply(v, ids, jnp.zeros((ids.shape[0], ids.shape[1], D)))
