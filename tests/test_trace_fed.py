"""Which lookups the trace reads as positional (``Use.fixed``: indices computed from no model input;
``Dataflow.positional``: those whose indices carry no batch, whose looked-up rows XLA sums over the
batch): token ids stay model inputs through a scan's sliced inputs, its carry and a while loop's carry."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from tpflax._src.trace.dataflow import dataflow

V, D, T = 64, 16, 5


class Lookups(nn.Module):
    """A table looked up inside a loop body, its indices reaching the body in one of several ways."""

    how: str

    @nn.compact
    def __call__(self, ids):  # (b, T) int32
        table = self.param("table", nn.initializers.normal(0.02), (V, D))
        h0 = jnp.zeros((ids.shape[0], D))
        if self.how == "xs":  # a recurrence over time: each step's token ids are the scan's slice
            _, ys = jax.lax.scan(lambda h, tok: (jnp.tanh(h + table[tok]),) * 2, h0, ids.T)
        elif self.how == "carry":  # teacher forcing: a step reads the token the step before carried in
            def step(c, tok):
                h, prev = c
                h = jnp.tanh(h + table[prev])
                return (h, tok), h
            bos = jnp.zeros((ids.shape[0],), jnp.int32)
            _, ys = jax.lax.scan(step, (h0, bos), ids.T)
        elif self.how == "while":  # the ids a while loop carries
            def body(c):
                i, h, tok = c
                return i + 1, jnp.tanh(h + table[tok[:, 0]]), jnp.roll(tok, -1, axis=1)
            ys = jax.lax.while_loop(lambda c: c[0] < T, body, (0, h0, ids))[1]
        else:  # "positions": arange positions inside the body, whatever the batch (GPT-2's wpe)
            steps = jnp.broadcast_to(jnp.arange(T)[:, None], (T, ids.shape[0]))
            _, ys = jax.lax.scan(lambda h, t: (jnp.tanh(h + table[t]),) * 2, h0, steps)
        return nn.Dense(8, name="out")(ys)


@pytest.mark.parametrize(("how", "fixed"), [("xs", False), ("carry", False), ("while", False), ("positions", True)])
def test_lookups_by_ids_in_a_loop_body_are_not_positional(how, fixed):
    m, ids = Lookups(how), jax.ShapeDtypeStruct((4, T), jnp.int32)
    flow = dataflow(m, (ids,), jax.eval_shape(m.init, jax.random.key(0), ids))
    gathers = [u for u in flow.uses if u.path == "params/table" and u.op == "gather"]
    assert gathers and all(u.fixed == fixed for u in gathers)


class Positions(nn.Module):
    """A position table looked up at ``arange`` positions, broadcast to the batch before the lookup (HF's
    ``position_ids``) or after it (``[None, :]``), and a T5-style bias table at (query, key) buckets."""

    broadcast: bool

    @nn.compact
    def __call__(self, ids):
        t = ids.shape[1]
        pos = jnp.broadcast_to(jnp.arange(t), ids.shape) if self.broadcast else jnp.arange(t)[None, :]
        buckets = jnp.clip(jnp.arange(t)[None, :] - jnp.arange(t)[:, None] + 4, 0, 7)
        x = nn.Embed(V, D, name="tok")(ids) + nn.Embed(T, D, name="pos")(pos)
        return nn.Dense(8, name="out")(x) + nn.Embed(8, 8, name="bias")(buckets).sum(0)


@pytest.mark.parametrize("examples", [4, 1])
@pytest.mark.parametrize("broadcast", [False, True], ids=["after", "before"])
def test_positional_lookups_are_the_ones_whose_indices_carry_no_batch(broadcast, examples):
    # XLA sums a batch-free lookup's rows over the batch before scattering them into the table (XLA:TPU
    # all-reduces those rows, tpu_aot_notes.md); ids broadcast to the batch first are scattered like
    # token ids. With one example the two cannot be told apart, and count as batch-free.
    m, ids = Positions(broadcast), jax.ShapeDtypeStruct((examples, T), jnp.int32)
    flow = dataflow(m, (ids,), jax.eval_shape(m.init, jax.random.key(0), ids))
    want = {"params/bias/embedding": (T * T, (1,))}
    if not broadcast or examples == 1:
        want["params/pos/embedding"] = (T, (1,))
    assert flow.examples == examples and flow.positional() == want
