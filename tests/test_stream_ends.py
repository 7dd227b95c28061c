"""Whole kernels at the ends of a residual stream a model's own constraint splits on its features.

MaxText constrains its residual stream over ``tensor`` (``activation_embed``). Past a norm the stream carries
no kernel's tag, so the trace's meets do not reach the embedding that writes it or the output head that reads
the final norm. Kept whole (a replicated or a pure-FSDP plan), both meet the split anyway: the head gathers its
input, and the gradients of both come out split on the features, so XLA runs their updates split and gathers
the parameters and their moments back (the gradient's batch sum runs on the shard). The estimate priced none
of it: 0.50 of the compiled collectives here, 0.51 on MaxText's llama3 replicated
(``benchmarks/results/probe_maxtext.md``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _util import COMM_XLA
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax

V, D, F, B, T = 1000, 64, 256, 8, 16
MESH = {"data": 2, "model": 4}


def make(mesh, head_dtype=None):
    def stream(x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None, "model")))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(F, use_bias=False, name="up")(nn.RMSNorm()(x)))
            return stream(x + nn.Dense(D, use_bias=False, name="down")(h))

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = stream(nn.Embed(V, D, name="embed")(ids))
            for i in range(2):
                x = Block(name=f"b{i}")(x)
            return nn.Dense(V, use_bias=False, name="head", dtype=head_dtype)(nn.RMSNorm(name="final")(x))

    return LM()


def loss(logits, ids):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1).mean()


def built(head_dtype=None):
    """(mesh, forward, abstract params, sample ids) of the model on ``MESH``."""
    mesh = tpflax.make_mesh(MESH)
    m, ids = make(mesh, head_dtype), jax.ShapeDtypeStruct((B, T), jnp.int32)
    return mesh, (lambda v, ids: m.apply(v, ids)), jax.eval_shape(m.init, jax.random.key(0), ids), ids


def test_whole_embedding_and_head_meet_the_constrained_stream(devices):
    mesh, fn, params, ids = built()
    p = tpflax.plan(params, MESH, model=fn, sample=(ids,), batch=(ids,), rules=[(r".*", "replicate")])
    e = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=(ids,), loss=loss, backend="cpu")
    why = {(i.source, i.why.split(":")[0]) for i in e.items}
    for path in ("params/embed/embedding", "params/head/kernel"):
        assert (path, "a leaf whole on the tensor axis whose gradient a tensor split it meets splits "
                      "(a kernel's or a constraint's)") in why
    assert ("params/head/kernel", "a whole kernel contracting split features") in why
    dr = tpflax.dry_run(tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, mesh,
                        compiler_options=COMM_XLA)
    # measured 0.998: the norms' row statistics (a few hundred bytes) are not priced; 0.498 before
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05


def test_a_whole_head_cast_to_bfloat16_sums_its_partial_logits(devices):
    # Dense(dtype=bfloat16) casts its float32 kernel before the matmul. XLA lays the cast copy out as the matmul
    # prefers, split like the features it contracts (the parameter itself stays whole), and all-reduces the
    # partial logits, f32[4,16,1000] on XLA:CPU, where the float32 head above gathers its 64-wide input
    # (measured, XLA:CPU and XLA:TPU v5e:2x4; MaxText's llama3 replicated, f32[4,64,8016])
    mesh, fn, params, ids = built(jnp.bfloat16)
    p = tpflax.plan(params, MESH, model=fn, sample=(ids,), batch=(ids,), rules=[(r".*", "replicate")])
    e = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=(ids,), loss=loss, backend="cpu")
    head = {i.why for i in e.items if i.source == "params/head/kernel" and "contracting" in i.why}
    assert head == {"a whole kernel contracting split features: sum its partial outputs (forward)"}
    dr = tpflax.dry_run(tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, mesh,
                        compiler_options=COMM_XLA)
    logits = [c for c in dr.collectives if c.kind == "all-reduce" and c.shapes[0] == (B // 2, T, V)]
    assert len(logits) == 1 and "head" in logits[0].op_name
    # measured 0.999 (the norms' row statistics unpriced); 0.842 with the input's gather priced
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05
