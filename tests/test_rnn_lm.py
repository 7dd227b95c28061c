"""An LSTM language model's output head: an untied Dense whose bias is its own kernel's.

A word-level LSTM LM (PyTorch's word_language_model, written with Flax's ``nn.RNN``) embeds the
tokens at 64, runs two LSTM layers 128 wide and projects back onto the vocabulary with a Dense
named ``decoder``, bias and all. The tree planner read no output head (its input width is the
cells' hidden width, not the embedding's; its name is no head's), so the token table was priced
as tied to the logits and ``decoder/bias``, as long as the vocab-split table, was taken for the
tied logits' bias and split over ``model`` beside a replicated kernel (8% more bytes, 4% more
collectives than the hand layout on data=2 x model=4). The head is vocab-parallel (its output
dim over ``model``) and its bias follows it, in the tree plan and the traced one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import FAST_XLA
from jax.sharding import PartitionSpec as P

import tpflax

B, S, V, D, HID = 8, 16, 512, 64, 128
IDS = (jax.ShapeDtypeStruct((B, S), jnp.int32),)
MESH = {"data": 2, "model": 4}
HAND = [(r"encoder/embedding$", P("model", None)), (r"decoder/kernel$", P(None, "model")),
        (r"decoder/bias$", P("model")), (r".*", P())]


class LstmLM(nn.Module):
    head: str = "decoder"

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="encoder")(ids)
        for i in range(2):
            x = nn.RNN(nn.OptimizedLSTMCell(HID), name=f"lstm_{i}")(x)
        return nn.Dense(V, name=self.head)(x)


class DeepHead(nn.Module):
    """No RNN: a Dense 128 wide, then a projection onto the vocabulary that no rule reads as a head."""

    @nn.compact
    def __call__(self, ids):
        x = nn.relu(nn.Dense(HID, name="hidden")(nn.Embed(V, D, name="encoder")(ids)))
        return nn.Dense(V, name="decoder")(x)


def _params(m):
    return jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((B, S), jnp.int32))["params"]


def _fn(m):
    return lambda p, ids: m.apply({"params": p}, ids)


def _loss(logits, ids):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])


@pytest.mark.parametrize("traced", [False, True], ids=["tree", "model"])
def test_head_is_vocab_parallel_and_keeps_its_bias(traced):
    m = LstmLM()
    kw = {"model": _fn(m), "sample": IDS} if traced else {}
    plan = tpflax.plan(_params(m), MESH, batch=IDS, **kw)  # priced at the batch the step runs
    d = plan.decisions
    assert d["decoder/kernel"].spec == P(None, "model")
    assert d["decoder/bias"].spec == P("model")
    assert d["encoder/embedding"].spec == P("model", None)
    assert "tied" not in d["decoder/bias"].reason and "decoder/kernel" in d["decoder/bias"].reason
    assert "tied" not in d["encoder/embedding"].reason


def test_head_by_name_too():
    plan = tpflax.plan(_params(LstmLM(head="head")), MESH, batch=IDS)
    assert (plan.decisions["head/kernel"].spec, plan.decisions["head/bias"].spec) == (P(None, "model"), P("model"))


def test_bias_of_an_unread_head_follows_its_kernel():
    # the projection is no head to the tree rules (left whole), and its bias stays with it: a bias
    # beside its own kernel is never the tied logits' bias, however many rows the token table has
    plan = tpflax.plan(_params(DeepHead()), MESH, batch=IDS)
    k, b = plan.decisions["decoder/kernel"].spec, plan.decisions["decoder/bias"].spec
    assert (k[-1],) == tuple(b), (k, b)
    assert "tied" not in plan.decisions["decoder/bias"].reason


def _numbers(m, plan, seen: dict):
    """The compiled step's bytes held, collective bytes and FLOPs; compiled once per program: a plan whose step
    lowers to the same StableHLO text as one already compiled (in ``seen``) compiles to the same numbers."""
    mesh = tpflax.make_mesh(MESH)
    step = tpflax.make_train_step(_fn(m), plan, mesh, optax.adamw(1e-3), sample=IDS, loss=_loss)
    text = jax.jit(step.fn, in_shardings=step.in_shardings, out_shardings=step.out_shardings,
                   donate_argnums=step.donate_argnums).lower(*step.args).as_text()
    if text not in seen:
        dr = tpflax.dry_run(step, plan, mesh, compiler_options=FAST_XLA)
        mem = dr.memory
        held = mem["argument"] + mem["temp"] + mem["output"] - (mem["alias"] or 0)
        seen[text] = held, dr.comm_total, dr.flops
    return seen[text]


def test_compiled_step_no_worse_than_hand(devices):
    m = LstmLM()
    params = _params(m)
    # today the tree plan and the traced one are the hand layout, leaf for leaf: their steps lower to the same
    # program, compiled once (~2 compiles saved); a plan that differs lowers to another program, compiled apart
    seen: dict = {}
    hand = _numbers(m, tpflax.plan(params, MESH, rules=HAND), seen)
    for kw in ({}, {"model": _fn(m), "sample": IDS}):
        got = _numbers(m, tpflax.plan(params, MESH, batch=IDS, **kw), seen)
        assert all(g <= h for g, h in zip(got, hand, strict=True)), (kw.keys(), got, hand)
