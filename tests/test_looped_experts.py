"""Experts run by a Python loop over a stacked kernel (``w[i]`` for each expert i), as Tunix's Qwen3 MoE runs them off
TPU: each expert's slices make a column -> row pair of their own, which sums its partial outputs, its input gradients
and gathers the split stream apart from the others'.

Measured on Tunix's Qwen3 MoE (8 experts, ``fsdp=2,tp=4``, ``benchmarks/results/probe_tunix.md``): a row sum, a stream
gather and an output-gradient gather per expert and layer, where the estimate had priced one per layer (0.666 of the
compiled collectives; the column input gradients were already summed once per slice). Under a stream split on its
features (Tunix splits its norm scales over ``tp``), experts reading one input between them (weighted after their
matmuls, as here) gather it once, where Tunix's, each reading its own slice of the dispatched buffer, gather it once
each; and with a hidden narrower than the stream, XLA:CPU computes each slice's weight gradients split like the stream:
it gathers the hidden instead and moves each slice's gradient into its kernel's split with an all-to-all (0.885 ->
0.990 on that probe row).
"""

from __future__ import annotations

import collections
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import FAST_XLA, newer_xla
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}
E, D, F, B, T, VOCAB = 4, 64, 128, 8, 16, 256


class LoopMoE(nn.Module):
    """A gated expert MLP over a ``(E, D, F)``/``(E, F, D)`` stack, each expert computed on every token and weighted
    by a softmax router (Tunix's dense fallback, without the top-k)."""

    hidden: int = F

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        gate, up = (self.param(n, init, (E, D, self.hidden)) for n in ("gate", "up"))
        down = self.param("down", init, (E, self.hidden, D))
        probs = jax.nn.softmax(nn.Dense(E, use_bias=False, name="router")(x))
        out = jnp.zeros_like(x)
        for i in range(E):
            h = nn.silu(x @ gate[i]) * (x @ up[i])
            out = out + probs[..., i:i + 1] * (h @ down[i])
        return out


class Model(nn.Module):
    hidden: int = F

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="embed")(ids)
        for i in range(2):
            x = x + LoopMoE(self.hidden, name=f"moe{i}")(nn.RMSNorm(name=f"norm{i}")(x))
        return nn.Dense(VOCAB, use_bias=False, name="head")(nn.RMSNorm(name="final")(x))


def _loss(logits, ids):
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))


# each expert Megatron-split over model (its hidden F), the rest replicated
RULES = [(r"moe\d/(gate|up)$", P(None, None, "model")), (r"moe\d/down$", P(None, "model", None)),
         (r".*", "replicate")]


def _measure(m, rules):
    """(CPU estimate, dry run) of ``m``'s adamw step under ``rules``."""
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), MESH, rules=rules)
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(ids,), loss=_loss, backend="cpu")
    mesh = tpflax.make_mesh(MESH)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=_loss), p, mesh,
                        compiler_options=FAST_XLA)
    return e, dr


@pytest.fixture(scope="module")
def measured(devices):
    return _measure(Model(), RULES)


def test_each_looped_expert_sums_its_own_partial_outputs_and_input_gradients(measured):
    # per layer and expert: down's partial outputs summed forward, gate's and up's input gradients backward (on
    # XLA:CPU one sum each): 3 x 4 experts x 2 layers sums of a (4, 16, 64) float32 activation over model=4
    e, dr = measured
    act = (B // 2, T, D)
    compiled = collections.Counter()
    for c in dr.collectives:
        if c.kind == "all-reduce" and c.shapes and all(s == act for s in c.shapes):
            compiled[c.kind] += c.ring_bytes * c.count
    estimated = collections.Counter()
    for i in e.items:
        if i.kind == "all-reduce" and i.why.startswith(("row", "column")) and "sum partial" in i.why:
            estimated[i.kind] += i.ring_bytes * i.count
    sums = 3 * E * 2 * 2 * 3 / 4 * (B // 2) * T * D * 4  # all-reduce ring bytes: 2 (n - 1) / n of the buffer
    assert compiled["all-reduce"] == estimated["all-reduce"] == sums, (compiled, estimated)


def test_the_looped_experts_estimate_matches_the_compiled_collectives(measured):
    e, dr = measured
    assert abs(e.comm_total / dr.comm_total - 1) < 0.02, (e.comm_total, dr.comm_total)  # measured 1.000


# the stream split on its features, as Tunix lays it out: its norm scales over model, the table on its features
SPLIT_STREAM = [(r"scale$", P("model")), (r"embed/embedding$", P(None, "model")), (r"head/kernel$", P("model", None)),
                (r"router/kernel$", P("model", None))]


# a newer XLA's SPMD partitioner cannot move the narrower experts' weight-gradient slices by all-to-all ("Involuntary
# full rematerialization" of the broadcast_in_dim in the transpose): it all-gathers them whole instead
NO_ALL_TO_ALL = newer_xla("no all-to-all: 24 all-gathers of (1, 32, 64) and (1, 64, 32) weight slices (147,456 bytes) "
                          "where 0.10's XLA moves them by 24 all-to-alls (36,864 bytes)")


@pytest.mark.parametrize("hidden", [pytest.param(D // 2, marks=NO_ALL_TO_ALL), 2 * D], ids=["narrower", "wider"])
def test_looped_experts_under_a_split_stream_gather_it_once_and_each_output_gradient_apart(devices, hidden):
    # per layer: the experts' one input (the split stream) gathered once, forward; each expert's output gradient
    # gathered apart, backward. Narrower than the stream: per expert and layer, gate's and up's output gradients and
    # down's input gathered (hidden-wide) and the three slices' weight gradients moved by all-to-all; wider, none
    # of it (XLA keeps the stream it gathered forward)
    e, dr = _measure(Model(hidden), SPLIT_STREAM + RULES)
    stream, narrow = (B // 2, T, D), (B // 2, T, hidden)
    compiled = collections.Counter()
    for c in dr.collectives:
        if c.kind == "all-to-all" or c.kind == "all-gather" and c.shapes in ((narrow,), (stream,)):
            compiled[(c.kind, c.shapes[0][-1] if c.kind == "all-gather" else 0)] += c.ring_bytes * c.count
    estimated = collections.Counter()
    for i in e.items:
        if i.why.startswith("looped expert") or "moe" in i.why and "gather the " in i.why:
            width = D if i.size == math.prod(stream) * 4 else hidden
            estimated[(i.kind, width if i.kind == "all-gather" else 0)] += i.ring_bytes * i.count
    assert compiled[("all-gather", D)] > 0 and compiled == estimated, (compiled, estimated)
    assert (("all-to-all", 0) in compiled) == (hidden < D)
